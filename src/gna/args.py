"""Argument normalization and validation, done once per call.

``normalize`` turns the user's arguments into a :class:`Problem`: per-dimension tuples (a
:class:`~gna.geometry.Geometry`) plus the tensor facts the backends need. Every check states
the rule, the offending values and how to fix the call. The CLI tools call the same
functions, so the messages are the same everywhere.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import torch

from .geometry import Geometry

__all__ = ["Problem", "normalize", "normalize_dense", "normalize_geometry", "normalize_scale",
           "per_dim",
           "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def per_dim(name: str, value, ndim: int, kind=int) -> tuple:
    """Broadcast a scalar to ``ndim`` dimensions, or check a sequence has ``ndim`` entries."""
    if type(value) is (bool if kind is bool else int):  # fast path: one plain scalar
        return (value,) * ndim
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python {kind.__name__} or a tuple of them, got a tensor")
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(
            f"{name} needs one value per spatial dimension ({ndim}), or a single value to "
            f"broadcast; got {name}={value!r}"
        )
    for v in values:
        ok = isinstance(v, bool) if kind is bool else (type(v) is int or _is_int(v))
        if not ok:
            raise TypeError(f"{name} must hold {kind.__name__}s, got {name}={value!r}")
    return tuple(kind(v) for v in values)


def normalize_geometry(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> Geometry:
    """Validate GNA parameters against a spatial ``shape`` and return the :class:`Geometry`."""
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    return _checked_geometry(shape, per_dim("kernel_size", kernel_size, ndim),
                             per_dim("stride", stride, ndim), per_dim("dilation", dilation, ndim),
                             per_dim("is_causal", is_causal, ndim, kind=bool))


@functools.lru_cache(maxsize=1024)
def _checked_geometry(shape, kernel_size, stride, dilation, causal) -> Geometry:
    # Cached: arguments are already normalized tuples of exact ints / bools.
    if any(k < 1 for k in kernel_size):
        raise ValueError(f"kernel_size must be >= 1 in every dimension, got {kernel_size=}")
    if any(d < 1 for d in dilation):
        raise ValueError(f"dilation must be >= 1 in every dimension, got {dilation=}")
    if any(s < 1 or s > k for s, k in zip(stride, kernel_size)):
        raise ValueError(
            f"stride must satisfy 1 <= stride <= kernel_size in every dimension, got "
            f"{stride=} with {kernel_size=}; stride == kernel_size is blocked attention"
        )
    if any(k * d > n for k, d, n in zip(kernel_size, dilation, shape)):
        raise ValueError(
            f"kernel_size * dilation must not exceed the input size in any dimension, got "
            f"{kernel_size=}, {dilation=} for input size {shape}; use a smaller window or "
            f"dilation"
        )
    return Geometry(shape, kernel_size, stride, dilation, causal)


@dataclass(frozen=True)
class Problem:
    """One validated call: geometry plus the facts about the tensors that backends need."""

    geometry: Geometry
    batch: int
    heads: int
    heads_kv: int
    head_dim: int
    scale: float
    num_extra: int  # additional keys/values every query attends to (0 if none)
    dtype: torch.dtype
    device: torch.device

    @property
    def ndim(self) -> int:
        return self.geometry.ndim


def _describe(t: torch.Tensor) -> str:
    return f"shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device}"


def _check_tensors(names_tensors: dict, rank: int | None, what: str) -> None:
    """Types, ranks (None: any rank >= 3), dtypes, devices, emptiness."""
    for name, t in names_tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in names_tensors.items():
        if rank is None and t.dim() < 3:
            raise ValueError(f"{what} expects {name} as [batch, *spatial, heads, head_dim], got "
                             f"{_describe(t)}")
        if rank is not None and t.dim() != rank:
            layout = "[batch, n, heads, head_dim]" if rank == 4 else "[batch, *spatial, heads, head_dim]"
            raise ValueError(f"{what} expects {name} of rank {rank} {layout}, got {_describe(t)}")
    first_name, first = next(iter(names_tensors.items()))
    for name, t in names_tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} has unsupported dtype {t.dtype}; use one of "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have {first_name}'s dtype {first.dtype}, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(
                f"{name} must be on {first_name}'s device {first.device}, got {t.device}"
            )
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: {_describe(t)}")


def _check_heads(query, key, value) -> tuple[int, int]:
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape, got key {tuple(key.shape)} and value "
            f"{tuple(value.shape)}"
        )
    if key.shape[0] != query.shape[0] or key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"key/value must match query in batch and head_dim, got query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}"
        )
    heads, heads_kv = query.shape[-2], key.shape[-2]
    if heads % heads_kv != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA/MQA), got {heads=} and "
            f"{heads_kv=}"
        )
    return heads, heads_kv


def _check_extra(query, heads_kv, additional_keys, additional_values) -> int:
    """Validate additional keys/values; return how many there are (0 for none)."""
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is None:
        return 0
    extra = {"additional_keys": additional_keys, "additional_values": additional_values}
    _check_tensors(extra, 4, "additional context")
    for name, t in extra.items():
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have query's dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {t.device}")
        if t.shape[0] != query.shape[0] or tuple(t.shape[2:]) != (heads_kv, query.shape[-1]):
            raise ValueError(
                f"{name} must be [batch, n_extra, heads_kv, head_dim] = "
                f"[{query.shape[0]}, n, {heads_kv}, {query.shape[-1]}], got {_describe(t)}"
            )
    if additional_keys.shape != additional_values.shape:
        raise ValueError(
            f"additional_keys and additional_values must have the same shape, got "
            f"{tuple(additional_keys.shape)} and {tuple(additional_values.shape)}"
        )
    return additional_keys.shape[1]


def normalize_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` by default, else a real number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    return float(scale)


def normalize(
    ndim: int | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale=None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> Problem:
    """Check a neighborhood-attention call and return its :class:`Problem`.

    ``ndim`` is the number of spatial dimensions the caller expects (1, 2 or 3), or None to
    take it from ``query`` (rank minus 3).
    """
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if ndim is None:
        ndim = query.dim() - 3
        if ndim not in (1, 2, 3):
            raise ValueError(
                f"GNA supports 1, 2 or 3 spatial dimensions; query must be "
                f"[batch, *spatial, heads, head_dim] of rank 4, 5 or 6, got {_describe(query)}"
            )
    _check_tensors({"query": query, "key": key, "value": value}, ndim + 3,
                   f"{ndim}-D neighborhood attention")
    heads, heads_kv = _check_heads(query, key, value)
    if key.shape[1:-2] != query.shape[1:-2]:
        raise ValueError(
            f"key/value must have query's spatial size {tuple(query.shape[1:-2])}, got "
            f"{tuple(key.shape[1:-2])}"
        )
    geometry = normalize_geometry(query.shape[1:-2], kernel_size, stride, dilation, is_causal)
    num_extra = _check_extra(query, heads_kv, additional_keys, additional_values)
    return Problem(
        geometry=geometry,
        batch=query.shape[0],
        heads=heads,
        heads_kv=heads_kv,
        head_dim=query.shape[-1],
        scale=normalize_scale(scale, query.shape[-1]),
        num_extra=num_extra,
        dtype=query.dtype,
        device=query.device,
    )


def normalize_dense(query, key, value, scale=None, additional_keys=None,
                    additional_values=None) -> float:
    """Check a dense-attention call (any spatial rank, flattened); return the scale."""
    _check_tensors({"query": query, "key": key, "value": value}, None, "attention")
    _, heads_kv = _check_heads(query, key, value)
    _check_extra(query, heads_kv, additional_keys, additional_values)
    return normalize_scale(scale, query.shape[-1])
