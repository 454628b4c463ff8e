"""Host launcher of the fused backward kernels (:mod:`gna.kernels.backward`); no autograd.

:func:`launch_backward` takes the forward's inputs, its ``out`` and ``lse``, and the incoming
gradients, and returns ``(dq, dk, dv, dextra_k, dextra_v)``. The geometry tables come from
:mod:`gna.geometry`: ``win`` and ``rng`` are the forward launcher's own (``_plan``), ``inv``
(per KV tile, the Q tiles that see it) is built here the same way from
:meth:`gna.geometry.Dim.inverse_tile_ranges`.

Four launches: delta (fp32), dK/dV (one program per KV tile x dilation group x batch x KV
head), dQ (one program per Q tile x dilation group x batch x head) and, with additional keys,
their dK/dV as fp32 partial sums over token splits, added here in a fixed order. Everything is
deterministic: each output element is written by exactly one program.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton

from .geometry import Geometry, group_length
from .kernels.backward import (
    gna_backward_delta_kernel,
    gna_backward_dkdv_kernel,
    gna_backward_dq_kernel,
    gna_backward_extra_kernel,
)
from .triton_backend import (
    _LOG2E,
    LaunchConfig,
    _device_tables,
    _next_pow2,
    _pad3,
    _Plan,
    _plan,
    _strides,
)

__all__ = ["launch_backward"]

# Programs the additional-key kernel aims for (token splits x extra tiles x batch x KV heads):
# enough to fill an H100's 132 SMs a few times over when there are few extra tiles.
_EXTRA_TARGET_PROGRAMS = 512
_DELTA_BLOCK = 64  # tokens per program of the delta kernel


@dataclass(frozen=True)
class _BackwardPlan:
    """The forward plan plus the inverse (KV tile -> Q tiles) table of the dK/dV kernel."""

    forward: _Plan
    n_kv_tiles: tuple[int, int, int]  # KV tiles per dimension of dilation group 0
    inv: np.ndarray


@functools.lru_cache(maxsize=256)
def _backward_plan(geo: Geometry, q_tile: tuple, kv_tile: tuple) -> _BackwardPlan:
    """``inv[a, g, j] = (first, last, full_first, full_last)``: the Q tiles of dilation group
    ``g`` along axis ``a`` that see KV tile ``j`` (any query / all queries seeing all of it).
    Entries past a shorter group's end stay zero: empty ranges, nothing visited."""
    plan = _plan(geo, q_tile, kv_tile)
    geo3 = plan.geo3
    lengths = [group_length(n, d, 0) for n, d in zip(geo3.shape, geo3.dilation)]
    n_kv = tuple(-(-n // t) for n, t in zip(lengths, plan.kv_tile))
    inv = np.zeros((3, max(geo3.dilation), max(n_kv), 4), dtype=np.int32)
    for axis in range(3):
        for g in range(geo3.dilation[axis]):
            r = geo3.dim(axis, g).inverse_tile_ranges(plan.q_tile[axis], plan.kv_tile[axis])
            inv[axis, g, : len(r.first)] = np.stack(
                [r.first, r.last, r.full_first, r.full_last], axis=1)
    return _BackwardPlan(plan, n_kv, inv)


_DEVICE_INV: dict = {}


def _device_inv(plan: _BackwardPlan, device: torch.device) -> torch.Tensor:
    """The inverse table on ``device``; made once, so CUDA graph capture finds it ready."""
    fwd = plan.forward
    key = (fwd.geo3, fwd.q_tile, fwd.kv_tile, device)
    inv = _DEVICE_INV.get(key)
    if inv is None:
        inv = torch.from_numpy(plan.inv).to(device)
        _DEVICE_INV[key] = inv
    return inv


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_backward(q, k, v, extra_k, extra_v, out, lse, dout, dlse, geo: Geometry,
                    scale: float, config: LaunchConfig, tf32: bool = False):
    """Gradients of GNA w.r.t. ``q, k, v`` and the additional keys/values.

    Args:
        q: ``[batch, *spatial, heads, head_dim]``; k, v: ``[batch, *spatial, heads_kv,
            head_dim]``; any strides with unit last-dimension stride (views of a fused qkv
            tensor are read in place).
        extra_k, extra_v: ``[batch, n_extra, heads_kv, head_dim]`` or None.
        out, lse: the forward's output and float32 natural-log LSE ``[batch, *spatial, heads]``.
        dout: gradient of ``out``; dlse: gradient of ``lse`` (None means zero).
        geo, scale: the forward's geometry and softmax scale; config: tile shapes and launch
            options (the forward's tiles work here too).
        tf32: fp32 inputs multiply in TF32 instead of IEEE fp32.

    Returns ``(dq, dk, dv, dextra_k, dextra_v)`` with the inputs' shapes and dtypes
    (contiguous); the extra gradients are None without additional keys.
    """
    ndim = geo.ndim
    q, k, v, out, dout = (_unit_last(t) for t in (q, k, v, out, dout))
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    groups_per_kv = heads // heads_kv
    plan = _backward_plan(geo, tuple(config.q_tile), tuple(config.kv_tile))
    fwd = plan.forward
    win, rng = _device_tables(fwd, q.device)
    inv = _device_inv(plan, q.device)
    head_dim_p2 = _next_pow2(max(head_dim, 16))
    precision = "tf32" if tf32 else "ieee"
    qk_scale = scale * _LOG2E
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)

    # delta = rowsum(dO * O) - dlse, fp32, laid out like a contiguous lse (as are lse, dlse).
    lse = lse.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    s = delta.stride()
    l_strides = (s[0], *_pad3(s[1: 1 + ndim], 0), s[-1])
    lengths = fwd.geo3.shape
    num_tokens = math.prod(lengths)
    gna_backward_delta_kernel[(triton.cdiv(num_tokens, _DELTA_BLOCK), batch * heads)](
        out, dout, dlse if dlse is not None else delta, delta,
        *_strides(out, ndim), *_strides(dout, ndim), *l_strides,
        lengths[1], lengths[2], num_tokens, heads, head_dim,
        BLOCK_M=_DELTA_BLOCK, HEAD_DIM=head_dim_p2, HAS_DLSE=dlse is not None, num_warps=4)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    tiles = (*fwd.q_tile, *fwd.kv_tile)
    table_strides = (*win.stride()[:3],)
    geo_args = (*fwd.geo3.shape, *fwd.geo3.dilation)
    n_groups = math.prod(fwd.geo3.dilation)

    gna_backward_dkdv_kernel[(math.prod(plan.n_kv_tiles), n_groups, batch * heads_kv)](
        q, k, v, dout, lse, delta, dk, dv, win, inv,
        *_strides(q, ndim), *_strides(k, ndim), *_strides(v, ndim), *_strides(dout, ndim),
        *l_strides, *_strides(dk, ndim), *_strides(dv, ndim),
        *geo_args, *plan.n_kv_tiles, *table_strides, *inv.stride()[:3],
        heads_kv, groups_per_kv, head_dim, qk_scale, scale,
        *tiles, HEAD_DIM=head_dim_p2, PRECISION=precision, **launch)

    if extra_k is not None:
        extra_k, extra_v = _unit_last(extra_k), _unit_last(extra_v)
        extra_strides = (*extra_k.stride()[:3], *extra_v.stride()[:3])
        num_extra = extra_k.shape[1]
    else:
        extra_k, extra_v = k, v  # never read
        extra_strides = (0,) * 6
        num_extra = 0

    gna_backward_dq_kernel[(math.prod(fwd.n_tiles), n_groups, batch * heads)](
        q, k, v, extra_k, extra_v, dout, lse, delta, dq, win, rng,
        *_strides(q, ndim), *_strides(k, ndim), *_strides(v, ndim), *_strides(dout, ndim),
        *l_strides, *_strides(dq, ndim), *extra_strides,
        *geo_args, *fwd.n_tiles, *table_strides, *rng.stride()[:3],
        heads, groups_per_kv, head_dim, num_extra, qk_scale, scale,
        *tiles, HEAD_DIM=head_dim_p2, PAD_D=head_dim_p2 != head_dim, HAS_EXTRA=num_extra > 0,
        PRECISION=precision, **launch)

    if num_extra == 0:
        return dq, dk, dv, None, None
    dextra_k, dextra_v = _launch_extra(q, extra_k, extra_v, dout, lse, delta, l_strides,
                                       lengths, ndim, scale, qk_scale, config, head_dim_p2,
                                       precision)
    return dq, dk, dv, dextra_k, dextra_v


def _launch_extra(q, extra_k, extra_v, dout, lse, delta, l_strides, lengths, ndim, scale,
                  qk_scale, config, head_dim_p2, precision):
    """dK/dV of the additional keys: fp32 partial sums over token splits, then a sum over the
    splits in a fixed order (deterministic)."""
    batch, num_extra, heads_kv, head_dim = extra_k.shape
    block_m, block_n = math.prod(config.q_tile), math.prod(config.kv_tile)
    num_tokens = math.prod(lengths)
    n_tiles = triton.cdiv(num_extra, block_n)
    splits = max(1, min(triton.cdiv(num_tokens, block_m),
                        _EXTRA_TARGET_PROGRAMS // (n_tiles * batch * heads_kv)))
    per_split = triton.cdiv(triton.cdiv(num_tokens, splits), block_m) * block_m
    splits = triton.cdiv(num_tokens, per_split)
    part = torch.empty((2, splits, batch, num_extra, heads_kv, head_dim), dtype=torch.float32,
                       device=q.device)
    gna_backward_extra_kernel[(n_tiles, splits, batch * heads_kv)](
        q, extra_k, extra_v, dout, lse, delta, part[0], part[1],
        *_strides(q, ndim), *_strides(dout, ndim), *l_strides,
        *extra_k.stride()[:3], *extra_v.stride()[:3], *part.stride()[1:5],
        lengths[1], lengths[2], num_tokens, per_split,
        heads_kv, q.shape[-2] // heads_kv, head_dim, num_extra, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim_p2, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages)
    grads = part.sum(1)
    return (grads[0] * scale).to(extra_k.dtype), grads[1].to(extra_v.dtype)
