"""The ``gna`` command: ``gna demo`` end to end, its failure paths, and argument errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from gna import backends, cli
from gna.args import normalize_geometry


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    # These tests are about the command, not the kernels: keep Triton's CPU interpreter out so
    # on a CPU-only machine the triton backend is reported as skipped, quickly.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _row(backend: str, check: str) -> re.Pattern:
    """A table row of ``gna demo`` naming ``backend`` with ``check`` in the next column."""
    return re.compile(rf"{re.escape(backend)}\s+│\s+{check}\s")


def _sparsity_lines(problem: cli.DemoProblem) -> list[str]:
    geometry = normalize_geometry(problem.shape, problem.kernel_size, problem.stride,
                                  problem.dilation, problem.is_causal)
    attended, dense = geometry.attended_pairs(), geometry.dense_pairs()
    return [f"attended pairs: {attended:,} of {dense:,} ({100 * attended / dense:.1f}%)",
            f"FLOP-wise speedup over dense: {dense / attended:.1f}x"]


def test_demo_in_process(capsys):
    assert cli.main(["demo", "--device", "cpu", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for name in backends.available():
        assert name in out
    for problem in cli.DEMO_PROBLEMS:
        for line in _sparsity_lines(problem):
            assert line in out
    assert len(_row("reference", "ok").findall(out)) == len(cli.DEMO_PROBLEMS)
    assert "dense" in out
    assert "agree with the reference" in out


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_demo_low_precision(capsys, dtype):
    assert cli.main(["demo", "--device", "cpu", "--dtype", dtype]) == 0
    assert f"{dtype}, seed 0" in capsys.readouterr().out


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "gna", "demo", "--device", "cpu"],
                            capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in backends.available():
        assert name in result.stdout
    for line in _sparsity_lines(cli.DEMO_PROBLEMS[0]):
        assert line in result.stdout


def _register(monkeypatch, name, why_not, run):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register(backends.Backend(name, why_not, run))


def _shifted_reference(problem, options, q, k, v, extra_k, extra_v):
    out, lse = backends._reference_run(problem, options, q, k, v, extra_k, extra_v)
    return out + 1e-2, lse


def test_demo_fails_on_a_wrong_backend(monkeypatch, capsys):
    _register(monkeypatch, "off_by_1e-2", lambda problem, options: None, _shifted_reference)
    assert cli.main(["demo", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert len(_row("off_by_1e-2", "FAIL").findall(out)) == 2
    assert "1.00e-02" in out
    assert "2 backend check(s) failed" in out


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_demo_fails_on_a_crashing_backend(monkeypatch, capsys, error):
    # A backend that accepted the call and then raised is broken, even with a ValueError.
    def crash(*args):
        raise error("kernel exploded [grid 3x4]")

    _register(monkeypatch, "crashing", lambda problem, options: None, crash)
    assert cli.main(["demo", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert len(_row("crashing", "ERROR").findall(out)) == 2
    assert f"crashing raised {error.__name__}: kernel exploded [grid 3x4]" in out


def test_demo_skips_a_backend_that_cannot_run(monkeypatch, capsys):
    _register(monkeypatch, "picky", lambda problem, options: "wants a quantum computer",
              _shifted_reference)
    assert cli.main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(_row("picky", "skipped").findall(out)) == 2
    assert "wants a quantum computer" in out


@pytest.mark.parametrize("argv", [
    ["demo", "--dtype", "int8"],
    ["demo", "--device", "tpu"],
    ["demo", "--seed", "x"],
    ["no-such-command"],
    [],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: gna" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_a_gpu_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--device", "cuda"])
    assert exc.value.code == 2
    assert "sees no CUDA device" in capsys.readouterr().err
