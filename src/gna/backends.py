"""Backend registry: each backend is ``(name, why_not, run)``; no if/elif chains elsewhere.

``why_not(problem, options)`` returns None when the backend can run the problem, else a short
reason (shown to the user when they forced that backend). ``run(problem, options, q, k, v,
extra_k, extra_v)`` returns ``(out, lse)`` and must be differentiable w.r.t. all tensors.
An optional ``prepare(problem, options)`` returns a callable ``(q, k, v, extra_k, extra_v) ->
(out, lse)`` that does the per-problem planning once: :func:`gna.neighborhood_attention`
keeps it for later calls with the same arguments, shapes and strides.
Backends are tried in registration order when the caller does not name one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .args import Problem

__all__ = ["Backend", "Options", "register", "select", "available", "state"]


@dataclass(frozen=True)
class Options:
    """How to run a call (not what it computes). Tile shapes are per-dimension tuples."""

    backend: str | None = None
    q_tile_shape: tuple[int, ...] | None = None
    kv_tile_shape: tuple[int, ...] | None = None
    backward_q_tile_shape: tuple[int, ...] | None = None
    backward_kv_tile_shape: tuple[int, ...] | None = None
    deterministic: bool = False
    fp32_precision: str = "ieee"  # or "tf32": matrix units' reduced-precision float32


@dataclass(frozen=True)
class Backend:
    name: str
    why_not: Callable[[Problem, Options], str | None]
    run: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    prepare: Callable[[Problem, Options], Callable] | None = None

    def prepared(self, problem: Problem, options: Options) -> Callable:
        """``(q, k, v, extra_k, extra_v) -> (out, lse)`` for this problem and options."""
        if self.prepare is not None:
            return self.prepare(problem, options)
        return functools.partial(self.run, problem, options)


_REGISTRY: dict[str, Backend] = {}
_GENERATION = 0  # bumped by every register()


def state() -> tuple:
    """Changes whenever :func:`select` may choose differently: callers that memoize a
    selection key on it."""
    return id(_REGISTRY), _GENERATION


def register(backend: Backend, first: bool = False) -> None:
    """Add a backend; ``first=True`` makes it the preferred one for automatic selection."""
    global _GENERATION
    _GENERATION += 1
    entries = [(backend.name, backend)] + [(n, b) for n, b in _REGISTRY.items() if n != backend.name]
    if not first:
        entries = entries[1:] + entries[:1]
    _REGISTRY.clear()
    _REGISTRY.update(entries)


def available() -> list[str]:
    return list(_REGISTRY)


def select(problem: Problem, options: Options) -> Backend:
    if options.backend is not None:
        backend = _REGISTRY.get(options.backend)
        if backend is None:
            raise ValueError(
                f"unknown backend {options.backend!r}; available: {', '.join(_REGISTRY)}"
            )
        reason = backend.why_not(problem, options)
        if reason is not None:
            raise ValueError(f"backend {options.backend!r} cannot run this call: {reason}")
        return backend
    for backend in _REGISTRY.values():
        if backend.why_not(problem, options) is None:
            return backend
    raise RuntimeError("no backend can run this call")  # the reference always can


def _reference_why_not(problem: Problem, options: Options) -> str | None:
    return None


def _reference_run(problem, options, q, k, v, extra_k, extra_v):
    return reference.neighborhood_attention(problem, q, k, v, extra_k, extra_v)


register(Backend("reference", _reference_why_not, _reference_run))
