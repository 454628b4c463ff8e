"""The ``gna`` command (also ``python -m gna``).

Subcommands live in :data:`COMMANDS`, a table of ``name -> (add_arguments, run)``:
``add_arguments(parser)`` declares the subcommand's options and ``run(args, console)`` does the
work and returns the exit status. The first line of ``run``'s docstring is the subcommand's
help. A subcommand signals a bad invocation that argparse could not catch by raising
:class:`UsageError`; :func:`main` turns it into argparse's usage message and exit status 2.

``gna demo`` runs a small 2-D and a small 3-D GNA problem through every registered backend on
this machine, checks each against the reference backend run in float64, and prints timings and
how sparse each problem is. It exits with status 1 if any backend disagrees.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from . import __version__, backends
from .api import attention, neighborhood_attention
from .args import normalize, normalize_geometry
from .backends import Options

__all__ = ["COMMANDS", "UsageError", "main"]


class UsageError(Exception):
    """A bad invocation found after parsing; reported like an argparse error (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Shared helpers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda, but this PyTorch ({torch.__version__}) sees no CUDA device; use "
            f"--device cpu or --device auto"
        )
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} threads"


def median_ms(fn: Callable[[], object], device: torch.device, runs: int = 7, warmup: int = 2,
              budget_s: float = 0.5) -> float:
    """Median wall time of ``fn`` in milliseconds, after up to ``warmup`` untimed calls.

    Warm-up and timing each stop early (after one call) once ``budget_s`` is spent, so a slow
    backend (the Triton interpreter, say) keeps the demo short instead of running many times.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    deadline = time.perf_counter() + budget_s
    for _ in range(warmup):
        fn()
        sync()
        if time.perf_counter() > deadline:
            break
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < runs and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------------------------------------
# gna demo

def _fmt(sizes) -> str:
    return "x".join(str(int(x)) for x in sizes)


@dataclass(frozen=True)
class DemoProblem:
    """One small GNA call: ``[batch, *shape, heads, head_dim]`` tensors and per-dim parameters."""

    name: str
    shape: tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    batch: int = 1

    def describe(self) -> tuple[str, str]:
        """Two short lines: the tensors, then the GNA parameters."""
        causal = [str(axis) for axis, c in enumerate(self.is_causal) if c]
        return (f"{self.name} problem: batch x spatial {self.batch}x{_fmt(self.shape)}, "
                f"{self.heads} heads, head_dim {self.head_dim}",
                f"window {_fmt(self.kernel_size)}, stride {_fmt(self.stride)}, dilation "
                f"{_fmt(self.dilation)}, "
                + (f"causal along axis {', '.join(causal)}" if causal else "not causal"))


# Small enough that the float32 reference runs both in well under a second on two CPU cores.
DEMO_PROBLEMS = (
    DemoProblem("2-D", (32, 32), heads=4, head_dim=32, kernel_size=(7, 7), stride=(2, 2),
                dilation=(1, 1), is_causal=(False, False)),
    DemoProblem("3-D", (8, 12, 12), heads=2, head_dim=32, kernel_size=(3, 5, 5),
                stride=(1, 1, 1), dilation=(1, 2, 1), is_causal=(True, False, False)),
)

# Largest accepted max |out - float64 reference|. Outputs are convex combinations of values
# drawn from N(0, 1), so |out| is O(1) and these are a few units in the last place of the
# dtype (fp16 eps 9.8e-4, bf16 eps 7.8e-3); fp32 leaves room for a different summation order.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default: auto, CUDA if available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="input dtype (default: fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the inputs")


def _demo_problem(problem: DemoProblem, device: torch.device, dtype: torch.dtype,
                  generator: torch.Generator, console: Console) -> int:
    """Run one problem through every backend; print its table; return how many failed."""
    geometry = normalize_geometry(problem.shape, problem.kernel_size, problem.stride,
                                  problem.dilation, problem.is_causal)
    attended, dense = geometry.attended_pairs(), geometry.dense_pairs()
    tensor_shape = (problem.batch, *problem.shape, problem.heads, problem.head_dim)
    q, k, v = (torch.randn(tensor_shape, generator=generator).to(device=device, dtype=dtype)
               for _ in range(3))

    def call(backend: str, *tensors: torch.Tensor) -> torch.Tensor:
        return neighborhood_attention(*tensors, problem.kernel_size, problem.stride,
                                      problem.dilation, problem.is_causal, backend=backend)

    checked = normalize(None, q, k, v, problem.kernel_size, problem.stride, problem.dilation,
                        problem.is_causal)
    automatic = backends.select(checked, Options()).name
    expected = call("reference", q.double(), k.double(), v.double())
    dense_ms = median_ms(lambda: attention(q, k, v), device)
    tolerance = TOLERANCE[dtype]

    tensors, parameters = problem.describe()
    console.print()
    console.print(f"[bold]{tensors}[/bold]")
    console.print(parameters)
    console.print(f"attended pairs: {attended:,} of {dense:,} ({100 * attended / dense:.1f}%)")
    console.print(f"FLOP-wise speedup over dense: {dense / attended:.1f}x")
    console.print(f"default backend here: {automatic}")
    table = Table(caption="max |diff|: against the reference backend run in float64")
    table.add_column("backend")
    table.add_column("check")
    table.add_column("max |diff|", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("median ms", justify="right")
    table.add_column("vs dense", justify="right")

    failed, notes = 0, []
    for name in backends.available():
        try:  # the same question neighborhood_attention(..., backend=name) asks first
            backends.select(checked, Options(backend=name))
        except ValueError as e:  # the backend cannot run this problem on this machine
            table.add_row(name, "skipped", "", "", "", "")
            notes.append(f"{name} skipped: {e}")
            continue
        try:
            out = call(name, q, k, v)
        except Exception as e:  # noqa: BLE001 - a backend that accepts the call must run it
            table.add_row(name, "[red]ERROR[/red]", "", "", "", "")
            notes.append(f"{name} raised {type(e).__name__}: {e}")
            failed += 1
            continue
        diff = (out.double() - expected).abs().max().item()
        ok = out.shape == expected.shape and out.dtype == dtype and diff <= tolerance
        failed += not ok
        ms = median_ms(lambda: call(name, q, k, v), device)
        table.add_row(name, "ok" if ok else "[red]FAIL[/red]", f"{diff:.2e}", f"{tolerance:.0e}",
                      f"{ms:.3f}", f"{dense_ms / ms:.2f}x")
    table.add_row("dense", "", "", "", f"{dense_ms:.3f}", "1.00x", style="dim")
    console.print(table)
    for note in notes:
        console.print(f"  {note}", markup=False)
    return failed


def run_demo(args: argparse.Namespace, console: Console) -> int:
    """Run small 2-D and 3-D problems through every backend, check them, time them."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    console.print(f"gna {__version__}, torch {torch.__version__}, {describe_device(device)}, "
                  f"{dtype_name}, seed {args.seed}")
    console.print(f"backends: {', '.join(backends.available())}")
    generator = torch.Generator().manual_seed(args.seed)
    failed = sum(_demo_problem(p, device, dtype, generator, console) for p in DEMO_PROBLEMS)
    console.print()
    if failed:
        console.print(f"[red]{failed} backend check(s) failed[/red]")
        return 1
    console.print("all backends that ran agree with the reference")
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, Console], int]]] = {
    "demo": (_demo_arguments, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gna", description="Generalized Neighborhood Attention tools.")
    parser.add_argument("--version", action="version", version=f"gna {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run) in COMMANDS.items():
        summary = run.__doc__.strip().splitlines()[0] if run.__doc__ else None
        sub = subparsers.add_parser(name, help=summary, description=summary)
        add_arguments(sub)
        sub.set_defaults(_run=run, _parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args._run(args, Console(highlight=False))
    except UsageError as e:
        args._parser.error(str(e))  # exits with status 2
