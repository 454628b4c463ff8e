"""``gna profile`` and ``gna plot`` (gna.profiler) and the tile cache (gna.tuned), on the CPU:
argument errors are the API's, dry run, optimize and --save, the JSON schema, a plain profile
run with the reference backend, the FlexAttention mask's semantics, the plot."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gna
from gna import cli, plots, profiler, sim, triton_backend, tuned
from gna.args import normalize_geometry
from gna.backends import Options

TINY = ["-i", "12", "16", "-w", "5", "7", "-s", "2", "4", "-n", "2", "-d", "16"]
FAST = ["--warmup", "0", "--repeat", "2"]
RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "forward.jsonl"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    # The reference backend is what runs on a CPU; keep Triton's interpreter out (it is slow)
    # and keep the tile cache away from the user's.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GNA_CACHE_DIR", str(tmp_path / "cache"))
    tuned.forget()
    yield
    tuned.forget()


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["profile", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gna profile" in err
    return err


def _json(argv, capsys) -> dict:
    assert cli.main(["profile", *argv, "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------- arguments, errors

def _api_error(call) -> str:
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    return str(e.value)


def _tensors(shape, heads, heads_kv=None, d=16):
    q = torch.randn(1, *shape, heads, d)
    kv = torch.randn(1, *shape, heads_kv or heads, d)
    return q, kv, kv


@pytest.mark.parametrize("argv, call", [
    (["-i", "30", "48", "80", "-w", "18", "24", "24", "-s", "20", "1", "1"],
     lambda: normalize_geometry((30, 48, 80), (18, 24, 24), (20, 1, 1))),
    (["-i", "8", "-w", "9"], lambda: gna.na1d(*_tensors((8,), 1), 9)),
    (["-i", "8", "8", "-w", "3", "3", "3"], lambda: gna.na2d(*_tensors((8, 8), 1), (3, 3, 3))),
    (["-i", "8", "8", "-w", "3", "--dilation", "3"],
     lambda: gna.na2d(*_tensors((8, 8), 1), 3, dilation=3)),
    (["-i", "8", "8", "-w", "3", "-n", "3", "--heads-kv", "2", "-d", "16"],
     lambda: gna.na2d(*_tensors((8, 8), 3, 2), 3)),
    (["-i", "8", "8", "-w", "3", "-c", "1", "0", "1"],
     lambda: gna.na2d(*_tensors((8, 8), 1), 3, is_causal=(True, False, True))),
    (["-i", "8", "8", "-w", "3", "--backend", "gna", "--q-tile", "8", "8", "8"],
     lambda: gna.na2d(*_tensors((8, 8), 1), 3, q_tile_shape=(8, 8, 8))),
])
def test_errors_are_the_apis(argv, call, capsys):
    """The CLI reports the API's own message (not a second copy of the checks)."""
    message = _api_error(call)
    assert f"gna profile: error: {message}" in _usage_error(argv, capsys)


def test_tile_errors_are_the_kernels(capsys, monkeypatch):
    # The kernels' planner refuses a 3x3 tile; the ops say the same when they run it.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _tensors((8, 8), 1)
    message = _api_error(lambda: gna.na2d(q, k, v, 3, backend="triton", q_tile_shape=(3, 3)))
    assert "powers of two" in message
    err = _usage_error(["-i", "8", "8", "-w", "3", "--backend", "gna", "--q-tile", "3", "3"],
                       capsys)
    assert f"error: {message}" in err


@pytest.mark.parametrize("argv, message", [
    (["-i", "8", "-w", "3", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["-i", "8", "-w", "3", "--repeat", "0"], "expected an integer >= 1"),
    (["-i", "0", "-w", "3"], "expected an integer >= 1"),
    (["-i", "8", "-w", "3", "--backend", "natten"], "invalid choice: 'natten'"),
    (["-i", "8", "-w", "3", "-c", "maybe"], "expected 0/1 or true/false"),
    (["-i", "8", "-w", "3", "--save"], "--save stores the winner of --optimize"),
    (["-i", "32", "-w", "3", "--optimize", "--q-tile", "16"], "--optimize chooses the tile"),
    (["-i", "32", "-w", "3", "--optimize", "--backend", "flex"], "--optimize tunes gna's"),
    (["-i", "8", "-w", "3", "--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_invocations_exit_2(argv, message, capsys):
    assert message in _usage_error(argv, capsys)


def test_per_dim_broadcast_and_defaults(capsys):
    printed = _json(["-i", "12", "16", "-w", "5", "-c", "1", "--dry-run"], capsys)
    assert printed["problem"]["window_size"] == [5, 5]
    assert printed["problem"]["causal"] == [True, True]
    assert printed["problem"]["stride"] == [1, 1]
    assert printed["problem"]["dtype"] == "float32"  # the CPU default
    assert [b["name"] for b in printed["backends"]] == ["reference"]


# ------------------------------------------------------------------------------------ dry run

def test_dry_run_lists_valid_configurations(capsys, monkeypatch):
    def no_inputs(*args):
        raise AssertionError("a dry run must not allocate or run anything")

    monkeypatch.setattr(profiler, "_inputs", no_inputs)
    printed = _json([*TINY, "--dry-run", "--top", "3", "--backend", "gna", "cudnn"], capsys)
    assert printed["settings"]["mode"] == "dry_run"
    found = printed["dry_run"]
    problem = profiler.make_problem((12, 16), (5, 7), (2, 4), heads=2, head_dim=16,
                                    dtype=torch.float32)
    geo = problem.geometry
    default = triton_backend.default_config(problem, Options())
    configs = found["configs"]
    assert [c["rank"] for c in configs][:3] == [1, 2, 3]
    assert sum(c["default"] for c in configs) == 1
    (d,) = [c for c in configs if c["default"]]
    assert (tuple(d["q_tile"]), tuple(d["kv_tile"])) == (default.q_tile, default.kv_tile)
    assert d["relative_cost"] == 1.0
    costs = [c["predicted_cost"] for c in configs if c["rank"] <= 3]
    assert costs == sorted(costs)
    for c in configs:
        report = sim.simulate_geometry(geo, c["q_tile"], c["kv_tile"], flat=False)
        assert c["bound"] == report.tiled.bound
        assert c["masked_share"] == report.tiled.masked_share
        ranked = sim.rank_tiles(geo, [(c["q_tile"], c["kv_tile"])])[0]
        assert c["predicted_cost"] == ranked.cost
    assert found["considered"] >= len(configs)
    assert found["planned_for"].startswith("an H100")
    status = {b["name"]: b for b in printed["backends"]}
    assert status["cudnn"]["available"] is False
    assert "needs a CUDA device" in status["cudnn"]["reason"]
    assert status["gna"]["reason"].startswith("backend 'triton' cannot run this call")


def test_dry_run_rejects_what_does_not_fit(capsys):
    # fp32 at head_dim 256: 128-token tiles overflow an H100's shared memory even at one stage.
    printed = _json(["-i", "16", "16", "-w", "5", "-d", "256", "--dtype", "fp32", "--dry-run",
                     "--top", "1000"], capsys)
    found = printed["dry_run"]
    problem = profiler.make_problem((16, 16), 5, head_dim=256, dtype=torch.float32)
    assert found["rejected"] > 0
    assert found["considered"] == len(found["configs"])
    for c in found["configs"]:  # every listed one is accepted by the kernels' planner
        triton_backend.default_config(problem, Options(q_tile_shape=tuple(c["q_tile"]),
                                                       kv_tile_shape=tuple(c["kv_tile"])))
    # The candidates: the kernels' default and own candidates, and every pair of the search's
    # tiles (32, 64 and 128 tokens); the planner refuses the rest.
    default = triton_backend.default_config(problem, Options())
    shapes = sim.candidate_tiles(problem.geometry, (32, 64, 128))
    candidates = dict.fromkeys([(default.q_tile, default.kv_tile),
                                *sim.kernel_candidates(problem.geometry, 256),
                                *itertools.product(shapes, shapes)])
    refused = 0
    for q, kv in candidates:
        try:
            triton_backend.default_config(problem, Options(q_tile_shape=q, kv_tile_shape=kv))
        except ValueError:
            refused += 1
    assert found["rejected"] == refused and found["considered"] == len(candidates) - refused


def test_dry_run_table(capsys):
    assert cli.main(["profile", *TINY, "--dry-run", "--optimize", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "valid tile configurations" in out and "default" in out
    assert "timed by --optimize" in out
    assert "FLOP-wise speedup" in out


# ---------------------------------------------------------------------------------- optimize

def test_optimize_times_the_top_and_the_default(capsys, monkeypatch, tmp_path):
    """Deterministic: fake timings make the third-ranked configuration the fastest."""
    fake_ms = {}

    def fake_time_passes(runner, problem, label, passes, warmup, repeat, progress):
        ms = fake_ms.setdefault(label, 10.0 - len(fake_ms) % 3 * 3)  # 10, 7, 4, 10, ...
        return {passes[0]: profiler.Timing(ms, ms, ms, ms, ms, repeat)}, None

    monkeypatch.setattr(profiler, "_time_passes", fake_time_passes)
    path = tmp_path / "opt.json"
    assert cli.main(["profile", *TINY, "--optimize", "--top", "3", "--backend", "reference",
                     *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    found = profiler.load_json(path).optimize
    assert [c.rank for c in found.timed][:3] == [1, 2, 3]
    assert sum(c.default for c in found.timed) == 1
    assert found.winner.rank == 3 and found.winner.timing.ms == 4.0
    assert found.speedup_over_default == found.default.timing.ms / 4.0
    assert found.winner.timing.speedup == found.speedup_over_default
    assert found.saved_to is None
    assert "winner: Q tile" in out and f"{found.speedup_over_default:.2f}x" in out


def test_optimize_on_cpu_saves_and_lookup_reads_it(capsys, tmp_path):
    printed = _json([*TINY, "--optimize", "--top", "2", "--backend", "reference", *FAST,
                     "--save"], capsys)
    found = printed["optimize"]
    timed = [c for c in found["timed"] if c["timing"] is not None]
    assert len(timed) == len(found["timed"]) >= 2
    winner = min(timed, key=lambda c: c["timing"]["ms"])
    assert found["winner"] == winner
    assert found["speedup_over_default"] == pytest.approx(
        found["default"]["timing"]["ms"] / winner["timing"]["ms"])
    cache = tmp_path / "cache" / "tiles.json"
    assert found["saved_to"] == str(cache) and cache.exists()

    geo = normalize_geometry((12, 16), (5, 7), (2, 4))
    tiles = (tuple(winner["q_tile"]), tuple(winner["kv_tile"]))
    assert tuned.lookup(geo, 16, torch.float32, "cpu") == tiles
    tuned.forget()  # as a new process would: from the file
    assert tuned.lookup(geo, 16, torch.float32, "cpu") == tiles
    assert tuned.lookup(geo, 16, "float32", "cpu") == tiles
    assert tuned.lookup(geo, 16, torch.float16, "cpu") is None
    assert tuned.lookup(geo, 32, torch.float32, "cpu") is None
    assert tuned.lookup(geo, 16, torch.float32, "NVIDIA H100 80GB HBM3") is None
    entry = tuned.entries()["cpu"][tuned.signature(geo, 16, torch.float32)]
    assert entry["objective"] == "forward" and entry["ms"] == winner["timing"]["ms"]


def test_cached_tiles_are_listed_and_timed(capsys):
    """Once a winner is saved the ops use it (default_config reads the cache); dry run and
    optimize still measure against the kernels' own default, and time the cached tiles too."""
    problem = profiler.make_problem((12, 16), (5, 7), (2, 4), heads=2, head_dim=16,
                                    dtype=torch.float32)
    before = triton_backend.default_config(problem, Options())
    listed = _json([*TINY, "--dry-run", "--top", "1000"], capsys)["dry_run"]["configs"]
    pick = next(c for c in listed[5:] if not c["default"])
    tuned.store(problem.geometry, 16, torch.float32, "cpu", pick["q_tile"], pick["kv_tile"])
    now = triton_backend.default_config(problem, Options())
    assert (now.q_tile, now.kv_tile) == (tuple(pick["q_tile"]), tuple(pick["kv_tile"]))

    configs = _json([*TINY, "--dry-run", "--top", "2"], capsys)["dry_run"]["configs"]
    (default,) = [c for c in configs if c["default"]]
    (cached,) = [c for c in configs if c["cached"]]
    assert (tuple(default["q_tile"]), tuple(default["kv_tile"])) == \
        (before.q_tile, before.kv_tile)
    assert cached["rank"] == pick["rank"] and default["relative_cost"] == 1.0
    found = _json([*TINY, "--optimize", "--top", "2", *FAST], capsys)["optimize"]
    assert [c["rank"] for c in found["timed"]] == [c["rank"] for c in configs]
    assert found["default"]["default"] and not found["default"]["cached"]


# ------------------------------------------------------------------------------- tile cache

def test_tuned_cache_key_store_and_bad_files(tmp_path):
    geo = normalize_geometry((30, 48, 80), (18, 24, 24), (16, 8, 8))
    assert tuned.signature(geo, 128, torch.float16) == (
        "input=30x48x80 window=18x24x24 stride=16x8x8 dilation=1x1x1 causal=0x0x0 "
        "head_dim=128 dtype=float16")
    assert tuned.cache_path() == tmp_path / "cache" / "tiles.json"
    assert tuned.lookup(geo, 128, torch.float16, "gpu") is None  # no file yet
    tuned.store(geo, 128, torch.float16, "gpu", (2, 8, 8), (2, 8, 8), ms=1.0)
    assert tuned.lookup(geo, 128, torch.float16, "gpu") == ((2, 8, 8), (2, 8, 8))
    tuned.store(geo, 128, torch.float16, "gpu", (4, 4, 8), (2, 8, 8))  # replaces the entry
    assert tuned.lookup(geo, 128, torch.float16, "gpu") == ((4, 4, 8), (2, 8, 8))
    other = normalize_geometry((30, 48, 80), (18, 24, 24), (16, 8, 8), is_causal=True)
    assert tuned.lookup(other, 128, torch.float16, "gpu") is None
    with pytest.raises(ValueError, match="one positive size per dimension"):
        tuned.store(geo, 128, torch.float16, "gpu", (2, 8), (2, 8, 8))

    tuned.cache_path().write_text("{not json")
    tuned.forget()
    with pytest.warns(UserWarning, match="ignoring the gna tile cache"):
        assert tuned.lookup(geo, 128, torch.float16, "gpu") is None
    with pytest.raises(ValueError, match="not valid JSON"):
        tuned.store(geo, 128, torch.float16, "gpu", (2, 8, 8), (2, 8, 8))
    assert tuned.cache_path().read_text() == "{not json"  # not overwritten

    bad = {"version": tuned.VERSION, "devices": {"gpu": {
        tuned.signature(geo, 128, torch.float16): {"q_tile": [2, 8], "kv_tile": [2, 8, 8]}}}}
    tuned.cache_path().write_text(json.dumps(bad))
    tuned.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned.lookup(geo, 128, torch.float16, "gpu") is None  # malformed entry


def test_tuned_does_not_import_the_profiler():
    code = ("import sys, gna.tuned; bad = [m for m in ('rich', 'gna.profiler', 'gna.cli', "
            "'matplotlib') if m in sys.modules]; sys.exit(str(bad) if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gna_tiles_are_the_kernels():
    """The tiles reported for gna are the launchers' own: forward from default_config, the
    backward kernels from backward_configs on the backward tiles; the bound is the sim's."""
    from gna.triton_backward import backward_configs

    problem = profiler.make_problem((30, 48, 80), (18, 24, 24), (16, 8, 8), heads=24,
                                    head_dim=128)
    options = Options(backward_q_tile_shape=(2, 4, 8))
    tiles, bound = profiler._gna_tiles(problem, options)
    config = triton_backend.default_config(problem, options)
    assert (tiles["forward"]["q_tile"], tiles["forward"]["kv_tile"]) == \
        ([*config.q_tile], [*config.kv_tile])
    assert bound == sim.simulate_geometry(problem.geometry, config.q_tile,
                                          config.kv_tile).tiled.bound == pytest.approx(100 / 9)
    assert "backward_error" not in tiles
    bwd = triton_backend.default_config(problem, Options(q_tile_shape=(2, 4, 8)))
    dq, dkdv = backward_configs(problem.geometry, bwd, 2, 128,
                                triton_backend.shared_limit(problem.device))
    assert tiles["backward_dq"]["q_tile"] == [*dq.q_tile] and \
        tiles["backward_dkdv"]["kv_tile"] == [*dkdv.kv_tile]


# -------------------------------------------------------------------------- profile and JSON

def test_profile_on_cpu_with_the_reference(capsys, tmp_path):
    path = tmp_path / "profile.json"
    assert cli.main(["profile", *TINY, "--backend", "reference", "cudnn", "--backprop",
                     "--add-kv", "3", *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("forward", "forward + backward", "backward alone", "sdpa-math (baseline)",
                 "cudnn: not available: needs a CUDA device", "FLOP-wise speedup",
                 "3 additional keys", f"JSON written to {path}"):
        assert text in out, text
    report = profiler.load_json(path)
    assert report.baseline == "sdpa-math"
    ref, base = report.backend("reference"), report.backend("sdpa-math")
    assert ref.available and ref.error is None and base.baseline and not ref.baseline
    geo = normalize_geometry((12, 16), (5, 7), (2, 4))
    flops = 4 * (geo.attended_pairs() + geo.num_tokens * 3) * 2 * 16
    dense_flops = 4 * (geo.dense_pairs() + geo.num_tokens * 3) * 2 * 16
    assert report.problem["forward_flops"] == flops
    for name, scale in (("forward", 1.0), ("forward_backward", 3.5), ("backward", 2.5)):
        t, b = ref.passes[name], base.passes[name]
        assert t.samples == 2 and t.ms_min <= t.ms_q20 <= t.ms <= t.ms_q80 <= t.ms_max
        assert t.speedup == pytest.approx(b.ms / t.ms)
        assert t.tflops == pytest.approx(scale * flops / t.ms / 1e9)
        assert b.tflops == pytest.approx(scale * dense_flops / b.ms / 1e9)
        assert t.peak_bytes is None  # CPU: no memory figure
    assert report.backend("cudnn").passes == {}


def test_a_failing_backend_is_reported_not_raised(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(profiler, "neighborhood_attention", broken)
    assert cli.main(["profile", *TINY, "--backend", "reference", *FAST]) == 1
    out = capsys.readouterr().out
    assert "reference: error: RuntimeError: kernel exploded" in out
    assert "sdpa-math (baseline)" in out


def test_json_schema_round_trip(capsys, tmp_path):
    reports = []
    for extra in (["--backprop", "--backend", "reference", "flex"], ["--dry-run"],
                  ["--optimize", "--top", "1"]):
        path = tmp_path / "r.json"
        cli.main(["profile", *TINY, *FAST, *extra, "--json", str(path)])
        data = json.loads(path.read_text())
        assert data["schema"] == "gna.profile" and data["version"] == profiler.SCHEMA_VERSION
        report = profiler.load_json(path)
        assert report.to_dict() == data
        assert profiler.Report.from_dict(report.to_dict()) == report
        reports.append(report)
    assert reports[0].backend("reference").passes.keys() == set(profiler.PASSES)
    assert reports[1].dry_run is not None and reports[2].optimize is not None
    capsys.readouterr()
    data = reports[0].to_dict()
    with pytest.raises(ValueError, match="version 99"):
        profiler.Report.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="not a gna profile report"):
        profiler.Report.from_dict({**data, "schema": "gna.sim"})


# ----------------------------------------------------------------------- FlexAttention mask

@pytest.mark.parametrize("shape, window, stride, dilation, causal", [
    ((13,), 5, 2, 2, False),
    ((6, 10), (3, 4), (1, 2), (2, 1), (False, True)),
    ((4, 6, 6), (3, 3, 2), (2, 1, 2), (1, 2, 1), (True, False, False)),
])
def test_flex_mask_has_natten_semantics(shape, window, stride, dilation, causal):
    problem = profiler.make_problem(shape, window, stride, dilation, causal)
    geo = problem.geometry
    n = geo.num_tokens
    idx = torch.arange(n)
    mask = profiler._natten_mask_mod(problem)(None, None, idx[:, None], idx[None, :])
    expected = torch.zeros(n, n, dtype=torch.bool)
    coords = list(itertools.product(*(range(s) for s in shape)))
    flat = {c: i for i, c in enumerate(coords)}
    for c in coords:
        for key in itertools.product(*geo.key_window(c)):
            expected[flat[c], flat[key]] = True
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------------------------- the plot

def _png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_the_committed_results(capsys, tmp_path):
    out = tmp_path / "forward.png"
    assert cli.main(["plot", "--results", str(RESULTS), "-o", str(out)]) == 0
    assert _png(out)
    rows = plots.load_forward_results(RESULTS)
    assert f"plot of {len(rows)} problems written to {out}" in capsys.readouterr().out
    names = [r.problem for r in rows]
    assert len(names) == len(set(names)) >= 7
    raw = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    last = [r for r in raw if r["problem"] == "3d-w18x24x24-s16x8x8"
            and r["dtype"] == "float16" and r["head_dim"] == 128][-1]
    (row,) = [r for r in rows if r.problem == "3d-w18x24x24-s16x8x8"]
    assert row.gna == last["gna"]["speedup"] and row.natten_published == 9.7


def test_plot_handles_errors_and_missing_peers(capsys, tmp_path):
    base = {"dtype": "float16", "head_dim": 128, "gpu": "GPU X", "cudnn": {"ms": 10.0}}
    lines = [
        {**base, "problem": "a", "flop_bound": 4.0, "natten_published": 3.0,
         "gna": {"ms": 5.0, "speedup": 2.0}, "flex_flat": {"ms": 4.0, "speedup": 2.5}},
        {**base, "problem": "a", "flop_bound": 4.0, "natten_published": 3.5, "gpu": "GPU Y",
         "gna": {"ms": 4.0}},  # newer gna without a stored speedup; flex not rerun
        {**base, "problem": "b", "flop_bound": 2.0, "natten_published": None,
         "gna": {"error": "OutOfMemoryError"}, "flex_flat": {"error": "compile failed"}},
        {**base, "problem": "c", "dtype": "bfloat16", "gna": {"ms": 1.0, "speedup": 9.0}},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    a, b = plots.load_forward_results(path)
    assert (a.problem, a.gna, a.flex_flat, a.flex_tiled, a.natten_published, a.gpu) == \
        ("a", 2.5, 2.5, None, 3.5, "GPU Y")
    assert (b.gna, b.flex_flat, b.errors) == (None, None, ("gna", "flex_flat"))
    out = tmp_path / "p.png"
    assert cli.main(["plot", "--results", str(path), "-o", str(out)]) == 0
    assert _png(out)
    assert cli.main(["plot", "--results", str(path), "-o", str(out), "--dtype", "bf16"]) == 0

    with pytest.raises(SystemExit):
        cli.main(["plot", "--results", str(path), "--head-dim", "64", "-o", str(out)])
    assert "no rows with dtype float16 and head_dim 64" in capsys.readouterr().err
    path.write_text("{oops\n")
    with pytest.raises(SystemExit):
        cli.main(["plot", "--results", str(path), "-o", str(out)])
    assert "line 1: not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["plot", "--results", str(tmp_path / "missing.jsonl")])
    assert "cannot read" in capsys.readouterr().err
