"""Public functions: one generic entry point, thin 1-D/2-D/3-D wrappers, dense attention and
merging of partial attentions. Tensors are heads-last: ``[batch, *spatial, heads, head_dim]``.
"""

from __future__ import annotations

import os

import torch

from . import backends, reference, triton_backend, tuned
from .args import normalize, normalize_dense, per_dim
from .backends import Options, select

__all__ = ["neighborhood_attention", "na1d", "na2d", "na3d", "attention", "merge_attentions"]


def _tile(name, value, ndim):
    return None if value is None else per_dim(name, value, ndim)


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    q_tile_shape=None,
    kv_tile_shape=None,
    backward_q_tile_shape=None,
    backward_kv_tile_shape=None,
    deterministic: bool = False,
    fp32_precision: str = "ieee",
    *,
    _ndim: int | None = None,
):
    """Generalized Neighborhood Attention over 1, 2 or 3 spatial dimensions.

    Args:
        query: ``[batch, *spatial, heads, head_dim]``.
        key, value: ``[batch, *spatial, heads_kv, head_dim]``; ``heads % heads_kv == 0``
            (GQA/MQA share each key/value head among ``heads // heads_kv`` query heads).
        kernel_size, stride, dilation, is_causal: an int (bool) for every dimension or a
            tuple with one per dimension. ``1 <= stride <= kernel_size`` and
            ``kernel_size * dilation <= size`` in every dimension.
        scale: multiplies ``q @ k``; default ``head_dim ** -0.5``.
        additional_keys, additional_values: ``[batch, n_extra, heads_kv, head_dim]``, context
            every query also attends to (e.g. text tokens), in the same softmax.
        return_lse: also return the log-sum-exp of the scaled scores, ``[batch, *spatial,
            heads]``, float32 (natural log), for :func:`merge_attentions`.
        backend: None picks the fastest that can run the call; ``"reference"`` forces the
            pure-PyTorch oracle. See ``gna.backends.available()``.
        q_tile_shape, kv_tile_shape, backward_*: kernel tile shapes (kernel backends only).
        deterministic: run-to-run identical gradients. The reference backend always is; the
            Triton backend's backward is too, except where the fused Gluon kernel runs
            (on Hopper, fp16/bf16, where the Gluon dK/dV kernel qualifies), whose dQ adds the KV
            tiles' shares through the copy engine's reductions in whatever order they
            finish: ``True`` takes the separate deterministic dQ kernel there (slower).
        fp32_precision: ``"ieee"`` or ``"tf32"`` for float32 inputs on kernel backends.

    Returns:
        ``out`` with query's shape and dtype, or ``(out, lse)`` if ``return_lse``.

    Example::

        q = k = v = torch.randn(1, 32, 32, 4, 64)
        out = gna.na2d(q, k, v, kernel_size=7, stride=2, dilation=2)
    """
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    if torch.compiler.is_compiling() and triton_backend.compiles(query, backend):
        # torch.compile: skip the host-side planning (Dynamo would trace it); the op does it,
        # and its fake implementation validates the call.
        out, lse = triton_backend.compiled_call(
            query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
            additional_values, (q_tile_shape, kv_tile_shape, backward_q_tile_shape,
                                backward_kv_tile_shape), fp32_precision == "tf32",
            deterministic)
        return (out, lse) if return_lse else out
    args = (_ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
            additional_keys, additional_values, backend, q_tile_shape, kv_tile_shape,
            backward_q_tile_shape, backward_kv_tile_shape, deterministic, fp32_precision)
    try:
        call_key = _call_key(*args)
        call = _CALLS.get(call_key)
    except (TypeError, AttributeError):  # unhashable or odd arguments: validate them in full
        call_key = call = None
    if call is None:
        call = _prepare(*args)
        if call_key is not None:
            if len(_CALLS) >= _MAX_CALLS:
                _CALLS.clear()
            _CALLS[call_key] = call
    if call is _DENSE:
        # Every query sees every key: dense attention is the same function, and faster.
        return attention(query, key, value, scale, additional_keys, additional_values,
                         return_lse)
    out, lse = call(query, key, value, additional_keys, additional_values)
    return (out, lse) if return_lse else out


# Calls already validated and planned, by everything their validation and plan depend on:
# host time per call is what bounds small problems (a 32k-token 1-D layer runs ~0.09 ms on
# an H100, about what validating, planning and launching cost on a slow host).
_CALLS: dict = {}
_MAX_CALLS = 1024
_DENSE = object()  # the call is dense attention


def _tensor_key(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _value_key(x):
    """A parameter as a key that tells 1 from True and 2 from 2.0 (validation does)."""
    if type(x) in (tuple, list):
        return (type(x), tuple(x), tuple(map(type, x)))
    return (type(x), x)


def _call_key(ndim, q, k, v, kernel_size, stride, dilation, is_causal, scale, extra_k,
              extra_v, backend, q_tile, kv_tile, bwd_q_tile, bwd_kv_tile, deterministic,
              fp32_precision):
    return (ndim, _tensor_key(q), _tensor_key(k), _tensor_key(v), _tensor_key(extra_k),
            _tensor_key(extra_v), _value_key(kernel_size), _value_key(stride),
            _value_key(dilation), _value_key(is_causal), _value_key(scale), backend,
            _value_key(q_tile), _value_key(kv_tile), _value_key(bwd_q_tile),
            _value_key(bwd_kv_tile), bool(deterministic), fp32_precision, tuned.state(),
            backends.state(), os.environ.get("TRITON_INTERPRET"))


def _prepare(ndim, q, k, v, kernel_size, stride, dilation, is_causal, scale, extra_k, extra_v,
             backend, q_tile, kv_tile, bwd_q_tile, bwd_kv_tile, deterministic, fp32_precision):
    """Validate a call and plan it: :data:`_DENSE`, or the chosen backend's callable."""
    problem = normalize(ndim, q, k, v, kernel_size, stride, dilation, is_causal, scale,
                        extra_k, extra_v)
    ndim = problem.ndim
    options = Options(
        backend=backend,
        q_tile_shape=_tile("q_tile_shape", q_tile, ndim),
        kv_tile_shape=_tile("kv_tile_shape", kv_tile, ndim),
        backward_q_tile_shape=_tile("backward_q_tile_shape", bwd_q_tile, ndim),
        backward_kv_tile_shape=_tile("backward_kv_tile_shape", bwd_kv_tile, ndim),
        deterministic=bool(deterministic),
        fp32_precision=fp32_precision,
    )
    if problem.geometry.is_dense and backend is None:
        return _DENSE
    return select(problem, options).prepared(problem, options)


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, **options):
    """1-D GNA: ``query [batch, length, heads, head_dim]``. See :func:`neighborhood_attention`."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  **options, _ndim=1)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, **options):
    """2-D GNA: ``query [batch, height, width, heads, head_dim]``. See
    :func:`neighborhood_attention`."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  **options, _ndim=2)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, **options):
    """3-D GNA: ``query [batch, depth, height, width, heads, head_dim]``. See
    :func:`neighborhood_attention`."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  **options, _ndim=3)


def attention(query, key, value, scale=None, additional_keys=None, additional_values=None,
              return_lse=False):
    """Dense softmax attention in the heads-last layout.

    ``query [batch, *spatial_q, heads, head_dim]``, ``key/value [batch, *spatial_kv,
    heads_kv, head_dim]`` (spatial dimensions are flattened; query and key sizes may differ).
    Returns ``out`` (query's shape) or ``(out, lse)``.
    """
    scale = normalize_dense(query, key, value, scale, additional_keys, additional_values)
    batch, heads, head_dim = query.shape[0], query.shape[-2], query.shape[-1]
    q = query.reshape(batch, -1, heads, head_dim)
    k = key.reshape(batch, -1, key.shape[-2], head_dim)
    v = value.reshape(batch, -1, key.shape[-2], head_dim)
    if query.is_cuda and not return_lse:
        if additional_keys is not None:
            k = torch.cat([k, additional_keys], dim=1)
            v = torch.cat([v, additional_values], dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
            enable_gqa=heads != k.shape[2],
        ).transpose(1, 2)
        return out.reshape(query.shape)
    out, lse = reference.dense_attention(q, k, v, scale, additional_keys, additional_values)
    out = out.reshape(query.shape)
    return (out, lse.reshape(query.shape[:-1])) if return_lse else out


def merge_attentions(outputs, lses):
    """Merge attention outputs over disjoint key sets into the output over their union.

    ``outputs[i]`` ``[batch, *spatial, heads, head_dim]`` and ``lses[i]`` ``[batch, *spatial,
    heads]`` as returned with ``return_lse=True``. Returns ``(out, lse)``; differentiable.
    """
    outputs, lses = list(outputs), list(lses)
    if len(outputs) < 1 or len(outputs) != len(lses):
        raise ValueError(
            f"merge_attentions needs one lse per output, got {len(outputs)} outputs and "
            f"{len(lses)} lses"
        )
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape != outputs[0].shape or l.shape != o.shape[:-1]:
            raise ValueError(
                f"output {i} {tuple(o.shape)} / lse {tuple(l.shape)} do not match output 0 "
                f"{tuple(outputs[0].shape)} and its lse shape {tuple(outputs[0].shape[:-1])}"
            )
    cdt = torch.float64 if outputs[0].dtype == torch.float64 else torch.float32
    lse_all = torch.stack([l.to(cdt) for l in lses])
    lse = torch.logsumexp(lse_all, dim=0)
    weights = torch.exp(lse_all - lse)
    out = sum(w[..., None] * o.to(cdt) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), lse
