"""GNA geometry: the one place that knows which keys each query sees.

Everything else (the reference backend, the Triton launchers, the simulator, the tests)
asks this module; nothing re-derives the rules.

Rules (DESIGN.md section 1, NATTEN 0.21 semantics), per dimension of length ``L`` with
window ``w``, stride ``s`` and dilation ``d``:

* Dilation splits coordinates ``x`` into groups ``g = x % d``; inside a group the index is
  ``i = x // d`` and the group length is ``ceil((L - g) / d)``. A query only sees keys of its
  own group, so each group is an independent non-dilated problem. :class:`Dim` describes one
  such group; :class:`Geometry` ties the groups of all dimensions together.
* Non-causal: ``wl = w // 2``, ``wr = w // 2 + w % 2 - 1``,
  ``leader = min((i // s) * s + s // 2, L - 1)``, ``center = clamp(leader, wl, L - 1 - wr)``,
  keys ``[center - wl, center + wr]``: always exactly ``w`` keys.
* Causal: ``leader = min((i // s) * s + s - 1, L - 1)``; keys ``[max(leader - w + 1, 0), i]``.

All ranges here are half-open ``[start, end)``. Window starts and ends are non-decreasing in
the query index, which is why a tile of queries has a contiguous key range and a key has a
contiguous range of queries that see it (the backward pass walks that inverse range).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Dim", "TileRanges", "InverseTileRanges", "Geometry", "windows"]


def _ceil_div(a, b):
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def _windows_cached(length: int, kernel_size: int, stride: int, causal: bool):
    i = np.arange(length, dtype=np.int64)
    if causal:
        leader = np.minimum((i // stride) * stride + stride - 1, length - 1)
        start = np.maximum(leader - kernel_size + 1, 0)
        end = i + 1
    else:
        wl = kernel_size // 2
        wr = kernel_size // 2 + kernel_size % 2 - 1
        leader = np.minimum((i // stride) * stride + stride // 2, length - 1)
        center = np.clip(leader, wl, length - 1 - wr)
        start = center - wl
        end = center + wr + 1
    start.setflags(write=False)
    end.setflags(write=False)
    return start, end


def windows(length: int, kernel_size: int, stride: int, causal: bool):
    """Key window ``[start, end)`` of every query ``0..length-1`` of one non-dilated dimension.

    Returns two read-only int64 arrays of shape ``[length]``.
    """
    return _windows_cached(int(length), int(kernel_size), int(stride), bool(causal))


@dataclass(frozen=True)
class TileRanges:
    """Per Q tile along one dimension: the KV tiles it visits and the mask-free ones.

    ``first[t]:last[t]`` are the KV tiles Q tile ``t`` must visit; ``full_first[t]:full_last[t]``
    (a sub-range, possibly empty) are the KV tiles every query of the tile sees entirely, so
    they need no mask in this dimension.
    """

    first: np.ndarray
    last: np.ndarray
    full_first: np.ndarray
    full_last: np.ndarray

    @property
    def visited(self) -> np.ndarray:
        return self.last - self.first

    @property
    def full(self) -> np.ndarray:
        return np.maximum(self.full_last - self.full_first, 0)


@dataclass(frozen=True)
class InverseTileRanges:
    """Per KV tile along one dimension: the Q tiles that see it (backward dK/dV walks these).

    ``first[j]:last[j]`` are the Q tiles with at least one query seeing a key of KV tile ``j``;
    ``full_first[j]:full_last[j]`` the Q tiles all of whose queries see all of it.
    """

    first: np.ndarray
    last: np.ndarray
    full_first: np.ndarray
    full_last: np.ndarray

    @property
    def visited(self) -> np.ndarray:
        return np.maximum(self.last - self.first, 0)

    @property
    def full(self) -> np.ndarray:
        return np.maximum(self.full_last - self.full_first, 0)


@dataclass(frozen=True)
class Dim:
    """One non-dilated dimension (one dilation group of a dimension)."""

    length: int
    kernel_size: int
    stride: int
    causal: bool

    def windows(self):
        """``(start, end)`` arrays, the half-open key window of every query."""
        return windows(self.length, self.kernel_size, self.stride, self.causal)

    def window(self, i: int) -> tuple[int, int]:
        start, end = self.windows()
        return int(start[i]), int(end[i])

    def num_tiles(self, tile: int) -> int:
        return _ceil_div(self.length, tile)

    def attended_pairs(self) -> int:
        start, end = self.windows()
        return int((end - start).sum())

    def tile_ranges(self, q_tile: int, kv_tile: int) -> TileRanges:
        """KV tile ranges of every Q tile (forward pass iteration space)."""
        start, end = self.windows()
        t = np.arange(self.num_tiles(q_tile), dtype=np.int64)
        q_first = t * q_tile
        q_last = np.minimum(q_first + q_tile, self.length) - 1
        first = start[q_first] // kv_tile
        last = _ceil_div(end[q_last], kv_tile)
        # A KV tile needs no mask when it lies inside the window of the tile's last query
        # (largest start) and of its first query (smallest end). Tiles crossing the end of
        # the dimension are never full, since every end is <= length.
        full_first = _ceil_div(start[q_last], kv_tile)
        full_last = np.maximum(end[q_first] // kv_tile, full_first)
        return TileRanges(first, last, full_first, full_last)

    def inverse_tile_ranges(self, q_tile: int, kv_tile: int) -> InverseTileRanges:
        """Q tile ranges of every KV tile (backward dK/dV iteration space)."""
        start, end = self.windows()
        n_q = self.num_tiles(q_tile)
        j = np.arange(self.num_tiles(kv_tile), dtype=np.int64)
        kv_lo = j * kv_tile
        kv_hi = np.minimum(kv_lo + kv_tile, self.length)
        # Queries seeing any key of the tile: end(q) > kv_lo and start(q) < kv_hi.
        q_lo = np.searchsorted(end, kv_lo, side="right")
        q_hi = np.searchsorted(start, kv_hi, side="left")
        first = q_lo // q_tile
        last = np.maximum(_ceil_div(q_hi, q_tile), first)
        # Queries seeing all of the (unclipped) tile: start(q) <= kv_lo and end(q) >= lo+tile.
        see_lo = np.searchsorted(end, kv_lo + kv_tile, side="left")
        see_hi = np.searchsorted(start, kv_lo, side="right")
        full_first = _ceil_div(see_lo, q_tile)
        full_last = np.where(see_hi >= self.length, n_q, see_hi // q_tile)
        full_last = np.maximum(full_last, full_first)
        return InverseTileRanges(first, last, full_first, full_last)

    def query_ranges(self):
        """``(first, last)`` arrays: the half-open range of queries that see each key."""
        start, end = self.windows()
        k = np.arange(self.length, dtype=np.int64)
        return np.searchsorted(end, k, side="right"), np.searchsorted(start, k, side="right")


def group_length(length: int, dilation: int, group: int) -> int:
    """Length of dilation group ``group`` of a dimension: ``ceil((length - group) / dilation)``."""
    return _ceil_div(length - group, dilation)


@dataclass(frozen=True)
class Geometry:
    """A whole GNA problem's geometry: per-dimension tuples, already validated.

    Build it with :func:`gna.args.normalize` (which checks the rules) or directly from tuples
    of equal length.
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def is_dense(self) -> bool:
        """True when every query sees every key: the dense path can run it."""
        return all(
            k == n and d == 1 and not c
            for k, n, d, c in zip(self.kernel_size, self.shape, self.dilation, self.causal)
        )

    def dim(self, axis: int, group: int = 0) -> Dim:
        """The non-dilated problem of dilation group ``group`` along ``axis``."""
        return Dim(
            group_length(self.shape[axis], self.dilation[axis], group),
            self.kernel_size[axis],
            self.stride[axis],
            self.causal[axis],
        )

    def groups(self):
        """Every combination of dilation groups: yields ``(offsets, dims)``.

        ``offsets[a]`` is the group index along axis ``a`` (the first coordinate of the group),
        ``dims[a]`` its :class:`Dim`. The group's tokens are ``x[offsets[a]::dilation[a]]``.
        """
        per_axis = [range(d) for d in self.dilation]
        for offsets in itertools.product(*per_axis):
            yield offsets, tuple(self.dim(a, g) for a, g in enumerate(offsets))

    def key_window(self, coord) -> list[range]:
        """Keys seen by the query at ``coord`` (original coordinates), one range per axis."""
        ranges = []
        for axis, x in enumerate(coord):
            d = self.dilation[axis]
            g, i = x % d, x // d
            lo, hi = self.dim(axis, g).window(i)
            ranges.append(range(g + lo * d, g + hi * d, d))
        return ranges

    def attended_pairs(self) -> int:
        """Exact number of (query, key) pairs attended, over the whole layout.

        Dimensions are independent, so the count is a product over axes of the per-axis sum
        of window lengths (summed over the axis's dilation groups).
        """
        total = 1
        for axis in range(self.ndim):
            total *= sum(self.dim(axis, g).attended_pairs() for g in range(self.dilation[axis]))
        return total

    def dense_pairs(self) -> int:
        return self.num_tokens**2

    def tile_counts(self, q_tile, kv_tile):
        """KV tiles visited and mask-free per Q tile, over all Q tiles of all dilation groups.

        Returns two flat int64 arrays ``(visited, full)``: the counts for each Q tile of the
        multi-dimensional tiling (a KV tile is mask-free only if it is in every dimension).
        """
        return self._counts(lambda dim, tq, tk: dim.tile_ranges(tq, tk), q_tile, kv_tile)

    def inverse_tile_counts(self, q_tile, kv_tile):
        """Q tiles visited and mask-free per KV tile (the dK/dV iteration space), over all KV
        tiles of all dilation groups: two flat int64 arrays ``(visited, full)`` as
        :meth:`tile_counts` gives per Q tile, KV tiles in row-major order within a group."""
        return self._counts(lambda dim, tq, tk: dim.inverse_tile_ranges(tq, tk), q_tile, kv_tile)

    def _counts(self, ranges, q_tile, kv_tile):
        visited_all, full_all = [], []
        for _, dims in self.groups():
            visited, full = np.ones(1, dtype=np.int64), np.ones(1, dtype=np.int64)
            for dim, tq, tk in zip(dims, q_tile, kv_tile):
                r = ranges(dim, tq, tk)
                visited = np.multiply.outer(visited, r.visited).reshape(-1)
                full = np.multiply.outer(full, r.full).reshape(-1)
            visited_all.append(visited)
            full_all.append(full)
        return np.concatenate(visited_all), np.concatenate(full_all)

    def has_partial_tiles(self, q_tile, kv_tile) -> bool:
        """Whether some Q tile visits a KV tile it sees only in part (one that needs a mask),
        by :meth:`tile_counts`."""
        visited, full = self.tile_counts(q_tile, kv_tile)
        return bool((visited != full).any())
