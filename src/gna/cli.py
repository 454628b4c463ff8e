"""The ``gna`` command (also ``python -m gna``).

Subcommands live in :data:`COMMANDS`, a table of ``name -> (add_arguments, run)``:
``add_arguments(parser)`` declares the subcommand's options and ``run(args, console)`` does the
work and returns the exit status. The first line of ``run``'s docstring is the subcommand's
help. A subcommand signals a bad invocation that argparse could not catch by raising
:class:`UsageError`; :func:`main` turns it into argparse's usage message and exit status 2.

``gna demo`` runs a small 2-D and a small 3-D GNA problem through every registered backend on
this machine, checks each against the reference backend run in float64, and prints timings and
how sparse each problem is. It exits with status 1 if any backend disagrees.

``gna sim`` runs the simulator (:mod:`gna.sim`): the analytical speedup bound of a GNA problem
under multi-dimensional and flattened 1-D tiling, and with ``--sweep-stride`` a sweep over
strides and tile shapes, plotted. Its arguments follow NATTEN's profiler (``-i``, ``-w``,
``-s``, ``-d``, ``-c``); bad values are reported with the API's own messages.

``gna profile`` (:mod:`gna.profiler`) times one GNA problem across backends (gna's kernels,
the reference, FlexAttention, dense cuDNN / FlashAttention) with the simulator's bound next
to each; ``--dry-run`` lists the valid tile configurations, ``--optimize`` times the ones the
simulator ranks best and ``--save`` keeps the winner for the ops (:mod:`gna.tuned`). As in
NATTEN's profiler, ``-d`` is the head dim there and ``--dilation`` the dilation. ``gna plot``
(:mod:`gna.plots`) draws the committed forward benchmark results as a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from . import __version__, backends, plots, profiler, sim
from .api import attention, neighborhood_attention
from .args import normalize, normalize_geometry, per_dim
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
# gna sim

_TRUE, _FALSE = ("1", "true", "t", "yes", "y"), ("0", "false", "f", "no", "n")


def _bool_value(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")


def _stride_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    return values


def _sim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input-size", type=int, nargs="+", required=True, metavar="N",
                        help="spatial layout, one size per dimension, e.g. 30 48 80")
    parser.add_argument("-w", "--window-size", type=int, nargs="+", required=True, metavar="W",
                        help="kernel (window) size per dimension, or one for all")
    parser.add_argument("-s", "--stride", type=int, nargs="+", default=[1], metavar="S",
                        help="stride per dimension, or one for all (default 1)")
    parser.add_argument("-d", "--dilation", type=int, nargs="+", default=[1], metavar="D",
                        help="dilation per dimension, or one for all (default 1)")
    parser.add_argument("-c", "--causal", type=_bool_value, nargs="+", default=[False],
                        metavar="0|1", help="causal per dimension (0/1 or true/false), or one "
                        "for all, e.g. -c 1 0 0 for causal along time only (default 0)")
    parser.add_argument("--q-tile", type=int, nargs="+", metavar="T",
                        help="Q tile shape (default: the kernels' choice, gna.sim.default_tiles)")
    parser.add_argument("--kv-tile", type=int, nargs="+", metavar="T",
                        help="KV tile shape (default: the kernels' choice for the Q tile)")
    parser.add_argument("--no-flat", action="store_true",
                        help="skip the 1-D flattened tiling comparison")
    parser.add_argument("--sweep-stride", action="store_true",
                        help="also sweep strides: the bound with these tiles and with the best "
                        "supported tiles per stride; writes a bar plot (--plot)")
    parser.add_argument("--sweep-values", type=_stride_values, nargs="+", metavar="S,S,...",
                        help="strides to sweep per dimension, e.g. 1,2,4,8,16 1,8 1,8 "
                        "(default: powers of two below the window, and the window)")
    parser.add_argument("--plot", default="gna-sim-strides.png", metavar="FILE",
                        help="where --sweep-stride writes its PNG (default gna-sim-strides.png)")
    parser.add_argument("--top", type=int, default=15, metavar="N",
                        help="sweep rows to print, highest bound first (default 15)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write the results as JSON to FILE, or print only JSON to stdout "
                        "when no FILE is given")


def _scalar_or_tuple(values):
    """One CLI value broadcasts to every dimension, as a scalar does in the API."""
    return None if values is None else values[0] if len(values) == 1 else tuple(values)


def _plot_sweep(fixed, best, path: str) -> None:
    """Bars: bound per stride with the given tiles (perfectly block-sparse ones highlighted);
    dots: bound with the best supported tiles; line: the FLOP-wise speedup."""
    try:  # optional dependency (the plot extra), only needed here
        from matplotlib.figure import Figure  # renders with Agg, no pyplot state
    except ImportError:
        raise UsageError("--sweep-stride plots with matplotlib, which is not installed; "
                         "pip install 'gna[plot]'") from None

    settings = fixed.settings
    labels = [_fmt(s.stride) for s in settings]
    x = range(len(settings))
    fig = Figure(figsize=(min(30.0, max(6.0, 0.13 * len(settings) + 2)), 4.5))
    ax = fig.subplots()
    colors = ["tab:green" if s.perfectly_block_sparse else "tab:blue" for s in settings]
    q, kv = settings[0].q_tile, settings[0].kv_tile
    ax.bar(x, [s.bound for s in settings], color=colors,
           label=f"bound, Q tile {_fmt(q)}, KV tile {_fmt(kv)} (green: perfectly block-sparse)")
    ax.plot(x, [s.bound for s in best.settings], "k.", label="bound, best supported tiles")
    flops = [s.flop_speedup for s in settings]
    if max(flops) - min(flops) <= 1e-9 * max(flops):
        ax.axhline(flops[0], color="tab:red", linestyle="--",
                   label=f"FLOP-wise speedup {flops[0]:.2f}x")
    else:  # causal: attended pairs depend on the stride
        ax.plot(x, flops, color="tab:red", linestyle="--", label="FLOP-wise speedup")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7 if len(settings) <= 60 else 5)
    ax.set_xlim(-0.6, len(settings) - 0.4)
    ax.set_ylim(0, 1.3 * max(flops + [s.bound for s in best.settings]))  # room for the legend
    ax.set_xlabel("stride")
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title(f"gna sim: input {_fmt(fixed.shape)}, window {_fmt(fixed.kernel_size)}, "
                 f"dilation {_fmt(fixed.dilation)}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _describe_problem(geo) -> str:
    causal = [str(a) for a, c in enumerate(geo.causal) if c]
    return (f"input {_fmt(geo.shape)}, window {_fmt(geo.kernel_size)}, stride "
            f"{_fmt(geo.stride)}, dilation {_fmt(geo.dilation)}, "
            + (f"causal along axis {', '.join(causal)}" if causal else "not causal"))


def _report_table(report) -> Table:
    columns = [report.tiled] + ([report.flat] if report.flat is not None else [])
    table = Table(caption="bound: all KV tiles / the most one Q tile visits")
    table.add_column("")
    table.add_column("multi-dim tiles", justify="right")
    if report.flat is not None:
        table.add_column("1-D flattened", justify="right")

    def row(name, fn):
        table.add_row(name, *(fn(f) for f in columns))

    row("Q tile / KV tile", lambda f: f"{_fmt(f.q_tile)} / {_fmt(f.kv_tile)}")
    row("Q tiles / KV tiles", lambda f: f"{len(f.visited):,} / {f.total_kv_tiles:,}")
    row("visited per Q tile (min/mean/max)",
        lambda f: f"{f.visited_min} / {f.visited_mean:.1f} / {f.visited_max}")
    row("visited tiles needing a mask", lambda f: f"{100 * f.masked_share:.1f}%")
    row("analytical bound", lambda f: f"{f.bound:.2f}x")
    row("average-based (all / mean)", lambda f: f"{f.average_bound:.2f}x")
    row("perfectly block-sparse", lambda f: "yes" if f.perfectly_block_sparse else "no")
    return table


def _sweep_table(fixed, best, top: int) -> Table:
    order = sorted(range(len(fixed.settings)),
                   key=lambda i: (-fixed.settings[i].bound, math.prod(fixed.settings[i].stride),
                                  fixed.settings[i].stride))[:top]
    s0 = fixed.settings[0]
    table = Table(title=f"{len(order)} of {len(fixed.settings)} strides, highest bound with "
                  f"{_fmt(s0.q_tile)} / {_fmt(s0.kv_tile)} tiles first",
                  caption="*: perfectly block-sparse; best: over the supported tiles")
    for name in ("stride", "bound", "masked", "best Q / KV tile", "best bound", "FLOP-wise"):
        table.add_column(name, justify="left" if name in ("stride", "best Q / KV tile")
                         else "right")

    def mark(s):
        return f"{s.bound:.2f}x" + ("*" if s.perfectly_block_sparse else " ")

    for i in order:
        f, b = fixed.settings[i], best.settings[i]
        table.add_row(_fmt(f.stride), mark(f), f"{100 * f.masked_share:.0f}%",
                      f"{_fmt(b.q_tile)} / {_fmt(b.kv_tile)}", mark(b), f"{f.flop_speedup:.2f}x")
    return table


def _perfect_line(result) -> str:
    found = result.perfect
    if not found:
        return "none"
    return ", ".join(f"{_fmt(s.stride)} ({_fmt(s.q_tile)} / {_fmt(s.kv_tile)})" for s in found)


def run_sim(args: argparse.Namespace, console: Console) -> int:
    """Simulate tiled GNA: analytical speedup bounds, no GPU needed (the paper's NATTEN Sim)."""
    try:
        geo = normalize_geometry(args.input_size, _scalar_or_tuple(args.window_size),
                                 _scalar_or_tuple(args.stride), _scalar_or_tuple(args.dilation),
                                 _scalar_or_tuple(args.causal))
        report = sim.simulate_geometry(geo, _scalar_or_tuple(args.q_tile),
                                       _scalar_or_tuple(args.kv_tile), flat=not args.no_flat)
        sweep = None
        if args.sweep_stride:
            strides = sim.stride_grid(geo.kernel_size, args.sweep_values)
            problem = (geo.shape, geo.kernel_size, geo.dilation, geo.causal)
            fixed = sim.search(*problem, strides=strides,
                               tiles=[(report.tiled.q_tile, report.tiled.kv_tile)])
            sweep = (fixed, sim.search(*problem, strides=strides))
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    payload = report.to_dict()
    if sweep is not None:
        payload["sweep"] = {"tiles": sweep[0].to_dict(), "best_tiles": sweep[1].to_dict(),
                            "plot": args.plot}
        _plot_sweep(*sweep, args.plot)
    if args.json == "-":
        console.out(json.dumps(payload, indent=2), highlight=False)
        return 0

    console.print(f"[bold]gna sim[/bold]: {_describe_problem(geo)}")
    console.print(f"attended pairs: {report.attended_pairs:,} of {report.dense_pairs:,} "
                  f"({100 / report.flop_speedup:.1f}%); FLOP-wise speedup "
                  f"{report.flop_speedup:.2f}x")
    console.print(_report_table(report))
    console.print(f"predicted cost (kernel cost model, key tokens): {report.predicted_cost:,.0f}")
    if sweep is not None:
        fixed, best = sweep
        console.print(_sweep_table(fixed, best, args.top))
        console.print(f"smallest perfectly block-sparse strides with these tiles: "
                      f"{_perfect_line(fixed)}", soft_wrap=True)
        console.print(f"... with any supported tiles: {_perfect_line(best)}", soft_wrap=True)
        b = best.best
        console.print(f"highest bound: {b.bound:.2f}x at stride {_fmt(b.stride)} with Q tile "
                      f"{_fmt(b.q_tile)} / KV tile {_fmt(b.kv_tile)}")
        console.print(f"plot written to {args.plot}", soft_wrap=True, markup=False)
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        console.print(f"JSON written to {args.json}", soft_wrap=True, markup=False)
    return 0


# ---------------------------------------------------------------------------------------------
# gna profile and gna plot (the work is in gna.profiler and gna.plots)

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    problem = parser.add_argument_group("problem (as NATTEN's profiler takes it)")
    problem.add_argument("-i", "--input-size", type=_positive, nargs="+", required=True,
                         metavar="N", help="spatial layout, one size per dimension")
    problem.add_argument("-w", "--window-size", type=int, nargs="+", required=True, metavar="W",
                         help="kernel (window) size per dimension, or one for all")
    problem.add_argument("-s", "--stride", type=int, nargs="+", default=[1], metavar="S",
                         help="stride per dimension, or one for all (default 1)")
    problem.add_argument("--dilation", type=int, nargs="+", default=[1], metavar="D",
                         help="dilation per dimension, or one for all (default 1)")
    problem.add_argument("-c", "--causal", type=_bool_value, nargs="+", default=[False],
                         metavar="0|1", help="causal per dimension (0/1), or one for all")
    problem.add_argument("-b", "--batch-size", type=_positive, default=1, metavar="B")
    problem.add_argument("-n", "--heads", type=_positive, default=1, metavar="H")
    problem.add_argument("--heads-kv", type=_positive, metavar="H",
                         help="key/value heads (GQA/MQA; default: --heads)")
    problem.add_argument("-d", "--dim", type=_positive, default=64, metavar="D",
                         help="head dim (default 64)")
    problem.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                         help="default: fp16 on CUDA, fp32 on CPU")
    problem.add_argument("--add-kv", type=_count, default=0, metavar="N",
                         help="additional keys/values every query attends to (default 0)")
    run = parser.add_argument_group("what to run")
    run.add_argument("--backend", nargs="+", choices=profiler.BACKENDS, metavar="NAME",
                     help=f"any of {', '.join(profiler.BACKENDS)} (default: gna on CUDA, "
                     "reference on CPU); dense cuDNN is always timed for the speedups")
    run.add_argument("--backprop", action="store_true",
                     help="also time forward+backward and backward alone")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    for flag, what in (("--q-tile", "Q tile"), ("--kv-tile", "KV tile"),
                       ("--backward-q-tile", "backward Q tile"),
                       ("--backward-kv-tile", "backward KV tile")):
        run.add_argument(flag, type=int, nargs="+", metavar="T",
                         help=f"gna's {what} shape (default: the kernels' choice)")
    run.add_argument("--warmup", type=_count, default=5, metavar="N",
                     help="untimed calls after the first (compiling) one (default 5)")
    run.add_argument("--repeat", type=_positive, default=20, metavar="N",
                     help="timed calls (default 20)")
    run.add_argument("--seed", type=int, default=0, help="random seed for the inputs")
    run.add_argument("--json", nargs="?", const="-", metavar="FILE",
                     help="write the report as JSON to FILE, or print only JSON to stdout "
                     "when no FILE is given (schema: gna.profiler)")
    tiles = parser.add_argument_group("tile shapes")
    tiles.add_argument("--dry-run", action="store_true",
                       help="list the valid tile configurations with the simulator's figures; "
                       "runs nothing on the device")
    tiles.add_argument("--optimize", action="store_true",
                       help="time the configurations the simulator ranks best and the default; "
                       "report the fastest")
    tiles.add_argument("--top", type=_positive, metavar="N",
                       help="configurations --optimize times (default 5); --dry-run lists "
                       "20 unless given")
    tiles.add_argument("--save", action="store_true",
                       help="with --optimize: store the winner in the tile cache the ops read "
                       "($GNA_CACHE_DIR/tiles.json or ~/.cache/gna/tiles.json)")


def _profile_problem(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The problem and gna's tile options, validated by the API's own checks."""
    problem = profiler.make_problem(
        args.input_size, _scalar_or_tuple(args.window_size), _scalar_or_tuple(args.stride),
        _scalar_or_tuple(args.dilation), _scalar_or_tuple(args.causal), batch=args.batch_size,
        heads=args.heads, heads_kv=args.heads_kv, head_dim=args.dim, dtype=dtype,
        additional_kv=args.add_kv, device=device)
    tiles = {name: None if value is None else per_dim(name, _scalar_or_tuple(value),
                                                        problem.ndim)
             for name, value in (("q_tile_shape", args.q_tile), ("kv_tile_shape", args.kv_tile),
                                 ("backward_q_tile_shape", args.backward_q_tile),
                                 ("backward_kv_tile_shape", args.backward_kv_tile))}
    return problem, Options(**tiles)


def _print_table(console: Console, table) -> None:
    """Tables at their natural width when written to a file or pipe (logs, pasted notes)."""
    if console.is_terminal:
        console.print(table)
        return
    width = console.width
    console.width = max(width, 200)
    try:
        console.print(table)
    finally:
        console.width = width


def _write_json(report, args, console: Console) -> None:
    if args.json is not None and args.json != "-":
        profiler.save_json(report, args.json)
        console.print(f"JSON written to {args.json}", soft_wrap=True, markup=False)


def run_profile(args: argparse.Namespace, console: Console) -> int:
    """Time a GNA problem on this machine across backends; dry-run or optimize tile shapes."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    names = args.backend or (["gna"] if device.type == "cuda" else ["reference"])
    if args.save and not args.optimize:
        raise UsageError("--save stores the winner of --optimize; add --optimize")
    try:
        problem, options = _profile_problem(args, device, dtype)
        if args.optimize and options != Options():
            raise UsageError("--optimize chooses the tile shapes; drop --q-tile, --kv-tile and "
                             "the backward ones")
        if args.optimize and (len(names) != 1 or names[0] not in ("gna", "reference")):
            raise UsageError(f"--optimize tunes gna's tiles with one backend, gna (or reference "
                             f"on a CPU, which ignores tiles); got --backend {' '.join(names)}")
        if "gna" in names and options != Options():
            profiler.check_tiles(problem, options)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None

    try:  # backends report their own failures; a ValueError here is about the request
        if args.dry_run:
            report = profiler.dry_run(problem, args.top or 20, names, options)
        else:
            with profiler.make_progress() as progress:
                if args.optimize:
                    report = profiler.optimize(
                        problem, names[0], top=args.top or 5, warmup=args.warmup,
                        repeat=args.repeat, backprop=args.backprop, seed=args.seed,
                        progress=progress)
                else:
                    report = profiler.profile(
                        problem, names, options, warmup=args.warmup, repeat=args.repeat,
                        backprop=args.backprop, seed=args.seed, progress=progress)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.optimize and args.save and not args.dry_run and report.optimize.winner is not None:
        report = profiler.save_winner(report, problem)
    if args.json == "-":
        console.out(json.dumps(report.to_dict(), indent=2), highlight=False)
    else:
        console.print("[bold]gna profile[/bold]")
        for line in profiler.header_lines(report):
            console.print(line, markup=False, soft_wrap=True)
        if args.dry_run:
            _print_table(console, profiler.dry_run_table(
                report, args.top or 5 if args.optimize else None))
            for line in profiler.dry_run_notes(report):
                console.print(line, markup=False, soft_wrap=True)
            for b in report.backends:
                state = "available" if b.available else f"not available: {b.reason}"
                console.print(f"{b.name}: {state}", markup=False, soft_wrap=True)
        elif args.optimize:
            _print_table(console, profiler.optimize_table(report))
            for line in profiler.optimize_summary(report):
                console.print(line, markup=False, soft_wrap=True)
            if report.optimize.saved_to:
                console.print(f"saved to {report.optimize.saved_to}", markup=False,
                              soft_wrap=True)
        else:
            for table in profiler.profile_tables(report):
                _print_table(console, table)
            for line in profiler.profile_notes(report):
                console.print(line, markup=False, soft_wrap=True)
    _write_json(report, args, console)
    if args.optimize and not args.dry_run:
        return 0 if report.optimize.winner is not None else 1
    return 1 if any(b.error for b in report.backends if b.name in names) else 0


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="benchmarks/results/forward.jsonl", metavar="FILE",
                        help="benchmark rows, one JSON object a line (default "
                        "benchmarks/results/forward.jsonl)")
    parser.add_argument("-o", "--output", default="gna-forward.png", metavar="FILE",
                        help="the PNG to write (default gna-forward.png)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                        help="rows of this dtype (default fp16)")
    parser.add_argument("--head-dim", type=_positive, default=128, metavar="D",
                        help="rows of this head dim (default 128)")
    parser.add_argument("--title", help="plot title (default: names the GPU)")


def run_plot(args: argparse.Namespace, console: Console) -> int:
    """Plot the committed forward benchmark: gna vs FlexAttention vs NATTEN, and the bound."""
    dtype = str(DTYPES[args.dtype]).removeprefix("torch.")
    try:
        rows = plots.load_forward_results(args.results, dtype, args.head_dim)
    except OSError as e:
        raise UsageError(f"cannot read {args.results}: {e.strerror}; pass --results FILE "
                         f"(benchmarks/results/forward.jsonl in a checkout)") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not rows:
        raise UsageError(f"no rows with dtype {dtype} and head_dim {args.head_dim} in "
                         f"{args.results}")
    try:
        plots.plot_forward_results(rows, args.output, args.title)
    except ImportError:
        raise UsageError("gna plot draws with matplotlib, which is not installed; "
                         "pip install 'gna[plot]'") from None
    console.print(f"plot of {len(rows)} problems written to {args.output}", markup=False,
                  soft_wrap=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, Console], int]]] = {
    "demo": (_demo_arguments, run_demo),
    "sim": (_sim_arguments, run_sim),
    "profile": (_profile_arguments, run_profile),
    "plot": (_plot_arguments, run_plot),
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
