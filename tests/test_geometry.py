"""Property tests of :mod:`gna.geometry` against brute force.

Windows are checked against the oracle's independent reading of the rule (``tests/oracle.py``);
tile ranges, inverse ranges, query ranges and tile counts against brute-force enumeration of
those windows.
"""

from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest

from gna.geometry import Dim, Geometry
import oracle


def _dims(max_length: int):
    """Every valid non-dilated ``(length, kernel, stride, causal)`` up to ``max_length``."""
    for length in range(1, max_length + 1):
        for kernel in range(1, length + 1):
            for stride in range(1, kernel + 1):
                for causal in (False, True):
                    yield Dim(length, kernel, stride, causal)


def _random_dims(seed: int, count: int, max_length: int):
    rng = random.Random(seed)
    for _ in range(count):
        length = rng.randint(1, max_length)
        kernel = rng.choice([rng.randint(1, min(length, 8)), rng.randint(1, length)])
        stride = rng.choice([1, kernel, rng.randint(1, kernel)])
        yield Dim(length, kernel, stride, rng.random() < 0.5)


def _window_sets(dim: Dim) -> list[set[int]]:
    start, end = dim.windows()
    return [set(range(int(s), int(e))) for s, e in zip(start, end)]


# ------------------------------------------------------------------------------ windows

def test_dim_windows_match_oracle_rule():
    """Every valid 1-D setting up to length 16: Dim.windows() is the rule of DESIGN.md."""
    checked = 0
    for dim in _dims(16):
        mask = oracle.axis_mask(dim.length, dim.kernel_size, dim.stride, 1, dim.causal)
        start, end = dim.windows()
        assert start.shape == end.shape == (dim.length,)
        for i in range(dim.length):
            expected = np.flatnonzero(mask[i])
            got = np.arange(start[i], end[i])
            assert np.array_equal(got, expected), (
                f"{dim}: query {i} window [{start[i]}, {end[i]}) != oracle keys {expected}")
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("dim", list(_dims(14)), ids=str)
def test_dim_window_properties(dim):
    start, end = dim.windows()
    i = np.arange(dim.length)
    assert (start >= 0).all() and (end <= dim.length).all() and (start < end).all(), dim
    assert (np.diff(start) >= 0).all() and (np.diff(end) >= 0).all(), (
        f"{dim}: window starts/ends must be non-decreasing")
    assert ((start <= i) & (i < end)).all(), f"{dim}: a query must see itself"
    if dim.causal:
        assert (end == i + 1).all(), f"{dim}: causal windows end at the query"
        assert ((end - start) <= dim.kernel_size).all()
    else:
        assert (end - start == dim.kernel_size).all(), f"{dim}: exactly kernel_size keys"
    if dim.kernel_size == dim.length and not dim.causal:
        assert (start == 0).all() and (end == dim.length).all(), f"{dim}: all keys"
    assert dim.attended_pairs() == int((end - start).sum())
    for q in (0, dim.length - 1):
        assert dim.window(q) == (int(start[q]), int(end[q]))


@pytest.mark.parametrize("length,kernel", [(12, 4), (14, 4), (9, 3), (10, 3), (7, 7), (8, 1),
                                           (11, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_blocked_windows(length, kernel, causal):
    """stride == kernel_size: non-overlapping blocks covering the axis; a trailing partial
    block (length not a multiple of kernel) sees the last kernel_size keys."""
    dim = Dim(length, kernel, kernel, causal)
    start, end = dim.windows()
    full_blocks = length // kernel
    for x in range(length):
        b = x // kernel
        lo, hi = (b * kernel, (b + 1) * kernel) if b < full_blocks else (length - kernel, length)
        if causal:
            hi = x + 1
        assert (start[x], end[x]) == (lo, hi), f"{dim}: query {x}"
    if length % kernel == 0 and not causal:
        blocks = sorted(set(zip(start.tolist(), end.tolist())))
        assert blocks == [(b * kernel, (b + 1) * kernel) for b in range(full_blocks)]


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", [
    ((9, 8), (3, 4), (2, 3), (2, 1), (False, False)),
    ((7, 10), (2, 3), (1, 3), (3, 2), (True, False)),
    ((5, 6, 7), (2, 3, 2), (2, 1, 2), (2, 2, 3), (False, True, False)),
    ((6, 4, 9), (3, 4, 3), (3, 4, 1), (2, 1, 3), (False, False, True)),
])
def test_key_window_matches_oracle(shape, kernel, stride, dilation, causal):
    geo = Geometry(shape, kernel, stride, dilation, causal)
    mask = oracle.dense_mask(shape, kernel, stride, dilation, causal).numpy()
    for flat, coord in enumerate(itertools.product(*[range(n) for n in shape])):
        ranges = geo.key_window(coord)
        keys = sorted(np.ravel_multi_index(c, shape) for c in itertools.product(*ranges))
        assert keys == np.flatnonzero(mask[flat]).tolist(), (
            f"{geo}: query {coord} keys {ranges}")
        if not any(causal):
            assert math.prod(len(r) for r in ranges) == math.prod(kernel)
    assert geo.attended_pairs() == int(mask.sum())


@pytest.mark.parametrize("seed", range(20))
def test_key_window_non_causal_sees_kernel_size(seed):
    rng = random.Random(seed)
    ndim = rng.randint(1, 3)
    kernel = tuple(rng.randint(1, 5) for _ in range(ndim))
    dilation = tuple(rng.randint(1, 3) for _ in range(ndim))
    shape = tuple(k * d + rng.randint(0, 6) for k, d in zip(kernel, dilation))
    stride = tuple(rng.randint(1, k) for k in kernel)
    geo = Geometry(shape, kernel, stride, dilation, (False,) * ndim)
    for coord in itertools.product(*[range(n) for n in shape]):
        ranges = geo.key_window(coord)
        assert [len(r) for r in ranges] == list(kernel), (geo, coord, ranges)
        for x, r, d in zip(coord, ranges, dilation):
            assert all(y % d == x % d for y in r), (geo, coord, ranges)
    mask = oracle.dense_mask(shape, kernel, stride, dilation, False)
    assert geo.attended_pairs() == int(mask.sum()) == geo.num_tokens * math.prod(kernel)


def test_kernel_equals_length_is_dense():
    geo = Geometry((5, 7), (5, 7), (2, 7), (1, 1), (False, False))
    assert geo.is_dense
    assert geo.attended_pairs() == geo.dense_pairs() == 35 * 35
    for c in [(0, 0), (4, 6), (2, 3)]:
        assert [list(r) for r in geo.key_window(c)] == [list(range(5)), list(range(7))]
    assert not Geometry((5, 7), (5, 7), (1, 1), (1, 1), (False, True)).is_dense
    assert not Geometry((5, 7), (5, 6), (1, 1), (1, 1), (False, False)).is_dense


# --------------------------------------------------------------------- tile ranges

def brute_tile_ranges(dim: Dim, q_tile: int, kv_tile: int):
    """Per Q tile: (visited KV tiles, full KV tiles) as sets, from the windows alone."""
    windows = _window_sets(dim)
    n_kv = -(-dim.length // kv_tile)
    result = []
    for t in range(-(-dim.length // q_tile)):
        queries = range(t * q_tile, min((t + 1) * q_tile, dim.length))
        union = set().union(*(windows[q] for q in queries))
        visited = {j for j in range(n_kv) if union & set(range(j * kv_tile, (j + 1) * kv_tile))}
        # Full: the whole unclipped tile inside every query's window (so a tile crossing the
        # end of the axis never is).
        full = {j for j in range(n_kv)
                if all(set(range(j * kv_tile, (j + 1) * kv_tile)) <= windows[q] for q in queries)}
        result.append((visited, full))
    return result


TILES = [1, 2, 3, 4, 5, 8, 16]


def _check_tile_ranges(dim: Dim, q_tile: int, kv_tile: int):
    r = dim.tile_ranges(q_tile, kv_tile)
    brute = brute_tile_ranges(dim, q_tile, kv_tile)
    assert len(r.first) == len(brute) == dim.num_tiles(q_tile)
    for t, (visited, full) in enumerate(brute):
        got_visited = set(range(int(r.first[t]), int(r.last[t])))
        got_full = set(range(int(r.full_first[t]), int(r.full_last[t])))
        where = f"{dim}, q_tile={q_tile}, kv_tile={kv_tile}, Q tile {t}"
        assert got_visited == visited, f"{where}: visited {got_visited} != brute {visited}"
        assert got_full == full, f"{where}: full {got_full} != brute {full}"
        assert r.visited[t] == len(visited) and r.full[t] == len(full), where
        assert full <= visited, where


def _check_inverse(dim: Dim, q_tile: int, kv_tile: int):
    fwd = dim.tile_ranges(q_tile, kv_tile)
    inv = dim.inverse_tile_ranges(q_tile, kv_tile)
    n_q, n_kv = dim.num_tiles(q_tile), dim.num_tiles(kv_tile)
    assert len(inv.first) == n_kv
    for j in range(n_kv):
        for t in range(n_q):
            where = f"{dim}, q_tile={q_tile}, kv_tile={kv_tile}, Q tile {t}, KV tile {j}"
            visits = fwd.first[t] <= j < fwd.last[t]
            full = fwd.full_first[t] <= j < fwd.full_last[t]
            assert visits == (inv.first[j] <= t < inv.last[j]), f"{where}: visited"
            assert full == (inv.full_first[j] <= t < inv.full_last[j]), f"{where}: full"
        assert inv.visited[j] == sum(fwd.first[t] <= j < fwd.last[t] for t in range(n_q))


def _check_query_ranges(dim: Dim):
    windows = _window_sets(dim)
    first, last = dim.query_ranges()
    for key in range(dim.length):
        seen_by = [q for q in range(dim.length) if key in windows[q]]
        assert seen_by == list(range(int(first[key]), int(last[key]))), (
            f"{dim}: key {key} is seen by {seen_by}, query_ranges says "
            f"[{first[key]}, {last[key]})")


def _tile_params(count: int, seed: int, max_length: int):
    rng = random.Random(seed)
    params = []
    for dim in _random_dims(seed, count, max_length):
        params.append((dim, rng.choice(TILES), rng.choice(TILES)))
    return params


# Small exhaustive settings plus seeded random ones.
_SMALL = [(d, qt, kt) for d in _dims(9) for qt, kt in [(1, 1), (2, 3), (4, 2), (3, 8)]]


@pytest.mark.parametrize("chunk", range(8))
def test_tile_ranges_brute_force_small(chunk):
    for dim, q_tile, kv_tile in _SMALL[chunk::8]:
        _check_tile_ranges(dim, q_tile, kv_tile)


@pytest.mark.parametrize("seed", range(4))
def test_tile_ranges_brute_force_random(seed):
    for dim, q_tile, kv_tile in _tile_params(400, seed, 40):
        _check_tile_ranges(dim, q_tile, kv_tile)


@pytest.mark.extended
@pytest.mark.parametrize("seed", range(100, 140))
def test_tile_ranges_brute_force_extended(seed):
    for dim, q_tile, kv_tile in _tile_params(300, seed, 80):
        _check_tile_ranges(dim, q_tile, kv_tile)


@pytest.mark.parametrize("chunk", range(4))
def test_inverse_tile_ranges_small(chunk):
    for dim, q_tile, kv_tile in _SMALL[chunk::4]:
        _check_inverse(dim, q_tile, kv_tile)


@pytest.mark.parametrize("seed", range(2))
def test_inverse_tile_ranges_random(seed):
    for dim, q_tile, kv_tile in _tile_params(150, 10 + seed, 40):
        _check_inverse(dim, q_tile, kv_tile)


@pytest.mark.extended
@pytest.mark.parametrize("seed", range(200, 220))
def test_inverse_tile_ranges_extended(seed):
    for dim, q_tile, kv_tile in _tile_params(200, seed, 80):
        _check_inverse(dim, q_tile, kv_tile)


def test_query_ranges():
    for dim in _dims(12):
        _check_query_ranges(dim)
    for dim in _random_dims(7, 100, 60):
        _check_query_ranges(dim)


def test_perfectly_block_sparse_needs_no_mask():
    """Window and stride multiples of the tiles, aligned: every visited tile is full."""
    dim = Dim(64, 16, 16, False)
    r = dim.tile_ranges(16, 8)
    assert (r.visited == 2).all() and (r.full == 2).all()
    inv = dim.inverse_tile_ranges(16, 8)
    assert (inv.visited == 1).all() and (inv.full == 1).all()


# --------------------------------------------------------------------------- N-d geometry

def brute_tile_counts(geo: Geometry, q_tile, kv_tile, inverse=False):
    """Per Q tile of every dilation group (groups in product order, tiles row-major):
    KV tiles touched by any (query, key) pair, and KV tiles whose every key every query
    of the tile sees (clipped KV tiles at the end of an axis never count as full). With
    ``inverse``, the same per KV tile: the Q tiles touching it, and those seeing all of it."""
    mask = oracle.dense_mask(geo.shape, geo.kernel_size, geo.stride, geo.dilation,
                             geo.causal).numpy()
    visited_all, full_all = [], []
    for offsets in itertools.product(*[range(d) for d in geo.dilation]):
        # Coordinates of the group's tokens, in group-local order.
        axes = [list(range(g, n, d)) for g, n, d in zip(offsets, geo.shape, geo.dilation)]
        lengths = [len(a) for a in axes]
        flat = np.array([np.ravel_multi_index(c, geo.shape) for c in itertools.product(*axes)])
        sub = mask[np.ix_(flat, flat)].reshape(lengths + lengths)
        n_q = [-(-n // t) for n, t in zip(lengths, q_tile)]
        n_kv = [-(-n // t) for n, t in zip(lengths, kv_tile)]
        outer, inner = (n_kv, n_q) if inverse else (n_q, n_kv)
        for a in itertools.product(*[range(n) for n in outer]):
            visited = full = 0
            for b in itertools.product(*[range(n) for n in inner]):
                qt, kt = (b, a) if inverse else (a, b)
                q_sl = tuple(slice(i * t, (i + 1) * t) for i, t in zip(qt, q_tile))
                k_sl = tuple(slice(j * t, (j + 1) * t) for j, t in zip(kt, kv_tile))
                block = sub[q_sl + k_sl]
                clipped = any((j + 1) * t > n for j, t, n in zip(kt, kv_tile, lengths))
                visited += bool(block.any())
                full += bool(block.all()) and not clipped
            visited_all.append(visited)
            full_all.append(full)
    return np.array(visited_all), np.array(full_all)


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal,q_tile,kv_tile", [
    ((9, 8), (3, 4), (2, 3), (1, 1), (False, False), (4, 4), (2, 2)),
    ((9, 8), (3, 4), (3, 4), (1, 1), (False, False), (3, 4), (3, 4)),
    ((10, 11), (4, 5), (1, 2), (2, 1), (False, True), (2, 4), (4, 2)),
    ((7, 10), (2, 3), (2, 3), (3, 2), (True, True), (1, 3), (2, 2)),
    ((6, 7, 8), (2, 3, 4), (1, 2, 4), (1, 1, 1), (False, True, False), (2, 2, 4), (2, 4, 2)),
    ((6, 6, 9), (3, 2, 3), (3, 1, 2), (2, 2, 3), (True, False, False), (2, 1, 2), (1, 2, 2)),
    ((4, 5, 6), (4, 5, 6), (1, 1, 1), (1, 1, 1), (False, False, False), (2, 2, 2), (2, 2, 2)),
])
def test_tile_counts_brute_force(shape, kernel, stride, dilation, causal, q_tile, kv_tile):
    geo = Geometry(shape, kernel, stride, dilation, causal)
    for inverse, counts in ((False, geo.tile_counts), (True, geo.inverse_tile_counts)):
        visited, full = counts(q_tile, kv_tile)
        exp_visited, exp_full = brute_tile_counts(geo, q_tile, kv_tile, inverse)
        where = f"{geo} q_tile={q_tile} kv_tile={kv_tile} inverse={inverse}"
        assert visited.tolist() == exp_visited.tolist(), where
        assert full.tolist() == exp_full.tolist(), where


@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", [
    ((9,), (4,), (3,), (2,), (True,)),
    ((10, 11), (4, 5), (1, 2), (2, 1), (False, True)),
    ((5, 6, 7), (2, 3, 2), (2, 1, 2), (2, 2, 3), (True, True, False)),
])
def test_attended_pairs_equals_oracle(shape, kernel, stride, dilation, causal):
    geo = Geometry(shape, kernel, stride, dilation, causal)
    assert geo.attended_pairs() == int(oracle.dense_mask(shape, kernel, stride, dilation,
                                                         causal).sum())
    assert geo.dense_pairs() == math.prod(shape) ** 2


def test_groups_cover_layout():
    geo = Geometry((7, 5), (2, 2), (1, 2), (3, 2), (False, True))
    seen = np.zeros(geo.shape, dtype=int)
    for offsets, dims in geo.groups():
        view = tuple(slice(g, None, d) for g, d in zip(offsets, geo.dilation))
        seen[view] += 1
        assert tuple(d.length for d in dims) == seen[view].shape
    assert (seen == 1).all()


def test_tile_counts_large_layout_is_fast():
    """The 3-D video problem of DESIGN.md section 6: enumeration must be instantaneous."""
    geo = Geometry((30, 48, 80), (18, 24, 24), (1, 1, 1), (1, 1, 1), (False, False, False))
    t0 = time.perf_counter()
    visited, full = geo.tile_counts((4, 8, 8), (2, 8, 8))
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"tile_counts took {elapsed:.2f} s"
    assert visited.shape == full.shape == (8 * 6 * 10,)
    assert (full <= visited).all() and (visited > 0).all()
    # Per-axis products: visited counts factor over the axes.
    per_axis = [geo.dim(a).tile_ranges(q, k).visited
                for a, (q, k) in enumerate(zip((4, 8, 8), (2, 8, 8)))]
    assert visited.max() == math.prod(int(v.max()) for v in per_axis)
