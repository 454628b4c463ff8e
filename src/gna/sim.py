"""The GNA simulator (the GNA paper's "NATTEN Sim"): how much of the FLOP-wise speedup a tiled
kernel can realize, counted without running anything.

Everything here is counted from :mod:`gna.geometry` (windows, per-dimension tile ranges,
mask-free tiles); no rule is re-derived. Definitions (DESIGN.md section 5):

* **FLOP-wise speedup**: dense pairs ``N**2`` over the exact number of attended pairs.
* **KV tiles of the layout**: the KV tiles a dense kernel tiled the same way would visit per Q
  tile: ``prod(ceil(L_g / kv_tile))`` summed over the dilation groups (tiles never straddle
  groups; a tile that overhangs the end of an axis counts whole).
* **Analytical bound** (the paper's): KV tiles of the layout / the most KV tiles any single Q
  tile visits. Q tiles run in parallel, so the worst one bounds the kernel.
* **Average-based figure**: KV tiles of the layout / the mean over Q tiles of visited tiles
  (what perfect load balancing of uneven Q tiles would give).
* **Masked share**: visited (Q tile, KV tile) pairs that need a mask / all visited pairs. A KV
  tile is mask-free when every query of the Q tile sees every key of the (unclipped) KV tile.
* **Perfectly block-sparse**: the tiled work equals the attended work even when charged at the
  worst Q tile, i.e. ``N * max_visited * kv_volume == attended pairs``. Equivalently (proof in
  :func:`_figures`): every visited KV tile is mask-free *and* every Q tile visits the same
  number of KV tiles. Then ``bound == flop_speedup`` exactly; in any other setting whose KV
  tiles divide the layout the bound is lower (overhanging tiles, counted whole, blur this: a
  1-token layout in one 8-token tile has bound 1 == FLOP-wise 1, its one tile masked). Without
  causal masking the second condition follows from the first (every query then sees exactly
  ``prod(kernel_size)`` keys); a causal axis with a Q tile or window larger than one never
  qualifies, because its first queries see fewer keys than its last.
* **1-D tiling of the flattened sequence** (the "curse of multi-dimensionality"): each dilation
  group's tokens, flattened row-major, cut into 1-D Q and KV tiles of the same volumes as the
  multi-dimensional tiles. A 1-D block-sparse kernel visits exactly the KV tiles holding at
  least one key that some query of the Q tile sees (as a block mask would); they are counted
  exactly, from per-axis prefix sums (:func:`_flat_counts`), without building a mask.

The kernels' tile cost model lives here too (:func:`predicted_cost`, :func:`rank_tiles`,
:data:`MASK_COST`, :data:`TILE_OVERHEAD`), with the candidate tiles the Triton kernels choose
from (:func:`kernel_candidates`), and a vectorized search over strides and tile shapes
(:func:`search`).

Example::

    >>> from gna import sim
    >>> r = sim.simulate((30, 48, 80), (18, 24, 24), stride=(16, 8, 8),
    ...                  q_tile=(4, 8, 8), kv_tile=(2, 8, 8))
    >>> round(r.flop_speedup, 2), round(r.tiled.bound, 2), r.tiled.perfectly_block_sparse
    (11.11, 11.11, True)
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .args import normalize_geometry, per_dim
from .geometry import Dim, Geometry, group_length

__all__ = [
    "TilingFigures", "SimReport", "TileChoice", "StrideSetting", "SearchResult",
    "simulate", "simulate_geometry", "predicted_cost", "rank_tiles", "kernel_candidates",
    "default_tiles", "candidate_tiles", "stride_grid", "search",
    "MASK_COST", "TILE_OVERHEAD", "REFERENCE_Q_VOLUME", "KERNEL_TILES", "SUPPORTED_VOLUMES",
]

# ---------------------------------------------------------------------------------------------
# Kernel cost model and candidate tiles (the numbers triton_backend's default_config uses)

# Cost of one KV tile visit, in "key tokens" of a 128-token Q tile: the tile's volume, times
# MASK_COST[ndim] when the tile is partial (needs a mask), plus TILE_OVERHEAD. Fitted to the H100
# forward sweep (fp16, d=128, benchmarks/results/forward_sweep.jsonl): 128-token KV tiles won on
# perfectly block-sparse settings (3-D stride 16x8x8: 35.5 ms vs 39.6 ms with 64-token tiles),
# 64-token ones where many tiles are partial (3-D stride 1: 78.6 ms vs 91.3 ms). A 3-D mask is
# 6 compares per score, hence the larger factor.
MASK_COST = {1: 1.0, 2: 1.0, 3: 3.0}
TILE_OVERHEAD = 24
# The Q tile volume the constants above were measured at. rank_tiles compares Q tiles of other
# volumes by scaling a visit's whole cost (work and overhead alike, the overhead read as
# TILE_OVERHEAD extra key columns) by the Q volume over this one.
REFERENCE_Q_VOLUME = 128

# The Triton kernels' candidate tiles per number of dimensions: (Q tile, KV tiles), before
# fitting them to the problem (kernel_candidates); for head_dim > 128 each volume is halved.
KERNEL_TILES = {
    1: ((128,), ((64,), (128,))),
    2: ((8, 16), ((8, 8), (8, 16))),
    3: ((2, 8, 8), ((2, 4, 8), (1, 8, 8), (2, 8, 8))),
}
# Tile volumes (tokens) the search tries for Q and KV tiles, like the kernels' tiles.
SUPPORTED_VOLUMES = (64, 128)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _halve(tile: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """Divide a tile's volume by ``factor`` (1 or 2), taking it off the largest dimension."""
    if factor == 1:
        return tile
    tile = list(tile)
    tile[tile.index(max(tile))] //= factor
    return tuple(tile)


def _fit(tile: tuple[int, ...], lengths: tuple[int, ...]) -> tuple[int, ...]:
    """Shrink tile dimensions longer than the axis, moving the volume to the last axis."""
    fitted = [min(t, _next_pow2(n)) for t, n in zip(tile, lengths)]
    volume = math.prod(tile)
    for a in reversed(range(len(fitted))):
        while math.prod(fitted) < volume and fitted[a] < _next_pow2(lengths[a]):
            fitted[a] *= 2
    return tuple(fitted)


def _group0_lengths(geo: Geometry) -> tuple[int, ...]:
    """Axis lengths of dilation group 0, the longest group of every axis."""
    return tuple(group_length(n, d, 0) for n, d in zip(geo.shape, geo.dilation))


def kernel_candidates(geo: Geometry, head_dim: int = 128) -> list[tuple[tuple, tuple]]:
    """The ``(q_tile, kv_tile)`` pairs the Triton forward kernel chooses its defaults from:
    :data:`KERNEL_TILES` halved for ``head_dim > 128`` and fitted to the problem's axes."""
    q_target, kv_targets = KERNEL_TILES[geo.ndim]
    shrink = 2 if head_dim > 128 else 1
    lengths = _group0_lengths(geo)
    q_tile = _fit(_halve(q_target, shrink), lengths)
    kv_tiles = sorted({_fit(_halve(t, shrink), lengths) for t in kv_targets})
    return [(q_tile, kv) for kv in kv_tiles]


def _tile(name: str, tile, ndim: int) -> tuple[int, ...]:
    tile = per_dim(name, tile, ndim)
    if any(t < 1 for t in tile):
        raise ValueError(f"{name} entries must be >= 1, got {name}={tile}")
    return tile


# ---------------------------------------------------------------------------------------------
# Per-axis counts: a Q tile's visited (and mask-free) KV tiles are a product over axes, so the
# sums, minima and maxima over all Q tiles are products of per-axis figures.

@dataclass(frozen=True)
class _AxisCounts:
    """One axis, summed over its dilation groups: Q and KV tiles, visited tiles per Q tile
    (min, max, sum) and mask-free ones (sum), attended pairs."""

    q_tiles: int
    kv_tiles: int
    visited_min: int
    visited_max: int
    visited_sum: int
    full_sum: int
    attended: int

    @property
    def perfect(self) -> bool:
        return self.visited_min == self.visited_max and self.full_sum == self.visited_sum


@functools.lru_cache(maxsize=1 << 16)
def _axis_counts(length: int, kernel_size: int, stride: int, dilation: int, causal: bool,
                 q_tile: int, kv_tile: int) -> _AxisCounts:
    q_tiles = kv_tiles = visited_sum = full_sum = attended = 0
    visited_min, visited_max = math.inf, 0
    for g in range(dilation):
        dim = Dim(group_length(length, dilation, g), kernel_size, stride, causal)
        r = dim.tile_ranges(q_tile, kv_tile)
        visited = r.visited
        q_tiles += len(visited)
        kv_tiles += dim.num_tiles(kv_tile)
        visited_min = min(visited_min, int(visited.min()))
        visited_max = max(visited_max, int(visited.max()))
        visited_sum += int(visited.sum())
        full_sum += int(r.full.sum())
        attended += dim.attended_pairs()
    return _AxisCounts(q_tiles, kv_tiles, visited_min, visited_max, visited_sum, full_sum,
                       attended)


def _axes(geo: Geometry, q_tile, kv_tile) -> list[_AxisCounts]:
    return [_axis_counts(geo.shape[a], geo.kernel_size[a], geo.stride[a], geo.dilation[a],
                         geo.causal[a], q_tile[a], kv_tile[a]) for a in range(geo.ndim)]


# ---------------------------------------------------------------------------------------------
# Cost model and tile ranking

def predicted_cost(geo: Geometry, q_tile, kv_tile) -> float:
    """The kernels' cost model: KV tile visits summed over all Q tiles, in key tokens.

    ``full * V + partial * V * MASK_COST[ndim] + visited * TILE_OVERHEAD`` with ``V`` the KV
    tile volume and ``full``/``partial``/``visited`` the mask-free, masked and all (Q tile,
    KV tile) visits. Compares KV tiles for one Q tile (the constants were measured with
    128-token Q tiles); :func:`rank_tiles` also compares Q tiles.
    """
    q_tile, kv_tile = _tile("q_tile", q_tile, geo.ndim), _tile("kv_tile", kv_tile, geo.ndim)
    return _cost(geo, q_tile, kv_tile, REFERENCE_Q_VOLUME)


def _cost(geo: Geometry, q_tile, kv_tile, q_volume: int) -> float:
    axes = _axes(geo, q_tile, kv_tile)
    visited = math.prod(a.visited_sum for a in axes)
    full = math.prod(a.full_sum for a in axes)
    volume = math.prod(kv_tile)
    cost = (full * volume + (visited - full) * volume * MASK_COST[geo.ndim]
            + visited * TILE_OVERHEAD)
    return cost if q_volume == REFERENCE_Q_VOLUME else cost * q_volume / REFERENCE_Q_VOLUME


@dataclass(frozen=True)
class TileChoice:
    """A ``(q_tile, kv_tile)`` pair and its predicted cost (lower is faster)."""

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    cost: float


def rank_tiles(geo: Geometry, candidates=None) -> list[TileChoice]:
    """Rank ``(q_tile, kv_tile)`` pairs by predicted cost, cheapest first.

    ``candidates`` defaults to :func:`kernel_candidates`. The cost is :func:`predicted_cost`
    times ``prod(q_tile) / REFERENCE_Q_VOLUME`` (score elements, in units of a 128-token Q
    tile), so pairs sharing a Q tile rank exactly as by :func:`predicted_cost`, and for
    128-token Q tiles the cost *is* :func:`predicted_cost`. Ties go to the smaller pair, as
    ``min(sorted(...))`` would.
    """
    if candidates is None:
        candidates = kernel_candidates(geo)
    ranked = []
    for q_tile, kv_tile in candidates:
        q_tile, kv_tile = _tile("q_tile", q_tile, geo.ndim), _tile("kv_tile", kv_tile, geo.ndim)
        ranked.append(TileChoice(q_tile, kv_tile, _cost(geo, q_tile, kv_tile, math.prod(q_tile))))
    if not ranked:
        raise ValueError("rank_tiles needs at least one (q_tile, kv_tile) candidate")
    return sorted(ranked, key=lambda c: (c.cost, c.q_tile, c.kv_tile))


def default_tiles(geo: Geometry, head_dim: int = 128) -> tuple[tuple, tuple]:
    """The kernels' default ``(q_tile, kv_tile)`` for ``geo``: the cheapest kernel candidate."""
    best = rank_tiles(geo, kernel_candidates(geo, head_dim))[0]
    return best.q_tile, best.kv_tile


# ---------------------------------------------------------------------------------------------
# Reports

@dataclass(frozen=True)
class TilingFigures:
    """Visited KV tiles per Q tile under one tiling, and the figures derived from them.

    ``visited[t]`` and ``masked[t]`` are the KV tiles Q tile ``t`` visits and how many of them
    need a mask. For multi-dimensional tiling the order is :meth:`Geometry.tile_counts`'s
    (dilation groups in :meth:`Geometry.groups` order, Q tiles row-major inside a group); for
    the flattened tiling, groups in the same order and 1-D tiles in sequence order.
    """

    tiling: str  # "multi-dimensional" or "1-D flattened"
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    total_kv_tiles: int
    visited_min: int
    visited_mean: float
    visited_max: int
    bound: float
    average_bound: float
    masked_share: float
    perfectly_block_sparse: bool
    visited: np.ndarray = field(repr=False, compare=False)
    masked: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "tiling": self.tiling, "q_tile": list(self.q_tile), "kv_tile": list(self.kv_tile),
            "total_kv_tiles": self.total_kv_tiles, "visited_min": self.visited_min,
            "visited_mean": self.visited_mean, "visited_max": self.visited_max,
            "bound": self.bound, "average_bound": self.average_bound,
            "masked_share": self.masked_share,
            "perfectly_block_sparse": self.perfectly_block_sparse,
        }


def _figures(tiling: str, q_tile, kv_tile, total: int, visited: np.ndarray,
             full: np.ndarray) -> TilingFigures:
    """Derive the figures from per-Q-tile counts.

    Why "perfectly block-sparse" is "no masked tile and every Q tile visits the same number":
    with ``n_t`` queries in Q tile ``t`` and KV tile volume ``V``, all visited tiles mask-free
    means attended pairs ``A = V * sum_t n_t * visited_t``; and since every key is seen by some
    query, every KV tile is visited, so none overhangs an axis (``V * total == N``). Then
    ``bound / flop_speedup = (total / max) / (N**2 / A) = sum_t n_t visited_t / (N * max)``,
    which is 1 exactly when every ``visited_t`` equals the max (``sum_t n_t == N``). With a
    masked tile and no overhang, ``A < V * sum_t n_t visited_t`` and the ratio is below 1.
    """
    masked = visited - full
    visited_sum = int(visited.sum())
    return TilingFigures(
        tiling=tiling, q_tile=tuple(q_tile), kv_tile=tuple(kv_tile), total_kv_tiles=int(total),
        visited_min=int(visited.min()), visited_mean=float(visited.mean()),
        visited_max=int(visited.max()),
        bound=total / int(visited.max()), average_bound=total / float(visited.mean()),
        masked_share=int(masked.sum()) / visited_sum,
        perfectly_block_sparse=bool(masked.sum() == 0 and visited.min() == visited.max()),
        visited=visited, masked=masked)


@dataclass(frozen=True)
class SimReport:
    """What :func:`simulate` found for one problem and one pair of tile shapes.

    ``tiled`` holds the multi-dimensional tiling's figures, ``flat`` the same for 1-D tiling of
    the flattened sequence (None when not asked for).
    """

    geometry: Geometry
    attended_pairs: int
    dense_pairs: int
    tiled: TilingFigures
    flat: TilingFigures | None
    predicted_cost: float

    @property
    def flop_speedup(self) -> float:
        return self.dense_pairs / self.attended_pairs

    def to_dict(self) -> dict:
        geo = self.geometry
        return {
            "problem": {"input_size": list(geo.shape), "window_size": list(geo.kernel_size),
                        "stride": list(geo.stride), "dilation": list(geo.dilation),
                        "causal": list(geo.causal)},
            "attended_pairs": self.attended_pairs, "dense_pairs": self.dense_pairs,
            "flop_speedup": self.flop_speedup, "predicted_cost": self.predicted_cost,
            "tiled": self.tiled.to_dict(),
            "flat": None if self.flat is None else self.flat.to_dict(),
        }


def simulate(shape, kernel_size, stride=1, dilation=1, is_causal=False, q_tile=None,
             kv_tile=None, *, flat: bool = True) -> SimReport:
    """Simulate a GNA problem: arguments as :func:`gna.neighborhood_attention` takes them
    (validated by the same code, so errors read the same), plus tile shapes.

    ``shape`` is the spatial layout, e.g. ``(30, 48, 80)``. ``q_tile``/``kv_tile`` are per
    dimension (any positive sizes; they need not divide the layout); when either is None the
    kernels' default (:func:`default_tiles`) is used for it. ``flat=False`` skips the 1-D
    flattened comparison.
    """
    geo = normalize_geometry(shape, kernel_size, stride, dilation, is_causal)
    return simulate_geometry(geo, q_tile, kv_tile, flat=flat)


def simulate_geometry(geo: Geometry, q_tile=None, kv_tile=None, *,
                      flat: bool = True) -> SimReport:
    """:func:`simulate` for an already validated :class:`~gna.geometry.Geometry`."""
    if q_tile is None:
        q_tile, default_kv = default_tiles(geo)
        kv_tile = default_kv if kv_tile is None else kv_tile
    q_tile = _tile("q_tile", q_tile, geo.ndim)
    if kv_tile is None:  # the kernels' best KV tile for this Q tile
        kv_tile = rank_tiles(geo, [(q_tile, kv) for _, kv in kernel_candidates(geo)])[0].kv_tile
    kv_tile = _tile("kv_tile", kv_tile, geo.ndim)
    visited, full = geo.tile_counts(q_tile, kv_tile)
    total = sum(math.prod(d.num_tiles(t) for d, t in zip(dims, kv_tile))
                for _, dims in geo.groups())
    tiled = _figures("multi-dimensional", q_tile, kv_tile, total, visited, full)
    flat_figures = None
    if flat:
        q_volume, kv_volume = math.prod(q_tile), math.prod(kv_tile)
        visited, full, total = _flat_counts(geo, q_volume, kv_volume)
        flat_figures = _figures("1-D flattened", (q_volume,), (kv_volume,), total, visited, full)
    return SimReport(geo, geo.attended_pairs(), geo.dense_pairs(), tiled, flat_figures,
                     _cost(geo, q_tile, kv_tile, REFERENCE_Q_VOLUME))


# ---------------------------------------------------------------------------------------------
# 1-D tiling of the flattened sequence
#
# A 1-D Q tile is a range [x0, x1) of flat indices, a KV tile a range [y0, y1). The pairs they
# share are P = S(x1, y1) - S(x0, y1) - S(x1, y0) + S(x0, y0), where S(x, y) counts attended
# pairs with query index < x and key index < y. A flat prefix [0, x) of a row-major layout is a
# union of ndim boxes (box m: the first m coordinates equal to x's digits, coordinate m below
# x's digit m, the rest free), and the pairs between a query box and a key box are a product
# over axes of per-axis pair counts, which are O(1) from prefix sums of window starts and ends.
# So S is exact at every (Q tile, KV tile) boundary without building the N x N mask:
# ndim**2 box pairs per boundary, vectorized over all boundaries.

class _AxisPairs:
    """Per-axis pair counts ``H(q, k)``: pairs (query < q, key < k) along one axis."""

    def __init__(self, dim: Dim):
        self.length = dim.length
        self.start, self.end = dim.windows()
        self.start_sums = np.concatenate([[0], np.cumsum(self.start)])
        self.end_sums = np.concatenate([[0], np.cumsum(self.end)])

    def prefix(self, q, k):
        # Query i contributes |[start_i, end_i) & [0, k)| = min(end_i, k) - min(start_i, k).
        # Starts and ends are non-decreasing, so the queries with end_i < k are a prefix.
        ce = np.minimum(q, np.searchsorted(self.end, k, side="left"))
        cs = np.minimum(q, np.searchsorted(self.start, k, side="left"))
        return self.end_sums[ce] - self.start_sums[cs] + (cs - ce) * k

    def pairs(self, q0, q1, k0, k1):
        """Pairs with query in ``[q0, q1)`` and key in ``[k0, k1)`` (broadcasting)."""
        h = self.prefix(q1, k1)
        if not (np.isscalar(q0) and q0 == 0):
            h = h - self.prefix(q0, k1)
        if not (np.isscalar(k0) and k0 == 0):
            h = h - self.prefix(q1, k0)
            if not (np.isscalar(q0) and q0 == 0):
                h = h + self.prefix(q0, k0)
        return h


def _digits(flat: np.ndarray, lengths) -> list[np.ndarray]:
    """Row-major coordinates of flat indices; ``N`` itself maps to ``(L0, 0, ..., 0)``."""
    digits, rest = [], flat
    for a in reversed(range(1, len(lengths))):
        digits.append(rest % lengths[a])
        rest = rest // lengths[a]
    digits.append(rest)
    return digits[::-1]


def _box(digits, a: int, m: int, length: int):
    """Range of axis ``a`` in prefix box ``m``: ``[x_a, x_a + 1)``, ``[0, x_a)`` or all."""
    if a < m:
        return digits[a], np.minimum(digits[a] + 1, length)
    if a == m:
        return 0, digits[a]
    return 0, length


def _prefix_pairs(axes: list[_AxisPairs], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``S[i, j]``: attended pairs with flat query index < ``xs[i]`` and key index < ``ys[j]``."""
    lengths = [ax.length for ax in axes]
    xd = [d[:, None] for d in _digits(xs, lengths)]
    yd = [d[None, :] for d in _digits(ys, lengths)]
    total = np.zeros((len(xs), len(ys)), dtype=np.int64)
    ndim = len(axes)
    for m, n in itertools.product(range(ndim), repeat=2):
        term = 1
        for a, ax in enumerate(axes):
            q0, q1 = _box(xd, a, m, ax.length)
            k0, k1 = _box(yd, a, n, ax.length)
            term = term * ax.pairs(q0, q1, k0, k1)
        total += term
    return total


def _flat_counts(geo: Geometry, q_volume: int, kv_volume: int):
    """Visited and mask-free KV tiles per Q tile under 1-D tiling of each dilation group's
    flattened tokens; returns ``(visited, full, total_kv_tiles)``."""
    visited_all, full_all, total = [], [], 0
    for _, dims in geo.groups():
        axes = [_AxisPairs(d) for d in dims]
        n = math.prod(d.length for d in dims)
        n_q, n_kv = -(-n // q_volume), -(-n // kv_volume)
        total += n_kv
        xs = np.minimum(np.arange(n_q + 1, dtype=np.int64) * q_volume, n)
        ys = np.minimum(np.arange(n_kv + 1, dtype=np.int64) * kv_volume, n)
        queries = np.diff(xs)
        visited, full = np.empty(n_q, dtype=np.int64), np.empty(n_q, dtype=np.int64)
        chunk = max(1, (1 << 20) // (n_kv + 1))  # rows of S per pass, to bound memory
        for t0 in range(0, n_q, chunk):
            t1 = min(n_q, t0 + chunk)
            pairs = np.diff(np.diff(_prefix_pairs(axes, xs[t0: t1 + 1], ys), axis=0), axis=1)
            visited[t0:t1] = (pairs > 0).sum(axis=1)
            # Mask-free: every query of the tile sees every key of the whole (unclipped) tile.
            full[t0:t1] = (pairs == queries[t0:t1, None] * kv_volume).sum(axis=1)
        visited_all.append(visited)
        full_all.append(full)
    return np.concatenate(visited_all), np.concatenate(full_all), total


# ---------------------------------------------------------------------------------------------
# Search over strides and tile shapes

def candidate_tiles(geo: Geometry, volumes=SUPPORTED_VOLUMES) -> list[tuple[int, ...]]:
    """Tile shapes the search tries: powers of two per dimension with a volume in ``volumes``,
    no dimension longer than its axis rounded up to a power of two (dilation group 0). If no
    such shape exists (a layout smaller than every volume) the whole layout is one tile."""
    caps = [_next_pow2(n) for n in _group0_lengths(geo)]
    shapes = []
    for volume in sorted(set(volumes), reverse=True):
        if volume < 1 or volume & (volume - 1):
            raise ValueError(f"tile volumes must be powers of two, got {volumes=}")
        bits = volume.bit_length() - 1
        for split in itertools.product(range(bits + 1), repeat=geo.ndim):
            tile = tuple(1 << b for b in split)
            if sum(split) == bits and all(t <= c for t, c in zip(tile, caps)):
                shapes.append(tile)
    return shapes or [tuple(caps)]


def stride_grid(kernel_size, values=None) -> list[tuple[int, ...]]:
    """Every combination of per-dimension strides, row-major.

    ``values`` gives the strides to try per dimension; by default the powers of two below the
    window and the window itself (stride == window is blocked attention).
    """
    kernel_size = tuple(kernel_size)
    if values is None:
        values = [sorted({1 << b for b in range(w.bit_length()) if 1 << b <= w} | {w})
                  for w in kernel_size]
    if len(values) != len(kernel_size):
        raise ValueError(f"stride values need one list per dimension ({len(kernel_size)}), "
                         f"got {len(values)}")
    return list(itertools.product(*[sorted(set(int(s) for s in v)) for v in values]))


@dataclass(frozen=True)
class StrideSetting:
    """One stride of a :func:`search`: the best tiles found for it and their figures."""

    stride: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    bound: float
    average_bound: float
    flop_speedup: float
    masked_share: float
    perfectly_block_sparse: bool

    def to_dict(self) -> dict:
        return {"stride": list(self.stride), "q_tile": list(self.q_tile),
                "kv_tile": list(self.kv_tile), "bound": self.bound,
                "average_bound": self.average_bound, "flop_speedup": self.flop_speedup,
                "masked_share": self.masked_share,
                "perfectly_block_sparse": self.perfectly_block_sparse}


@dataclass(frozen=True)
class SearchResult:
    """Every stride a :func:`search` tried, in the order given, each with its best tiles."""

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    settings: tuple[StrideSetting, ...]

    @property
    def best(self) -> StrideSetting:
        """The highest bound; among equals, perfectly block-sparse, then the smallest stride."""
        return max(self.settings, key=lambda s: (s.bound, s.perfectly_block_sparse,
                                                 -math.prod(s.stride), [-x for x in s.stride]))

    @property
    def perfect(self) -> list[StrideSetting]:
        """The smallest perfectly block-sparse strides: those with no other perfectly
        block-sparse stride at most as large in every dimension; smallest product first."""
        found = [s for s in self.settings if s.perfectly_block_sparse]
        def below(o, s):
            return o.stride != s.stride and all(a <= b for a, b in zip(o.stride, s.stride))

        minimal = [s for s in found if not any(below(o, s) for o in found)]
        return sorted(minimal, key=lambda s: (math.prod(s.stride), s.stride))

    def to_dict(self) -> dict:
        return {"input_size": list(self.shape), "window_size": list(self.kernel_size),
                "dilation": list(self.dilation), "causal": list(self.causal),
                "settings": [s.to_dict() for s in self.settings],
                "best": self.best.to_dict(),
                "perfect": [s.to_dict() for s in self.perfect]}


def search(shape, kernel_size, dilation=1, is_causal=False, *, strides=None, tiles=None,
           volumes=SUPPORTED_VOLUMES) -> SearchResult:
    """For each stride, the tile shapes that maximize the analytical bound.

    ``strides``: stride tuples to try (default :func:`stride_grid`). ``tiles``: the
    ``(q_tile, kv_tile)`` pairs to choose from (default every pair of :func:`candidate_tiles`
    with ``volumes``, larger volumes first). Per stride, the pair with the highest bound wins;
    ties go to the smallest masked share (a perfectly block-sparse pair has none), then to the
    earlier pair. Everything is counted per axis (a Q tile's visited KV tiles are a product
    over axes, :func:`_pick_tiles`), so a whole stride x tile-pair grid costs a few array
    operations: the 216 default strides of a 30x48x80 layout, window 18x24x24, times its 3,481
    tile pairs take well under a second.
    """
    geo = normalize_geometry(shape, kernel_size, 1, dilation, is_causal)
    ndim = geo.ndim
    if strides is None:
        strides = stride_grid(geo.kernel_size)
    strides = [normalize_geometry(geo.shape, geo.kernel_size, s, geo.dilation, geo.causal).stride
               for s in strides]
    if not strides:
        raise ValueError("search needs at least one stride to try")
    if tiles is None:
        shapes = candidate_tiles(geo, volumes)
        tiles = sorted(itertools.product(shapes, shapes),
                       key=lambda p: (-math.prod(p[0]), -math.prod(p[1])))
    pairs = [(_tile("q_tile", q, ndim), _tile("kv_tile", kv, ndim)) for q, kv in tiles]
    if not pairs:
        raise ValueError("search needs at least one (q_tile, kv_tile) pair to try")

    pick = _pick_tiles(geo, strides, pairs)
    settings = tuple(_setting(geo, s, *pairs[p]) for s, p in zip(strides, pick))
    return SearchResult(geo.shape, geo.kernel_size, geo.dilation, geo.causal, settings)


def _pick_tiles(geo: Geometry, strides, pairs) -> np.ndarray:
    """Index of the winning pair for every stride (see :func:`search`), vectorized.

    Per axis, the counts over (stride value, pair) come from a small table over (stride, Q
    size, KV size); a (stride, pair) figure is a product over axes, here a sum of logs. Logs are
    compared with a tolerance, since equal ratios of different integers may round differently.
    """
    per_axis = []  # per axis: (row of each stride, log bound factor, log mask-free share)
    for a in range(geo.ndim):
        strides_a = sorted({s[a] for s in strides})
        q_a, kv_a = sorted({q[a] for q, _ in pairs}), sorted({kv[a] for _, kv in pairs})
        table = np.array([[[(c.kv_tiles, c.visited_max, c.full_sum, c.visited_sum) for c in (
            _axis_counts(geo.shape[a], geo.kernel_size[a], s, geo.dilation[a], geo.causal[a],
                         q, kv) for kv in kv_a)] for q in q_a] for s in strides_a],
            dtype=np.float64)
        qi = np.searchsorted(q_a, [q[a] for q, _ in pairs])
        ki = np.searchsorted(kv_a, [kv[a] for _, kv in pairs])
        kv_tiles, visited_max, full_sum, visited_sum = np.moveaxis(table[:, qi, ki], -1, 0)
        with np.errstate(divide="ignore"):  # no mask-free tile at all: log 0 = -inf, fine
            log_full = np.log(full_sum) - np.log(visited_sum)
        per_axis.append((np.searchsorted(strides_a, [s[a] for s in strides]),
                         np.log(kv_tiles) - np.log(visited_max), log_full))
    pick = np.empty(len(strides), dtype=np.int64)
    step = max(1, (1 << 20) // len(pairs))  # strides per pass, to bound memory
    for i0 in range(0, len(strides), step):
        log_bound = sum(bound[rows[i0: i0 + step]] for rows, bound, _ in per_axis)
        log_full = sum(full[rows[i0: i0 + step]] for rows, _, full in per_axis)
        chosen = log_bound >= log_bound.max(axis=1, keepdims=True) - 1e-9
        masked = np.where(chosen, -log_full, np.inf)  # -log(1 - masked share): monotone
        chosen &= masked <= masked.min(axis=1, keepdims=True) + 1e-12
        pick[i0: i0 + step] = chosen.argmax(axis=1)  # first of the remaining ties
    return pick


def _setting(geo: Geometry, stride, q_tile, kv_tile) -> StrideSetting:
    """Exact figures of one stride and tile pair, from per-axis counts (the same numbers
    :func:`simulate` gets from the per-Q-tile arrays)."""
    axes = [_axis_counts(geo.shape[a], geo.kernel_size[a], stride[a], geo.dilation[a],
                         geo.causal[a], q_tile[a], kv_tile[a]) for a in range(geo.ndim)]
    total = math.prod(c.kv_tiles for c in axes)
    visited = math.prod(c.visited_sum for c in axes)
    full = math.prod(c.full_sum for c in axes)
    mean = visited / math.prod(c.q_tiles for c in axes)
    return StrideSetting(
        stride=tuple(stride), q_tile=q_tile, kv_tile=kv_tile,
        bound=total / math.prod(c.visited_max for c in axes), average_bound=total / mean,
        flop_speedup=geo.dense_pairs() / math.prod(c.attended for c in axes),
        masked_share=(visited - full) / visited,
        perfectly_block_sparse=all(c.perfect for c in axes))
