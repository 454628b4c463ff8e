"""The profiler behind ``gna profile``: what a GNA problem costs on this machine, explained by
the simulator.

* :func:`make_problem` validates a problem given as sizes (the CLI's arguments) with the
  API's own checks (:func:`gna.args.normalize` on ``meta`` tensors, so nothing is allocated).
* :func:`profile` times backends on it: ``gna`` (the Triton kernels), ``reference`` (pure
  PyTorch), ``flex`` (compiled FlexAttention with a NATTEN-semantics block mask), ``cudnn``
  and ``flash`` (dense SDPA). Dense cuDNN is always timed in the same run for the speedup
  column (on a CPU: dense SDPA's math kernel). A backend that cannot run is reported with the
  reason; one that fails is reported with its error.
* :func:`dry_run` lists the tile configurations gna's kernels accept for the problem on this
  device, ranked by the simulator's cost model, with the analytical bound of each; it runs
  nothing. :func:`optimize` times only the best few and the default; :func:`save_winner`
  stores the winner where the ops find it (:mod:`gna.tuned`).
* :class:`Report` is what all of these return; :meth:`Report.to_dict` is the ``--json``
  schema (below) and :func:`load_json` reads it back.
* The tables ``gna profile`` prints: :func:`profile_tables`, :func:`dry_run_table`,
  :func:`optimize_table`. (``gna plot``, the plot of the committed benchmark results, is
  :mod:`gna.plots`.)

Timing: CUDA events on a GPU (perf_counter on a CPU), median and 20/80% quantiles over
``repeat`` calls after one untimed first call (compilation) and ``warmup`` untimed calls. Calls
slower than 20 ms are synchronized one by one (so progress bars move); faster ones run back to
back and are synchronized at the end. Peak memory (CUDA only) is
``torch.cuda.max_memory_allocated`` during one extra call, above what was allocated before it.
Achieved TFLOP/s count ``4 * head_dim`` FLOPs per attended (query, key) pair per head and batch
entry, the pairs counted exactly by :mod:`gna.geometry` (additional keys: every query sees each
one); dense backends are charged every pair. Backward is 2.5x the forward's FLOPs, as in
``benchmarks/``.

JSON schema (``version`` 1)::

    {"schema": "gna.profile", "version": 1,
     "environment": {"gna", "torch", "triton", "python", "device", "device_name", "cuda", "time"},
     "problem": {"input_size", "window_size", "stride", "dilation", "causal", "batch", "heads",
                 "heads_kv", "head_dim", "dtype", "additional_kv", "attended_pairs",
                 "dense_pairs", "flop_speedup", "forward_flops"},
     "settings": {"mode": "profile" | "dry_run" | "optimize", "warmup", "repeat", "backprop",
                  "seed", "timer": "cuda_events" | "perf_counter", "tiles": {...}},
     "baseline": "cudnn" | "sdpa" | "sdpa-math" | null,
     "backends": [{"name", "available", "reason", "error", "note", "baseline", "tiles",
                   "sim_bound", "passes": {"forward" | "forward_backward" | "backward":
                       {"ms", "ms_q20", "ms_q80", "ms_min", "ms_max", "samples", "speedup",
                        "tflops", "peak_bytes"}}}],
     "dry_run": null | {"planned_for", "shared_limit", "considered", "rejected",
                        "configs": [config]},
     "optimize": null | {"backend", "objective", "considered", "timed": [config], "winner",
                         "default", "speedup_over_default", "saved_to"}}

    config = {"rank", "q_tile", "kv_tile", "predicted_cost", "relative_cost", "bound",
              "masked_share", "perfectly_block_sparse", "num_warps", "num_stages", "default",
              "cached", "timing": null | timing, "error": null | str}

Times are milliseconds, memory bytes; ``speedup`` is the baseline's time over this backend's
in the same pass; ``sim_bound`` the simulator's analytical bound for the tiles used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import sim, tuned
from .api import neighborhood_attention
from .args import Problem, normalize
from .backends import Options, select

__all__ = [
    "BACKENDS", "DENSE_BACKENDS", "PASSES", "SCHEMA_VERSION", "VOLUMES", "Timing",
    "BackendResult", "TileConfig", "DryRun", "OptimizeResult", "Report", "make_problem",
    "environment", "problem_dict",
    "profile", "dry_run", "optimize", "save_winner", "load_json", "save_json",
    "make_progress", "check_tiles", "header_lines", "profile_tables", "profile_notes",
    "dry_run_table", "dry_run_notes", "optimize_table", "optimize_summary",
]

SCHEMA_VERSION = 1
# Backends a user can name. "gna" is backend="triton" of the ops.
BACKENDS = ("gna", "reference", "flex", "cudnn", "flash")
# Dense SDPA runners: torch.nn.attention.SDPBackend member, or None for PyTorch's own choice.
# "sdpa" (CUDA, when cuDNN fails) and "sdpa-math" (CPU) only serve as speedup baselines.
DENSE_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "sdpa": None,
                  "sdpa-math": "MATH"}
PASSES = ("forward", "forward_backward", "backward")
# Tile volumes (tokens) dry run and optimize try, beyond the kernels' own candidates: the
# simulator search's 64 and 128, and 32 for small layouts and large head dims.
VOLUMES = (32, 64, 128)
_PASS_FLOPS = {"forward": 1.0, "forward_backward": 3.5, "backward": 2.5}
_SYNC_EACH_MS = 20.0  # calls slower than this are synchronized one by one


# ---------------------------------------------------------------------------------------------
# Results (frozen dataclasses; to_dict / from_dict are the JSON schema)

@dataclass(frozen=True)
class Timing:
    """One pass of one backend: times in ms, and the figures derived from them."""

    ms: float
    ms_q20: float
    ms_q80: float
    ms_min: float
    ms_max: float
    samples: int
    speedup: float | None = None  # baseline's ms / ms, same pass
    tflops: float | None = None
    peak_bytes: int | None = None  # CUDA only

    @classmethod
    def from_samples(cls, times_ms) -> Timing:
        t = np.asarray(times_ms, dtype=np.float64)
        q20, median, q80 = np.percentile(t, [20, 50, 80])
        return cls(float(median), float(q20), float(q80), float(t.min()), float(t.max()),
                   len(t))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        return cls(**d)


@dataclass(frozen=True)
class BackendResult:
    """What happened to one backend: not available (``reason``), failed (``error``, with the
    passes measured before the failure), or measured."""

    name: str
    available: bool
    reason: str | None = None
    error: str | None = None
    note: str | None = None
    baseline: bool = False  # the dense run the speedups are relative to
    tiles: dict | None = None  # gna: {"forward"|"backward_dq"|"backward_dkdv": {...}}
    sim_bound: float | None = None
    passes: dict = field(default_factory=dict)  # pass name -> Timing

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["passes"] = {k: v.to_dict() for k, v in self.passes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BackendResult:
        return cls(**{**d, "passes": {k: Timing.from_dict(v) for k, v in d["passes"].items()}})


@dataclass(frozen=True)
class TileConfig:
    """One (Q tile, KV tile) configuration of gna's forward kernel, as the simulator sees it
    and (after :func:`optimize`) as measured."""

    rank: int  # 1-based, simulator order among the valid configurations
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    predicted_cost: float  # sim.rank_tiles' cost (key tokens x Q tile volume / 128)
    relative_cost: float  # predicted_cost / the default configuration's
    bound: float  # analytical speedup bound (sim)
    masked_share: float
    perfectly_block_sparse: bool
    num_warps: int
    num_stages: int
    default: bool = False  # the kernels' own choice for this problem
    cached: bool = False  # in the tile cache for this problem (what the ops use now)
    timing: Timing | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(q_tile=list(self.q_tile), kv_tile=list(self.kv_tile),
                 timing=None if self.timing is None else self.timing.to_dict())
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TileConfig:
        return cls(**{**d, "q_tile": tuple(d["q_tile"]), "kv_tile": tuple(d["kv_tile"]),
                      "timing": None if d["timing"] is None else Timing.from_dict(d["timing"])})


@dataclass(frozen=True)
class DryRun:
    """The configurations :func:`dry_run` lists: the best ``top`` by predicted cost, and the
    default if it ranks lower."""

    planned_for: str  # the device whose shared memory limit was checked
    shared_limit: int
    considered: int  # valid configurations ranked
    rejected: int  # candidates the kernels refuse (tile rules, shared memory)
    configs: tuple[TileConfig, ...]

    def to_dict(self) -> dict:
        return {"planned_for": self.planned_for, "shared_limit": self.shared_limit,
                "considered": self.considered, "rejected": self.rejected,
                "configs": [c.to_dict() for c in self.configs]}

    @classmethod
    def from_dict(cls, d: dict) -> DryRun:
        return cls(**{**d, "configs": tuple(TileConfig.from_dict(c) for c in d["configs"])})


@dataclass(frozen=True)
class OptimizeResult:
    """The configurations :func:`optimize` timed (simulator order, default last if it ranked
    below them), the fastest, and by how much it beat the default."""

    backend: str
    objective: str  # "forward" or "forward_backward"
    considered: int
    timed: tuple[TileConfig, ...]
    winner: TileConfig | None
    default: TileConfig
    speedup_over_default: float | None
    saved_to: str | None = None

    def to_dict(self) -> dict:
        return {"backend": self.backend, "objective": self.objective,
                "considered": self.considered, "timed": [c.to_dict() for c in self.timed],
                "winner": None if self.winner is None else self.winner.to_dict(),
                "default": self.default.to_dict(),
                "speedup_over_default": self.speedup_over_default, "saved_to": self.saved_to}

    @classmethod
    def from_dict(cls, d: dict) -> OptimizeResult:
        return cls(**{**d, "timed": tuple(TileConfig.from_dict(c) for c in d["timed"]),
                      "winner": None if d["winner"] is None else TileConfig.from_dict(d["winner"]),
                      "default": TileConfig.from_dict(d["default"])})


@dataclass(frozen=True)
class Report:
    """Everything one ``gna profile`` run found; ``to_dict()`` is the JSON schema."""

    environment: dict
    problem: dict
    settings: dict
    baseline: str | None
    backends: tuple[BackendResult, ...]
    dry_run: DryRun | None = None
    optimize: OptimizeResult | None = None

    def backend(self, name: str) -> BackendResult:
        return next(b for b in self.backends if b.name == name)

    def to_dict(self) -> dict:
        return {"schema": "gna.profile", "version": SCHEMA_VERSION,
                "environment": self.environment, "problem": self.problem,
                "settings": self.settings, "baseline": self.baseline,
                "backends": [b.to_dict() for b in self.backends],
                "dry_run": None if self.dry_run is None else self.dry_run.to_dict(),
                "optimize": None if self.optimize is None else self.optimize.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        if d.get("schema") != "gna.profile":
            raise ValueError(f"not a gna profile report (schema {d.get('schema')!r})")
        if d.get("version") != SCHEMA_VERSION:
            raise ValueError(f"gna profile report version {d.get('version')!r}; this gna reads "
                             f"version {SCHEMA_VERSION}")
        return cls(
            environment=d["environment"], problem=d["problem"], settings=d["settings"],
            baseline=d["baseline"],
            backends=tuple(BackendResult.from_dict(b) for b in d["backends"]),
            dry_run=None if d["dry_run"] is None else DryRun.from_dict(d["dry_run"]),
            optimize=None if d["optimize"] is None else OptimizeResult.from_dict(d["optimize"]))


def save_json(report: Report, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=2)
        f.write("\n")


def load_json(path) -> Report:
    """Read a report written by ``gna profile --json FILE``."""
    with open(path, encoding="utf-8") as f:
        return Report.from_dict(json.load(f))


# ---------------------------------------------------------------------------------------------
# The problem

def make_problem(input_size, window_size, stride=1, dilation=1, causal=False, *, batch=1,
                 heads=1, heads_kv=None, head_dim=64, dtype=torch.float16, additional_kv=0,
                 device="cpu") -> Problem:
    """Validate a problem given by its sizes, as :func:`gna.neighborhood_attention` would
    validate tensors of these shapes (same checks, same messages), without allocating them."""
    heads_kv = heads if heads_kv is None else heads_kv
    spatial = tuple(input_size)

    def meta(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    q = meta(batch, *spatial, heads, head_dim)
    k, v = meta(batch, *spatial, heads_kv, head_dim), meta(batch, *spatial, heads_kv, head_dim)
    extra = (meta(batch, additional_kv, heads_kv, head_dim),) * 2 if additional_kv else (None,) * 2
    problem = normalize(None, q, k, v, window_size, stride, dilation, causal, None, *extra)
    return dataclasses.replace(problem, device=torch.device(device))


def problem_dict(problem: Problem) -> dict:
    geo = problem.geometry
    pairs = _pairs(problem, dense=False)
    return {"input_size": list(geo.shape), "window_size": list(geo.kernel_size),
            "stride": list(geo.stride), "dilation": list(geo.dilation),
            "causal": list(geo.causal), "batch": problem.batch, "heads": problem.heads,
            "heads_kv": problem.heads_kv, "head_dim": problem.head_dim,
            "dtype": str(problem.dtype).removeprefix("torch."),
            "additional_kv": problem.num_extra, "attended_pairs": geo.attended_pairs(),
            "dense_pairs": geo.dense_pairs(),
            "flop_speedup": geo.dense_pairs() / geo.attended_pairs(),
            "forward_flops": _forward_flops(problem, pairs)}


def _pairs(problem: Problem, dense: bool) -> int:
    """(query, key) pairs per head: attended (or all, for a dense run), with the extra keys."""
    geo = problem.geometry
    pairs = geo.dense_pairs() if dense else geo.attended_pairs()
    return pairs + geo.num_tokens * problem.num_extra


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _forward_flops(problem: Problem, pairs: int) -> int:
    return 4 * pairs * problem.heads * problem.batch * problem.head_dim


def environment(device: torch.device) -> dict:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gna": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "device": device.type,
            "device_name": tuned.device_name(device),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _inputs(problem: Problem, seed: int) -> tuple[torch.Tensor, ...]:
    """Heads-last ``q, k, v`` (and additional keys/values) drawn from N(0, 1)."""
    geo, device = problem.geometry, problem.device
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=problem.dtype)

    b, h, hkv, d = problem.batch, problem.heads, problem.heads_kv, problem.head_dim
    tensors = [randn(b, *geo.shape, h, d), randn(b, *geo.shape, hkv, d),
               randn(b, *geo.shape, hkv, d)]
    if problem.num_extra:
        tensors += [randn(b, problem.num_extra, hkv, d), randn(b, problem.num_extra, hkv, d)]
    return tuple(tensors)


# ---------------------------------------------------------------------------------------------
# Progress

def make_progress(console=None):
    """A transient rich progress display (on stderr unless ``console`` says otherwise)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    console = console or Console(stderr=True)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                    transient=True, disable=not console.is_terminal)


@contextlib.contextmanager
def _task(progress, description: str, total: int | None = None):
    """A progress task for the duration of the block; yields ``advance()``."""
    if progress is None:
        yield lambda: None
        return
    task = progress.add_task(description, total=total)
    try:
        yield lambda: progress.advance(task)
    finally:
        progress.remove_task(task)


# ---------------------------------------------------------------------------------------------
# Runners: how each backend computes the problem, in the layout it is fastest in

@dataclass
class _Runner:
    """``call(tensors) -> out``; ``tensors`` are the inputs in the runner's layout (made
    before timing); ``context`` is entered around all of the runner's work."""

    call: Callable
    tensors: tuple[torch.Tensor, ...]
    dense: bool = False
    note: str | None = None
    tiles: dict | None = None
    sim_bound: float | None = None
    context: Callable = contextlib.nullcontext


def _why_not(name: str, problem: Problem, options: Options) -> str | None:
    """None if backend ``name`` can run the problem here, else the reason."""
    if name in ("gna", "reference"):
        opts = dataclasses.replace(options, backend="triton" if name == "gna" else name)
        try:
            select(problem, opts)  # the same question the ops ask
        except ValueError as e:
            return str(e)
        return None
    if name == "sdpa-math":
        return None
    if problem.device.type != "cuda":
        return f"needs a CUDA device, the problem is on {problem.device}"
    if name == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            return f"FlexAttention is not available in torch {torch.__version__} ({e})"
        if problem.num_extra:
            return "additional keys are not supported by the FlexAttention runner (--add-kv)"
    return None


def _gna_tiles(problem: Problem, options: Options) -> tuple[dict, float]:
    """The tiles gna's kernels use for this call (forward, and the backward kernels fitted
    from the backward tiles) and the simulator's bound for the forward tiles."""
    from . import triton_backend

    geo = problem.geometry
    config = triton_backend.default_config(problem, options)
    forward = sim.simulate_geometry(geo, config.q_tile, config.kv_tile, flat=False).tiled
    tiles = {"forward": {"q_tile": list(config.q_tile), "kv_tile": list(config.kv_tile),
                         "num_warps": config.num_warps, "num_stages": config.num_stages,
                         "bound": forward.bound,
                         "perfectly_block_sparse": forward.perfectly_block_sparse}}
    bwd_options = dataclasses.replace(
        options, q_tile_shape=options.backward_q_tile_shape or options.q_tile_shape,
        kv_tile_shape=options.backward_kv_tile_shape or options.kv_tile_shape)
    bwd = triton_backend.default_config(problem, bwd_options)
    head_dim_p2 = 1 << (max(problem.head_dim, 16) - 1).bit_length()
    fma_dots = problem.dtype == torch.float32 and options.fp32_precision != "tf32"
    try:  # as launch_backward derives them
        from .triton_backward import backward_configs

        dq, dkdv = backward_configs(geo, bwd, problem.dtype.itemsize, head_dim_p2,
                                    triton_backend.shared_limit(problem.device), fma_dots)
    except Exception as e:  # noqa: BLE001 - only the report's tile column depends on it
        tiles["backward_error"] = f"{type(e).__name__}: {e}"
        return tiles, forward.bound
    for name, c in (("backward_dq", dq), ("backward_dkdv", dkdv)):
        tiles[name] = {"q_tile": list(c.q_tile), "kv_tile": list(c.kv_tile),
                       "num_warps": c.num_warps, "num_stages": c.num_stages}
    tiles["backward_dq"]["bound"] = sim.simulate_geometry(geo, dq.q_tile, dq.kv_tile,
                                                          flat=False).tiled.bound
    return tiles, forward.bound


def _ops_runner(name: str, problem: Problem, options: Options, inputs) -> _Runner:
    geo = problem.geometry
    opts = dataclasses.replace(options, backend="triton" if name == "gna" else name)

    def call(t):
        q, k, v, *extra = t
        extra_k, extra_v = extra if extra else (None, None)
        return neighborhood_attention(
            q, k, v, geo.kernel_size, geo.stride, geo.dilation, geo.causal,
            additional_keys=extra_k, additional_values=extra_v, backend=opts.backend,
            q_tile_shape=opts.q_tile_shape, kv_tile_shape=opts.kv_tile_shape,
            backward_q_tile_shape=opts.backward_q_tile_shape,
            backward_kv_tile_shape=opts.backward_kv_tile_shape,
            fp32_precision=opts.fp32_precision)

    runner = _Runner(call, inputs)
    if name == "gna":
        runner.tiles, runner.sim_bound = _gna_tiles(problem, opts)
        if opts.q_tile_shape or opts.kv_tile_shape:
            origin = "as given"
        elif tuned.lookup(geo, problem.head_dim, problem.dtype,
                          tuned.device_name(problem.device)):
            origin = f"from the tile cache ({tuned.cache_path()})"
        else:
            origin = "of the kernels' default"
        runner.note = ("Triton kernels, heads-last layout; tiles " + origin
                       + (f" (backward tiles unknown: {runner.tiles['backward_error']})"
                          if "backward_error" in runner.tiles else ""))
    else:
        runner.note = "pure PyTorch; ignores tile shapes"
    return runner


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """``[batch, *spatial, heads, d]`` -> contiguous ``[batch, heads, tokens, d]``."""
    return t.reshape(t.shape[0], -1, t.shape[-2], t.shape[-1]).transpose(1, 2).contiguous()


def _dense_runner(name: str, problem: Problem, inputs) -> _Runner:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (_heads_first(t) for t in inputs[:3])
    if problem.num_extra:
        k = torch.cat([k, _heads_first(inputs[3])], dim=2)
        v = torch.cat([v, _heads_first(inputs[4])], dim=2)
    groups = problem.heads // problem.heads_kv
    if groups > 1:  # not every SDPA kernel takes GQA; give each query head its own copy
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    member = DENSE_BACKENDS[name]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def call(t):
        if member is None:
            return sdpa(*t)
        with sdpa_kernel(getattr(SDPBackend, member)):
            return sdpa(*t)

    what = {"cudnn": "cuDNN", "flash": "FlashAttention", "sdpa": "PyTorch's choice",
            "sdpa-math": "math kernel"}[name]
    note = (f"dense SDPA ({what}), [batch, heads, tokens, head_dim] layout"
            + (", K/V heads repeated for GQA" if groups > 1 else "")
            + (", additional keys appended" if problem.num_extra else ""))
    return _Runner(call, (q, k, v), dense=True, note=note, sim_bound=1.0)


def _natten_mask_mod(problem: Problem):
    """FlexAttention ``mask_mod`` with NATTEN semantics: per axis, the key coordinate must be
    in the query's dilation group and inside its window (windows from gna.geometry)."""
    geo, device = problem.geometry, problem.device
    axes = []
    for a in range(geo.ndim):
        d, n = geo.dilation[a], geo.shape[a]
        lo, hi = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for g in range(d):
            start, end = geo.dim(a, g).windows()
            lo[g::d], hi[g::d] = start, end
        axes.append((d, math.prod(geo.shape[a + 1:]), n,
                     torch.tensor(lo, device=device, dtype=torch.int32),
                     torch.tensor(hi, device=device, dtype=torch.int32)))

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for d, after, n, lo, hi in axes:
            qx, kx = (q_idx // after) % n, (kv_idx // after) % n
            kg = kx // d  # in-group key index
            inside = (lo[qx] <= kg) & (kg < hi[qx])
            if d > 1:
                inside = inside & (kx % d == qx % d)
            ok = inside if ok is None else ok & inside
        return ok

    return mask_mod


def _flex_runner(problem: Problem, inputs, progress) -> _Runner:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = problem.geometry.num_tokens
    q, k, v = (_heads_first(t) for t in inputs[:3])
    with _task(progress, "flex: building the block mask"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = create_block_mask(_natten_mask_mod(problem), None, None, n, n,
                                       device=problem.device, _compile=True)
        torch.cuda.synchronize()
        mask_s = time.perf_counter() - t0
    compiled = torch.compile(flex_attention)
    gqa = problem.heads != problem.heads_kv

    def call(t):
        return compiled(t[0], t[1], t[2], block_mask=block_mask, enable_gqa=gqa)

    geo = problem.geometry
    bound = None
    if all(d == 1 for d in geo.dilation):  # Flex tiles the flat sequence in 128-token blocks
        flat = (1,) * (geo.ndim - 1) + (128,)
        bound = sim.simulate_geometry(geo, flat, flat).flat.bound
    note = (f"compiled, [batch, heads, tokens, head_dim] layout, 128x128 blocks of the flat "
            f"sequence; block mask built in {mask_s:.1f} s (not timed)")
    tiles = {"forward": {"q_tile": [128], "kv_tile": [128], "flat": True}}

    def context():
        # Backward timed alone reruns the graph (retain_graph=True), which AOTAutograd refuses
        # when it donated the forward's buffers to the compiled backward.
        config = torch._functorch.config
        if hasattr(config, "donated_buffer"):
            return config.patch(donated_buffer=False)
        return contextlib.nullcontext()

    return _Runner(call, (q, k, v), note=note, tiles=tiles, sim_bound=bound, context=context)


def _runner(name: str, problem: Problem, options: Options, inputs, progress) -> _Runner:
    if name in ("gna", "reference"):
        return _ops_runner(name, problem, options, inputs)
    if name == "flex":
        return _flex_runner(problem, inputs, progress)
    return _dense_runner(name, problem, inputs)


# ---------------------------------------------------------------------------------------------
# Timing

def capture_graph(fn):
    """``fn`` captured in a CUDA graph, after the warm-up run on a side stream that capture
    needs: returns the graph and what the captured call returned (for timing the device work
    alone, ``benchmarks/harness.py``, and for the tests' graph replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def _first_call(fn) -> None:
    """Run ``fn`` once (compiles); if it fails, add the warnings it gave to the error (SDPA
    explains "No available kernel" in warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as e:
            reasons = "; ".join(dict.fromkeys(str(w.message) for w in caught))
            if reasons:
                raise RuntimeError(f"{e} ({reasons})") from e
            raise


def _measure(fn, device: torch.device, warmup: int, repeat: int, advance) -> Timing:
    """One untimed first call (compiles), ``warmup`` untimed calls, ``repeat`` timed ones; on
    CUDA then one more for the peak memory."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for call in [_first_call] + [lambda f: f()] * warmup:
        t0 = time.perf_counter()
        call(fn)
        sync()
        last_ms = 1e3 * (time.perf_counter() - t0)
        advance()
    if not cuda:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            advance()
        return Timing.from_samples(times)
    each = last_ms > _SYNC_EACH_MS
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
        if each:
            end.synchronize()
        advance()
    torch.cuda.synchronize()
    timing = Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    return dataclasses.replace(timing, peak_bytes=int(peak))


def _pass_functions(runner: _Runner, passes):
    """``(pass name, fn)`` per pass, built lazily (a failing pass stops the ones after it)."""
    t = runner.tensors
    for name in passes:
        if name == "forward":
            def forward():
                with torch.no_grad():
                    return runner.call(t)
            yield name, forward
            continue
        leaves = tuple(x.detach().requires_grad_() for x in t)
        dout = torch.randn_like(t[0])  # every runner's output has its query's shape
        if name == "forward_backward":
            yield name, lambda: torch.autograd.grad(runner.call(leaves), leaves, dout)
        else:  # backward alone: one forward, then its graph rerun (retain_graph)
            out = runner.call(leaves)
            yield name, lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
            del out


def _time_passes(runner: _Runner, problem: Problem, label: str, passes, warmup: int,
                 repeat: int, progress) -> tuple[dict, str | None]:
    """Time each pass; returns the timings and the error that stopped them (None if none)."""
    timings = {}
    try:
        with runner.context():
            for name, fn in _pass_functions(runner, passes):
                description = f"{label}: {name.replace('_', '+')} (first call compiles)"
                with _task(progress, description, 1 + warmup + repeat) as advance:
                    timings[name] = _measure(fn, problem.device, warmup, repeat, advance)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        return timings, f"{type(e).__name__}: {e}"[:800]
    finally:
        if problem.device.type == "cuda":
            torch.cuda.empty_cache()
    return timings, None


# ---------------------------------------------------------------------------------------------
# Profile

def check_tiles(problem: Problem, options: Options) -> None:
    """Raise ValueError, with the kernels' own message, if gna's kernels refuse the tile
    shapes in ``options`` (powers of two, at least 16 tokens, shared memory)."""
    from . import triton_backend

    triton_backend.default_config(problem, options)
    triton_backend.default_config(problem, dataclasses.replace(
        options, q_tile_shape=options.backward_q_tile_shape or options.q_tile_shape,
        kv_tile_shape=options.backward_kv_tile_shape or options.kv_tile_shape))


def _run_backend(name: str, problem: Problem, options: Options, inputs, passes, warmup: int,
                 repeat: int, progress) -> BackendResult:
    reason = _why_not(name, problem, options)
    if reason is not None:
        return BackendResult(name, available=False, reason=reason)
    try:
        with _task(progress, f"{name}: setting up"):
            runner = _runner(name, problem, options, inputs, progress)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        return BackendResult(name, available=True, error=f"{type(e).__name__}: {e}"[:800])
    timings, error = _time_passes(runner, problem, name, passes, warmup, repeat, progress)
    flops = _forward_flops(problem, _pairs(problem, dense=runner.dense))
    timings = {p: dataclasses.replace(t, tflops=_ratio(flops * _PASS_FLOPS[p] / 1e9, t.ms))
               for p, t in timings.items()}
    return BackendResult(name, available=True, error=error, note=runner.note,
                         tiles=runner.tiles, sim_bound=runner.sim_bound, passes=timings)


def profile(problem: Problem, backends=("gna",), options: Options = Options(), *,
            warmup: int = 5, repeat: int = 20, backprop: bool = False, seed: int = 0,
            progress=None) -> Report:
    """Time ``backends`` (names from :data:`BACKENDS`) on ``problem``, plus the dense
    baseline: cuDNN on CUDA (PyTorch's own SDPA choice if cuDNN cannot run), the math SDPA
    kernel on a CPU. ``options`` carries gna's tile shapes. ``backprop`` adds
    forward+backward and backward alone. ``progress``: a :func:`make_progress` display."""
    names = list(dict.fromkeys(backends))
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    cuda = problem.device.type == "cuda"
    passes = PASSES if backprop else ("forward",)
    inputs = _inputs(problem, seed)
    results = {}
    baseline = "cudnn" if cuda else "sdpa-math"
    for name in names + ([baseline] if baseline not in names else []):
        results[name] = _run_backend(name, problem, options, inputs, passes, warmup, repeat,
                                     progress)
    if "forward" not in results[baseline].passes and cuda:
        baseline = "sdpa"
        results[baseline] = _run_backend(baseline, problem, options, inputs, passes, warmup,
                                         repeat, progress)
    base = results[baseline]
    if "forward" not in base.passes:
        baseline = None
    for name, result in results.items():
        passes_ = {p: dataclasses.replace(t, speedup=_ratio(base.passes[p].ms, t.ms))
                   if baseline and p in base.passes else t for p, t in result.passes.items()}
        results[name] = dataclasses.replace(result, passes=passes_,
                                            baseline=name == baseline)
    settings = {"mode": "profile", "warmup": warmup, "repeat": repeat, "backprop": backprop,
                "seed": seed, "timer": "cuda_events" if cuda else "perf_counter",
                "tiles": _options_dict(options)}
    return Report(environment(problem.device), problem_dict(problem), settings, baseline,
                  tuple(results.values()))


def _options_dict(options: Options) -> dict:
    return {name: None if getattr(options, name) is None else list(getattr(options, name))
            for name in ("q_tile_shape", "kv_tile_shape", "backward_q_tile_shape",
                         "backward_kv_tile_shape")}


# ---------------------------------------------------------------------------------------------
# Tile configurations: dry run and optimize

def _untuned_default(problem: Problem):
    """The kernels' own default launch configuration (the simulator's tiles, fitted to shared
    memory), ignoring tiles saved in the tile cache: what ``--optimize`` measures against.
    ``default_config`` would return the cached tiles once a winner is saved."""
    from . import triton_backend as tb

    return tb._default_config_cached(problem.geometry, problem.head_dim, None, None,
                                     tb._has_tma(problem.device), problem.dtype.itemsize,
                                     tb.shared_limit(problem.device))


def _ranked(problem: Problem):
    """The (Q tile, KV tile) pairs gna's forward kernel accepts for ``problem`` on its device,
    cheapest first by the simulator's cost model, with their launch configs, how many
    candidates were rejected, the kernels' default pair and the pair the ops use now (the
    default, or tiles saved in the tile cache).

    Candidates: the kernels' own (:func:`gna.sim.kernel_candidates`, their default, the cached
    pair) and every pair of :func:`gna.sim.candidate_tiles` of :data:`VOLUMES` tokens. A
    pair is valid when the kernels' planner
    (``triton_backend.default_config``) accepts it: powers of two, at least 16 tokens, fits
    the device's shared memory. Equal predicted costs go to the larger Q tile, then KV tile:
    the cost model counts score elements, the same for two 64-token Q tiles as for one of 128,
    but the larger tile reads each KV tile half as often.
    """
    from . import triton_backend

    geo, head_dim = problem.geometry, problem.head_dim
    try:
        default = _untuned_default(problem)
        current = triton_backend.default_config(problem, Options())
    except ValueError as e:
        raise ValueError(f"gna's kernels cannot run this problem: {e}") from None
    default, current = (default.q_tile, default.kv_tile), (current.q_tile, current.kv_tile)
    shapes = sim.candidate_tiles(geo, VOLUMES)
    pairs = [default, current, *sim.kernel_candidates(geo, head_dim),
             *((q, kv) for q in shapes for kv in shapes)]
    configs, rejected = {}, 0
    for pair in dict.fromkeys(pairs):
        try:
            configs[pair] = triton_backend.default_config(
                problem, Options(q_tile_shape=pair[0], kv_tile_shape=pair[1]))
        except ValueError:
            rejected += 1
    ranked = sorted(sim.rank_tiles(geo, list(configs)),
                    key=lambda c: (float(f"{c.cost:.9g}"), -math.prod(c.q_tile),
                                   -math.prod(c.kv_tile)))
    return ranked, configs, rejected, default, current


def _tile_configs(problem: Problem, top: int):
    """The best ``top`` configurations, then the default and the cached one if they rank
    lower, as :class:`TileConfig`; and how many were considered and rejected."""
    ranked, configs, rejected, default, current = _ranked(problem)
    default_cost = next(c.cost for c in ranked if (c.q_tile, c.kv_tile) == default)
    rows = []
    for rank, choice in enumerate(ranked, 1):
        pair = (choice.q_tile, choice.kv_tile)
        if rank > top and pair not in (default, current):
            continue
        figures = sim.simulate_geometry(problem.geometry, *pair, flat=False).tiled
        launch = configs[pair]
        rows.append(TileConfig(
            rank, *pair, predicted_cost=choice.cost, relative_cost=choice.cost / default_cost,
            bound=figures.bound, masked_share=figures.masked_share,
            perfectly_block_sparse=figures.perfectly_block_sparse,
            num_warps=launch.num_warps, num_stages=launch.num_stages,
            default=pair == default, cached=pair == current != default))
    return rows, len(ranked), rejected


def _planned_for(device: torch.device) -> str:
    if device.type == "cuda":
        return tuned.device_name(device)
    return "an H100 (no CUDA device here; the Triton interpreter plans as one)"


def dry_run(problem: Problem, top: int = 20, backends=(), options: Options = Options()) -> Report:
    """The valid tile configurations of gna's forward kernel for ``problem`` on its device:
    the ``top`` cheapest by the simulator's cost model, and the default. Runs nothing on the
    device; ``backends`` are only checked for availability."""
    from . import triton_backend

    rows, considered, rejected = _tile_configs(problem, top)
    found = DryRun(_planned_for(problem.device), triton_backend.shared_limit(problem.device),
                   considered, rejected, tuple(rows))
    checked = tuple(BackendResult(n, available=(r := _why_not(n, problem, options)) is None,
                                  reason=r) for n in dict.fromkeys(backends))
    settings = {"mode": "dry_run", "warmup": 0, "repeat": 0, "backprop": False, "seed": 0,
                "timer": None, "tiles": _options_dict(options)}
    return Report(environment(problem.device), problem_dict(problem), settings, None, checked,
                  dry_run=found)


def optimize(problem: Problem, backend: str = "gna", *, top: int = 5, warmup: int = 5,
             repeat: int = 20, backprop: bool = False, seed: int = 0, progress=None) -> Report:
    """Rank the configurations with the simulator, time the ``top`` best, the kernels' default
    and the tiles in the tile cache (if any) with ``backend`` (``"gna"``, or ``"reference"``,
    which ignores tiles: for trying the mechanics on a CPU), report the fastest and its
    speedup over the default. The objective is the forward time, or forward+backward with
    ``backprop``. Every configuration runs with its tiles passed explicitly, so the tile
    cache does not substitute its own."""
    if backend not in ("gna", "reference"):
        raise ValueError(f"optimize tunes gna's tile shapes: backend must be 'gna' (or "
                         f"'reference', which ignores tiles), got {backend!r}")
    reason = _why_not(backend, problem, Options())
    if reason is not None:
        raise ValueError(f"cannot optimize with {backend}: {reason}")
    rows, considered, _ = _tile_configs(problem, top)
    objective = "forward_backward" if backprop else "forward"
    inputs = _inputs(problem, seed)
    flops = _forward_flops(problem, _pairs(problem, dense=False)) * _PASS_FLOPS[objective]
    timed = []
    with _task(progress, f"optimize: timing {len(rows)} configurations", len(rows)) as step:
        for row in rows:
            label = f"{backend} {_x(row.q_tile)} / {_x(row.kv_tile)}"
            options = Options(q_tile_shape=row.q_tile, kv_tile_shape=row.kv_tile)
            try:
                runner = _ops_runner(backend, problem, options, inputs)
                timings, error = _time_passes(runner, problem, label, (objective,), warmup,
                                              repeat, progress)
            except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                timings, error = {}, f"{type(e).__name__}: {e}"[:800]
            timing = timings.get(objective)
            if timing is not None:
                timing = dataclasses.replace(timing, tflops=_ratio(flops / 1e9, timing.ms))
            timed.append(dataclasses.replace(row, timing=timing, error=error))
            step()
    default = next(r for r in timed if r.default)
    if default.timing is not None:  # speedup column: the default's time over each one's
        timed = [r if r.timing is None else dataclasses.replace(r, timing=dataclasses.replace(
            r.timing, speedup=_ratio(default.timing.ms, r.timing.ms))) for r in timed]
        default = next(r for r in timed if r.default)
    measured = [r for r in timed if r.timing is not None]
    winner = min(measured, key=lambda r: r.timing.ms) if measured else None
    speedup = (_ratio(default.timing.ms, winner.timing.ms)
               if winner is not None and default.timing is not None else None)
    result = OptimizeResult(backend, objective, considered, tuple(timed), winner, default,
                            speedup)
    cuda = problem.device.type == "cuda"
    settings = {"mode": "optimize", "warmup": warmup, "repeat": repeat, "backprop": backprop,
                "seed": seed, "timer": "cuda_events" if cuda else "perf_counter",
                "tiles": _options_dict(Options())}
    return Report(environment(problem.device), problem_dict(problem), settings, None, (),
                  optimize=result)


def save_winner(report: Report, problem: Problem) -> Report:
    """Store the winner of :func:`optimize` in the tile cache (:func:`gna.tuned.store`) for
    this problem and device; returns the report with ``optimize.saved_to`` set."""
    found = report.optimize
    if found is None or found.winner is None:
        raise ValueError("nothing to save: no configuration was timed successfully")
    w, d = found.winner, found.default
    path = tuned.store(
        problem.geometry, problem.head_dim, problem.dtype, tuned.device_name(problem.device),
        w.q_tile, w.kv_tile, backend=found.backend, objective=found.objective, ms=w.timing.ms,
        default_q_tile=list(d.q_tile), default_kv_tile=list(d.kv_tile),
        default_ms=None if d.timing is None else d.timing.ms,
        gna=report.environment["gna"], time=report.environment["time"])
    return dataclasses.replace(report, optimize=dataclasses.replace(found, saved_to=str(path)))


# ---------------------------------------------------------------------------------------------
# Tables (rich)

def _x(values) -> str:
    return "x".join(str(int(v)) for v in values)


def _ms(ms: float) -> str:
    return f"{ms:.4g}" if ms < 1e4 else f"{ms:,.0f}"


def _tflops(t: Timing) -> str:
    if t.tflops is None:
        return "-"
    return f"{t.tflops:.0f}" if t.tflops >= 10 else f"{t.tflops:.3g}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


_PASS_TITLES = {"forward": "forward", "forward_backward": "forward + backward",
                "backward": "backward alone"}
_BASELINE_LABELS = {"cudnn": "dense cuDNN", "sdpa": "dense SDPA",
                    "sdpa-math": "dense SDPA math on CPU"}


def header_lines(report: Report) -> list[str]:
    """The problem and the machine, in a few lines."""
    p, env = report.problem, report.environment
    causal = [str(a) for a, c in enumerate(p["causal"]) if c]
    heads = f"{p['heads']} heads" + (f" ({p['heads_kv']} for K/V)"
                                     if p["heads_kv"] != p["heads"] else "")
    extra = f", {p['additional_kv']} additional keys" if p["additional_kv"] else ""
    return [
        f"input {_x(p['input_size'])}, window {_x(p['window_size'])}, stride "
        f"{_x(p['stride'])}, dilation {_x(p['dilation'])}, "
        + (f"causal along axis {', '.join(causal)}" if causal else "not causal"),
        f"batch {p['batch']}, {heads}, head_dim {p['head_dim']}, {p['dtype']}{extra}",
        f"attended pairs per head: {p['attended_pairs']:,} of {p['dense_pairs']:,} "
        f"({100 / p['flop_speedup']:.1f}%); FLOP-wise speedup {p['flop_speedup']:.2f}x",
        f"{env['device_name']}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
        + f", torch {env['torch']}, triton {env['triton']}, gna {env['gna']}",
    ]


def _tiles_cell(result: BackendResult, pass_name: str) -> str:
    if result.tiles is None:
        return "-"
    if pass_name == "forward":
        t = result.tiles["forward"]
        return f"{_x(t['q_tile'])} / {_x(t['kv_tile'])}" + (" flat" if t.get("flat") else "")
    if "backward_dq" not in result.tiles:
        return "-"
    dq, dkdv = result.tiles["backward_dq"], result.tiles["backward_dkdv"]
    return (f"dQ {_x(dq['q_tile'])} / {_x(dq['kv_tile'])}, "
            f"dK/dV {_x(dkdv['q_tile'])} / {_x(dkdv['kv_tile'])}")


def profile_tables(report: Report) -> list:
    """One table per pass (forward; forward + backward; backward alone), a row per backend,
    then the notes (why a backend did not run, what each one is)."""
    from rich.table import Table

    tables = []
    passes = [p for p in PASSES if any(p in b.passes for b in report.backends)]
    for pass_name in passes or ["forward"]:
        table = Table(title=_PASS_TITLES[pass_name], title_justify="left")
        table.add_column("backend")
        table.add_column("tiles Q / KV" if pass_name == "forward" else "tiles")
        if pass_name == "forward":
            table.add_column("sim bound", justify="right")
        memory = any(t.peak_bytes is not None for b in report.backends
                     for t in b.passes.values())
        for name in ("median ms", "q20-q80 ms", f"vs {report.baseline or 'dense'}",
                     "TFLOP/s") + (("peak mem",) if memory else ()):
            table.add_column(name, justify="right")
        for b in report.backends:
            if not b.available:  # listed in the notes
                continue
            t = b.passes.get(pass_name)
            name = b.name + (" (baseline)" if b.baseline else "")
            tiles = [_tiles_cell(b, pass_name)]
            if pass_name == "forward":
                tiles.append("-" if b.sim_bound is None else f"{b.sim_bound:.2f}x")
            if t is None:
                table.add_row(name, *tiles, "error" if b.error else "-", style="dim")
                continue
            table.add_row(name, *tiles, _ms(t.ms), f"{_ms(t.ms_q20)}-{_ms(t.ms_q80)}",
                          "-" if t.speedup is None else f"{t.speedup:.2f}x", _tflops(t),
                          *((_bytes(t.peak_bytes),) if memory else ()))
        tables.append(table)
    return tables


def profile_notes(report: Report) -> list[str]:
    s = report.settings
    lines = [f"{s['repeat']} timed calls after {s['warmup']} warm-up calls and a compiling "
             f"first call ({s['timer']}); speedup: {_BASELINE_LABELS.get(report.baseline, '-')}"
             f" time / this time, same pass and run; TFLOP/s: 4 * head_dim FLOPs per attended "
             f"pair (dense: every pair), backward 2.5x; sim bound: the simulator's analytical "
             f"bound for the tiles used"]
    for b in report.backends:
        for text in (b.reason and f"not available: {b.reason}", b.error and f"error: {b.error}",
                     b.note):
            if text:
                lines.append(f"{b.name}: {text}")
    return lines


def _config_columns(table, timed: bool) -> None:
    table.add_column("rank")
    table.add_column("tiles Q / KV")
    extra = ("median ms", "q20-q80 ms", "vs default", "TFLOP/s") if timed else \
        ("masked", "warps/stages")
    for name in ("predicted", "bound", *extra):
        table.add_column(name, justify="right")
    table.add_column("note")


def _config_cells(c: TileConfig, timed: bool) -> list[str]:
    cells = [str(c.rank), f"{_x(c.q_tile)} / {_x(c.kv_tile)}", f"{c.relative_cost:.2f}",
             f"{c.bound:.2f}x" + ("*" if c.perfectly_block_sparse else "")]
    if not timed:
        return cells + [f"{100 * c.masked_share:.0f}%", f"{c.num_warps}/{c.num_stages}"]
    t = c.timing
    return cells + (["-"] * 4 if t is None else [
        _ms(t.ms), f"{_ms(t.ms_q20)}-{_ms(t.ms_q80)}",
        "-" if t.speedup is None else f"{t.speedup:.2f}x", _tflops(t)])


def dry_run_table(report: Report, optimize_top: int | None = None):
    """The configurations :func:`dry_run` found; ``optimize_top`` marks the ones
    ``--optimize --top N`` would time."""
    from rich.table import Table

    found = report.dry_run
    table = Table(title=f"{len(found.configs)} of {found.considered} valid tile configurations "
                  f"({found.rejected} rejected)", title_justify="left")
    _config_columns(table, timed=False)
    for c in found.configs:
        marks = ["default"] * c.default + ["cached"] * c.cached
        if optimize_top is not None and (c.rank <= optimize_top or c.default or c.cached):
            marks.append("timed by --optimize")
        table.add_row(*_config_cells(c, timed=False), ", ".join(marks),
                      style="bold" if c.default else None)
    return table


def optimize_table(report: Report):
    from rich.table import Table

    found = report.optimize
    table = Table(title=f"{len(found.timed)} of {found.considered} valid configurations timed "
                  f"({found.objective.replace('_', ' + ')}, {found.backend})",
                  title_justify="left")
    _config_columns(table, timed=True)
    winner = None if found.winner is None else found.winner.rank
    for c in found.timed:
        marks = ["winner"] * (c.rank == winner) + ["default"] * c.default + ["cached"] * c.cached
        table.add_row(*_config_cells(c, timed=True), ", ".join(marks + ["error"] * bool(c.error)),
                      style="bold" if c.rank == winner else None)
    return table


_CONFIG_NOTE = ("rank and predicted: the simulator's order and cost relative to the kernels' "
                "default; bound: the analytical speedup bound (*: perfectly block-sparse); "
                "cached: the tiles gna profile --optimize --save stored, which the ops use")


def dry_run_notes(report: Report) -> list[str]:
    found = report.dry_run
    return [f"planned for {found.planned_for}, {found.shared_limit:,} B of shared memory per "
            f"program; masked: visited KV tiles needing a mask", _CONFIG_NOTE]


def optimize_summary(report: Report) -> list[str]:
    """The winner and its speedup over the default, then any errors, one a line."""
    found = report.optimize
    errors = [f"{_x(c.q_tile)} / {_x(c.kv_tile)}: error: {c.error}" for c in found.timed
              if c.error]
    notes = [_CONFIG_NOTE + "; vs default: the default's time / this time"]
    if found.winner is None:
        return notes + ["no configuration ran"] + errors
    w = found.winner
    text = f"winner: Q tile {_x(w.q_tile)} / KV tile {_x(w.kv_tile)}, {_ms(w.timing.ms)} ms"
    if found.speedup_over_default is not None:
        text += (f", {found.speedup_over_default:.2f}x the default's speed "
                 f"({_x(found.default.q_tile)} / {_x(found.default.kv_tile)}, "
                 f"{_ms(found.default.timing.ms)} ms)")
    if found.backend == "reference":
        text += "; the reference ignores tiles, so on it the differences are noise"
    return notes + [text] + errors
