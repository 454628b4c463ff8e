"""Brute-force oracle for the tests, written independently of :mod:`gna`.

It re-reads the rule of DESIGN.md section 1 with plain Python loops (it does NOT import
``gna.geometry``), builds a dense boolean mask ``[N, N]`` over the flattened (row-major) layout,
and runs masked softmax attention in float64. Slow and memory-hungry on purpose: use it on
small layouts only.

Also here: comparison helpers whose failure messages say which case failed, where, and by how
much.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = [
    "axis_keys", "axis_mask", "dense_mask", "masked_attention", "neighborhood_attention",
    "assert_close", "assert_rel_norm", "as_tuple",
]


def as_tuple(value, ndim: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim


def axis_keys(x: int, length: int, kernel_size: int, stride: int, dilation: int,
              causal: bool) -> list[int]:
    """Coordinates of the keys query ``x`` sees along one axis, straight from the rule."""
    w, s, d = kernel_size, stride, dilation
    g, i = x % d, x // d
    group_len = -(-(length - g) // d)  # ceil((L - g) / d)
    if causal:
        leader = min((i // s) * s + s - 1, group_len - 1)
        lo, hi = max(leader - w + 1, 0), i
    else:
        wl = w // 2
        wr = w // 2 + (w % 2) - 1
        leader = min((i // s) * s + s // 2, group_len - 1)
        center = min(max(leader, wl), group_len - 1 - wr)
        lo, hi = center - wl, center + wr
    keys = []
    for y in range(length):
        if y % d == g and lo <= y // d <= hi:
            keys.append(y)
    return keys


@functools.lru_cache(maxsize=4096)
def axis_mask(length: int, kernel_size: int, stride: int, dilation: int,
              causal: bool) -> np.ndarray:
    """``[L, L]`` boolean: ``mask[x, y]`` is True when query ``x`` sees key ``y`` on this axis."""
    mask = np.zeros((length, length), dtype=bool)
    for x in range(length):
        for y in axis_keys(x, length, kernel_size, stride, dilation, causal):
            mask[x, y] = True
    mask.setflags(write=False)
    return mask


def dense_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> torch.Tensor:
    """``[N, N]`` boolean mask over the row-major flattened layout ``shape``.

    A query sees a key when it sees it along every axis (the Cartesian product of per-axis
    key sets), so the N-d mask is the logical AND of the per-axis masks.
    """
    ndim = len(shape)
    ks, st = as_tuple(kernel_size, ndim), as_tuple(stride, ndim)
    dl, ca = as_tuple(dilation, ndim), as_tuple(is_causal, ndim)
    mask = np.ones((1, 1), dtype=bool)
    for a in range(ndim):
        m = axis_mask(int(shape[a]), int(ks[a]), int(st[a]), int(dl[a]), bool(ca[a]))
        n = mask.shape[0]
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(n * shape[a], n * shape[a])
    return torch.from_numpy(mask)


def masked_attention(q, k, v, mask=None, scale=None, additional_keys=None,
                     additional_values=None):
    """Softmax attention in float64 with an explicit ``[Nq, Nk]`` mask (None: dense).

    ``q [B, *S, H, D]``, ``k/v [B, *S_kv, Hkv, D]``, additional keys/values ``[B, E, Hkv, D]``
    appended to every query's key set. Query head ``h`` uses key/value head
    ``h // (H // Hkv)``. Returns ``out [B, *S, H, D]`` and ``lse [B, *S, H]`` (natural log),
    both float64 and differentiable.
    """
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    assert heads % heads_kv == 0
    if scale is None:
        scale = head_dim ** -0.5
    qf = q.to(torch.float64).reshape(batch, -1, heads, head_dim)
    kf = k.to(torch.float64).reshape(batch, -1, heads_kv, head_dim)
    vf = v.to(torch.float64).reshape(batch, -1, heads_kv, head_dim)
    n_q, n_k = qf.shape[1], kf.shape[1]
    kv_head = torch.tensor([h // (heads // heads_kv) for h in range(heads)])
    kf, vf = kf[:, :, kv_head], vf[:, :, kv_head]  # [B, Nk, H, D]
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if mask is not None:
        assert tuple(mask.shape) == (n_q, n_k), (tuple(mask.shape), n_q, n_k)
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    if additional_keys is not None:
        ek = additional_keys.to(torch.float64)[:, :, kv_head]
        ev = additional_values.to(torch.float64)[:, :, kv_head]
        scores = torch.cat([scores, torch.einsum("bqhd,bkhd->bhqk", qf, ek) * scale], dim=-1)
        vf = torch.cat([vf, ev], dim=1)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Nq]
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    return out.reshape(q.shape[:-1] + (head_dim,)), lse.permute(0, 2, 1).reshape(q.shape[:-1])


def neighborhood_attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False,
                           scale=None, additional_keys=None, additional_values=None):
    """GNA by brute force: :func:`dense_mask` plus :func:`masked_attention`."""
    mask = dense_mask(tuple(q.shape[1:-2]), kernel_size, stride, dilation, is_causal)
    return masked_attention(q, k, v, mask, scale, additional_keys, additional_values)


# ----------------------------------------------------------------------------- comparisons


def _where(index, shape) -> tuple:
    return tuple(int(i) for i in np.unravel_index(int(index), tuple(shape)))


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "",
                 case=None) -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` (NaN always fails).

    The message names the case and the tensor, and gives the worst element's index and values.
    """
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}; case: {case}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bool(bad.any()):
        excess = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err - tol)
        where = _where(torch.argmax(excess), a.shape)
        max_err = float(torch.nan_to_num(err, nan=math.inf).max())
        raise AssertionError(
            f"{name} mismatch: {int(bad.sum())} of {bad.numel()} elements exceed "
            f"atol={atol:g} rtol={rtol:g}; max abs error {max_err:.3e} "
            f"at index {where}: actual {float(a[where]):.17g}, expected {float(e[where]):.17g}\n"
            f"case: {case}"
        )


def assert_rel_norm(actual, expected, *, bound: float, name: str = "", case=None) -> None:
    """``||actual - expected|| / ||expected|| <= bound`` (Frobenius norms, float64)."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}; case: {case}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    err = (a - e).abs()
    rel = float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e).clamp_min(1e-300))
    if not rel <= bound:
        where = _where(torch.argmax(torch.nan_to_num(err, nan=math.inf)), a.shape)
        raise AssertionError(
            f"{name} mismatch: relative norm error {rel:.3e} > {bound:g}; max abs error "
            f"{float(err[where]):.3e} at index {where}: actual {float(a[where]):.9g}, "
            f"expected {float(e[where]):.9g}\ncase: {case}"
        )
