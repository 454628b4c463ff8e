"""The ``triton`` backend: host launcher, ``torch.library`` op, autograd, registration.

Layers, bottom up: the ``@triton.jit`` kernel (:mod:`gna.kernels.forward`), and on Hopper for
perfectly block-sparse calls the Gluon kernel (:mod:`gna.kernels.forward_gluon`, chosen by
:func:`gluon_block_sparse_ineligible`); :func:`launch_forward`
(strides, geometry tables, grid, launch options; no autograd); the custom op ``gna::na_forward``
so ``torch.compile(fullgraph=True)`` and CUDA graphs see one opaque call; autograd registered on
it; and the backend entry :func:`run` that :mod:`gna.backends` dispatches to.

The backward pass is a second op, ``gna::na_backward``, over the fused kernels of
:mod:`gna.kernels.backward` (launcher: :mod:`gna.triton_backward`). Every gradient element is
written by exactly one program (no atomics), so gradients are deterministic run to run, except
dQ where the fused Gluon kernel runs (on Hopper, see :func:`gna.triton_backward._plan_backward`;
``deterministic=True`` rules it out), which adds the KV tiles' shares through the copy engine's
reductions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import numpy as np
import torch

from . import sim, tuned
from .args import Problem, normalize_geometry, normalize_scale, per_dim
from .backends import Backend, Options, register
from .geometry import Geometry, group_length
from .sim import _halve, _next_pow2

try:  # Triton is optional: without it this backend reports why it cannot run.
    import triton
    from triton.runtime import _allocation
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .kernels.forward import gna_forward_kernel
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["LaunchConfig", "default_config", "launch_forward", "run"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tile shapes (per dimension, powers of two) and Triton launch options."""

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2
    use_tma: bool = False  # K/V through tensor descriptors (Hopper copy engine)
    warp_specialize: bool = False  # Triton's warp specialization of the mask-free loop
    # The persistent warp-specialized Gluon kernel (gna.kernels.forward_gluon) where the
    # forward qualifies (see gluon_block_sparse_ineligible); the Triton kernel otherwise.
    gluon_block_sparse: bool = False


# Warp specialization of the mask-free loop, per number of dimensions (H100, fp16, d=128, with
# TMA): 2-D stride 16x16 went 12.06 -> 10.56 ms; 1-D and 3-D were unchanged or 1-2% slower.
_WARP_SPECIALIZE = {1: False, 2: True, 3: False}


def default_config(problem: Problem, options: Options) -> LaunchConfig:
    return _config(problem.geometry, problem.head_dim, problem.dtype, problem.device,
                   options.q_tile_shape, options.kv_tile_shape)


def _config(geo: Geometry, head_dim: int, dtype, device, q_tile, kv_tile) -> LaunchConfig:
    """The launch configuration: tiles the caller passed, else tiles ``gna profile --optimize
    --save`` measured best for this problem on this device (:mod:`gna.tuned`), else the
    simulator's choice."""
    if q_tile is None and kv_tile is None:
        q_tile, kv_tile = tuned.lookup(geo, head_dim, dtype, tuned.device_name(device)) or (
            None, None)
    return _default_config_cached(geo, head_dim, q_tile, kv_tile, _has_tma(device),
                                  dtype.itemsize, shared_limit(device))


@functools.lru_cache(maxsize=16)
def _has_tma(device: torch.device) -> bool:
    """Hopper or newer, compiled (the interpreter takes the pointer path)."""
    return (device.type == "cuda" and not _interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


H100_SHARED = 232448  # bytes of shared memory a block may opt into on an H100


@functools.lru_cache(maxsize=16)
def shared_limit(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (the interpreter plans as an H100)."""
    if device.type != "cuda":
        return H100_SHARED
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _forward_shared(q_tile, kv_tile, head_dim: int, elem: int, stages: int) -> int:
    """Shared memory of the forward kernel: Q resident, K and V per pipeline stage. Matches the
    compiler's figures on sm_90: fp16 d=128 128/128 tiles 3 stages 229,376 B; fp32 d=128
    128/64 3 stages 262,144 B; fp32 d=256 64/64 2 stages 327,680 B (the last two over an
    H100's limit, which is why the fitting below exists)."""
    m, n = math.prod(q_tile), math.prod(kv_tile)
    return elem * head_dim * (m + 2 * n * stages)


@functools.lru_cache(maxsize=1024)
def _default_config_cached(geo: Geometry, head_dim: int, q_tile, kv_tile, tma: bool = False,
                           elem: int = 2, limit: int = H100_SHARED) -> LaunchConfig:
    """Tile shapes and launch options; TMA (with Triton's warp specialization where it was
    measured to help) on Hopper. K/V through TMA beat per-row pointers on every benchmark
    problem (H100 fp16 d=128: 2-D w80 18.4 -> 15.4 ms, 3-D w18x24x24 78.3 -> 70.1 ms,
    benchmarks/results/forward_sweep.jsonl). Default tiles shrink, and stages drop, until the
    kernel fits ``limit`` bytes of shared memory for ``elem``-byte inputs."""
    user_q, user_kv = q_tile, kv_tile
    if q_tile is None or kv_tile is None:
        # The simulator's cheapest candidate (its cost model was fitted to the H100 forward
        # sweep; see gna.sim), keeping whichever tile the caller fixed.
        candidates = sim.kernel_candidates(geo, head_dim)
        if q_tile is not None:
            candidates = [(q_tile, kv) for _, kv in candidates]
        if kv_tile is not None:
            candidates = [(q, kv_tile) for q, _ in candidates]
        best = sim.rank_tiles(geo, candidates)[0]
        q_tile, kv_tile = best.q_tile, best.kv_tile
    for name, tile in (("q_tile_shape", q_tile), ("kv_tile_shape", kv_tile)):
        if any(t < 1 or t & (t - 1) for t in tile):
            raise ValueError(f"{name} entries must be powers of two, got {name}={tile}")
        if math.prod(tile) < 16:
            raise ValueError(f"{name} must hold at least 16 tokens (tl.dot), got {name}={tile}")
    head_dim = _next_pow2(max(head_dim, 16))
    stages = 3 if head_dim <= 128 else 2
    while _forward_shared(q_tile, kv_tile, head_dim, elem, stages) > limit:
        if stages > 2:
            stages -= 1
        elif user_kv is None and math.prod(kv_tile) > 16:
            kv_tile = _halve(kv_tile, 2)
        elif user_q is None and math.prod(q_tile) > 16:
            q_tile = _halve(q_tile, 2)
        elif stages > 1:
            stages -= 1
        else:
            raise ValueError(
                f"q_tile_shape={q_tile} with kv_tile_shape={kv_tile} needs "
                f"{_forward_shared(q_tile, kv_tile, head_dim, elem, 1)} bytes of shared memory "
                f"at head_dim {head_dim} ({elem}-byte inputs), over this GPU's {limit}; pass "
                f"smaller tiles")
    big = math.prod(q_tile) >= 128 and head_dim >= 64
    return LaunchConfig(q_tile, kv_tile, num_warps=8 if big else 4, num_stages=stages,
                        use_tma=tma, warp_specialize=tma and _WARP_SPECIALIZE[geo.ndim],
                        gluon_block_sparse=tma)


def _pad3(values, fill):
    values = tuple(values)
    return (fill,) * (3 - len(values)) + values


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about a launch that depends only on geometry and tiles (cached)."""

    geo3: Geometry  # padded to 3 dimensions with unit dimensions in front
    q_tile: tuple[int, int, int]
    kv_tile: tuple[int, int, int]
    n_tiles: tuple[int, int, int]  # Q tiles per dimension of dilation group 0
    win: np.ndarray
    rng: np.ndarray


def token_table(geo3: Geometry, ranges) -> np.ndarray:
    """``table[a, g, i] = ranges(dim)[:][i]``: a pair of per-token arrays of every dilation
    group ``g`` of every axis ``a`` of a 3-D geometry (``ranges(dim)`` gives the pair for one
    :class:`gna.geometry.Dim`), as int32. Entries past a shorter group's end stay zero."""
    lengths = [group_length(n, d, 0) for n, d in zip(geo3.shape, geo3.dilation)]
    table = np.zeros((3, max(geo3.dilation), max(lengths), 2), dtype=np.int32)
    for axis in range(3):
        for g in range(geo3.dilation[axis]):
            dim = geo3.dim(axis, g)
            first, last = ranges(dim)
            table[axis, g, : dim.length, 0] = first
            table[axis, g, : dim.length, 1] = last
    return table


@functools.lru_cache(maxsize=256)
def _plan(geo: Geometry, q_tile: tuple, kv_tile: tuple) -> _Plan:
    """Pad to 3 dimensions and build the kernel's geometry tables from :mod:`gna.geometry`.

    ``win[a, g, i] = (start, end)`` of query ``i`` of dilation group ``g`` along axis ``a``;
    ``rng[a, g, t] = (first, last, full_first, full_last)`` KV tile ranges of Q tile ``t``.
    Entries past a shorter group's end stay zero: empty ranges, nothing visited.
    """
    geo = Geometry(_pad3(geo.shape, 1), _pad3(geo.kernel_size, 1), _pad3(geo.stride, 1),
                   _pad3(geo.dilation, 1), _pad3(geo.causal, False))
    q_tile, kv_tile = _pad3(q_tile, 1), _pad3(kv_tile, 1)
    lengths = [group_length(n, d, 0) for n, d in zip(geo.shape, geo.dilation)]
    n_tiles = tuple(-(-n // t) for n, t in zip(lengths, q_tile))
    win = token_table(geo, lambda dim: dim.windows())
    rng = np.zeros((3, max(geo.dilation), max(n_tiles), 4), dtype=np.int32)
    for axis in range(3):
        for g in range(geo.dilation[axis]):
            r = geo.dim(axis, g).tile_ranges(q_tile[axis], kv_tile[axis])
            rng[axis, g, : len(r.first)] = np.stack(
                [r.first, r.last, r.full_first, r.full_last], axis=1)
    return _Plan(geo, q_tile, kv_tile, n_tiles, win, rng)


_DEVICE_TABLES: dict = {}


def _device_tables(plan: _Plan, device: torch.device):
    """The plan's tables on ``device``; made once, so CUDA graph capture finds them ready."""
    key = (plan.geo3, plan.q_tile, plan.kv_tile, device)
    tables = _DEVICE_TABLES.get(key)
    if tables is None:
        tables = (torch.from_numpy(plan.win).to(device), torch.from_numpy(plan.rng).to(device))
        _DEVICE_TABLES[key] = tables
    return tables


def _strides(t: torch.Tensor, ndim: int):
    """(batch, dim0, dim1, dim2, head) strides of a heads-last tensor, unit dims padded."""
    s = t.stride()
    return (s[0], *_pad3(s[1: 1 + ndim], 16), s[-2])  # any 16-multiple: index is always 0


def launch_forward(q, k, v, extra_k, extra_v, geo: Geometry, scale: float, config: LaunchConfig,
                   tf32: bool = False, counts: torch.Tensor | None = None,
                   plans: dict | None = None):
    """Run the forward kernel. Returns ``out`` (contiguous, q's dtype) and ``lse`` (float32).

    ``counts`` (debug mode, see :func:`count_tiles`): an int32 tensor of ``2 * programs per
    head`` elements that receives each program's visited and masked KV tile counts.
    ``plans``: a cache of launch plans by input signature alone, owned by a caller whose
    geometry, scale, config and precision never change (:func:`prepare`); by default the
    module's cache, keyed by all of them."""
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    if extra_k is not None:
        extra_k, extra_v = unit_last(extra_k), unit_last(extra_v)
    views = (q, k, v) if extra_k is None else (q, k, v, extra_k, extra_v)
    if plans is None or counts is not None:
        plans, key = _FORWARD_PLANS, (geo, config, tf32, scale, counts is None, signature(views))
    else:
        key = signature(views)
    plan = plans.get(key) or cache_plan(
        plans, key, lambda: _plan_forward(q, k, v, extra_k, extra_v, geo, scale, config, tf32,
                                          counts is not None))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if plan.gluon is not None:
        return _launch_gluon_forward(plan, q, k, v, out, lse)
    tensors = (q, k, v, k if extra_k is None else extra_k, v if extra_v is None else extra_v,
               out, lse, plan.win, plan.rng, plan.rng if counts is None else counts)
    if plan.descriptors is not None:
        shape, (k_strides, v_strides), block = plan.descriptors
        descriptors = ((TensorDescriptor, k, shape, k_strides, block),
                       (TensorDescriptor, v, shape, v_strides, block))
    else:  # never read: the kernel makes its own descriptors or uses pointers
        tensors, descriptors = tensors + (k, v), ()
    c = plan.config
    try:
        launch_planned(plan.compiled, gna_forward_kernel, plan.grid, tensors, descriptors,
                       plan.scalars, plan.constexprs, c.num_warps, c.num_stages, tma=c.use_tma)
    except RuntimeError as e:
        # Triton 3.6's warp-specialization pass fails on some tile/head-dim combinations
        # ("PassManager::run failed"); those run without it, from now on.
        if not c.warp_specialize or "PassManager" not in str(e):
            raise
        plan = plans[key] = dataclasses.replace(
            plan, config=dataclasses.replace(c, warp_specialize=False),
            constexprs={**plan.constexprs, "WARP_SPECIALIZE": False}, compiled=[])
        launch_planned(plan.compiled, gna_forward_kernel, plan.grid, tensors, descriptors,
                       plan.scalars, plan.constexprs, c.num_warps, c.num_stages, tma=c.use_tma)
    return out, lse


def signature(tensors) -> tuple:
    """What a launch plan depends on in its inputs: shapes, strides, dtypes, 16-byte alignment
    (TMA and Triton's specialization), device. Launches are planned once per signature: host
    time is what bounds small problems."""
    return (tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16) for t in tensors),
            tensors[0].device)


_MAX_PLANS = 1024


def cache_plan(cache: dict, key, build):
    """``cache[key] = build()``, keeping the cache bounded (many shapes: start over)."""
    if len(cache) >= _MAX_PLANS:
        cache.clear()
    plan = cache[key] = build()
    return plan


@dataclasses.dataclass(frozen=True)
class _ForwardPlan:
    """A forward launch for one signature of inputs: all but the buffers."""

    config: LaunchConfig  # after the checks below (TMA needs aligned K/V)
    grid: tuple[int, int, int]
    scalars: tuple
    constexprs: dict
    win: torch.Tensor
    rng: torch.Tensor
    # (shape, (K strides, V strides), block) of host-made K/V descriptors, or None
    # (see host_descriptors)
    descriptors: tuple | None
    # The Gluon block-sparse kernel's Q, K, V descriptors: ((shape, strides, block, layout),
    # ...) per tensor, or None where the Triton kernel runs.
    gluon: tuple | None = None
    # Filled by the first launch (launch_planned): the compiled kernel, valid for every call of
    # this signature (it fixes the dtypes, pointer alignments and scalars Triton specializes
    # on), its _Relaunch where it takes host descriptors (None where not, or unavailable) and
    # its constexpr values.
    compiled: list = dataclasses.field(default_factory=list)

    @property
    def kernel(self):
        return gna_forward_kernel if self.gluon is None else _gluon_forward_kernel()


_FORWARD_PLANS: dict = {}


def _plan_forward(q, k, v, extra_k, extra_v, geo, scale, config, tf32, count) -> _ForwardPlan:
    ndim = geo.ndim
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    if config.use_tma and not _tma_compatible(k, v):
        config = dataclasses.replace(config, use_tma=False, warp_specialize=False)
    if count:  # a loop-carried counter; warp specialization is not needed here
        config = dataclasses.replace(config, warp_specialize=False)
    plan = _plan(geo, config.q_tile, config.kv_tile)
    win, rng = _device_tables(plan, q.device)
    _, _, extra_strides, num_extra = extra_args(k, v, extra_k, extra_v)
    # out and lse are allocated contiguous per call: their strides, from meta tensors.
    out = torch.empty(q.shape, device="meta")
    s = torch.empty(q.shape[:-1], device="meta").stride()
    lse_strides = (s[0], *_pad3(s[1: 1 + ndim], 0), s[-1])
    head_dim_p2 = _next_pow2(max(head_dim, 16))
    scalars = (*_strides(q, ndim), *_strides(k, ndim), *_strides(v, ndim), *_strides(out, ndim),
               *lse_strides, *extra_strides,
               *plan.geo3.shape, *plan.geo3.dilation, *plan.n_tiles,
               *win.stride()[:3], *rng.stride()[:3],
               heads, heads // k.shape[-2], head_dim, num_extra, scale * _LOG2E)
    if gluon_block_sparse_ineligible(q, k, v, extra_k, geo, config, count) is None:
        return _plan_gluon_forward(q, k, v, geo, config, plan, rng, lse_strides, out, scale)
    descriptors = (host_descriptors(k, v, plan.geo3, plan.kv_tile, head_dim_p2, ndim)
                   if config.use_tma else None)
    constexprs = dict(T0=plan.q_tile[0], T1=plan.q_tile[1], T2=plan.q_tile[2],
                      K0=plan.kv_tile[0], K1=plan.kv_tile[1], K2=plan.kv_tile[2],
                      HEAD_DIM=head_dim_p2, PAD_D=head_dim_p2 != head_dim,
                      HAS_EXTRA=num_extra > 0, PRECISION="tf32" if tf32 else "ieee",
                      USE_TMA=config.use_tma, HOST_DESC=descriptors is not None,
                      WARP_SPECIALIZE=config.warp_specialize, COUNT_TILES=count)
    grid = (math.prod(plan.n_tiles), math.prod(plan.geo3.dilation), batch * heads)
    return _ForwardPlan(config, grid, scalars, constexprs, win, rng, descriptors)


# Measured on H100 (fp16, d=128, same run, benchmarks/results/forward_sweep.jsonl, session 5):
# the Gluon kernel against the Triton kernel, outputs bit-identical: 1-D 32k stride 2048
# 0.0766 -> 0.0684 ms (GPU time), 2-D 256x256 stride 16 9.59 -> 8.63 ms, 3-D 30x48x80
# stride 16x8x8 27.3 -> 24.8 ms, 3-D dense 299 -> 273 ms.
_GLUON_STAGES = 3  # K/V ring slots: Q + 3 x (K, V) tiles of 128 x 128 fp16 fill 224 KiB
_GLUON_NUM_WARPS = 4  # per consumer warpgroup; the kernel adds one more and a producer warp
_GLUON_MAXNREG = 168  # 12 warps (3 warpgroups) x 32 threads x 168 fits 64K registers
_GLUON_REGS = (232, 40)  # registers of the second consumer and of the producer (setmaxnreg)


def _gluon_forward_kernel():
    from .kernels.forward_gluon import gna_forward_block_sparse_kernel

    return gna_forward_block_sparse_kernel


def gluon_block_sparse_ineligible(q, k, v, extra_k, geo: Geometry, config: LaunchConfig,
                                  count: bool = False) -> str | None:
    """Why the Gluon block-sparse forward (:mod:`gna.kernels.forward_gluon`) cannot run this
    call, or None if it can: Hopper (it issues ``wgmma``), fp16/bf16, head dims 64 and 128,
    128-token Q and KV tiles, no additional keys, no dilation, every Q tile visiting at least
    one KV tile and only mask-free ones, and Q, K, V readable through 5-D tensor descriptors
    (16-byte aligned, batch and first dimension mergeable, see :func:`_merged_layout`).

    Only full KV tiles are read, so no K/V box reaches past the layout into another batch; a Q
    box may (the last Q tile of a batch whose first extent is not a multiple of the tile), but
    those rows are padding, computed and never stored."""
    if not config.gluon_block_sparse:
        return "not requested (LaunchConfig.gluon_block_sparse)"
    if count:
        return "tile-count debug mode"
    if extra_k is not None:
        return "additional keys/values"
    if any(d != 1 for d in geo.dilation):
        return "dilation"
    why = gluon_dtype_ineligible(q)
    if why:
        return why
    if math.prod(config.q_tile) != 128 or math.prod(config.kv_tile) != 128:
        return f"needs 128-token tiles, got {config.q_tile}/{config.kv_tile}"
    visited, full = geo.tile_counts(config.q_tile, config.kv_tile)
    if (visited != full).any() or full.min() < 1:
        return "some Q tiles visit partially masked KV tiles"
    why = gluon_device_ineligible((q, k, v), _plan(geo, config.q_tile, config.kv_tile).geo3,
                                  geo.ndim)
    if why:
        return why
    need = q.element_size() * q.shape[-1] * 128 * (1 + 2 * _GLUON_STAGES)
    if need > shared_limit(q.device):
        return f"needs {need} bytes of shared memory"
    return None


def gluon_dtype_ineligible(q) -> str | None:
    """What the Gluon block-sparse kernels need of the inputs' type: fp16 or bf16, head dims
    64 or 128 (or None)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16 inputs, got {q.dtype}"
    if q.shape[-1] not in (64, 128):
        return f"needs head_dim 64 or 128, got {q.shape[-1]}"
    return None


def gluon_device_ineligible(tensors, geo3: Geometry, ndim: int) -> str | None:
    """What the Gluon block-sparse kernels need of the device and of the tensors they read
    through 5-D host descriptors (or None): a Hopper GPU (they issue ``wgmma``), 16-byte
    aligned tensors, and batch and first dimension mergeable (:func:`_merged_layout`)."""
    q = tensors[0]
    if not q.is_cuda or _interpreting() or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "needs a Hopper GPU (sm_90)"
    if not _tma_compatible(*tensors):
        return "inputs not 16-byte aligned for the copy engine"
    if any(_merged_layout(t, geo3, ndim) is None for t in tensors):
        return "batch stride does not merge with the first dimension's"
    return None


def gluon_descriptor_specs(boxes, geo3: Geometry, ndim: int) -> tuple:
    """``(shape, strides, block, layout)`` of a Gluon host descriptor per ``(tensor, tile)``
    or ``(tensor, tile, d)``: boxes of one (padded 3-D) tile of one head, and ``d`` of its head
    dimension (all of it by default), over the 5-D ``[batch * L0, L1, L2, heads, d]`` view
    (:func:`_merged_layout`)."""
    from triton.experimental.gluon import language as gl

    elems = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}
    specs = []
    for t, tile, *d in boxes:
        shape, strides = _merged_layout(t, geo3, ndim)
        block = [*tile, 1, d[0] if d else t.shape[-1]]
        specs.append((shape, strides, block,
                      gl.NVMMASharedLayout.get_default_for(block, elems[t.dtype])))
    return tuple(specs)


def _plan_gluon_forward(q, k, v, geo, config, plan, rng, lse_strides, out, scale):
    ndim = geo.ndim
    descriptors = gluon_descriptor_specs(
        ((q, plan.q_tile), (k, plan.kv_tile), (v, plan.kv_tile)), plan.geo3, ndim)
    batch, heads = q.shape[0], q.shape[-2]
    num_items = math.prod(plan.n_tiles) * batch * heads
    programs = min(num_items, torch.cuda.get_device_properties(q.device).multi_processor_count)
    scalars = (*_strides(out, ndim), *lse_strides, plan.geo3.shape[0], *plan.geo3.shape,
               *plan.n_tiles, rng.stride(0), rng.stride(2), heads, heads // k.shape[-2],
               scale * _LOG2E, num_items)
    constexprs = dict(STAGES=_GLUON_STAGES, CONSUMER_REGS=_GLUON_REGS[0],
                      PRODUCER_REGS=_GLUON_REGS[1])
    return _ForwardPlan(config, (programs, 1, 1), scalars, constexprs, None, rng, None,
                        gluon=descriptors)


def _launch_gluon_forward(plan, q, k, v, out, lse):
    launch_planned(plan.compiled, plan.kernel, plan.grid, (out, lse, plan.rng),
                   tuple((GluonDescriptor, t, *spec) for t, spec in zip((q, k, v), plan.gluon)),
                   plan.scalars, plan.constexprs, _GLUON_NUM_WARPS, 1, maxnreg=_GLUON_MAXNREG)
    return out, lse


def host_descriptors(k, v, geo3: Geometry, kv_tile: tuple, head_dim_p2: int, ndim: int):
    """``(shape, (k_strides, v_strides), block)`` of tensor descriptors made on the host over
    all of ``k`` and ``v`` (``[batch, *spatial, heads, head_dim]``), or None where the kernel
    makes its own, one per program over its dilation group, batch and head.

    Measured on H100 (fp16, d=128, same run, ``benchmarks/results/forward_sweep.jsonl``):
    making its two descriptors costs each program ~1.8 us (1-D, 8 heads, one KV tile per
    program: 0.173 -> 0.146 ms), so host descriptors take 1-D 32k-token problems 2.5% and
    2-D 256x256 ones 4% faster; on 3-D 30x48x80 with 2x8x8 tiles they were 2% slower
    (stride 16x8x8: 28.0 -> 28.7 ms) and equal at stride 1. So they are used where the KV
    tile's first extent is 1 (1-D, 2-D, and 3-D tiles one frame deep), without dilation (a
    group is then the whole tensor).

    The copy engine takes at most 5 dimensions, so batch and the first (padded) spatial
    dimension merge into one of ``batch * L0`` rows, which needs the batch stride to be
    ``L0`` times the first dimension's stride (or one of them to be 1). With boxes one row
    deep along it, no box overhangs into the next batch (where a group descriptor reads
    zeros, this one would read that batch's keys and values: masked scores, but an inf or NaN
    value there would still leak through its zero probability)."""
    if kv_tile[0] != 1 or any(d != 1 for d in geo3.dilation):
        return None
    merged = [_merged_layout(t, geo3, ndim) for t in (k, v)]
    if None in merged:
        return None
    return merged[0][0], (merged[0][1], merged[1][1]), (*kv_tile, 1, head_dim_p2)


def _merged_layout(t: torch.Tensor, geo3: Geometry, ndim: int):
    """``(shape, strides)`` of a heads-last tensor seen as 5-D ``[batch * L0, L1, L2, heads,
    d]`` (the copy engine takes at most 5 dimensions), or None where batch and the first
    (padded) dimension do not merge: the batch stride must be ``L0`` times the first
    dimension's (or one of them 1)."""
    sb, s0, s1, s2, sh = _strides(t, ndim)
    l0 = geo3.shape[0]
    if l0 == 1:
        s0 = sb  # the padded first dimension: rows are batches
    elif t.shape[0] > 1 and sb != l0 * s0:
        return None
    return ((t.shape[0] * l0, geo3.shape[1], geo3.shape[2], t.shape[-2], t.shape[-1]),
            (s0, s1, s2, sh, 1))


def count_tiles(q, k, v, geo: Geometry, config: LaunchConfig):
    """Debug mode of the forward kernel: the KV tiles each Q tile's program actually visited,
    and how many of those it masked, as two int64 arrays in :meth:`Geometry.tile_counts`'
    order (dilation groups in :meth:`Geometry.groups` order, Q tiles row-major in a group), the
    order of :class:`gna.sim.TilingFigures`' ``visited`` and ``masked``."""
    plan = _plan(geo, config.q_tile, config.kv_tile)
    n_groups = math.prod(plan.geo3.dilation)
    counts = torch.full((n_groups, math.prod(plan.n_tiles), 2), -1, dtype=torch.int32,
                        device=q.device)
    launch_forward(q, k, v, None, None, geo, 1.0, config, counts=counts)
    counts = counts.cpu().numpy().astype(np.int64)
    visited, masked = [], []
    # Programs run over group 0's tile box; a shorter group's tiles past its end did nothing.
    for g, (_, dims) in enumerate(plan.geo3.groups()):
        n_tiles = [dim.num_tiles(t) for dim, t in zip(dims, plan.q_tile)]
        box = counts[g].reshape(*plan.n_tiles, 2)[: n_tiles[0], : n_tiles[1], : n_tiles[2]]
        visited.append(box[..., 0].reshape(-1))
        masked.append(box[..., 1].reshape(-1))
    return np.concatenate(visited), np.concatenate(masked)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (views of a fused qkv tensor are
    read in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def extra_args(k, v, extra_k, extra_v):
    """Kernel arguments for the additional keys/values: ``(extra_k, extra_v, strides, n)``;
    without them, ``k``/``v`` stand in as pointers that are never read."""
    if extra_k is None:
        return k, v, (0,) * 6, 0
    extra_k, extra_v = unit_last(extra_k), unit_last(extra_v)
    return extra_k, extra_v, (*extra_k.stride()[:3], *extra_v.stride()[:3]), extra_k.shape[1]


def _tma_compatible(*tensors) -> bool:
    """The copy engine needs 16-byte aligned bases and 16-byte multiple strides."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def _scratch_allocator(needed: bool):
    """Device-side tensor descriptors need global scratch memory at launch; provide it from
    PyTorch's caching allocator for this launch only (Triton's allocator is a ContextVar)."""
    if not needed:
        yield
        return
    token = _allocation._allocator.set(_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


@functools.lru_cache(maxsize=1)
def _raw_stream_getter():
    """``device index -> current CUDA stream handle``: PyTorch's raw getter (what Triton
    uses; ``torch.cuda.current_stream`` builds a Stream object, ~10 us of host time a call on
    the benchmark machine), or that where the build lacks it."""
    try:
        from torch._C import _cuda_getCurrentRawStream
        return _cuda_getCurrentRawStream
    except ImportError:  # pragma: no cover - CUDA builds have it
        return lambda index: torch.cuda.current_stream(index).cuda_stream


def _current_stream(t: torch.Tensor) -> int:
    return _raw_stream_getter()(t.get_device())


def _run_compiled(compiled, grid, tensors, scalars, values, tma: bool):
    """Launch an already compiled kernel on the current stream (scratch memory for device-side
    tensor descriptors from PyTorch's allocator, as :func:`_scratch_allocator`)."""
    stream = _current_stream(tensors[0])
    token = _allocation._allocator.set(_scratch) if tma else None
    try:
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *tensors, *scalars, *values)
    finally:
        if token is not None:
            _allocation._allocator.reset(token)


class _Relaunch:
    """A compiled kernel that takes host tensor descriptors, relaunched without Triton's
    per-call handling of them.

    Per launch, Triton's launcher turns every host descriptor into a ``CUtensorMap`` (a driver
    call and a few Python lists each) after the descriptor object has checked its arguments.
    On the benchmark machine's CPU that was about half of a 1-D forward call's host time
    (``benchmarks/host_profile.py``, session 6 of ``benchmarks/NOTES.md``). A tensor map depends
    only on the tensor's address, shape, strides, box, element type and swizzle, and a launch
    plan fixes all of them but the address. This keeps the first launch's expanded argument
    list with the tensors' and maps' places in it, and per descriptor a small cache of maps by
    address; a call fills in its tensors and maps and calls the compiled launcher directly.

    :meth:`build` returns None where the launcher is not the one this expects (another Triton
    version, scratch memory, descriptors without metadata): those launches keep the normal
    path. Launches with a profiler's hooks installed take the normal path too (callers check
    :func:`_launch_hooks_set`).
    """

    _MAX_MAPS = 64  # tensor maps cached per descriptor

    def __init__(self, compiled, grid, raw, fill, expanded, tensor_slots, desc_slots):
        self.compiled, self.grid, self.raw, self.fill = compiled, grid, raw, fill
        self.args, self.tensor_slots = expanded, tensor_slots
        self.desc_slots = [(pos, spec, {}) for pos, spec in desc_slots]

    @classmethod
    def build(cls, compiled, grid, args):
        """From a compiled kernel and one launch's full argument list (tensors, descriptors,
        scalars and constexpr values, in parameter order)."""
        try:
            from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST

            run = compiled.run
            if run.global_scratch_size or run.profile_scratch_size:
                return None
            inner = run.launch
            free = {name: cell.cell_contents
                    for name, cell in zip(inner.__code__.co_freevars, inner.__closure__ or ())}
            raw, indices = free["launcher"], free["tensordesc_indices"]
            metas = free["tensordesc_meta"]
            fill = triton.runtime.driver.active.utils.fill_tma_descriptor
        except (AttributeError, KeyError, ImportError):
            return None
        expanded, tensor_slots, desc_slots = [], [], []
        metas = iter(metas)
        for i, a in enumerate(args):
            if i in indices:
                meta = next(metas)
                if meta is None or meta.get("fp4_padded"):
                    return None
                spec = (meta["swizzle"], meta["elem_size"],
                        TMA_DTYPE_DEVICE_TO_HOST[meta["elem_type"]], list(meta["block_size"]),
                        list(a.shape), list(a.strides), 1 if a.padding == "nan" else 0)
                desc_slots.append((len(expanded), spec))
                expanded += [None, *a.shape, *a.strides]
            elif isinstance(a, torch.Tensor):
                tensor_slots.append(len(expanded))
                expanded.append(None)
            else:
                expanded.append(a)
        return cls(compiled, grid, raw, fill, expanded, tuple(tensor_slots), desc_slots)

    def __call__(self, tensors, bases):
        """Launch on the current stream with ``tensors`` (the plain tensor arguments, in
        order) and descriptors over ``bases`` (one tensor per descriptor, in order)."""
        args = self.args.copy()
        for pos, t in zip(self.tensor_slots, tensors):
            args[pos] = t
        for (pos, spec, maps), base in zip(self.desc_slots, bases):
            ptr = base.data_ptr()
            tensor_map = maps.get(ptr)
            if tensor_map is None:
                if len(maps) >= self._MAX_MAPS:
                    maps.clear()
                tensor_map = maps[ptr] = self.fill(ptr, *spec)
            args[pos] = tensor_map
        c, run = self.compiled, self.compiled.run
        self.raw(*self.grid, _current_stream(tensors[0]), c.function, run.launch_cooperative_grid,
                 run.launch_pdl, None, None, c.packed_metadata, None, None, None, *args)


def _fast_descriptor(cls, base, shape, strides, block, layout=None):
    """A host tensor descriptor of class ``cls`` (Triton's, or Gluon's with its shared memory
    ``layout``) without its constructor's checks (alignment, strides, block), which the launch
    plans made once per input signature."""
    d = cls.__new__(cls)
    d.__dict__.update(base=base, shape=shape, strides=strides, block_shape=block, padding="zero")
    if layout is not None:
        d.layout = layout
    return d


def launch_planned(compiled: list, kernel, grid, tensors, descriptors, scalars,
                   constexprs: dict, num_warps: int, num_stages: int,
                   maxnreg: int | None = None, tma: bool = False):
    """Launch ``kernel(*tensors, *descriptors, *scalars, **constexprs)`` for a launch plan that
    keeps, in ``compiled``, what its first launch compiled (the kernel, its :class:`_Relaunch`
    or None, its constexpr values): later calls relaunch that directly
    (through its :class:`_Relaunch` where the kernel takes host descriptors), the first goes
    through :func:`launch_cached`. ``descriptors``: ``(class, tensor, shape, strides, block[,
    layout])`` per host tensor descriptor; ``tma``: the kernel makes device-side descriptors
    and needs scratch memory."""
    hooks = _launch_hooks_set()
    if compiled and compiled[1] is not None and not hooks:
        compiled[1](tensors, tuple(d[1] for d in descriptors))
        return
    args = tensors + tuple(_fast_descriptor(*d) for d in descriptors)
    if compiled and not hooks:
        _run_compiled(compiled[0], grid, args, scalars, compiled[2], tma)
        return
    with _scratch_allocator(tma):
        new = launch_cached(kernel, grid, args, scalars, constexprs, num_warps, num_stages,
                            maxnreg)
    if new is not None and not compiled:
        values = _constexpr_values(kernel, constexprs)
        relaunch = _Relaunch.build(new, grid, (*args, *scalars, *values)) if descriptors else None
        compiled.extend((new, relaunch, values))


@functools.lru_cache(maxsize=64)
def _constexpr_names(kernel, count: int) -> tuple:
    return tuple(kernel.arg_names[len(kernel.arg_names) - count:])


def _constexpr_values(kernel, constexprs: dict) -> tuple:
    """``constexprs`` in ``kernel``'s parameter order (they are its last parameters)."""
    return tuple(constexprs[name] for name in _constexpr_names(kernel, len(constexprs)))


def _arg_key(t) -> tuple:
    """What Triton specializes a launch on in a tensor (dtype, 16-byte alignment) or a host
    tensor descriptor (also its shape, strides and block)."""
    if isinstance(t, torch.Tensor):
        return t.dtype, t.data_ptr() % 16
    return (t.base.dtype, t.base.data_ptr() % 16, tuple(t.shape), tuple(t.strides),
            tuple(t.block_shape))


def _launch_hooks_set() -> bool:
    """A profiler's launch hooks are installed: take Triton's normal path so they run."""
    hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


_COMPILED: dict = {}
_MAX_CACHED_LAUNCHES = 4096


def launch_cached(kernel, grid, tensors, scalars, constexprs: dict, num_warps: int,
                  num_stages: int, maxnreg: int | None = None):
    """Launch ``kernel(*tensors, *scalars, **constexprs)`` (its parameters in that order: all
    tensors first), skipping Triton's per-call argument specialization when an earlier launch
    had the same dtypes, pointer alignments and scalar arguments (hence the same
    specialization). That dispatch cost ~100 us of host time per call on the H100 box, more
    than the whole GPU time of a 32k-token 1-D problem. Used by every forward and backward
    launch. Returns the compiled kernel, for callers that keep it per launch plan and relaunch
    it with :func:`_run_compiled` (None under the interpreter)."""
    # In the kernel's parameter order (the fast path passes them by position).
    values = _constexpr_values(kernel, constexprs)
    key = (kernel, num_warps, num_stages, maxnreg, values, tensors[0].device, scalars,
           tuple(_arg_key(t) for t in tensors))
    compiled = _COMPILED.get(key)
    if compiled is not None and not _launch_hooks_set():
        _run_compiled(compiled, grid, tensors, scalars, values, False)  # caller set scratch
        return compiled
    options = {} if maxnreg is None else {"maxnreg": maxnreg}
    compiled = kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps,
                            num_stages=num_stages, **options)
    if tensors[0].is_cuda and hasattr(compiled, "packed_metadata"):
        if len(_COMPILED) >= _MAX_CACHED_LAUNCHES:  # many shapes: start over, stay bounded
            _COMPILED.clear()
        _COMPILED[key] = compiled
        return compiled
    return None


_LOG2E = math.log2(math.e)


# --- torch.library op -----------------------------------------------------------------------
# The op takes the call's own arguments, so all host-side planning (geometry, tile choice,
# tables) happens inside it: torch.compile sees one opaque call and traces none of it.

def _geometry_and_config(q, kernel_size, stride, dilation, causal, q_tile, kv_tile):
    geo = normalize_geometry(q.shape[1:-2], tuple(kernel_size), tuple(stride), tuple(dilation),
                             tuple(causal))
    config = _config(geo, q.shape[-1], q.dtype, q.device, tuple(q_tile) if q_tile else None,
                     tuple(kv_tile) if kv_tile else None)
    return geo, config


@torch.library.custom_op("gna::na_forward", mutates_args=())
def na_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    extra_k: torch.Tensor | None, extra_v: torch.Tensor | None,
    kernel_size: list[int], stride: list[int], dilation: list[int], causal: list[bool],
    scale: float, q_tile: list[int] | None, kv_tile: list[int] | None,
    bwd_q_tile: list[int] | None, bwd_kv_tile: list[int] | None, tf32: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    geo, config = _geometry_and_config(q, kernel_size, stride, dilation, causal, q_tile, kv_tile)
    return launch_forward(q, k, v, extra_k, extra_v, geo, scale, config, tf32)


@na_forward.register_fake
def _(q, k, v, extra_k, extra_v, kernel_size, stride, dilation, causal, scale, q_tile, kv_tile,
      bwd_q_tile, bwd_kv_tile, tf32, deterministic):
    _geometry_and_config(q, kernel_size, stride, dilation, causal, q_tile, kv_tile)  # validates
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))


@torch.library.custom_op("gna::na_backward", mutates_args=())
def na_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    extra_k: torch.Tensor | None, extra_v: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None,
    kernel_size: list[int], stride: list[int], dilation: list[int], causal: list[bool],
    scale: float, q_tile: list[int] | None, kv_tile: list[int] | None, tf32: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward; gradients of absent additional keys/values come back empty."""
    from .triton_backward import launch_backward  # imports this module

    geo, config = _geometry_and_config(q, kernel_size, stride, dilation, causal, q_tile, kv_tile)
    grads = launch_backward(q, k, v, extra_k, extra_v, out, lse, dout, dlse, geo, scale,
                            config, tf32, deterministic=deterministic)
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@na_backward.register_fake
def _(q, k, v, extra_k, extra_v, out, lse, dout, dlse, kernel_size, stride, dilation, causal,
      scale, q_tile, kv_tile, tf32, deterministic):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(0) if extra_k is None else torch.empty_like(extra_k),
            q.new_empty(0) if extra_v is None else torch.empty_like(extra_v))


def _setup_context(ctx, inputs, output):
    (q, k, v, extra_k, extra_v, kernel_size, stride, dilation, causal, scale, q_tile, kv_tile,
     bwd_q_tile, bwd_kv_tile, tf32, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
    ctx.args = (kernel_size, stride, dilation, causal, scale,
                bwd_q_tile if bwd_q_tile is not None else q_tile,
                bwd_kv_tile if bwd_kv_tile is not None else kv_tile, tf32, deterministic)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
    dq, dk, dv, dek, dev = na_backward(q, k, v, extra_k, extra_v, out, lse,
                                       grad_out.contiguous(), grad_lse, *ctx.args)
    if extra_k is None:
        dek = dev = None
    return (dq, dk, dv, dek, dev) + (None,) * 11


na_forward.register_autograd(_backward, setup_context=_setup_context)


def compiles(q: torch.Tensor, backend: str | None) -> bool:
    """Whether a call being traced by torch.compile goes to this backend's op."""
    return triton is not None and (
        (q.is_cuda and backend in (None, "triton")) or (_interpreting() and backend == "triton"))


def _tile_list(name, value, ndim):
    return None if value is None else list(per_dim(name, value, ndim))


def compiled_call(q, k, v, kernel_size, stride, dilation, is_causal, scale, extra_k, extra_v,
                  tiles, tf32, deterministic=False):
    """Entry used while torch.compile traces: per-dimension lists in, the op out (the op's fake
    implementation validates the geometry on fake tensors). ``tiles`` holds the forward and
    backward Q/KV tile shapes (None for the defaults)."""
    ndim = q.dim() - 3
    kernel_size, stride, dilation = (list(per_dim(n, x, ndim)) for n, x in (
        ("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)))
    causal = list(per_dim("is_causal", is_causal, ndim, kind=bool))
    scale = normalize_scale(scale, q.shape[-1])
    names = ("q_tile_shape", "kv_tile_shape", "backward_q_tile_shape", "backward_kv_tile_shape")
    return na_forward(q, k, v, extra_k, extra_v, kernel_size, stride, dilation, causal, scale,
                      *(_tile_list(n, t, ndim) for n, t in zip(names, tiles)), tf32,
                      bool(deterministic))


# --- backend entry --------------------------------------------------------------------------

def why_not(problem: Problem, options: Options) -> str | None:
    if triton is None:
        return "triton is not installed (pip install triton)"
    if problem.device.type != "cuda" and not (_interpreting() and options.backend == "triton"):
        return f"needs a CUDA device (or TRITON_INTERPRET=1), inputs are on {problem.device}"
    if problem.dtype not in _DTYPES:
        return f"supports float16, bfloat16 and float32, got {problem.dtype}"
    if problem.head_dim > MAX_HEAD_DIM:
        return f"supports head_dim <= {MAX_HEAD_DIM}, got {problem.head_dim}"
    return None


class _EagerAttention(torch.autograd.Function):
    """Eager autograd: the same launchers as the ops, without the custom-op dispatch (its
    argument handling and redispatch cost ~100-200 us of host time per training step, as much
    as the GPU time of small problems). ``torch.compile`` goes through the ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, geo, scale, config, bwd_config, tf32,
                deterministic=False, plans=None):
        out, lse = launch_forward(q, k, v, extra_k, extra_v, geo, scale, config, tf32,
                                  plans=plans)
        ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
        ctx.args = (geo, scale, bwd_config, tf32, deterministic)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from .triton_backward import launch_backward  # imports this module

        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        geo, scale, config, tf32, deterministic = ctx.args
        if grad_out is None:  # only the LSE was used
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dek, dev = launch_backward(q, k, v, extra_k, extra_v, out, lse,
                                               grad_out.contiguous(), grad_lse, geo, scale,
                                               config, tf32, deterministic=deterministic)
        return dq, dk, dv, dek, dev, None, None, None, None, None, None, None


def prepare(problem: Problem, options: Options):
    """Plan a problem once (tiles, precision): returns ``(q, k, v, extra_k, extra_v) ->
    (out, lse)``, which :func:`gna.neighborhood_attention` keeps for later calls with the same
    arguments, shapes and strides. Its launch plans are keyed by the inputs' signature only."""
    geo, scale = problem.geometry, problem.scale
    tf32 = options.fp32_precision == "tf32"
    config = default_config(problem, options)
    bwd_config = config
    if options.backward_q_tile_shape or options.backward_kv_tile_shape:
        bwd_config = default_config(problem, dataclasses.replace(
            options, q_tile_shape=options.backward_q_tile_shape or options.q_tile_shape,
            kv_tile_shape=options.backward_kv_tile_shape or options.kv_tile_shape))
    plans: dict = {}

    def call(q, k, v, extra_k, extra_v):
        if not (torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad
                or (extra_k is not None and (extra_k.requires_grad or extra_v.requires_grad)))):
            # Inference: the launcher directly (host time is what bounds small problems).
            return launch_forward(q, k, v, extra_k, extra_v, geo, scale, config, tf32,
                                  plans=plans)
        return _EagerAttention.apply(q, k, v, extra_k, extra_v, geo, scale, config,
                                     bwd_config, tf32, options.deterministic, plans)

    return call


def run(problem: Problem, options: Options, q, k, v, extra_k, extra_v):
    return prepare(problem, options)(q, k, v, extra_k, extra_v)


register(Backend("triton", why_not, run, prepare), first=True)
