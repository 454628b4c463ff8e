"""The simulator (:mod:`gna.sim`) and ``gna sim``: hand-counted layouts, brute force over the
dense mask of ``tests/oracle.py`` (which does not use :mod:`gna.geometry`), the identities the
definitions promise, the search, and the command."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
import time

import numpy as np
import pytest

import oracle
from gna import cli, sim
from gna.args import normalize_geometry


def _counts(report_figures):
    return report_figures.visited.tolist(), report_figures.masked.tolist()


# ------------------------------------------------------------------------------ hand-counted

def test_1d_by_hand():
    # L=8, window 3, stride 1, Q and KV tiles of 2. Windows (wl = wr = 1, shifted inward at
    # the borders): q0,q1 [0,3); q2 [1,4); q3 [2,5); q4 [3,6); q5 [4,7); q6,q7 [5,8).
    # KV tiles: [0,2) [2,4) [4,6) [6,8).
    #   Q tile {0,1}: keys 0..2 -> KV tiles 0 (both see 0,1: mask-free), 1 (key 3 unseen).
    #   Q tile {2,3}: keys 1..4 -> tiles 0, 1, 2; only tile 1 ([2,4)) is seen whole by both.
    #   Q tile {4,5}: keys 3..6 -> tiles 1, 2, 3; only tile 2 ([4,6)) whole.
    #   Q tile {6,7}: keys 5..7 -> tiles 2, 3; tile 3 whole.
    r = sim.simulate((8,), 3, 1, q_tile=2, kv_tile=2)
    assert _counts(r.tiled) == ([2, 3, 3, 2], [1, 2, 2, 1])
    assert r.tiled.total_kv_tiles == 4
    assert r.tiled.bound == 4 / 3
    assert r.tiled.average_bound == 4 / 2.5
    assert r.tiled.masked_share == 6 / 10
    assert r.flop_speedup == 64 / 24  # every query sees exactly 3 keys
    assert not r.tiled.perfectly_block_sparse
    # In 1-D the flattened tiling is the same tiling.
    assert _counts(r.flat) == _counts(r.tiled) and r.flat.bound == r.tiled.bound


def test_2d_by_hand():
    # 4x6 layout, window 3x3, stride 1, Q and KV tiles 2x2. Per axis, as in the 1-D case:
    #   axis 0 (L=4): q0,q1 see [0,3), q2,q3 see [1,4). Q tile {0,1}: KV tiles [0,2) whole,
    #     [2,4) partial; Q tile {2,3}: [0,2) partial, [2,4) whole -> visited (2, 2), full (1, 1).
    #   axis 1 (L=6): q0,q1 [0,3); q2 [1,4); q3 [2,5); q4,q5 [3,6). Q tiles {0,1}, {2,3},
    #     {4,5} visit 2, 3, 2 KV tiles, one whole each -> visited (2, 3, 2), full (1, 1, 1).
    # A 2-D tile is visited (mask-free) iff it is along both axes, so per Q tile (row-major)
    # visited = outer((2, 2), (2, 3, 2)) and exactly one visited tile is mask-free.
    r = sim.simulate((4, 6), 3, 1, q_tile=(2, 2), kv_tile=(2, 2))
    assert _counts(r.tiled) == ([4, 6, 4, 4, 6, 4], [3, 5, 3, 3, 5, 3])
    assert r.tiled.total_kv_tiles == 2 * 3
    assert r.tiled.bound == 6 / 6
    assert r.tiled.average_bound == 6 / (28 / 6)
    assert r.flop_speedup == (24 * 24) / (24 * 9)


def test_2d_blocked_by_hand_and_the_curse_of_flattening():
    # 2x4 layout, window 2x2, stride 2x2 (blocked): axis 0 is dense ([0,2) for both rows),
    # axis 1 splits into blocks [0,2) and [2,4). Tiles 2x2 are exactly the blocks: each Q tile
    # visits one KV tile, whole: perfectly block-sparse, bound = 2 / 1 = FLOP-wise 64 / 32.
    r = sim.simulate((2, 4), 2, 2, q_tile=(2, 2), kv_tile=(2, 2))
    assert _counts(r.tiled) == ([1, 1], [0, 0])
    assert r.tiled.perfectly_block_sparse and r.tiled.bound == r.flop_speedup == 2
    # Flattened, a 4-token tile is a row: row 0 holds queries of both blocks, so it needs both
    # KV rows, and no (row, row) pair is attended whole: twice the tiles, every one masked.
    assert r.flat.q_tile == (4,) and r.flat.kv_tile == (4,)
    assert _counts(r.flat) == ([2, 2], [2, 2])
    assert r.flat.bound == 1 and not r.flat.perfectly_block_sparse


def test_stride_equal_to_kernel_size_is_perfectly_block_sparse():
    # Blocked attention, L=8, window = stride = 4: queries 0..3 see [0,4), 4..7 see [4,8).
    # Q tiles of 2 or 4, KV tiles of 2: each Q tile visits its block's 2 KV tiles, whole.
    for q_tile in (2, 4):
        r = sim.simulate((8,), 4, 4, q_tile=q_tile, kv_tile=2)
        assert r.tiled.visited.tolist() == [2] * (8 // q_tile)
        assert r.tiled.masked_share == 0 and r.tiled.perfectly_block_sparse
        assert r.tiled.bound == r.flop_speedup == 2
    # A Q tile straddling two blocks (tiles of 4 offset by the window 6 of L=12) is not.
    r = sim.simulate((12,), 6, 6, q_tile=4, kv_tile=2)
    assert not r.tiled.perfectly_block_sparse and r.tiled.bound < r.flop_speedup


def test_causal_by_hand():
    # L=6, window 3, stride 1, causal: query i sees [max(i-2, 0), i+1): q0 [0,1), q1 [0,2),
    # q2 [0,3), q3 [1,4), q4 [2,5), q5 [3,6). Q and KV tiles of 2:
    #   {0,1}: keys 0..1 -> tile 0, partial (q0 misses key 1).
    #   {2,3}: keys 0..3 -> tiles 0 (q3 misses 0) and 1 (q2 misses 3), both partial.
    #   {4,5}: keys 2..5 -> tiles 1 (q5 misses 2) and 2 (q4 misses 5), both partial.
    r = sim.simulate((6,), 3, 1, is_causal=True, q_tile=2, kv_tile=2)
    assert _counts(r.tiled) == ([1, 2, 2], [1, 2, 2])
    assert r.tiled.bound == 3 / 2
    assert r.attended_pairs == 1 + 2 + 3 + 3 + 3 + 3
    assert r.flop_speedup == 36 / 15


def test_causal_mask_free_but_unbalanced_is_not_perfect():
    # L=4, window 2, causal, 1-token tiles: q0 sees [0,1), q1..q3 see two keys. Every visited
    # tile is whole (tiles of one token), but Q tile 0 visits 1 tile and the others 2: the
    # worst tile bounds the kernel at 4/2 = 2 < FLOP-wise 16/7, so not perfectly block-sparse;
    # the average-based figure (4 / (7/4)) is the FLOP-wise speedup.
    r = sim.simulate((4,), 2, 1, is_causal=True, q_tile=1, kv_tile=1)
    assert _counts(r.tiled) == ([1, 2, 2, 2], [0, 0, 0, 0])
    assert not r.tiled.perfectly_block_sparse
    assert r.tiled.bound == 2 < r.flop_speedup == 16 / 7
    assert r.tiled.average_bound == pytest.approx(r.flop_speedup, rel=1e-15)


def test_dilation_by_hand():
    # L=7, dilation 2: group 0 holds coordinates 0,2,4,6 (length 4), group 1 holds 1,3,5
    # (length 3); tiles never mix groups. Window 2, stride 1 (wl=1, wr=0), tiles of 2:
    #   group 0: i0,i1 see [0,2), i2 [1,3), i3 [2,4). Q tile {0,1}: tile [0,2) whole;
    #            {2,3}: keys 1..3 -> [0,2) partial and [2,4) partial (i2 misses 3).
    #   group 1: i0,i1 see [0,2), i2 [1,3). {0,1}: [0,2) whole; {2}: [0,2) partial and the
    #            clipped tile [2,3), which is never mask-free.
    # KV tiles of the layout: 2 per group.
    r = sim.simulate((7,), 2, 1, dilation=2, q_tile=2, kv_tile=2)
    assert _counts(r.tiled) == ([1, 2, 1, 2], [0, 2, 0, 2])
    assert r.tiled.total_kv_tiles == 4 and r.tiled.bound == 2
    assert r.flop_speedup == 49 / 14
    # Blocked inside each group (L=8, dilation 2: two groups of 4, window = stride = 2):
    # every Q tile of 2 sees one whole KV tile of 2.
    r = sim.simulate((8,), 2, 2, dilation=2, q_tile=2, kv_tile=2)
    assert _counts(r.tiled) == ([1, 1, 1, 1], [0, 0, 0, 0])
    assert r.tiled.perfectly_block_sparse and r.tiled.bound == r.flop_speedup == 4


# ------------------------------------------------------------------------------ brute force

def _brute_counts(shape, kernel_size, stride, dilation, causal, q_tile, kv_tile):
    """Visited / mask-free KV tiles per Q tile, multi-dimensional and flattened, from the
    oracle's dense mask: per dilation group, tile the group's tokens and look at every block."""
    mask = oracle.dense_mask(shape, kernel_size, stride, dilation, causal).numpy()
    coords = np.array(list(itertools.product(*[range(n) for n in shape])))
    dl = np.array(dilation)
    out = {"tiled": [[], [], 0], "flat": [[], [], 0]}
    for group in itertools.product(*[range(d) for d in dilation]):
        idx = np.flatnonzero(np.all(coords % dl == np.array(group), axis=1))  # row-major
        local = coords[idx] // dl
        m = mask[np.ix_(idx, idx)]
        lengths = local.max(axis=0) + 1
        q_id = [tuple(c) for c in local // np.array(q_tile)]
        kv_id = [tuple(c) for c in local // np.array(kv_tile)]
        q_tiles = list(itertools.product(*[range(-(-n // t)) for n, t in zip(lengths, q_tile)]))
        kv_tiles = list(itertools.product(*[range(-(-n // t)) for n, t in zip(lengths, kv_tile)]))
        q_rows = [[i for i, t in enumerate(q_id) if t == qt] for qt in q_tiles]
        kv_cols = [[i for i, t in enumerate(kv_id) if t == kt] for kt in kv_tiles]
        n, qv, kv = len(idx), math.prod(q_tile), math.prod(kv_tile)
        flat_rows = [list(range(a, min(a + qv, n))) for a in range(0, n, qv)]
        flat_cols = [list(range(a, min(a + kv, n))) for a in range(0, n, kv)]
        for name, rows, cols in (("tiled", q_rows, kv_cols), ("flat", flat_rows, flat_cols)):
            out[name][2] += len(cols)
            for r in rows:
                blocks = [m[np.ix_(r, c)] for c in cols]
                out[name][0].append(sum(b.any() for b in blocks))
                out[name][1].append(sum(b.all() and b.shape[1] == kv for b in blocks))
    return out


def _random_problem(rng: random.Random, max_len: int = 10):
    ndim = rng.randint(1, 3)
    shape = [rng.randint(1, max_len if ndim < 3 else 7) for _ in range(ndim)]
    dilation = [rng.choice([1, 1, 2, 3]) for _ in shape]
    dilation = [d if d <= n else 1 for d, n in zip(dilation, shape)]
    kernel = [rng.randint(1, n // d) for n, d in zip(shape, dilation)]
    stride = [rng.choice([1, k, rng.randint(1, k)]) for k in kernel]
    causal = [rng.random() < 0.3 for _ in shape]
    q_tile = [rng.choice([1, 2, 3, 4]) for _ in shape]
    kv_tile = [rng.choice([1, 2, 3, 4]) for _ in shape]
    return shape, kernel, stride, dilation, causal, q_tile, kv_tile


def test_counts_match_brute_force():
    rng = random.Random(0)
    for _ in range(120):
        problem = _random_problem(rng)
        r = sim.simulate(*problem)
        want = _brute_counts(*problem)
        for name, got in (("tiled", r.tiled), ("flat", r.flat)):
            visited, full, total = want[name]
            assert got.visited.tolist() == visited, (name, problem)
            assert got.masked.tolist() == [v - f for v, f in zip(visited, full)], (name, problem)
            assert got.total_kv_tiles == total, (name, problem)


def test_tile_arrays_in_geometry_order():
    geo = normalize_geometry((9, 10, 7), (3, 5, 3), (1, 2, 3), (2, 1, 2), (False, True, False))
    r = sim.simulate_geometry(geo, (2, 4, 2), (4, 2, 2), flat=False)
    visited, full = geo.tile_counts((2, 4, 2), (4, 2, 2))
    assert np.array_equal(r.tiled.visited, visited)
    assert np.array_equal(r.tiled.masked, visited - full)
    assert r.flat is None


# ------------------------------------------------------------------------------ identities

def _random_geometry(rng: random.Random):
    ndim = rng.randint(1, 3)
    shape = [rng.choice([rng.randint(1, 40), rng.choice([8, 16, 24, 32])]) for _ in range(ndim)]
    dilation = [rng.choice([1, 1, 1, 2, 3]) for _ in shape]
    dilation = [d if d <= n else 1 for d, n in zip(dilation, shape)]
    kernel = [rng.randint(1, n // d) for n, d in zip(shape, dilation)]
    stride = [rng.choice([1, k, rng.randint(1, k), math.gcd(k, 8)]) for k in kernel]
    causal = [rng.random() < 0.15 for _ in shape]
    return normalize_geometry(shape, kernel, stride, dilation, causal)


def test_perfectly_block_sparse_bound_equals_flop_wise():
    """The definition's promise, on a seeded sweep: perfect => bound == FLOP-wise exactly,
    and never a bound above the FLOP-wise speedup."""
    rng = random.Random(1)
    perfect = 0
    for _ in range(1500):
        geo = _random_geometry(rng)
        q_tile = [rng.choice([1, 2, 4, 8]) for _ in geo.shape]
        kv_tile = [rng.choice([1, 2, 4, 8]) for _ in geo.shape]
        r = sim.simulate_geometry(geo, q_tile, kv_tile, flat=False)
        f = r.tiled
        assert f.bound <= r.flop_speedup * (1 + 1e-12), (geo, q_tile, kv_tile)
        assert f.perfectly_block_sparse == (f.masked_share == 0 and f.visited_min == f.visited_max)
        if f.perfectly_block_sparse:
            perfect += 1
            assert f.bound == r.flop_speedup == f.average_bound, (geo, q_tile, kv_tile)
            # Tiled work at the worst Q tile is the attended work.
            assert geo.num_tokens * f.visited_max * math.prod(kv_tile) == r.attended_pairs
    assert perfect >= 50, f"the sweep should hit many perfectly block-sparse settings: {perfect}"


def test_predicted_cost_is_the_kernels_model():
    # full * V + partial * V * mask_cost + visited * 24, mask_cost 3 in 3-D and 1 otherwise
    # (the numbers triton_backend's default_config was fitted with).
    rng = random.Random(2)
    for _ in range(100):
        geo = _random_geometry(rng)
        q_tile = tuple(rng.choice([1, 2, 4, 8]) for _ in geo.shape)
        kv_tile = tuple(rng.choice([1, 2, 4, 8]) for _ in geo.shape)
        visited, full = geo.tile_counts(q_tile, kv_tile)
        volume = math.prod(kv_tile)
        mask_cost = 3.0 if geo.ndim == 3 else 1.0
        want = (full.sum() * volume + (visited.sum() - full.sum()) * volume * mask_cost
                + visited.sum() * 24)
        assert sim.predicted_cost(geo, q_tile, kv_tile) == want
        ranked = sim.rank_tiles(geo, [(q_tile, kv_tile)])
        assert ranked[0].cost == pytest.approx(want * math.prod(q_tile) / 128, rel=1e-12)


def test_default_tiles_are_the_kernels_defaults():
    from gna import triton_backend

    for shape, kernel, stride in [((32768,), 2048, 256), ((256, 256), 80, 16),
                                  ((30, 48, 80), (18, 24, 24), (16, 8, 8)),
                                  ((30, 48, 80), (18, 24, 24), 1), ((20, 6), (5, 3), (1, 3)),
                                  ((9, 22), (6, 7), (3, 2)), ((5, 12, 12), 3, 1)]:
        geo = normalize_geometry(shape, kernel, stride)
        for head_dim in (64, 128, 256):
            config = triton_backend._default_config_cached(geo, head_dim, None, None)
            assert sim.default_tiles(geo, head_dim) == (config.q_tile, config.kv_tile), (
                shape, kernel, stride, head_dim)
    geo = normalize_geometry((30, 48, 80), (18, 24, 24), (16, 8, 8))
    ranked = sim.rank_tiles(geo)
    assert [c.cost for c in ranked] == sorted(c.cost for c in ranked)
    assert (ranked[0].q_tile, ranked[0].kv_tile) == sim.default_tiles(geo)


def test_partial_tile_defaults():
    geo = normalize_geometry((30, 48, 80), (18, 24, 24), (16, 8, 8))
    kv_candidates = [kv for _, kv in sim.kernel_candidates(geo)]
    r = sim.simulate_geometry(geo, q_tile=(4, 8, 8), flat=False)  # the kernels' best KV tile
    assert r.tiled.kv_tile == min(
        kv_candidates, key=lambda kv: (sim.predicted_cost(geo, (4, 8, 8), kv), kv))
    r = sim.simulate_geometry(geo, kv_tile=(1, 8, 8), flat=False)  # the kernels' Q tile
    assert (r.tiled.q_tile, r.tiled.kv_tile) == (sim.default_tiles(geo)[0], (1, 8, 8))


def test_flat_is_fast_on_a_video_layout():
    """30x48x80 = 115,200 tokens, counted exactly; the curse of multi-dimensionality shows."""
    t0 = time.perf_counter()
    r = sim.simulate((30, 48, 80), (18, 24, 24), (16, 8, 8), q_tile=(4, 8, 8), kv_tile=(2, 8, 8))
    seconds = time.perf_counter() - t0
    print(f"simulate with flattened tiling, 115,200 tokens: {seconds:.2f} s")
    assert r.tiled.perfectly_block_sparse and r.tiled.bound == r.flop_speedup == 115200 / 10368
    assert r.flat.total_kv_tiles == 900 and len(r.flat.visited) == 450
    assert r.flat.bound < r.tiled.bound / 3


# ------------------------------------------------------------------------------ errors

def test_errors_are_the_apis():
    with pytest.raises(ValueError) as api:
        normalize_geometry((30, 48, 80), (18, 24, 24), (20, 1, 1))
    with pytest.raises(ValueError) as ours:
        sim.simulate((30, 48, 80), (18, 24, 24), (20, 1, 1))
    assert str(ours.value) == str(api.value)
    with pytest.raises(ValueError, match="q_tile needs one value per spatial dimension"):
        sim.simulate((8, 8), 3, q_tile=(2, 2, 2), kv_tile=2)
    with pytest.raises(ValueError, match=r"kv_tile entries must be >= 1, got kv_tile=\(2, 0\)"):
        sim.simulate((8, 8), 3, q_tile=2, kv_tile=(2, 0))
    with pytest.raises(ValueError, match="stride must satisfy"):
        sim.search((8, 8), 3, strides=[(1, 4)])


# ------------------------------------------------------------------------------ search

def test_search_picks_the_best_pair_and_matches_simulate():
    rng = random.Random(3)
    for _ in range(8):
        geo = _random_geometry(rng)
        pairs = [(tuple(rng.choice([1, 2, 4, 8]) for _ in geo.shape),
                  tuple(rng.choice([1, 2, 4, 8]) for _ in geo.shape)) for _ in range(6)]
        strides = sim.stride_grid(geo.kernel_size)[:12]
        result = sim.search(geo.shape, geo.kernel_size, geo.dilation, geo.causal,
                            strides=strides, tiles=pairs)
        assert [s.stride for s in result.settings] == strides
        for s in result.settings:
            g = normalize_geometry(geo.shape, geo.kernel_size, s.stride, geo.dilation, geo.causal)
            reports = [sim.simulate_geometry(g, q, kv, flat=False) for q, kv in pairs]
            assert s.bound == pytest.approx(max(r.tiled.bound for r in reports), rel=1e-9)
            r = sim.simulate_geometry(g, s.q_tile, s.kv_tile, flat=False)
            assert (s.bound, s.average_bound, s.masked_share, s.perfectly_block_sparse,
                    s.flop_speedup) == (r.tiled.bound, r.tiled.average_bound,
                                        r.tiled.masked_share, r.tiled.perfectly_block_sparse,
                                        r.flop_speedup)


def test_search_3d_video_sweep():
    """The paper's Figure 4 problem: 30x48x80, window 18x24x24, tiles 4x8x8 / 2x8x8, and the
    default stride grid over every supported tile pair."""
    problem = ((30, 48, 80), (18, 24, 24))
    t0 = time.perf_counter()
    fixed = sim.search(*problem, strides=sim.stride_grid((18, 24, 24), [[1, 2, 4, 8, 16]] * 3),
                       tiles=[((4, 8, 8), (2, 8, 8))])
    t1 = time.perf_counter()
    best = sim.search(*problem)
    t2 = time.perf_counter()
    pairs = len(sim.candidate_tiles(normalize_geometry(*problem))) ** 2
    print(f"fixed tiles, {len(fixed.settings)} strides: {t1 - t0:.3f} s; "
          f"{len(best.settings)} strides x {pairs} tile pairs: {t2 - t1:.3f} s")
    by_stride = {s.stride: s for s in fixed.settings}
    assert round(by_stride[(1, 1, 1)].bound, 2) == 3.27  # the paper: "limited by 3.3x"
    assert round(by_stride[(1, 8, 8)].bound, 2) > 9  # "cross 9x with a stride of 8x8"
    assert by_stride[(16, 8, 8)].perfectly_block_sparse  # "11.1x, its FLOP-wise speedup"
    assert by_stride[(16, 8, 8)].bound == by_stride[(16, 8, 8)].flop_speedup
    assert [s.stride for s in fixed.perfect] == [(16, 8, 8)]
    # Over all supported tiles, 1x8x8 tiles make stride 1x8x8 perfectly block-sparse, and it
    # is the only minimal one.
    assert [(s.stride, s.q_tile, s.kv_tile) for s in best.perfect] == [
        ((1, 8, 8), (1, 8, 8), (1, 8, 8))]
    assert best.best.bound == best.best.flop_speedup


def test_perfect_strides_are_minimal():
    result = sim.search((64, 64), (32, 32))
    found = [s for s in result.settings if s.perfectly_block_sparse]
    minimal = result.perfect
    assert minimal and set(s.stride for s in minimal) <= set(s.stride for s in found)
    for s in found:
        assert any(all(a <= b for a, b in zip(m.stride, s.stride)) for m in minimal)
    for m, n in itertools.permutations(minimal, 2):
        assert not all(a <= b for a, b in zip(m.stride, n.stride))
    assert {s.stride for s in minimal} == {(4, 32), (32, 4), (16, 16)}


def test_candidate_tiles():
    geo = normalize_geometry((30, 48, 80), (18, 24, 24))
    tiles = sim.candidate_tiles(geo)
    # Powers of two per axis, 64 or 128 tokens, no axis longer than 32x64x128 (its length
    # rounded up to a power of two).
    want = {t for t in itertools.product(*[[1 << b for b in range(8)]] * 3)
            if math.prod(t) in (64, 128) and t[0] <= 32 and t[1] <= 64}
    assert len(tiles) == len(set(tiles)) and set(tiles) == want
    assert (2, 8, 8) in tiles and (1, 8, 8) in tiles and (4, 8, 8) not in tiles  # 256 tokens
    # Tiles no longer than the (power-of-two rounded) axis; a tiny layout is one tile.
    assert all(t[0] <= 4 for t in sim.candidate_tiles(normalize_geometry((3, 64), 3)))
    assert sim.candidate_tiles(normalize_geometry((3, 5), 3)) == [(4, 8)]


# ------------------------------------------------------------------------------ gna sim

VIDEO = ["-i", "30", "48", "80", "-w", "18", "24", "24", "-s", "16", "8", "8"]


def test_cli_table(capsys):
    assert cli.main(["sim", *VIDEO, "--q-tile", "4", "8", "8", "--kv-tile", "2", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "FLOP-wise speedup 11.11x" in out
    assert "4x8x8 / 2x8x8" in out and "256 / 128" in out
    assert "11.11x" in out and "2.50x" in out
    assert "yes" in out


def test_cli_json_round_trip(capsys, tmp_path):
    argv = ["sim", "-i", "12", "10", "-w", "5", "4", "-s", "2", "-d", "1", "2", "-c", "1", "0",
            "--q-tile", "4", "2", "--kv-tile", "2", "4"]
    assert cli.main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = sim.simulate((12, 10), (5, 4), 2, (1, 2), (True, False), (4, 2), (2, 4))
    assert printed == json.loads(json.dumps(report.to_dict()))
    assert printed["problem"]["causal"] == [True, False]
    assert printed["tiled"]["bound"] == report.tiled.bound
    path = tmp_path / "sim.json"
    assert cli.main([*argv, "--json", str(path)]) == 0
    assert json.loads(path.read_text()) == printed
    assert "JSON written to" in capsys.readouterr().out


def test_cli_defaults_and_broadcast(capsys):
    assert cli.main(["sim", "-i", "30", "48", "80", "-w", "18", "24", "24", "-s", "16", "8", "8",
                     "-c", "false", "--no-flat", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    geo = normalize_geometry((30, 48, 80), (18, 24, 24), (16, 8, 8))
    q_tile, kv_tile = sim.default_tiles(geo)
    assert (printed["tiled"]["q_tile"], printed["tiled"]["kv_tile"]) == ([*q_tile], [*kv_tile])
    assert printed["flat"] is None and printed["problem"]["causal"] == [False] * 3


def test_cli_sweep_writes_a_plot(capsys, tmp_path):
    path = tmp_path / "strides.png"
    assert cli.main(["sim", "-i", "16", "24", "-w", "8", "12", "--q-tile", "4", "16",
                     "--kv-tile", "4", "16", "--sweep-stride", "--sweep-values", "1,2,4,8",
                     "1,4,12", "--plot", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["sweep"]["tiles"]["settings"]) == 4 * 3
    assert printed["sweep"]["plot"] == str(path)
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["sim", "-i", "16", "24", "-w", "8", "12", "--sweep-stride", "--plot",
                     str(path)]) == 0
    out = capsys.readouterr().out
    assert "smallest perfectly block-sparse strides" in out and f"plot written to {path}" in out


def test_cli_sweep_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(SystemExit) as exc:
        cli.main(["sim", "-i", "16", "-w", "8", "--sweep-stride", "--plot",
                  str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "pip install 'gna[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["-i", "30", "48", "80", "-w", "18", "24", "24", "-s", "20", "1", "1"],
     "stride must satisfy 1 <= stride <= kernel_size"),
    (["-i", "30", "48", "80", "-w", "18", "24"], "kernel_size needs one value per spatial"),
    (["-i", "8", "-w", "9"], "kernel_size * dilation must not exceed the input size"),
    (["-i", "8", "8", "-w", "3", "--q-tile", "2", "2", "2"], "q_tile needs one value per"),
    (["-i", "8", "-w", "3", "-c", "maybe"], "expected 0/1 or true/false"),
    (["-i", "8", "-w", "3", "--sweep-stride", "--sweep-values", "1,x"], "comma-separated"),
])
def test_cli_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sim", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gna sim" in err and message in err


def test_cli_error_message_is_the_apis(capsys):
    with pytest.raises(ValueError) as api:
        normalize_geometry((30, 48, 80), (18, 24, 24), (20, 1, 1))
    with pytest.raises(SystemExit):
        cli.main(["sim", *VIDEO[:8], "-s", "20", "1", "1"])
    assert f"gna sim: error: {api.value}" in capsys.readouterr().err


def test_import_does_not_need_matplotlib():
    code = ("import sys; import gna, gna.sim, gna.cli; "
            "sys.exit(1 if 'matplotlib' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
