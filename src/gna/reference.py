"""Reference backend: exact GNA in plain PyTorch, the oracle the kernels are checked against.

It runs anywhere PyTorch runs and differentiates through autograd. It never builds an
N x N mask or score matrix: queries are processed in tiles (boxes of tokens), and each tile
gathers only the box of keys its queries can see, as :mod:`gna.geometry` says. Memory is
``O(tokens * box / tile)`` per chunk of tiles, and chunks bound the peak.

Inputs in fp16/bf16 are computed in float32, float64 stays float64; the output is cast back
to the input dtype, the LSE is returned in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .args import Problem
from .geometry import Dim

__all__ = ["neighborhood_attention", "dense_attention"]

# Tile of queries the reference processes at once, per number of spatial dimensions.
_REF_TILE = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
# Upper bound on score elements materialized per chunk of tiles (float32: 256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_attention(dims: tuple[Dim, ...], q, k, v, extra_k, extra_v, scale):
    """GNA over one dilation group (a non-dilated problem). Tensors are heads-last."""
    ndim = len(dims)
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    groups = heads // heads_kv
    device = q.device

    tiles = tuple(min(t, d.length) for t, d in zip(_REF_TILE[ndim], dims))
    n_tiles, box, kv_index, masks = [], [], [], []
    for dim, tile in zip(dims, tiles):
        ranges = dim.tile_ranges(tile, 1)  # with 1-token KV tiles these are key ranges
        b = int((ranges.last - ranges.first).max())
        start, end = dim.windows()
        keys = ranges.first[:, None] + np.arange(b)  # [n, b] key coordinates of each box
        rows = np.minimum(np.arange(len(ranges.first))[:, None] * tile + np.arange(tile),
                          dim.length - 1)  # [n, tile]; padding rows reuse the last query
        mask = (start[rows][:, :, None] <= keys[:, None, :]) & (keys[:, None, :] < end[rows][:, :, None])
        n_tiles.append(len(ranges.first))
        box.append(b)
        kv_index.append(torch.from_numpy(np.minimum(keys, dim.length - 1)).to(device))
        masks.append(torch.from_numpy(mask).to(device))

    tile_size, box_size = math.prod(tiles), math.prod(box)
    # Pad queries to whole tiles; padding rows are computed and then cropped.
    pad = []
    for dim, tile, n in reversed(list(zip(dims, tiles, n_tiles))):
        pad += [0, n * tile - dim.length]
    q = torch.nn.functional.pad(q, [0, 0, 0, 0] + pad)

    # Chunks of whole rows of tiles along axis 0 keep the score tensor bounded.
    per_row = batch * heads * math.prod(n_tiles[1:]) * tile_size * (box_size + _num_extra(extra_k))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    outs, lses = [], []
    for c0 in range(0, n_tiles[0], rows_per_chunk):
        c1 = min(c0 + rows_per_chunk, n_tiles[0])
        counts = [c1 - c0] + n_tiles[1:]
        q_chunk = q[:, c0 * tiles[0]: c1 * tiles[0]]
        # [B, n0, t0, n1, t1, ..., H, D] -> [B, nT, T, H, D]
        q_t = q_chunk.reshape(batch, *[x for nt in zip(counts, tiles) for x in nt], heads, head_dim)
        perm = [0] + [1 + 2 * a for a in range(ndim)] + [2 + 2 * a for a in range(ndim)]
        q_t = q_t.permute(*perm, 2 * ndim + 1, 2 * ndim + 2)
        q_t = q_t.reshape(batch, -1, tile_size, heads_kv, groups, head_dim)

        # Gather each tile's key box: index arrays broadcast to [n0, n1, .., b0, b1, ..].
        index = []
        for a in range(ndim):
            idx = kv_index[a][c0:c1] if a == 0 else kv_index[a]
            shape = [1] * (2 * ndim)
            shape[a], shape[ndim + a] = idx.shape
            index.append(idx.reshape(shape))
        k_box = k[(slice(None), *index)].reshape(batch, -1, box_size, heads_kv, head_dim)
        v_box = v[(slice(None), *index)].reshape(batch, -1, box_size, heads_kv, head_dim)

        mask = None
        for a in range(ndim):
            m = masks[a][c0:c1] if a == 0 else masks[a]
            shape = [1] * (3 * ndim)
            shape[a], shape[ndim + a], shape[2 * ndim + a] = m.shape
            m = m.reshape(shape)
            mask = m if mask is None else mask & m
        mask = mask.reshape(-1, tile_size, box_size)  # [nT, T, box]

        scores = torch.einsum("btqhgd,btkhd->bthgqk", q_t * scale, k_box)
        scores = scores.masked_fill(~mask[None, :, None, None], float("-inf"))
        if extra_k is not None:
            extra = torch.einsum("btqhgd,behd->bthgqe", q_t * scale, extra_k)
            scores = torch.cat([scores, extra], dim=-1)
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse[..., None])
        out = torch.einsum("bthgqk,btkhd->bthgqd", p[..., :box_size], v_box)
        if extra_v is not None:
            out = out + torch.einsum("bthgqe,behd->bthgqd", p[..., box_size:], extra_v)

        # [B, nT, Hkv, G, T, D] -> [B, n0*t0, n1*t1, ..., H, D]
        inv = [0] + [x for a in range(ndim) for x in (1 + a, 1 + ndim + a)]
        out = out.permute(0, 1, 4, 2, 3, 5).reshape(batch, *counts, *tiles, heads, head_dim)
        out = out.permute(*inv, 2 * ndim + 1, 2 * ndim + 2)
        outs.append(out.reshape(batch, *[c * t for c, t in zip(counts, tiles)], heads, head_dim))
        lse = lse.permute(0, 1, 4, 2, 3).reshape(batch, *counts, *tiles, heads)
        lses.append(lse.permute(*inv, 2 * ndim + 1).reshape(
            batch, *[c * t for c, t in zip(counts, tiles)], heads))

    crop = (slice(None), *[slice(0, d.length) for d in dims])
    return torch.cat(outs, dim=1)[crop], torch.cat(lses, dim=1)[crop]


def _num_extra(extra_k) -> int:
    return 0 if extra_k is None else extra_k.shape[1]


def neighborhood_attention(problem: Problem, q, k, v, extra_k=None, extra_v=None):
    """Exact GNA forward for a validated :class:`~gna.args.Problem`; returns ``(out, lse)``."""
    geo = problem.geometry
    cdt = _compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    if extra_k is not None:
        extra_k, extra_v = extra_k.to(cdt), extra_v.to(cdt)
    if all(d == 1 for d in geo.dilation):
        (_, dims), = geo.groups()
        out, lse = _group_attention(dims, q, k, v, extra_k, extra_v, problem.scale)
        return out.to(problem.dtype), lse
    # Each dilation group is an independent non-dilated problem on a strided view.
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1])
    for offsets, dims in geo.groups():
        view = (slice(None), *[slice(g, None, d) for g, d in zip(offsets, geo.dilation)])
        o, l = _group_attention(dims, q[view], k[view], v[view], extra_k, extra_v, problem.scale)
        out[view] = o
        lse[view] = l
    return out.to(problem.dtype), lse


def dense_attention(q, k, v, scale: float, extra_k=None, extra_v=None):
    """Dense softmax attention, ``q [B, Nq, H, D]``, ``k/v [B, Nk, Hkv, D]``; ``(out, lse)``.

    Queries are processed in chunks so the score matrix is never whole in memory.
    """
    dtype = q.dtype
    cdt = _compute_dtype(dtype)
    if extra_k is not None:
        k, v = torch.cat([k, extra_k], dim=1), torch.cat([v, extra_v], dim=1)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    batch, n_q, heads, head_dim = q.shape
    heads_kv, n_k = k.shape[2], k.shape[1]
    q = q.reshape(batch, n_q, heads_kv, heads // heads_kv, head_dim)
    chunk = max(1, _CHUNK_ELEMENTS // max(batch * heads * n_k, 1))
    outs, lses = [], []
    for c0 in range(0, n_q, chunk):
        s = torch.einsum("bqhgd,bkhd->bhgqk", q[:, c0:c0 + chunk] * scale, k)
        lse = torch.logsumexp(s, dim=-1)
        o = torch.einsum("bhgqk,bkhd->bqhgd", torch.exp(s - lse[..., None]), v)
        outs.append(o.reshape(batch, -1, heads, head_dim))
        lses.append(lse.permute(0, 3, 1, 2).reshape(batch, -1, heads))
    return torch.cat(outs, dim=1).to(dtype), torch.cat(lses, dim=1)
