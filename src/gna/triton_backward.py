"""Host launcher of the fused backward kernels (:mod:`gna.kernels.backward`, and on Hopper for
perfectly block-sparse problems :mod:`gna.kernels.backward_gluon`); no autograd.

:func:`launch_backward` takes the forward's inputs, its ``out`` and ``lse``, and the incoming
gradients, and returns ``(dq, dk, dv, dextra_k, dextra_v)``. The geometry tables come from
:mod:`gna.geometry`: ``win`` and ``rng`` are the forward launcher's own (``_plan``), ``inv``
(per KV tile, the Q tiles that see it) is built here the same way from
:meth:`gna.geometry.Dim.inverse_tile_ranges`.

Four launches: delta (fp32, laid out like the LSE; also both row statistics tile-major for
dK/dV), dK/dV (one program per KV tile x dilation group x batch x KV head), dQ (one program
per Q tile x dilation group x batch x head) and, with additional keys, their dK/dV as fp32
partial sums over token splits, added here in a fixed order. Everything is deterministic:
each output element is written by exactly one program. The KV-major dK/dV masks come from
per-key query ranges (:meth:`gna.geometry.Dim.query_ranges`). Unless ``deterministic``, where
the Gluon dK/dV kernel runs on Hopper (and :func:`_fused_preferred`), the fused Gluon kernel and
a cast of its fp32 dQ accumulator (zeroed by the delta launch) replace the dK/dV and dQ
launches; its dQ adds the KV tiles' shares in whatever order they finish
(:func:`_plan_backward`).

Each kernel starts from the forward's tiles and launch options and is fitted to the device's
shared memory (:func:`_kernel_config`): the backward keeps more tiles on chip than the
forward (dK/dV: K, V and per stage Q, dO; dQ: Q, dO and per stage K, V).

Where every visited (Q tile, KV tile) pair is mask-free, on an H100/H200 with fp16/bf16 and
head dims 64 or 128, the dK/dV and dQ launches run the persistent warp-specialized Gluon
kernels instead (``KernelConfig.gluon_stages``, :func:`gluon_backward_ineligible`): same
tiles, same arithmetic in the same order, bit-identical gradients, 6-21% faster (measurements
below). A plan keeps each launch's compiled kernel and relaunches it directly; launches with
host tensor descriptors go through :class:`gna.triton_backend._Relaunch`.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton

from .geometry import Geometry, group_length
from .kernels.backward import (
    gna_backward_delta_kernel,
    gna_backward_dq_cast_kernel,
    gna_backward_dkdv_kernel,
    gna_backward_dq_kernel,
    gna_backward_extra_kernel,
)
from .triton_backend import (
    _LOG2E,
    GluonDescriptor,
    LaunchConfig,
    _device_tables,
    _halve,
    _next_pow2,
    _pad3,
    _plan,
    _strides,
    _tma_compatible,
    cache_plan,
    extra_args,
    gluon_descriptor_specs,
    gluon_device_ineligible,
    gluon_dtype_ineligible,
    launch_cached,
    launch_planned,
    shared_limit,
    signature,
    token_table,
    unit_last,
)

__all__ = ["KernelConfig", "backward_configs", "gluon_backward_ineligible", "launch_backward",
           "refused_dkdv"]

# Programs the additional-key kernel aims for (token splits x extra tiles x batch x KV heads):
# enough to fill an H100's 132 SMs a few times over when there are few extra tiles.
_EXTRA_TARGET_PROGRAMS = 512
# The delta kernel holds a Q tile of O and dO: eight warps from 128 tokens x 128 dims.
_DELTA_ELEMENTS_8_WARPS = 128 * 128
_MIN_TILE = 16  # tokens: the smallest tile tl.dot accepts


# --- launch configuration -----------------------------------------------------------------

# Shared memory (bytes) of each kernel as Triton 3.6 lays it out for sm_90, for Q / KV tile
# volumes m, n, padded head dim d, element size e and software-pipelining depth `stages`.
# Fitted to AOT compiles (triton.compile for GPUTarget("cuda", 90, 32), fp16 and tf32, head
# dims 32-256, tiles 32-128 tokens): exact for fp16 (e.g. dK/dV, m=128, n=64, d=128:
# 114688 / 184320 / 253952 bytes at 1 / 2 / 3 stages); an upper bound for fp32, whose
# transposed operands get extra copies (tf32 wgmma takes K-major operands only).
def _dq_shared(m, n, d, e, stages):
    # Q and dO resident; K and V per stage; fp32: a transposed copy of K for dS @ K.
    return e * d * (2 * m + 2 * n * stages) + (e * d * n if e == 4 else 0)


def _dkdv_shared(m, n, d, e, stages):
    # K and V resident; per stage Q, dO and 8 per-row vectors (LSE, delta, windows); P^T and
    # dS^T staged for the second GEMMs; fp32: transposed copies of Q, dO and P/dS.
    fp32 = e * d * 2 * m + e * m * n if e == 4 else 0
    return e * d * 2 * n + stages * (e * d * 2 * m + 32 * m) + e * m * n + fp32


@dataclass(frozen=True)
class KernelConfig:
    """Tiles and launch options of one backward kernel. ``kv_major``: dK/dV computes its
    scores transposed (keys x queries); ``use_tma``: the tiles streamed through the loop (dK/dV:
    Q and dO; dQ: K and V) are read through tensor descriptors (Hopper). ``gluon_stages``:
    where nonzero and the call qualifies (:func:`gluon_backward_ineligible`), the persistent
    Gluon kernel of :mod:`gna.kernels.backward_gluon` runs instead of the Triton one, on these
    tiles, with a ring of that many shared-memory slots (``num_warps`` and ``num_stages`` are
    then unused)."""

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_warps: int
    num_stages: int
    kv_major: bool = False
    use_tma: bool = False
    gluon_stages: int = 0

    @property
    def gluon(self) -> bool:
        return self.gluon_stages > 0


# KV tile tokens x padded head dim, at most. Measured on H100 (fp16, d=128, 24 heads, ms of
# dK/dV + dQ), Q tile 128 tokens with KV tile 128 vs 64 tokens: 3-D 30x48x80 window 18x24x24
# stride 16x8x8: 118 + 40 vs 100 + 39; stride 1: 317 + 102 vs 210 + 82; 2-D 256x256 window
# 80x80 stride 16: 36 + 15 vs 35 + 14; stride 1: 60 + 22 vs 47 + 18. (dK/dV keeps K, V and
# its dK, dV accumulators on chip: 128 x 128 fp32 accumulators spill at 8 warps.)
_MAX_KV_ELEMENTS = 64 * 128

# fp32 without TF32 multiplies on CUDA cores (no tensor-core fp32 MMA): Triton unrolls each
# tl.dot into FMAs, and beyond M * N * d = 32 * 32 * 128 per GEMM the sm_90 code spills tens of
# KB per thread and takes minutes to compile (128x64 tiles, d=128: 88 KB spills, ~40 s per
# kernel; 16x16: none, 2 s).
_FMA_DOT_VOLUME = 32 * 32 * 128


@functools.lru_cache(maxsize=256)
def _kernel_config(kind: str, config: LaunchConfig, elem: int, head_dim_p2: int,
                   shared_limit: int, fma_dots: bool = False) -> KernelConfig:
    """Tiles and launch options of the ``"dq"`` or ``"dkdv"`` kernel (the additional-key
    kernel shares dK/dV's), starting from the forward's:

    1. KV tiles of at most ``_MAX_KV_ELEMENTS / head_dim`` tokens (halved until they are);
    2. the most pipelining stages (up to ``config.num_stages``) that fit ``shared_limit``; if
       even one stage does not fit (or, with ``fma_dots``, the GEMMs are too large for
       CUDA-core code), the tile re-read per iteration is halved (dQ: KV tile; dK/dV: Q
       tile), then the other;
    3. eight warps once the tiles are large: at d=128, 128x64 tiles, four warps spill ~3 KB
       per thread on sm_90 (ptxas -v), eight ~0.2 KB.
    """
    tiles = [tuple(config.q_tile), tuple(config.kv_tile)]
    while _MIN_TILE < math.prod(tiles[1]) and math.prod(tiles[1]) * head_dim_p2 > _MAX_KV_ELEMENTS:
        tiles[1] = _halve(tiles[1], 2)
    shared = _dq_shared if kind == "dq" else _dkdv_shared
    order = (1, 0) if kind == "dq" else (0, 1)
    while True:
        m, n = math.prod(tiles[0]), math.prod(tiles[1])
        stages = next((s for s in range(config.num_stages, 0, -1)
                       if shared(m, n, head_dim_p2, elem, s) <= shared_limit), 0)
        fits = stages and not (fma_dots and m * n * head_dim_p2 > _FMA_DOT_VOLUME)
        shrinkable = [i for i in order if math.prod(tiles[i]) > _MIN_TILE]
        if fits or not shrinkable:
            break
        tiles[shrinkable[0]] = _halve(tiles[shrinkable[0]], 2)
    m, n = math.prod(tiles[0]), math.prod(tiles[1])
    num_warps = 8 if m * max(n, head_dim_p2) >= 8192 else config.num_warps
    return KernelConfig(tiles[0], tiles[1], num_warps, max(stages, 1))


# --- geometry tables ----------------------------------------------------------------------

@dataclass(frozen=True)
class _InversePlan:
    """Per KV tile the Q tiles that see it: the dK/dV kernel's iteration space."""

    n_kv_tiles: tuple[int, int, int]  # KV tiles per dimension of dilation group 0
    inv: np.ndarray


@functools.lru_cache(maxsize=256)
def _inverse_plan(geo: Geometry, q_tile: tuple, kv_tile: tuple) -> _InversePlan:
    """``inv[a, g, j] = (first, last, full_first, full_last)``: the Q tiles of dilation group
    ``g`` along axis ``a`` that see KV tile ``j`` (any query / all queries seeing all of it),
    padded to 3 dimensions like the forward's ``_plan``. Entries past a shorter group's end
    stay zero: empty ranges, nothing visited."""
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
    return _InversePlan(n_kv, inv)


_DEVICE_INV: dict = {}


def _device_inv(geo: Geometry, q_tile, kv_tile, device: torch.device):
    """The inverse plan and its table on ``device``; made once, so CUDA graph capture finds
    it ready."""
    plan = _inverse_plan(geo, q_tile, kv_tile)
    key = (geo, q_tile, kv_tile, device)
    inv = _DEVICE_INV.get(key)
    if inv is None:
        inv = torch.from_numpy(plan.inv).to(device)
        _DEVICE_INV[key] = inv
    return plan, inv


def balanced_schedule(costs: np.ndarray, programs: int) -> np.ndarray:
    """The work lists of a persistent kernel's ``programs`` as one int32 table: program ``p``
    takes items ``table[table[p]:table[p + 1]]``, in that order (the lists follow the
    ``programs + 1`` offsets). Items go out in their own order, each to the program that
    would be free first if item ``i`` took ``costs[i]`` (list scheduling): programs running
    at the same time still work on neighbouring items, and none ends far behind the others,
    where handing program ``p`` the items ``p, p + programs, ...`` left the busiest SM ~9%
    above the mean on the 3-D stride-16x8x8 benchmark problem (Q tiles per KV tile: 56 to
    480), against 0.5% this way."""
    costs = np.asarray(costs)
    if (costs == costs[0]).all():  # equal costs: the fixed stride is the list schedule
        owner = np.arange(len(costs)) % programs
    else:
        heap = [(0, p) for p in range(programs)]
        owner = np.empty(len(costs), dtype=np.int64)
        for item, cost in enumerate(costs.tolist()):
            free_at, p = heap[0]
            owner[item] = p
            heapq.heapreplace(heap, (free_at + cost, p))
    items = np.argsort(owner, kind="stable")  # by program, each program's in item order
    offsets = programs + 1 + np.concatenate([[0], np.cumsum(np.bincount(owner,
                                                                        minlength=programs))])
    return np.concatenate([offsets, items]).astype(np.int32)


# Per work item of the Gluon dK/dV kernel, its K/V copy and epilogue in steps (one Q tile of
# one query head): an estimate, for balanced_schedule's costs.
_DKDV_ITEM_STEPS = 2
_DEVICE_SCHEDULES: dict = {}


def dkdv_item_costs(geo: Geometry, q_tile: tuple, kv_tile: tuple, batch: int, heads_kv: int,
                    groups_per_kv: int) -> np.ndarray:
    """The Gluon dK/dV kernel's work items in its order (a KV tile of one batch and KV head,
    KV tiles fastest) and what each costs in steps: its visited Q tiles x query heads, plus
    ``_DKDV_ITEM_STEPS``."""
    visited, _ = geo.inverse_tile_counts(q_tile, kv_tile)
    return np.tile(visited * groups_per_kv + _DKDV_ITEM_STEPS, batch * heads_kv)


def _device_dkdv_schedule(plan, batch: int, heads_kv: int, groups_per_kv: int, programs: int,
                          device: torch.device) -> torch.Tensor:
    """The Gluon dK/dV kernel's work lists (:func:`balanced_schedule` of
    :func:`dkdv_item_costs`) on ``device``, made once (CUDA graph capture finds them ready)."""
    key = (plan.geo3, plan.q_tile, plan.kv_tile, batch, heads_kv, groups_per_kv, programs,
           device)
    table = _DEVICE_SCHEDULES.get(key)
    if table is None:
        costs = dkdv_item_costs(plan.geo3, plan.q_tile, plan.kv_tile, batch, heads_kv,
                                groups_per_kv)
        table = torch.from_numpy(balanced_schedule(costs, programs)).to(device)
        _DEVICE_SCHEDULES[key] = table
    return table


@functools.lru_cache(maxsize=256)
def _query_ranges(geo3: Geometry) -> np.ndarray:
    """``qr[a, g, x] = (first, last)``: the half-open range of queries of dilation group
    ``g`` along axis ``a`` that see key ``x`` (:meth:`gna.geometry.Dim.query_ranges`), laid
    out like the forward plan's ``win`` table. The KV-major dK/dV kernel masks with it."""
    return token_table(geo3, lambda dim: dim.query_ranges())


_DEVICE_QR: dict = {}


def _device_query_ranges(geo3: Geometry, device: torch.device) -> torch.Tensor:
    """:func:`_query_ranges` on ``device``, made once (CUDA graph capture finds it ready)."""
    table = _DEVICE_QR.get((geo3, device))
    if table is None:
        table = _DEVICE_QR[(geo3, device)] = torch.from_numpy(_query_ranges(geo3)).to(device)
    return table


def _tile_constexprs(plan) -> dict:
    (t0, t1, t2), (k0, k1, k2) = plan.q_tile, plan.kv_tile
    return dict(T0=t0, T1=t1, T2=t2, K0=k0, K1=k1, K2=k2)


# --- launcher -----------------------------------------------------------------------------

# Layout of the dK/dV kernel, from benchmarks/tune_backward.py on H100 (fp16, d=128, ms of the
# dK/dV kernel; benchmarks/results/backward_sweep.jsonl, session 3 rows: tile-major row
# statistics and per-key query-range masks). Q-major (Q 128 / KV 64 tokens, Q and dO through
# TMA) against KV-major (scores as keys x queries, 128-token KV tiles, 3 stages) with 64- and
# 32-token Q tiles:
#
#   problem               Q-major   KV-major Q64   KV-major Q32
#   1-D w2048              0.254       0.219          0.259
#   1-D w2048 s2048        0.229       0.170          0.204
#   2-D w80                38.9        31.0           33.0
#   2-D w80 s16            27.8        23.2           26.5
#   3-D w18x24x24          229         163            136
#   3-D w18x24x24 s16x8x8  87.6        69.2           80.8
#
# so KV-major everywhere it was measured, with 32-token Q tiles where a 3-D iteration has
# masked tiles (stride 1 there makes most visited tiles partial; smaller Q tiles leave fewer
# of their keys masked). The dQ kernel keeps pointer loads: TMA for K/V measured equal on
# block-sparse problems and slower with masks (3-D w18x24x24, 3 stages: 75 -> 90 ms; 2-D s16
# 13.6 -> 14.9 in session 3).
_KV_MAJOR_KV_TOKENS = 128
# The KV-major layout's Q tile, as measured, in place of the forward's default Q tile.
_KV_MAJOR_Q_TILE = {(8, 16): (8, 8), (2, 8, 8): (1, 8, 8)}


def refused_dkdv(config: KernelConfig, head_dim_p2: int) -> str | None:
    """Why a dK/dV configuration must not run, or None. Measured on an H200 (Triton 3.6,
    fp16, ``benchmarks/checks/dkdv_wrong_config.py``): Q-major with pointer loads, 32-token
    Q tiles, 128-token KV tiles and d=128 gives a wrong dK (relative error 5e-2; dV, dQ
    right) at 2 and 3 stages, while the same tiles through TMA, KV-major, 64-token Q tiles,
    64-token KV tiles or d=64 are right. No default produces it (without TMA, KV tiles stay
    at 64 tokens for d=128); :func:`launch_backward` refuses it rather than return wrong
    gradients."""
    m, n = math.prod(config.q_tile), math.prod(config.kv_tile)
    if not (config.kv_major or config.use_tma) and m < 64 and n * head_dim_p2 > _MAX_KV_ELEMENTS:
        return ("Q-major pointer-load dK/dV with Q tiles under 64 tokens and KV tiles over "
                f"{_MAX_KV_ELEMENTS // head_dim_p2} tokens computes wrong dK on Hopper "
                "(Triton 3.6); use TMA, the KV-major layout or smaller KV tiles")
    return None


@functools.lru_cache(maxsize=256)
def backward_configs(geo: Geometry, config: LaunchConfig, elem: int, head_dim_p2: int,
                     limit: int, fma_dots: bool = False) -> tuple[KernelConfig, KernelConfig]:
    """``(dq, dkdv)`` kernel configurations for ``geo``, derived from the forward's ``config``
    (see the measurements above): on Hopper (``config.use_tma``) with fp16/bf16 and head
    dims up to 128, dK/dV runs KV-major through TMA; elsewhere, Q-major with pointer loads."""
    dq = _kernel_config("dq", config, elem, head_dim_p2, limit, fma_dots)
    dkdv = _kernel_config("dkdv", config, elem, head_dim_p2, limit, fma_dots)
    if not config.use_tma:
        return dq, dkdv
    if config.gluon_block_sparse and _gluon_geometry_ineligible(
            "dq", geo, _pad3(dq.q_tile, 1), _pad3(dq.kv_tile, 1)) is None:
        dq = dataclasses.replace(dq, gluon_stages=_gluon_stages("dq", math.prod(dq.kv_tile)))
    dkdv = dataclasses.replace(dkdv, use_tma=True)
    # A 128-token KV tile: the forward's, else its Q tile (shaped for the layout the same way).
    kv_tile = next((tuple(t) for t in (config.kv_tile, config.q_tile)
                    if math.prod(t) == _KV_MAJOR_KV_TOKENS), None)
    if elem != 2 or head_dim_p2 != 128 or kv_tile is None:
        return dq, dkdv
    q_tile = _KV_MAJOR_Q_TILE.get(tuple(config.q_tile)) or _halve(tuple(config.q_tile), 2)
    if math.prod(q_tile) != 64:
        return dq, dkdv
    if geo.ndim == 3 and geo.has_partial_tiles(q_tile, kv_tile):
        q_tile = _halve(q_tile, 2)
    m = math.prod(q_tile)
    stages = next((s for s in (3, 2) if _dkdv_shared(m, 128, 128, 2, s) <= limit), 0)
    if stages:
        gluon = config.gluon_block_sparse and _gluon_geometry_ineligible(
            "dkdv", geo, _pad3(q_tile, 1), _pad3(kv_tile, 1)) is None
        dkdv = KernelConfig(q_tile, kv_tile, 8, stages, kv_major=True, use_tma=True,
                            gluon_stages=_gluon_stages("dkdv", 128) if gluon else 0)
    return dq, dkdv


# --- Gluon block-sparse kernels (Hopper) ---------------------------------------------------

# The persistent warp-specialized kernels of gna.kernels.backward_gluon. Shared memory (fp16,
# d=128): dK/dV keeps K and V (64 KiB) and rings 4 slots of 64-query Q and dO tiles (128 KiB);
# dQ keeps Q and dO (64 KiB) and rings K and V tiles in the remaining 128 KiB: 4 slots of the
# Triton dQ's 64-key tiles. Measured on an H200 (fp16, d=128, kernel ms, median of 9 calls,
# benchmarks/results/backward_sweep.jsonl, session 6), against the Triton kernels:
#
#   problem               dK/dV Triton  Gluon 4 slots  Gluon 3 slots
#   1-D 32k s2048            0.147         0.126          0.126
#   2-D 256x256 s16          22.2          17.6           17.4
#   3-D 30x48x80 s16x8x8     63.5          55.5           54.9
#
#   problem               dQ Triton  Gluon 64-key tiles, 4 slots  128-key tiles, 2 slots
#   1-D 32k s2048           0.090            0.085                     0.091
#   2-D 256x256 s16         12.6             11.2                      12.6
#   3-D 30x48x80 s16x8x8    39.2             33.5                      36.1
#
# (3 or 4 slots for dK/dV: within the noise; 4 kept.) On the dQ kernel's own tiles the Gluon
# dQ is also bit-identical to the Triton one (tested), as the Gluon dK/dV is.
_GLUON_RING_BYTES = 128 * 1024  # at d=128, 2-byte inputs


def _gluon_stages(kind: str, kv_tokens: int) -> int:
    """Ring slots of a Gluon kernel (at most 4): dK/dV's 64-query Q/dO tiles, or dQ's K/V
    tiles of ``kv_tokens`` keys, in ``_GLUON_RING_BYTES`` at d=128."""
    if kind == "fused":
        return _GLUON_FUSED_STAGES
    per_slot = 2 * 2 * 128 * (64 if kind == "dkdv" else kv_tokens)
    return min(4, _GLUON_RING_BYTES // per_slot)


_GLUON_NUM_WARPS = 4  # per consumer warpgroup; the kernels add one more and a producer warp
_GLUON_MAXNREG = 168  # 12 warps (3 warpgroups) x 32 threads x 168 fits 64K registers
# Registers (setmaxnreg) of the consumer warpgroups and the producer warp. dK/dV holds two
# fp32 [64 x d] accumulators and two [64 x 64] score tiles: at 232 its sm_90 code spills in
# the loop more than at 240 (ptxas: 20 B either way, 60 B at 224).
_GLUON_REGS = {"dkdv": (240, 32), "dq": (232, 40), "fused": (240, 32)}
# The fused dK/dV/dQ kernel's Q/dO ring: its dS and dQ staging buffers (64 KB at d=128) leave
# room for 3 slots in an H100's 227 KB.
_GLUON_FUSED_STAGES = 3
# Where the fused kernel also takes problems with partially masked tiles (stride 1, causal):
# 2-D, where it measured faster than the separate Gluon kernels (256x256 w80: 35.6 -> 33.7
# ms), not 1-D (32k tokens, w2048: 0.245 -> 0.260 ms); H200, fp16, d=128, session 11 of
# benchmarks/NOTES.md. (3-D problems with partial tiles get 32-token dK/dV Q tiles, which no
# Gluon dK/dV kernel takes.)
_FUSED_PARTIAL_NDIMS = (2,)
_CAST_BLOCK = 4096  # elements per program of the dQ accumulator's cast


@functools.lru_cache(maxsize=256)
def _gluon_geometry_ineligible(kind: str, geo: Geometry, q_tile: tuple, kv_tile: tuple):
    """The geometric half of :func:`gluon_backward_ineligible` (padded 3-D tiles): cached,
    since counting the tiles walks the whole layout."""
    m, n = math.prod(q_tile), math.prod(kv_tile)
    if kind == "dq" and (m != 128 or n not in (64, 128)):
        return f"needs 128-token Q and 64- or 128-token KV tiles, got {q_tile}/{kv_tile}"
    if kind in ("dkdv", "fused") and (m, n) != (64, 128):
        return f"needs 64-token Q and 128-token KV tiles, got {q_tile}/{kv_tile}"
    if any(d != 1 for d in geo.dilation):
        return "dilation"
    return None


def gluon_backward_ineligible(kind: str, q, k, v, dout, extra_k, geo: Geometry,
                              q_tile: tuple, kv_tile: tuple, stages: int = 4) -> str | None:
    """Why the Gluon block-sparse ``kind`` kernel (``"dq"``, ``"dkdv"`` or ``"fused"``, see
    :mod:`gna.kernels.backward_gluon`) cannot run this call with these tiles, or None if it
    can: Hopper, fp16/bf16, head dims 64 and 128, no dilation, q, k, v, dout readable through
    5-D tensor descriptors (see :func:`gna.triton_backend.gluon_block_sparse_ineligible`) and
    a ring of ``stages`` slots that fits shared memory. dQ also needs 128-token Q tiles, 64- or
    128-token KV tiles, no additional keys (whose dQ the Triton kernel adds in the same loop)
    and, with two batches or more, KV tiles that do not overhang a batch's first dimension; it
    masks partial KV tiles as the Triton kernel does. dK/dV needs 64-token Q tiles and 128-token
    KV tiles, and Q tiles that do not overhang a batch's first dimension (a Q box past it would
    read the next batch's queries, which the dK/dV sums would take in); it masks partial Q
    tiles as the Triton KV-major kernel does. ``"fused"`` (dK, dV and dQ in one kernel) needs
    what dK/dV needs and no additional keys (where the launcher takes it:
    :func:`_fused_preferred`)."""
    q_tile, kv_tile = _pad3(q_tile, 1), _pad3(kv_tile, 1)
    why = _gluon_geometry_ineligible(kind, geo, q_tile, kv_tile)
    if why:
        return why
    if kind in ("dq", "fused") and extra_k is not None:
        return "additional keys/values"
    why = gluon_dtype_ineligible(q)
    if why:
        return why
    geo3 = _plan(geo, q_tile, kv_tile).geo3
    if kind in ("dkdv", "fused") and q.shape[0] > 1 and geo3.shape[0] % q_tile[0]:
        return f"Q tiles {q_tile} overhang the first dimension ({geo3.shape[0]}) of a batch"
    if kind == "dq" and q.shape[0] > 1 and geo3.shape[0] % kv_tile[0]:
        # A partial KV box past a batch's first dimension would read the next batch's keys
        # (masked, but 0 * inf there would still be NaN); past the tensor's end, and in the
        # other dimensions, the copy engine reads zeros.
        return f"KV tiles {kv_tile} overhang the first dimension ({geo3.shape[0]}) of a batch"
    why = gluon_device_ineligible((q, k, v, dout), geo3, geo.ndim)
    if why:
        return why
    elem, head_dim = q.element_size(), q.shape[-1]
    if kind == "dq":  # Q, dO; per slot K, V
        need = elem * head_dim * 2 * (128 + math.prod(kv_tile) * stages)
    else:  # K, V; per slot Q, dO and their two row statistics
        need = elem * head_dim * 2 * (128 + 64 * stages) + 4 * 2 * 64 * stages
    if kind == "fused":  # two slots of dS^T, two warpgroups' dQ shares in fp32
        need += 2 * 128 * 64 * elem + 2 * 64 * (head_dim // 2) * 4
    if need > shared_limit(q.device):
        return f"needs {need} bytes of shared memory"
    return None


def _gluon_descriptors(named, geo3: Geometry, ndim: int) -> tuple:
    """``(buffer name, shape, strides, block, layout)`` per ``(name, tensor, tile)``: the
    Gluon kernels' host descriptors over the named buffers of a call."""
    specs = gluon_descriptor_specs(((t, tile) for _, t, tile in named), geo3, ndim)
    return tuple((name, *spec) for (name, _, _), spec in zip(named, specs))


def _plan_gluon_dkdv(q, k, v, dout, dk, dv, geo, plan, inv_plan, inv, qr, stat_stride,
                     qk_scale, scale, stages) -> _Launch:
    from triton.experimental.gluon import language as gl

    from .kernels.backward_gluon import gna_backward_dkdv_block_sparse_kernel

    ndim = geo.ndim
    batch, heads, heads_kv = q.shape[0], q.shape[-2], k.shape[-2]
    block_m = math.prod(plan.q_tile)
    descriptors = _gluon_descriptors(
        (("q", q, plan.q_tile), ("dout", dout, plan.q_tile), ("k", k, plan.kv_tile),
         ("v", v, plan.kv_tile)), plan.geo3, ndim)
    # The tile-major row statistics as one row of floats, a Q tile's 64 per box.
    stats_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    descriptors += (("stats", [2 * stat_stride], [1], [block_m], stats_layout),)
    kv_tiles = math.prod(inv_plan.n_kv_tiles)
    num_items = kv_tiles * batch * heads_kv
    programs = min(num_items, torch.cuda.get_device_properties(q.device).multi_processor_count)
    scalars = (*_strides(dk, ndim), *_strides(dv, ndim), *plan.geo3.shape[:1], *plan.geo3.shape,
               *inv_plan.n_kv_tiles[1:], kv_tiles, inv.stride(0), inv.stride(2),
               qr.stride(0), qr.stride(2), heads_kv, heads // heads_kv, *plan.n_tiles[1:],
               math.prod(plan.n_tiles), stat_stride, qk_scale, scale)
    regs = _GLUON_REGS["dkdv"]
    return _Launch(gna_backward_dkdv_block_sparse_kernel, (programs, 1, 1),
                   ("dk", "dv", "inv", "win_dkdv", "sched_dkdv"),
                   scalars, dict(STAGES=stages, CONSUMER_REGS=regs[0], PRODUCER_REGS=regs[1]),
                   _GLUON_NUM_WARPS, 1, False, descriptors, _GLUON_MAXNREG)


def _plan_gluon_fused(dkdv: _Launch, q, geo, plan) -> _Launch:
    """The fused dK/dV/dQ launch: the Gluon dK/dV launch's arguments and a descriptor over
    the fp32 dQ accumulator (``dq_acc``, laid out as a contiguous ``q``) in boxes of one Q tile
    and half the head dimension."""
    from .kernels.backward_gluon import gna_backward_fused_block_sparse_kernel

    acc = torch.empty(q.shape, dtype=torch.float32, device="meta")
    (spec,) = gluon_descriptor_specs(((acc, plan.q_tile, q.shape[-1] // 2),), plan.geo3,
                                     geo.ndim)
    regs = _GLUON_REGS["fused"]
    return dataclasses.replace(
        dkdv, kernel=gna_backward_fused_block_sparse_kernel,
        descriptors=dkdv.descriptors + (("dq_acc", *spec),),
        constexprs=dict(STAGES=_GLUON_FUSED_STAGES, CONSUMER_REGS=regs[0],
                        PRODUCER_REGS=regs[1]), compiled=[])


def _plan_gluon_dq(q, k, v, dout, dq, geo, c: KernelConfig, l_strides, qk_scale,
                   scale) -> tuple[_Launch, torch.Tensor, torch.Tensor]:
    """The dQ launch and its window and KV range tables (the forward's, for the dQ kernel's
    tiles)."""
    from .kernels.backward_gluon import gna_backward_dq_block_sparse_kernel

    ndim = geo.ndim
    batch, heads, heads_kv = q.shape[0], q.shape[-2], k.shape[-2]
    plan = _plan(geo, c.q_tile, c.kv_tile)
    win, rng = _device_tables(plan, q.device)
    descriptors = _gluon_descriptors(
        (("q", q, plan.q_tile), ("dout", dout, plan.q_tile), ("k", k, plan.kv_tile),
         ("v", v, plan.kv_tile)), plan.geo3, ndim)
    num_items = math.prod(plan.n_tiles) * batch * heads
    programs = min(num_items, torch.cuda.get_device_properties(q.device).multi_processor_count)
    scalars = (*_strides(dq, ndim), *l_strides, *plan.geo3.shape[:1], *plan.geo3.shape,
               *plan.n_tiles, rng.stride(0), rng.stride(2), win.stride(0), win.stride(2),
               heads, heads // heads_kv, qk_scale, scale, num_items)
    regs = _GLUON_REGS["dq"]
    return _Launch(gna_backward_dq_block_sparse_kernel, (programs, 1, 1),
                   ("dq", "lse", "delta", "rng", "win_dq"), scalars,
                   dict(STAGES=c.gluon_stages, CONSUMER_REGS=regs[0], PRODUCER_REGS=regs[1],
                        PARTIAL=geo.has_partial_tiles(plan.q_tile[3 - ndim:],
                                                      plan.kv_tile[3 - ndim:])),
                   _GLUON_NUM_WARPS, 1, False, descriptors, _GLUON_MAXNREG), win, rng


def launch_backward(q, k, v, extra_k, extra_v, out, lse, dout, dlse, geo: Geometry,
                    scale: float, config: LaunchConfig, tf32: bool = False,
                    configs: tuple[KernelConfig, KernelConfig] | None = None,
                    deterministic: bool = False):
    """Gradients of GNA w.r.t. ``q, k, v`` and the additional keys/values.

    Args:
        q: ``[batch, *spatial, heads, head_dim]``; k, v: ``[batch, *spatial, heads_kv,
            head_dim]``; any strides with unit last-dimension stride (views of a fused qkv
            tensor are read in place).
        extra_k, extra_v: ``[batch, n_extra, heads_kv, head_dim]`` or None.
        out, lse: the forward's output and float32 natural-log LSE ``[batch, *spatial, heads]``.
        dout: gradient of ``out``; dlse: gradient of ``lse`` (None means zero).
        geo, scale: the forward's geometry and softmax scale.
        config: the forward's tiles and launch options; each kernel starts from them and is
            fitted to the device's shared memory.
        tf32: fp32 inputs multiply in TF32 instead of IEEE fp32.
        configs: ``(dq, dkdv)`` kernel configurations instead of :func:`backward_configs`'
            (tuning scripts and tests).
        deterministic: run-to-run identical gradients: never the fused Gluon kernel, whose dQ
            adds the KV tiles' shares in whatever order they finish (dK and dV are
            deterministic either way).

    Returns ``(dq, dk, dv, dextra_k, dextra_v)`` with the inputs' shapes and dtypes
    (contiguous); the extra gradients are None without additional keys.
    """
    q, k, v, out, dout = (unit_last(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    if extra_k is not None:
        extra_k, extra_v = unit_last(extra_k), unit_last(extra_v)
    views = (q, k, v, out, dout) if extra_k is None else (q, k, v, out, dout, extra_k, extra_v)
    # The plan keeps its compiled kernels, specialized on every pointer's 16-byte alignment:
    # the views' (signature), the LSE's and dLSE's; the buffers allocated here are aligned.
    key = (geo, config, configs, tf32, deterministic, scale, lse.data_ptr() % 16,
           None if dlse is None else dlse.data_ptr() % 16, signature(views))
    plan = _BACKWARD_PLANS.get(key) or cache_plan(
        _BACKWARD_PLANS, key, lambda: _plan_backward(q, k, v, extra_k, extra_v, out, dout,
                                                     dlse is not None, geo, scale, config,
                                                     tf32, configs, deterministic))
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    stats = torch.empty(2 * plan.stat_stride, dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # The fused kernel's fp32 dQ accumulator (zeroed by the delta kernel).
    dq_acc = torch.empty(q.shape, dtype=torch.float32, device=q.device) if plan.fused else dq
    buffers = dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, delta=delta, stats=stats,
                   dq=dq, dk=dk, dv=dv, dq_acc=dq_acc,
                   dlse=delta if dlse is None else dlse, extra_k=k if extra_k is None else extra_k,
                   extra_v=v if extra_v is None else extra_v, **plan.tables)
    for launch in plan.launches:
        launch_planned(launch.compiled, launch.kernel, launch.grid,
                       tuple(buffers[n] for n in launch.tensors),
                       tuple((GluonDescriptor, buffers[name], *spec)
                             for name, *spec in launch.descriptors),
                       launch.scalars, launch.constexprs, launch.num_warps, launch.num_stages,
                       launch.maxnreg, launch.tma)
    if extra_k is None:
        return dq, dk, dv, None, None
    dextra_k, dextra_v = _launch_extra(q, extra_k, extra_v, dout, lse, delta, plan.l_strides,
                                       _pad3(geo.shape, 1), geo.ndim, scale, scale * _LOG2E,
                                       plan.dkdv_config, plan.head_dim_p2, plan.precision)
    return dq, dk, dv, dextra_k, dextra_v


@dataclass(frozen=True)
class _Launch:
    """One kernel launch of the backward, its tensors named (filled in per call). Gluon
    launches also take host tensor descriptors, ``(name, shape, strides, block, layout)``, made
    per call over the named buffers and passed after the tensors."""

    kernel: object
    grid: tuple[int, int, int]
    tensors: tuple[str, ...]
    scalars: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    tma: bool
    descriptors: tuple = ()
    maxnreg: int | None = None
    # Filled by the first launch (gna.triton_backend.launch_planned).
    compiled: list = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class _BackwardPlan:
    launches: tuple[_Launch, ...]
    tables: dict  # geometry tables on the device, by name
    stat_stride: int  # elements of one tile-major row statistic (the stats buffer holds two)
    l_strides: tuple
    dkdv_config: KernelConfig
    head_dim_p2: int
    precision: str
    fused: bool  # dQ comes from the fused kernel's fp32 accumulator (``dq_acc``)


_BACKWARD_PLANS: dict = {}


def _fused_preferred(geo: Geometry, q_tile: tuple, kv_tile: tuple) -> bool:
    """Whether the launcher takes the fused Gluon kernel where it qualifies: on perfectly
    block-sparse layouts, and on layouts with partially masked tiles in
    ``_FUSED_PARTIAL_NDIMS`` (tiles as the dK/dV configuration gives them)."""
    ndim = geo.ndim
    return ndim in _FUSED_PARTIAL_NDIMS or not geo.has_partial_tiles(
        _pad3(q_tile, 1)[3 - ndim:], _pad3(kv_tile, 1)[3 - ndim:])


def _plan_backward(q, k, v, extra_k, extra_v, out, dout, has_dlse, geo, scale, config, tf32,
                   configs, deterministic) -> _BackwardPlan:
    """The delta, dK/dV and dQ launches for these inputs' shapes, strides and alignments;
    unless ``deterministic``, where the fused Gluon kernel qualifies (on problems with
    partially masked tiles, in ``_FUSED_PARTIAL_NDIMS`` only), the delta launch (which then
    zeroes its fp32 dQ accumulator), that kernel and the accumulator's cast to dQ. (With
    the balanced dK/dV schedule the fused kernel measured 2-10% faster than the separate
    Gluon kernels on the block-sparse layouts tried, 1-D to 3-D, and equal within 2% on the
    3-D benchmark problem; session 11 of ``benchmarks/NOTES.md``. Its accumulator, 4 bytes
    per element of q, took the benchmark step's peak memory from 0.35x to 1.01x of cuDNN's.)"""
    ndim = geo.ndim
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    groups_per_kv = heads // heads_kv
    head_dim_p2 = _next_pow2(max(head_dim, 16))
    fma_dots = q.dtype == torch.float32 and not tf32
    if configs is None:
        configs = backward_configs(geo, config, q.element_size(), head_dim_p2,
                                   shared_limit(q.device), fma_dots)
    dq_config, dkdv_config = configs
    if dq_config.use_tma and not _tma_compatible(k, v):
        dq_config = dataclasses.replace(dq_config, use_tma=False)
    if dkdv_config.use_tma and not _tma_compatible(q, dout):
        # Unaligned Q / dO: the pointer-load layout this device would get without TMA.
        dkdv_config = _kernel_config("dkdv", dataclasses.replace(config, use_tma=False),
                                     q.element_size(), head_dim_p2, shared_limit(q.device),
                                     fma_dots)
    refused = refused_dkdv(dkdv_config, head_dim_p2)
    if refused:
        raise ValueError(f"dK/dV configuration {dkdv_config} at head_dim {head_dim}: {refused}")
    precision = "tf32" if tf32 else "ieee"
    qk_scale = scale * _LOG2E
    # The buffers each call allocates are contiguous: their strides, from meta tensors.
    delta, dq, dk, dv = (torch.empty(shape, device="meta")
                         for shape in (q.shape[:-1], q.shape, k.shape, v.shape))
    c = dkdv_config
    gluon = c.gluon and gluon_backward_ineligible("dkdv", q, k, v, dout, extra_k, geo,
                                                  c.q_tile, c.kv_tile, c.gluon_stages) is None
    fused = gluon and not deterministic and _fused_preferred(geo, c.q_tile, c.kv_tile) and (
        gluon_backward_ineligible("fused", q, k, v, dout, extra_k, geo, c.q_tile, c.kv_tile,
                                  _GLUON_FUSED_STAGES) is None)

    plan = _plan(geo, c.q_tile, c.kv_tile)
    geo_args = (*plan.geo3.shape, *plan.geo3.dilation)
    n_groups = math.prod(plan.geo3.dilation)
    n_q_tiles = math.prod(plan.n_tiles)
    block_m = math.prod(c.q_tile)
    # Row statistics of the dK/dV kernel's Q tiles, tile-major (lse * log2(e), then delta).
    stat_stride = batch * heads * n_groups * n_q_tiles * block_m

    # delta = rowsum(dO * O) - dlse, fp32, laid out like a contiguous lse (as are lse, dlse),
    # and both statistics tile-major for dK/dV: one program per dK/dV Q tile.
    s = delta.stride()
    l_strides = (s[0], *_pad3(s[1: 1 + ndim], 0), s[-1])
    nt1, nt2 = plan.n_tiles[1], plan.n_tiles[2]
    launches = [_Launch(
        gna_backward_delta_kernel, (n_q_tiles, n_groups, batch * heads),
        ("out", "dout", "lse", "dlse", "delta", "stats", "dq_acc"),
        (*_strides(out, ndim), *_strides(dout, ndim), *l_strides, *_strides(dq, ndim),
         *geo_args, nt1, nt2, n_q_tiles, n_groups, heads, stat_stride),
        dict(T0=plan.q_tile[0], T1=plan.q_tile[1], T2=plan.q_tile[2], HEAD_DIM=head_dim_p2,
             head_dim=head_dim, HAS_DLSE=has_dlse, ZERO_DQ=fused),
        8 if block_m * head_dim_p2 >= _DELTA_ELEMENTS_8_WARPS else 4, 1, False)]

    # dK, dV: per KV tile, the inverse range of Q tiles.
    # Masks: per query its key window, or (KV-major) per key the queries that see it.
    win_dkdv = (_device_query_ranges(plan.geo3, q.device) if c.kv_major or gluon
                else _device_tables(plan, q.device)[0])
    inv_plan, inv = _device_inv(geo, c.q_tile, c.kv_tile, q.device)
    tables = dict(win_dkdv=win_dkdv, inv=inv)
    if gluon:
        launch = _plan_gluon_dkdv(q, k, v, dout, dk, dv, geo, plan, inv_plan, inv, win_dkdv,
                                  stat_stride, qk_scale, scale, c.gluon_stages)
        tables["sched_dkdv"] = _device_dkdv_schedule(plan, batch, heads_kv, groups_per_kv,
                                                     launch.grid[0], q.device)
        launches.append(_plan_gluon_fused(launch, q, geo, plan) if fused else launch)
    else:
        launches.append(_Launch(
            gna_backward_dkdv_kernel, (math.prod(inv_plan.n_kv_tiles), n_groups,
                                       batch * heads_kv),
            ("q", "k", "v", "dout", "stats", "dk", "dv", "win_dkdv", "inv"),
            (*_strides(q, ndim), *_strides(k, ndim), *_strides(v, ndim), *_strides(dout, ndim),
             *_strides(dk, ndim), *_strides(dv, ndim),
             *geo_args, *inv_plan.n_kv_tiles, nt1, nt2, n_q_tiles, stat_stride,
             *win_dkdv.stride()[:3], *inv.stride()[:3],
             heads_kv, groups_per_kv, qk_scale, scale),
            dict(_tile_constexprs(plan), HEAD_DIM=head_dim_p2, head_dim=head_dim,
                 PRECISION=precision, KV_MAJOR=c.kv_major, USE_TMA=c.use_tma),
            c.num_warps, c.num_stages, c.use_tma))

    # dQ: per Q tile, the forward's range of KV tiles, then the additional keys; or, from the
    # fused kernel's accumulator, dQ = accumulator x scale.
    c = dq_config
    if fused:
        launches.append(_Launch(gna_backward_dq_cast_kernel,
                                (triton.cdiv(q.numel(), _CAST_BLOCK), 1, 1), ("dq_acc", "dq"),
                                (q.numel(), scale), dict(BLOCK=_CAST_BLOCK), 4, 1, False))
    elif c.gluon and gluon_backward_ineligible("dq", q, k, v, dout, extra_k, geo, c.q_tile,
                                               c.kv_tile, c.gluon_stages) is None:
        launch, tables["win_dq"], tables["rng"] = _plan_gluon_dq(q, k, v, dout, dq, geo, c,
                                                                 l_strides, qk_scale, scale)
        launches.append(launch)
    else:
        _, _, extra_strides, num_extra = extra_args(k, v, extra_k, extra_v)
        plan = _plan(geo, c.q_tile, c.kv_tile)
        tables["win_dq"], tables["rng"] = win_dq, rng = _device_tables(plan, q.device)
        launches.append(_Launch(
            gna_backward_dq_kernel, (math.prod(plan.n_tiles), n_groups, batch * heads),
            ("q", "k", "v", "extra_k", "extra_v", "dout", "lse", "delta", "dq", "win_dq", "rng"),
            (*_strides(q, ndim), *_strides(k, ndim), *_strides(v, ndim), *_strides(dout, ndim),
             *l_strides, *_strides(dq, ndim), *extra_strides,
             *geo_args, *plan.n_tiles, *win_dq.stride()[:3], *rng.stride()[:3],
             heads, groups_per_kv, num_extra, qk_scale, scale),
            dict(_tile_constexprs(plan), HEAD_DIM=head_dim_p2, head_dim=head_dim,
                 HAS_EXTRA=num_extra > 0, PRECISION=precision, USE_TMA=c.use_tma),
            c.num_warps, c.num_stages, c.use_tma))
    return _BackwardPlan(tuple(launches), tables, stat_stride, l_strides, dkdv_config,
                         head_dim_p2, precision, fused)


def _launch_extra(q, extra_k, extra_v, dout, lse, delta, l_strides, lengths, ndim, scale,
                  qk_scale, config: KernelConfig, head_dim_p2, precision):
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
    launch_cached(
        gna_backward_extra_kernel, (n_tiles, splits, batch * heads_kv),
        (q, extra_k, extra_v, dout, lse, delta, part[0], part[1]),
        (*_strides(q, ndim), *_strides(dout, ndim), *l_strides,
         *extra_k.stride()[:3], *extra_v.stride()[:3], *part.stride()[1:5],
         lengths[1], lengths[2], num_tokens, per_split,
         heads_kv, q.shape[-2] // heads_kv, num_extra, qk_scale),
        dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim_p2, head_dim=head_dim,
             PRECISION=precision), config.num_warps, config.num_stages)
    grads = part.sum(1)
    return (grads[0] * scale).to(extra_k.dtype), grads[1].to(extra_v.dtype)
