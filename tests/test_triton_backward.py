"""The fused Triton backward kernels against autograd through the reference backend (float64).

Each check runs ``launch_forward`` for ``out, lse``, then ``launch_backward`` with a random
``dout`` (and usually a random ``dlse``), and compares all five gradients (q, k, v, additional
keys, additional values) with ``torch.autograd.grad`` of ``(out * dout).sum() + (lse *
dlse).sum()`` through ``gna.neighborhood_attention(..., backend="reference")`` on float64
copies of the same inputs.

Without a GPU these run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) on
tiny fp16/fp32 problems; on a GPU the GPU-only tests add larger cases, bf16, tf32 and head
dims up to 256.

Error bounds, relative to the float64 gradients, ``||g - ref|| / ||ref||`` per gradient.
Measured (worst gradient per case): interpreter, 40 small cases: fp32 ieee median 2.5e-7, max
4.4e-7; fp16 median 3.6e-4, max 5.6e-4. H100, large cases (head dims up to 256): fp16
3.0e-4 to 5.3e-4, bf16 2.4e-3 to 4.1e-3. Bounds: fp32 ieee 1e-5, fp16 5e-3, bf16 2e-2, and
fp32 with TF32 1e-2.
"""

import dataclasses
import itertools
import math
import random

import pytest
import torch

import gna
from gna.args import normalize
from gna.backends import Options
from gna.profiler import capture_graph

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
triton = pytest.importorskip("triton")

from gna import triton_backward  # noqa: E402
from gna.triton_backend import (  # noqa: E402
    _halve,
    _next_pow2,
    default_config,
    launch_forward,
    shared_limit,
)
from gna.triton_backward import (  # noqa: E402
    KernelConfig,
    backward_configs,
    launch_backward,
    refused_dkdv,
)

REL_BOUND = {"fp32": 1e-5, "tf32": 1e-2, torch.float16: 5e-3, torch.bfloat16: 2e-2}
GRADS = ("dq", "dk", "dv", "dextra_k", "dextra_v")


def _pow2_tile(rng, ndim, volume, shape):
    """A random power-of-two tile of ``volume`` tokens, preferring axes it does not overhang."""
    tile = [1] * ndim
    for _ in range(int(math.log2(volume))):
        axes = [a for a in range(ndim) if tile[a] < shape[a]] or list(range(ndim))
        tile[rng.choice(axes)] *= 2
    return tuple(tile)


def _random_case(seed, small):
    rng = random.Random(seed)
    ndim = rng.choice([1, 2, 3])
    limit = ({1: 40, 2: 10, 3: 6} if small else {1: 600, 2: 36, 3: 14})[ndim]
    shape, ks, st, dl, cs = [], [], [], [], []
    for _ in range(ndim):
        n = rng.randint(4, limit)
        d = rng.randint(1, min(3, n))
        k = rng.randint(1, n // d)
        shape.append(n)
        ks.append(k)
        st.append(rng.randint(1, k))
        dl.append(d)
        cs.append(rng.random() < 0.35)
    heads_kv = rng.choice([1, 2])
    heads = heads_kv * rng.choice([1, 2] if small else [1, 2, 4])
    head_dim = rng.choice([16, 24, 32] if small else [24, 32, 64, 80, 128, 256])
    volumes = ([16, 32], [16, 32]) if small else ([64, 128], [32, 64, 128])
    if head_dim > 128:
        volumes = ([64], [32, 64])
    extra = rng.choice([0, 0, 3, 21] if small else [0, 7, 77])
    if math.prod(ks) == 1 and not extra:
        extra = 3  # one key per query: dq = dk = 0 exactly, and relative errors say nothing
    return dict(
        shape=tuple(shape), kernel_size=tuple(ks), stride=tuple(st), dilation=tuple(dl),
        is_causal=tuple(cs), heads=heads, heads_kv=heads_kv, head_dim=head_dim, extra=extra,
        q_tile=_pow2_tile(rng, ndim, rng.choice(volumes[0]), shape),
        kv_tile=_pow2_tile(rng, ndim, rng.choice(volumes[1]), shape),
        batch=rng.choice([1, 2]), scale=rng.choice([None, 0.3]),
        fused=rng.random() < 0.4, dlse=rng.random() < 0.7,
        kv_major=rng.random() < 0.5, tma=rng.random() < 0.5)


def _inputs(case, dtype, seed):
    """q, k, v (views of one fused tensor when ``case["fused"]``), extras, dout, dlse."""
    g = torch.Generator().manual_seed(seed)
    b, shape, h, hkv, d = (case["batch"], case["shape"], case["heads"], case["heads_kv"],
                           case["head_dim"])
    if case["fused"]:
        qkv = torch.randn(b, *shape, h + 2 * hkv, d, generator=g)
        q, k, v = qkv.split([h, hkv, hkv], dim=-2)
    else:
        q = torch.randn(b, *shape, h, d, generator=g)
        k = torch.randn(b, *shape, hkv, d, generator=g)
        v = torch.randn(b, *shape, hkv, d, generator=g)
    ek = ev = None
    if case["extra"]:
        ek = torch.randn(b, case["extra"], hkv, d, generator=g)
        ev = torch.randn(b, case["extra"], hkv, d, generator=g)
    # dout laid out heads-first in memory: a heads-last view with non-trivial strides.
    dout = torch.randn(b, h, *shape, d, generator=g).movedim(1, -2)
    dlse = torch.randn(b, *shape, h, generator=g) if case["dlse"] else None
    cast = [t if t is None else t.to(DEVICE, dtype) for t in (q, k, v, ek, ev, dout)]
    return (*cast, None if dlse is None else dlse.to(DEVICE))


def _reference_grads(case, q, k, v, ek, ev, dout, dlse):
    inputs = [t if t is None else t.detach().double().requires_grad_() for t in (q, k, v, ek, ev)]
    out, lse = gna.neighborhood_attention(
        *inputs[:3], case["kernel_size"], case["stride"], case["dilation"], case["is_causal"],
        scale=case["scale"], additional_keys=inputs[3], additional_values=inputs[4],
        return_lse=True, backend="reference")
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.double()).sum()
    wrt = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(loss, wrt))
    return [next(grads) if t is not None else None for t in inputs]


def _run(case, dtype, precision="ieee", seed=0):
    """Forward + fused backward; returns the inputs and the five gradients."""
    q, k, v, ek, ev, dout, dlse = _inputs(case, dtype, seed)
    problem = normalize(None, q, k, v, case["kernel_size"], case["stride"], case["dilation"],
                        case["is_causal"], case["scale"], ek, ev)
    config = default_config(problem, Options(q_tile_shape=case["q_tile"],
                                             kv_tile_shape=case["kv_tile"]))
    tf32 = precision == "tf32"
    out, lse = launch_forward(q, k, v, ek, ev, problem.geometry, problem.scale, config, tf32)
    # Random cases draw the dK/dV orientation and the way the streamed tiles are read,
    # whatever the defaults for this device are; the others run the defaults.
    configs = backward_configs(problem.geometry, config, q.element_size(),
                               _next_pow2(max(case["head_dim"], 16)), shared_limit(q.device),
                               dtype == torch.float32 and not tf32)
    if "kv_major" in case:
        dkdv = dataclasses.replace(configs[1], use_tma=case["tma"], kv_major=case["kv_major"])
        if refused_dkdv(dkdv, _next_pow2(max(case["head_dim"], 16))):  # see its test
            dkdv = dataclasses.replace(dkdv, use_tma=True)
        configs = (dataclasses.replace(configs[0], use_tma=case["tma"]), dkdv)
    grads = launch_backward(q, k, v, ek, ev, out, lse, dout, dlse, problem.geometry,
                            problem.scale, config, tf32, configs)
    return (q, k, v, ek, ev, dout, dlse), grads


def _errors(case, dtype, precision="ieee", seed=0):
    """Relative error of each gradient (None where absent), checking shapes and dtypes."""
    inputs, grads = _run(case, dtype, precision, seed)
    refs = _reference_grads(case, *inputs)
    errors = {}
    for name, x, g, ref in zip(GRADS, inputs[:5], grads, refs):
        if x is None:
            assert g is None, f"{name} should be None without additional keys"
            continue
        assert g.shape == x.shape and g.dtype == x.dtype, (name, g.shape, g.dtype)
        g = g.double().cpu()
        ref = ref.cpu()
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient for {case}"
        diff = g - ref
        worst = [int(i) for i in torch.unravel_index(diff.abs().argmax(), diff.shape)]
        errors[name] = ((diff.norm() / ref.norm().clamp_min(1e-30)).item(), worst)
    return errors


def _check(case, dtype, precision="ieee", seed=0):
    key = dtype if dtype != torch.float32 else ("tf32" if precision == "tf32" else "fp32")
    errors = _errors(case, dtype, precision, seed)
    bad = {n: f"{e:.2e} (worst at {w})" for n, (e, w) in errors.items() if not e <= REL_BOUND[key]}
    assert not bad, f"{case} {key}: relative error above {REL_BOUND[key]:.0e}: {bad}"


SMALL_DTYPES = [torch.float32, torch.float16]  # the interpreter computes bf16 dots wrongly


@pytest.mark.parametrize("seed", range(8))
def test_backward_matches_reference_small(seed):
    _check(_random_case(seed, small=True), SMALL_DTYPES[seed % 2], seed=seed)


@pytest.mark.extended
@pytest.mark.parametrize("seed", range(8, 40))
def test_backward_matches_reference_small_extended(seed):
    _check(_random_case(seed, small=True), SMALL_DTYPES[seed % 2], seed=seed)


def _case(**kw):
    base = dict(heads=2, heads_kv=1, head_dim=16, extra=0, batch=1, scale=None, fused=False,
                dlse=True)
    return {**base, **kw}


@pytest.mark.parametrize("kv_major", [False, True])
def test_backward_3d_dilation_causal_gqa_extra(kv_major):
    """3-D, mixed causal, dilation 2 (groups of unequal length), GQA, padded head dim, extra
    keys, custom scale, fused qkv views; both dK/dV orientations (their masks come from
    different tables: per-query key windows, per-key query ranges)."""
    case = _case(shape=(4, 5, 6), kernel_size=(3, 2, 2), stride=(2, 1, 2), dilation=(1, 2, 1),
                 is_causal=(True, False, True), heads=4, heads_kv=2, head_dim=24, extra=5,
                 q_tile=(1, 2, 8), kv_tile=(2, 2, 4), scale=0.7, fused=True,
                 kv_major=kv_major, tma=kv_major)
    _check(case, torch.float32)


def test_backward_block_sparse_is_mask_free():
    """Stride = window = a multiple of the tiles: every tile pair is mask-free in both the
    forward and the inverse ranges (only the kernels' unmasked loops run), and MQA."""
    case = _case(shape=(8, 16), kernel_size=(4, 8), stride=(4, 8), dilation=(1, 1),
                 is_causal=(False, False), heads=3, heads_kv=1, q_tile=(4, 4), kv_tile=(2, 8))
    geo = normalize(None, *[torch.empty(1, 8, 16, 1, 16, device="meta")] * 3,
                    case["kernel_size"], case["stride"]).geometry
    for axis in range(2):
        r = geo.dim(axis).inverse_tile_ranges(case["q_tile"][axis], case["kv_tile"][axis])
        assert (r.full == r.visited).all() and (r.visited > 0).all()
    _check(case, torch.float16, seed=3)


def test_backward_1d_dilation_3_even_window_causal():
    case = _case(shape=(37,), kernel_size=(4,), stride=(3,), dilation=(3,), is_causal=(True,),
                 heads=2, heads_kv=2, q_tile=(16,), kv_tile=(16,), extra=17, batch=2)
    _check(case, torch.float32, seed=5)


def test_backward_without_dlse_equals_zero_dlse_and_is_deterministic():
    case = _case(shape=(9, 7), kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1),
                 is_causal=(False, True), extra=3, q_tile=(4, 4), kv_tile=(4, 4), dlse=False)
    inputs, grads = _run(case, torch.float32)
    q, k, v, ek, ev, dout, _ = inputs
    problem = normalize(None, q, k, v, case["kernel_size"], case["stride"], case["dilation"],
                        case["is_causal"], None, ek, ev)
    config = default_config(problem, Options(q_tile_shape=case["q_tile"],
                                             kv_tile_shape=case["kv_tile"]))
    out, lse = launch_forward(q, k, v, ek, ev, problem.geometry, problem.scale, config)
    again = launch_backward(q, k, v, ek, ev, out, lse, dout, torch.zeros_like(lse),
                            problem.geometry, problem.scale, config)
    for name, a, b in zip(GRADS, grads, again):
        assert torch.equal(a, b), f"{name} differs between dlse=None and dlse=0 / across runs"


def test_backward_kernels_fitted_to_shared_memory(monkeypatch):
    """With too little shared memory for the forward's tiles, dK/dV halves its Q tile and dQ
    keeps its tiles at fewer stages: the two kernels then walk different tilings (and
    tables), and the gradients stay exact."""
    case = _case(shape=(6, 11), kernel_size=(3, 4), stride=(2, 1), dilation=(1, 2),
                 is_causal=(False, False), heads=2, heads_kv=2, extra=9, q_tile=(4, 8),
                 kv_tile=(4, 8))
    config = default_config(normalize(None, *[torch.empty(1, 6, 11, 2, 16, device="meta")] * 3,
                                      (3, 4)), Options(q_tile_shape=(4, 8), kv_tile_shape=(4, 8)))
    limit = 6000
    dq = triton_backward._kernel_config("dq", config, 2, 16, limit)
    dkdv = triton_backward._kernel_config("dkdv", config, 2, 16, limit)
    assert (dq.q_tile, dq.kv_tile, dq.num_stages) == ((4, 8), (4, 8), 1), dq
    assert math.prod(dkdv.q_tile) == 16 and dkdv.kv_tile == (4, 8), dkdv
    assert triton_backward._dq_shared(32, 32, 16, 2, dq.num_stages) <= limit
    assert triton_backward._dkdv_shared(16, 32, 16, 2, dkdv.num_stages) <= limit
    monkeypatch.setattr(triton_backward, "shared_limit", lambda device: limit)
    _check(case, torch.float16, seed=11)


def test_backward_kernel_config_defaults_fit_h100():
    """The forward's default tiles, fitted per backward kernel, fit an H100 by the shared
    memory model (the model itself was checked against sm_90 AOT compiles), with KV tiles
    capped by head dim."""
    for (q_tile, kv_tiles), head_dim, elem in itertools.product(
            gna.sim.KERNEL_TILES.values(), (32, 64, 128, 256), (2, 4)):
        shrink = 2 if head_dim > 128 else 1
        for kv_tile in kv_tiles:
            config = triton_backward.LaunchConfig(_halve(q_tile, shrink), _halve(kv_tile, shrink),
                                                  8, 3 if head_dim <= 128 else 2)
            for kind, shared in (("dq", triton_backward._dq_shared),
                                 ("dkdv", triton_backward._dkdv_shared)):
                c = triton_backward._kernel_config(kind, config, elem, head_dim, 232448)
                need = shared(math.prod(c.q_tile), math.prod(c.kv_tile), head_dim, elem,
                              c.num_stages)
                assert need <= 232448, (kind, config, elem, c, need)
                if elem == 2 and head_dim <= 128:  # fp16/bf16: the forward's Q tile
                    assert c.q_tile == config.q_tile, c
                assert math.prod(c.kv_tile) * head_dim <= triton_backward._MAX_KV_ELEMENTS, c


# --- GPU only -------------------------------------------------------------------------------

gpu = pytest.mark.gpu  # skipped without a CUDA device (conftest)


@gpu
@pytest.mark.parametrize("seed", range(40))
def test_backward_matches_reference_gpu(seed):
    dtype = [torch.float16, torch.bfloat16, torch.float32][seed % 3]
    _check(_random_case(1000 + seed, small=False), dtype, seed=seed)


@gpu
@pytest.mark.parametrize("seed", range(6))
def test_backward_tf32_gpu(seed):
    _check(_random_case(2000 + seed, small=False), torch.float32, precision="tf32", seed=seed)


@gpu
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_head_dims_gpu(head_dim, dtype):
    case = _case(shape=(12, 20, 24), kernel_size=(5, 7, 9), stride=(2, 3, 4), dilation=(1, 2, 1),
                 is_causal=(True, False, False), heads=4, heads_kv=2, head_dim=head_dim, extra=77,
                 q_tile=(2, 8, 8) if head_dim <= 128 else (1, 8, 8),
                 kv_tile=(2, 4, 8) if head_dim <= 128 else (1, 4, 8), batch=2, fused=True)
    _check(case, dtype)


@gpu
def test_backward_block_sparse_3d_gpu():
    """The perfectly block-sparse 3-D benchmark setting, scaled down: no masked tile."""
    case = _case(shape=(16, 16, 32), kernel_size=(8, 8, 16), stride=(8, 8, 16),
                 dilation=(1, 1, 1), is_causal=(False, False, False), heads=2, heads_kv=2,
                 head_dim=128, q_tile=(2, 8, 8), kv_tile=(2, 4, 8), extra=0)
    _check(case, torch.float16)


@gpu
def test_backward_deterministic_gpu():
    case = _case(shape=(10, 24, 24), kernel_size=(5, 7, 7), stride=(1, 2, 2), dilation=(2, 1, 1),
                 is_causal=(True, False, False), heads=8, heads_kv=2, head_dim=64, extra=40,
                 q_tile=(2, 8, 8), kv_tile=(2, 4, 8), batch=2)
    _, first = _run(case, torch.bfloat16, seed=1)
    _, second = _run(case, torch.bfloat16, seed=1)
    for name, a, b in zip(GRADS, first, second):
        assert torch.equal(a, b), f"{name} is not bitwise reproducible"


def test_backward_layout_follows_measurements():
    """On Hopper (TMA) with fp16 and d=128, dK/dV computes its scores KV-major (128-token KV
    tiles; 64-token Q tiles, 32 where a 3-D iteration has masked tiles) and reads Q/dO through
    TMA; without TMA, Q-major pointer loads; other head dims keep the Q-major layout (the rule
    measured in benchmarks/results/backward_sweep.jsonl). dQ keeps pointer loads."""
    def configs(shape, window, stride, kv_tile, tma=True, head_dim=128):
        q = torch.empty(1, *shape, 1, head_dim, device="meta", dtype=torch.float16)
        geo = normalize(None, q, q, q, window, stride).geometry
        q_tile = {1: (128,), 2: (8, 16), 3: (2, 8, 8)}[len(shape)]
        config = triton_backward.LaunchConfig(q_tile, kv_tile, 8, 3, use_tma=tma)
        return backward_configs(geo, config, 2, head_dim, 232448)

    dq, dkdv = configs((30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8))
    assert dkdv.kv_major and dkdv.use_tma and dkdv.q_tile == (1, 8, 8), dkdv
    assert dkdv.num_stages == 3 and dkdv.kv_tile == (2, 8, 8), dkdv
    assert not dq.use_tma and not dq.kv_major, dq
    # Stride 1 in 3-D: masked tiles, 32-token Q tiles; the forward's 64-token KV tile gives
    # way to a 128-token one (its Q tile's shape).
    _, dkdv = configs((30, 48, 80), (18, 24, 24), (1, 1, 1), (2, 4, 8))
    assert dkdv.kv_major and dkdv.q_tile == (1, 4, 8) and dkdv.kv_tile == (2, 8, 8), dkdv
    _, dkdv = configs((256, 256), (80, 80), (16, 16), (8, 16))
    assert dkdv.kv_major and dkdv.q_tile == (8, 8), dkdv
    _, dkdv = configs((256, 256), (80, 80), (1, 1), (8, 16))
    assert dkdv.kv_major and dkdv.q_tile == (8, 8), dkdv
    _, dkdv = configs((32768,), (2048,), (2048,), (128,))
    assert dkdv.kv_major and dkdv.use_tma and dkdv.q_tile == (64,), dkdv
    _, dkdv = configs((30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8), tma=False)
    assert not dkdv.use_tma and not dkdv.kv_major, dkdv
    _, dkdv = configs((30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8), head_dim=64)
    assert dkdv.use_tma and not dkdv.kv_major, dkdv


def test_backward_refuses_the_configuration_measured_wrong():
    """Q-major pointer-load dK/dV with 32-token Q and 128-token KV tiles at d=128 computed a
    wrong dK on the GPU (see refused_dkdv): the launcher raises instead of running it; TMA,
    KV-major or 64-token KV tiles run."""
    bad = KernelConfig((1, 4, 8), (2, 8, 8), 8, 3, kv_major=False, use_tma=False)
    assert refused_dkdv(bad, 128)
    for ok in (dataclasses.replace(bad, use_tma=True), dataclasses.replace(bad, kv_major=True),
               dataclasses.replace(bad, kv_tile=(2, 4, 8))):
        assert refused_dkdv(ok, 128) is None
    assert refused_dkdv(bad, 64) is None
    case = _case(shape=(4, 8, 16), kernel_size=(3, 3, 5), stride=(1, 1, 1), dilation=(1, 1, 1),
                 is_causal=(False, False, False), head_dim=128, q_tile=(1, 4, 8),
                 kv_tile=(2, 8, 8))
    q, k, v, ek, ev, dout, dlse = _inputs(case, torch.float32, 0)
    problem = normalize(None, q, k, v, case["kernel_size"], case["stride"])
    config = default_config(problem, Options(q_tile_shape=(1, 4, 8), kv_tile_shape=(2, 8, 8)))
    out, lse = launch_forward(q, k, v, None, None, problem.geometry, problem.scale, config)
    dq_config = KernelConfig((1, 4, 8), (2, 8, 8), 4, 1)
    with pytest.raises(ValueError, match="computes wrong dK"):
        launch_backward(q, k, v, None, None, out, lse, dout, None, problem.geometry,
                        problem.scale, config, False, (dq_config, bad))


@pytest.mark.parametrize("use", ["out_and_lse", "lse_only"])
def test_eager_autograd_through_backend(use):
    """Autograd through ``gna.neighborhood_attention(..., backend="triton")`` (the eager
    autograd.Function, with backward tile shapes of its own) equals the float64 reference,
    also when only the LSE is used (no gradient reaches ``out``)."""
    case = _case(shape=(6, 10), kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1),
                 is_causal=(False, True), heads=2, heads_kv=1, head_dim=16, extra=3,
                 q_tile=(4, 4), kv_tile=(2, 8))
    q, k, v, ek, ev, dout, dlse = _inputs(case, torch.float32, seed=5)
    if use == "lse_only":
        dout = torch.zeros_like(dout)
    inputs = [t.detach().requires_grad_() for t in (q, k, v, ek, ev)]
    out, lse = gna.neighborhood_attention(
        *inputs[:3], case["kernel_size"], case["stride"], case["dilation"], case["is_causal"],
        additional_keys=inputs[3], additional_values=inputs[4], return_lse=True,
        backend="triton", q_tile_shape=case["q_tile"], kv_tile_shape=case["kv_tile"],
        backward_q_tile_shape=(2, 8), backward_kv_tile_shape=(4, 4))
    loss = (lse * dlse).sum() if use == "lse_only" else (out * dout).sum() + (lse * dlse).sum()
    grads = torch.autograd.grad(loss, inputs)
    refs = _reference_grads(case, q, k, v, ek, ev, dout, dlse)
    for name, g, ref in zip(GRADS, grads, refs):
        err = ((g.double().cpu() - ref.cpu()).norm() / ref.norm().clamp_min(1e-12)).item()
        assert err <= REL_BOUND["fp32"], (name, err)


# --- The Gluon block-sparse backward kernels (Hopper) ----------------------------------------
# Perfectly block-sparse problems (stride = window, multiples of the 128-token tiles): every
# (Q tile, KV tile) pair of the forward's tiles and of dK/dV's 64-token Q tiles is mask-free.
GLUON_CASES = {
    "1d": ((4096,), (512,), (512,)),
    "2d": ((64, 64), (48, 48), (16, 16)),
    "3d": ((8, 16, 32), (4, 8, 16), (4, 8, 16)),
    "3d-dense": ((16, 16, 16), (16, 16, 16), (1, 1, 1)),
}


# Partially masked tiles: the Gluon kernels mask them (the Triton kernels' masks, in their
# order). Strided, odd windows, causal dimensions, and Q tiles without a single mask-free KV
# tile (the causal rows, every 2-D/3-D tile here); last, the Gluon kernels that take the case
# (dK/dV needs 128-token KV tiles).
GLUON_MASKED_CASES = {
    "1d": ((4096,), (512,), (1,), False, ("dq", "dkdv")),
    "1d-causal": ((4096,), (384,), (1,), True, ("dq", "dkdv")),
    "2d": ((48, 64), (13, 21), (1, 1), False, ("dq", "dkdv")),
    "3d": ((12, 16, 24), (5, 7, 9), (2, 3, 1), False, ("dq",)),
    "3d-causal": ((12, 16, 24), (6, 8, 8), (1, 1, 1), (True, False, False), ("dq",)),
}


def _gluon_configs(q, window, stride, gluon=True, causal=False):
    """The forward's configuration with the Gluon kernels requested, and the backward's
    ``(dq, dkdv)``: the default dQ tiles, KV-major dK/dV on 64-token Q and 128-token KV tiles
    (the default at d=128, set here for d=64 too); the Gluon kernels or, with ``gluon`` False,
    the Triton kernels on the same tiles."""
    problem = normalize(None, q, q, q, window, stride, 1, causal)
    config = dataclasses.replace(default_config(problem, Options()), gluon_block_sparse=True)
    dq, _ = backward_configs(problem.geometry, config, q.element_size(), q.shape[-1],
                             shared_limit(q.device))
    q_tile = triton_backward._KV_MAJOR_Q_TILE.get(config.q_tile) or _halve(config.q_tile, 2)
    dkdv = KernelConfig(q_tile, config.kv_tile, 8, 3, kv_major=True, use_tma=True)
    if gluon:
        dq = dataclasses.replace(
            dq, gluon_stages=triton_backward._gluon_stages("dq", math.prod(dq.kv_tile)))
        dkdv = dataclasses.replace(dkdv, gluon_stages=triton_backward._gluon_stages("dkdv", 128))
    else:
        dq = dataclasses.replace(dq, gluon_stages=0)
    return problem, config, (dq, dkdv)


def _schedule_lists(table, programs):
    return [table[table[p]:table[p + 1]].tolist() for p in range(programs)]


@pytest.mark.parametrize("seed", range(4))
def test_balanced_schedule_lists_every_item_once_in_order(seed):
    rng = random.Random(seed)
    programs = rng.choice([1, 3, 7, 132])
    costs = [rng.randint(1, 50) for _ in range(rng.randint(1, 2000))]
    table = triton_backward.balanced_schedule(costs, programs)
    assert table.dtype.name == "int32"
    assert table[0] == programs + 1 and table[programs] == len(table)
    lists = _schedule_lists(table, programs)
    assert sorted(i for items in lists for i in items) == list(range(len(costs)))
    assert all(items == sorted(items) for items in lists)
    # List scheduling: no program ends more than one item's cost after the mean.
    loads = [sum(costs[i] for i in items) for items in lists]
    assert max(loads) <= sum(costs) / programs + max(costs)


def test_balanced_schedule_of_dkdv_items_on_the_3d_benchmark_problem():
    # KV tiles of the 3-D stride-16x8x8 problem are seen by 56 to 480 Q tiles: handed out with
    # a fixed stride over 132 programs, the busiest would do 9% more than the mean.
    q = torch.empty(1, 30, 48, 80, 24, 128, device="meta", dtype=torch.float16)
    geometry = normalize(None, q, q, q, (18, 24, 24), (16, 8, 8)).geometry
    visited, full = geometry.inverse_tile_counts((1, 8, 8), (2, 8, 8))
    assert (visited == full).all() and (visited.min(), visited.max()) == (56, 480)
    costs = triton_backward.dkdv_item_costs(geometry, (1, 8, 8), (2, 8, 8), 1, 24, 1).tolist()
    assert costs == [int(c) + triton_backward._DKDV_ITEM_STEPS for c in visited] * 24
    fixed = [sum(costs[p::132]) for p in range(132)]
    assert max(fixed) / (sum(costs) / 132) > 1.09
    loads = [sum(costs[i] for i in items)
             for items in _schedule_lists(triton_backward.balanced_schedule(costs, 132), 132)]
    assert max(loads) / (sum(costs) / 132) < 1.01
    # Equal costs: the fixed stride.
    table = triton_backward.balanced_schedule([5] * 10, 4)
    assert _schedule_lists(table, 4) == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]


def test_gluon_backward_eligibility_rules():
    """Which calls the Gluon backward kernels take, decided before any GPU is needed: the
    perfectly block-sparse settings with 128-token tiles (dQ) or 64/128-token tiles (dK/dV)
    qualify, then need a Hopper GPU; partial tiles, dilation, other tiles, dtypes and head
    dims do not, nor additional keys for dQ or Q tiles overhanging a batch for dK/dV; and
    backward_configs marks exactly the qualifying geometries."""
    ineligible = triton_backward.gluon_backward_ineligible

    def reasons(shape, window, stride, dilation=1, dtype=torch.float16, head_dim=128,
                extra=False, batch=1, q_tile=None, kv_tile=None):
        q = torch.zeros(batch, *shape, 2, head_dim, dtype=dtype)
        problem = normalize(None, q, q, q, window, stride, dilation)
        config = default_config(problem, Options(q_tile_shape=q_tile, kv_tile_shape=kv_tile))
        dkdv_q = triton_backward._KV_MAJOR_Q_TILE.get(config.q_tile) or _halve(config.q_tile, 2)
        ek = q[:, 0] if extra else None
        return (ineligible("dq", q, q, q, q, ek, problem.geometry, config.q_tile,
                           _halve(config.kv_tile, 2)),
                ineligible("dkdv", q, q, q, q, ek, problem.geometry, dkdv_q, config.kv_tile))

    gpu_needed = ("needs a Hopper GPU (sm_90)",) * 2
    for shape, window, stride in GLUON_CASES.values():
        assert reasons(shape, window, stride) == gpu_needed, (shape, window, stride)
        assert reasons(shape, window, stride, head_dim=64, dtype=torch.bfloat16) == gpu_needed
    assert reasons((4096,), (512,), (1,)) == gpu_needed  # both mask partial tiles
    # Two batches: a partial KV tile past a 3-D batch's first dimension would read the next
    # batch's keys (1-D and 2-D layouts merge a unit dimension with the batch).
    tiles = dict(q_tile=(2, 8, 8), kv_tile=(2, 8, 8))  # dQ's KV tile: (2, 4, 8)
    why = reasons((7, 16, 24), (5, 7, 9), (1, 1, 1), batch=2, **tiles)[0]
    assert why.startswith("KV tiles (2, 4, 8) overhang the first dimension (7)"), why
    assert reasons((8, 16, 24), (5, 7, 9), (1, 1, 1), batch=2, **tiles)[0] == gpu_needed[0]
    assert reasons((4000,), (512,), (1,), batch=2)[0] == gpu_needed[0]
    assert reasons((4096,), (512,), (512,), dilation=(2,))[0] == "dilation"
    assert reasons((4096,), (512,), (512,), extra=True) == ("additional keys/values",
                                                          gpu_needed[1])
    assert all(r.startswith("needs fp16") for r in reasons(
        (4096,), (512,), (512,), dtype=torch.float32, q_tile=(128,), kv_tile=(128,)))
    assert all(r.startswith("needs head_dim") for r in reasons((4096,), (512,), (512,),
                                                               head_dim=32))
    assert all(r.startswith("needs 128-token" if i == 0 else "needs 64-token")
               for i, r in enumerate(reasons((4096,), (512,), (512,), q_tile=(64,))))
    assert ineligible("dq", *[torch.zeros(1, 4096, 2, 128, dtype=torch.float16)] * 4, None,
                      normalize(None, *[torch.zeros(1, 4096, 2, 128)] * 3, 512, 512).geometry,
                      (128,), (32,)).startswith("needs 128-token Q and 64- or 128-token KV")
    # Two batches: dK/dV's default Q tile is one frame deep and never overhangs; a deeper
    # one that does not divide the frames would read the next batch's queries.
    _, dkdv = reasons((8, 16, 32), (4, 8, 16), (4, 8, 16), batch=2)
    assert dkdv == gpu_needed[1]
    q = torch.zeros(2, 6, 16, 32, 2, 128, dtype=torch.float16)
    problem = normalize(None, q, q, q, (6, 8, 16), (1, 8, 16))
    why = ineligible("dkdv", q, q, q, q, None, problem.geometry, (4, 4, 4), (2, 8, 8))
    assert why.startswith("Q tiles (4, 4, 4) overhang"), why
    # The fused dK/dV/dQ kernel: dK/dV's rules (partial tiles too) and no additional keys;
    # the launcher takes it on partially masked tiles in 2-D only (measured slower in 1-D).
    for shape, window, stride, preferred in (((4096,), (512,), (512,), True),
                                             ((4096,), (512,), (1,), False),
                                             ((64, 64), (48, 48), (16, 16), True),
                                             ((48, 64), (13, 21), (1, 1), True)):
        q = torch.zeros(1, *shape, 2, 128, dtype=torch.float16)
        geometry = normalize(None, q, q, q, window, stride).geometry
        q_tile, kv_tile = ((64,), (128,)) if len(shape) == 1 else ((8, 8), (8, 16))
        assert triton_backward._fused_preferred(geometry, q_tile, kv_tile) == preferred, shape
    q = torch.zeros(1, 4096, 2, 128, dtype=torch.float16)
    for window, stride, extra, expected in (
            (512, 512, False, gpu_needed[0]),
            (512, 1, False, gpu_needed[0]),
            (512, 512, True, "additional keys/values")):
        geometry = normalize(None, q, q, q, window, stride).geometry
        why = ineligible("fused", q, q, q, q, q[:, :8] if extra else None, geometry, (64,),
                         (128,))
        assert why == expected, (window, stride, extra, why)

    def marked(shape, window, stride):
        q = torch.empty(1, *shape, 1, 128, device="meta", dtype=torch.float16)
        problem = normalize(None, q, q, q, window, stride)
        config = dataclasses.replace(default_config(problem, Options()), use_tma=True,
                                     gluon_block_sparse=True)
        dq, dkdv = backward_configs(problem.geometry, config, 2, 128, 232448)
        if dq.gluon:  # the measured ring depths at d=128
            assert dq.gluon_stages == (4 if math.prod(dq.kv_tile) == 64 else 2), dq
        if dkdv.gluon:
            assert dkdv.gluon_stages == 4, dkdv
        return dq.gluon, dkdv.gluon

    assert marked((256, 256), (80, 80), (16, 16)) == (True, True)
    assert marked((30, 48, 80), (18, 24, 24), (16, 8, 8)) == (True, True)
    assert marked((32768,), (2048,), (2048,)) == (True, True)
    assert marked((256, 256), (80, 80), (1, 1)) == (True, True)
    assert marked((30, 48, 80), (18, 24, 24), (1, 1, 1)) == (True, False)  # 32-token Q tiles
    assert marked((32768,), (2048,), (1,)) == (True, True)
    # The dQ kernel is compiled without its partial-tile code where no Q tile needs it.
    for shape, window, stride, q_tile, kv_tile, partial in (
            ((256, 256), (80, 80), (16, 16), (1, 8, 16), (1, 8, 8), False),
            ((30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8), (1, 8, 8), False),
            ((256, 256), (80, 80), (1, 1), (1, 8, 16), (1, 8, 8), True),
            ((4096,), (512,), (512,), (1, 1, 128), (1, 1, 64), False),
            ((4096,), (512,), (256,), (1, 1, 128), (1, 1, 64), False),
            ((4096,), (500,), (500,), (1, 1, 128), (1, 1, 64), True)):
        q = torch.empty(1, *shape, 1, 128, device="meta", dtype=torch.float16)
        geometry = normalize(None, q, q, q, window, stride).geometry
        assert geometry.has_partial_tiles(q_tile[3 - len(shape):],
                                          kv_tile[3 - len(shape):]) == partial, shape


def _gluon_grads(q, k, v, dout, window, stride, gluon=True, causal=False,
                 kinds=("dq", "dkdv"), deterministic=True):
    """Forward, then the backward with the Gluon kernels of ``kinds`` (checked to be the ones
    launched: ``"fused"`` for the fused dK/dV/dQ kernel, which ``deterministic`` rules out) or
    the Triton kernels, on the same inputs."""
    problem, config, configs = _gluon_configs(q, window, stride, gluon, causal)
    if gluon:
        checks = (("fused", configs[1], triton_backward._GLUON_FUSED_STAGES),) if (
            "fused" in kinds) else ((kind, c, c.gluon_stages)
                                    for kind, c in zip(("dq", "dkdv"), configs))
        for kind, c, stages in checks:
            why = triton_backward.gluon_backward_ineligible(
                kind, q, k, v, dout, None, problem.geometry, c.q_tile, c.kv_tile, stages)
            assert (why is None) == (kind in kinds), (kind, why)
    out, lse = launch_forward(q, k, v, None, None, problem.geometry, problem.scale, config)
    triton_backward._BACKWARD_PLANS.clear()
    grads = launch_backward(q, k, v, None, None, out, lse, dout, None, problem.geometry,
                            problem.scale, config, False, configs, deterministic)
    (plan,) = triton_backward._BACKWARD_PLANS.values()
    names = [launch.kernel.__name__ if hasattr(launch.kernel, "__name__")
             else launch.kernel.fn.__name__ for launch in plan.launches]
    launched = {kind for kind in ("dq", "dkdv", "fused")
                if f"{kind}_block_sparse" in " ".join(names)}
    assert launched == (set(kinds) if gluon else set()), names
    return grads[:3]


def _gluon_case(name):
    """``(shape, window, stride, causal, Gluon kernels)`` of a block-sparse case (both Gluon
    kernels) or a ``masked-`` one (the Gluon dQ)."""
    if name in GLUON_CASES:
        return (*GLUON_CASES[name], False, ("dq", "dkdv"))
    return GLUON_MASKED_CASES[name.removeprefix("masked-")]


ALL_GLUON_CASES = list(GLUON_CASES) + [f"masked-{name}" for name in GLUON_MASKED_CASES]


@gpu
@pytest.mark.hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ALL_GLUON_CASES)
def test_gluon_backward_matches_reference_gpu(case, dtype, head_dim):
    """Two batches, GQA (4 query heads on 2 KV heads): dQ, dK, dV against float64."""
    shape, window, stride, causal, kinds = _gluon_case(case)
    _check_gluon_against_reference(case, shape, window, stride, causal, dtype, head_dim, 17,
                                   kinds=kinds)


def _check_gluon_against_reference(case, shape, window, stride, causal, dtype, head_dim, seed,
                                   **kinds):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, *shape, 4, head_dim, generator=g)
    k, v = (torch.randn(2, *shape, 2, head_dim, generator=g) for _ in range(2))
    dout = torch.randn(2, *shape, 4, head_dim, generator=g)
    grads = _gluon_grads(*(t.to("cuda", dtype) for t in (q, k, v, dout)), window, stride,
                         causal=causal, **kinds)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = gna.neighborhood_attention(*leaves, window, stride, is_causal=causal,
                                     backend="reference")
    refs = torch.autograd.grad((out * dout.double()).sum(), leaves)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs):
        rel = ((got.double().cpu() - ref).norm() / ref.norm()).item()
        assert rel <= REL_BOUND[dtype], f"{case} {dtype} d={head_dim} {name}: rel err {rel:.2e}"


@gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", ["1d", "2d", "3d"] + ALL_GLUON_CASES[len(GLUON_CASES):])
def test_gluon_backward_equals_triton_kernels_gpu(case):
    """Same arithmetic in the same order as the Triton kernels on the same tiles (partial
    tiles masked alike): bit-identical dQ, dK, dV, here on views of a fused qkv tensor
    (strided heads) with GQA."""
    shape, window, stride, causal, kinds = _gluon_case(case)
    g = torch.Generator(device="cuda").manual_seed(18)
    qkv = torch.randn(1, *shape, 4 + 2 + 2, 128, device="cuda", dtype=torch.float16, generator=g)
    q, k, v = qkv.split([4, 2, 2], dim=-2)
    dout = torch.randn(1, *shape, 4, 128, device="cuda", dtype=torch.float16, generator=g)
    gluon = _gluon_grads(q, k, v, dout, window, stride, causal=causal, kinds=kinds)
    tri = _gluon_grads(q, k, v, dout, window, stride, gluon=False, causal=causal)
    for name, a, b in zip(("dq", "dk", "dv"), gluon, tri):
        assert torch.equal(a, b), f"{name}: max diff {(a.float() - b.float()).abs().max()}"


# The cases the launcher gives the fused kernel: the Gluon dK/dV kernel's, partially masked
# ones too where it takes those (2-D: triton_backward._FUSED_PARTIAL_NDIMS).
FUSED_CASES = [case for case in ALL_GLUON_CASES if "dkdv" in _gluon_case(case)[4] and (
    case in GLUON_CASES or len(_gluon_case(case)[0]) in triton_backward._FUSED_PARTIAL_NDIMS)]


@gpu
@pytest.mark.hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_gluon_fused_backward_matches_reference_gpu(case, dtype, head_dim):
    """The fused dK/dV/dQ kernel (dQ added into an fp32 accumulator by the copy engine's
    reductions), two batches, GQA (4 query heads on 2 KV heads): dQ, dK, dV against
    float64."""
    shape, window, stride, causal, _ = _gluon_case(case)
    _check_gluon_against_reference(case, shape, window, stride, causal, dtype, head_dim, 19,
                                   kinds=("fused",), deterministic=False)


@gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", FUSED_CASES)
def test_gluon_fused_backward_against_separate_kernels_gpu(case):
    """The fused kernel's dK and dV are the separate Gluon dK/dV kernel's bit for bit (same
    loop); its dQ sums the same fp32 products in another order (per KV tile, then across KV
    tiles in fp32 in global memory), so it differs from the deterministic dQ kernel's by
    rounding only (measured: 4e-5 to 9e-5 relative, in norm, on the benchmark rows). On views
    of a fused qkv tensor with GQA."""
    shape, window, stride, causal, kinds = _gluon_case(case)
    g = torch.Generator(device="cuda").manual_seed(20)
    qkv = torch.randn(1, *shape, 4 + 2 + 2, 128, device="cuda", dtype=torch.float16, generator=g)
    q, k, v = qkv.split([4, 2, 2], dim=-2)
    dout = torch.randn(1, *shape, 4, 128, device="cuda", dtype=torch.float16, generator=g)
    fused = _gluon_grads(q, k, v, dout, window, stride, causal=causal, kinds=("fused",),
                         deterministic=False)
    separate = _gluon_grads(q, k, v, dout, window, stride, causal=causal, kinds=kinds)
    assert torch.equal(fused[1], separate[1]) and torch.equal(fused[2], separate[2])
    a, b = fused[0].float(), separate[0].float()
    # Rounding apart: a few fp16 units of dQ's largest entries at most, 1e-3 in norm.
    assert (a - b).abs().max() <= 2.0 ** -9 * b.abs().max(), (a - b).abs().max()
    assert (a - b).norm() <= 1e-3 * b.norm(), ((a - b).norm() / b.norm()).item()


@gpu
@pytest.mark.hopper
def test_gluon_fused_backward_only_when_not_deterministic_gpu():
    """Through the public API: ``deterministic=True`` keeps the separate dQ kernel (and
    gradients identical run to run); the default takes the fused kernel."""
    shape, window, stride = GLUON_CASES["1d"]
    leaves = [torch.randn(1, *shape, 2, 128, device="cuda", dtype=torch.float16)
              .requires_grad_() for _ in range(3)]
    grad = torch.randn(1, *shape, 2, 128, device="cuda", dtype=torch.float16)
    launched = {}
    for deterministic in (False, True):
        triton_backward._BACKWARD_PLANS.clear()
        runs = []
        for _ in range(2):
            out = gna.na1d(*leaves, kernel_size=window, stride=stride, backend="triton",
                           deterministic=deterministic)
            runs.append(torch.autograd.grad(out, leaves, grad))
        (plan,) = triton_backward._BACKWARD_PLANS.values()
        launched[deterministic] = plan.fused
        if deterministic:
            for a, b in zip(*runs):
                assert torch.equal(a, b)
    assert launched == {False: True, True: False}


@gpu
@pytest.mark.hopper
def test_gluon_backward_64bit_offsets_gpu():
    """Gradients of a fused qkv view of 3 x 2^31+ elements through the Gluon kernels: the
    dQ/dK/dV offsets past 2^31 must not wrap."""
    heads, head_dim = 16, 128
    n = (1 << 31) // (heads * head_dim) + 4096  # a multiple of 128
    qkv = torch.empty(1, n, 3, heads, head_dim, device="cuda", dtype=torch.float16)
    qkv.normal_()
    q, k, v = qkv.unbind(dim=2)
    dout = torch.randn(1, n, heads, head_dim, device="cuda", dtype=torch.float16)
    grads = _gluon_grads(q, k, v, dout, (128,), (128,))
    tail = slice(n - 256, n)
    leaves = [t[:, tail].double().cpu().requires_grad_() for t in (q, k, v)]
    out = gna.na1d(*leaves, kernel_size=128, stride=128, backend="reference")
    refs = torch.autograd.grad((out * dout[:, tail].double().cpu()).sum(), leaves)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, refs):
        rel = ((got[:, tail].double().cpu() - ref).norm() / ref.norm()).item()
        assert rel <= REL_BOUND[torch.float16], f"{name}: rel err {rel:.2e}"


@gpu
@pytest.mark.hopper
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "separate"])
def test_gluon_backward_cuda_graph_gpu(deterministic):
    """The Gluon backward kernels replay under CUDA graph capture (descriptors made on the
    host per call, tables made before capture), replayed twice: the separate dK/dV and dQ
    kernels bit for bit; the fused kernel, whose dQ accumulator must start from zero on every
    replay (the delta kernel zeroes it), with a dQ that may differ from the eager step's in
    the last bits (the order of its fp32 additions)."""
    shape, window, stride = GLUON_CASES["1d"]
    leaves = [torch.randn(1, *shape, 2, 128, device="cuda", dtype=torch.float16)
              .requires_grad_() for _ in range(3)]
    grad = torch.randn(1, *shape, 2, 128, device="cuda", dtype=torch.float16)

    def step():
        for t in leaves:
            t.grad = None
        gna.na1d(*leaves, kernel_size=window, stride=stride, backend="triton",
                 deterministic=deterministic).backward(grad)

    triton_backward._BACKWARD_PLANS.clear()
    step()
    (plan,) = triton_backward._BACKWARD_PLANS.values()
    assert plan.fused != deterministic
    eager = [t.grad.clone() for t in leaves]
    graph, _ = capture_graph(step)
    for _ in range(2):
        for t in leaves:
            t.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip("qkv", eager, (t.grad for t in leaves)):
            if name == "q" and not deterministic:
                torch.testing.assert_close(b, a, rtol=2e-3, atol=1e-5)
            else:
                assert torch.equal(a, b), f"d{name} differs under graph replay"


@gpu
@pytest.mark.hopper
def test_gluon_backward_relaunch_takes_each_calls_tensors_gpu():
    """The backward plan relaunches its Gluon kernels with tensor maps cached by address:
    repeated calls on other inputs give each call's own gradients (a fresh plan's)."""
    shape, window, stride = GLUON_CASES["2d"]
    sets = [[torch.randn(1, *shape, 2, 128, device="cuda", dtype=torch.float16)
             for _ in range(4)] for _ in range(3)]
    first = [_gluon_grads(*s, window, stride) for s in sets]  # fresh plan per call
    problem, config, configs = _gluon_configs(sets[0][0], window, stride)
    for (q, k, v, dout), expected in zip(sets + sets[::-1], first + first[::-1]):
        out, lse = launch_forward(q, k, v, None, None, problem.geometry, problem.scale, config)
        grads = launch_backward(q, k, v, None, None, out, lse, dout, None, problem.geometry,
                                problem.scale, config, False, configs, deterministic=True)
        for name, a, b in zip(("dq", "dk", "dv"), grads, expected):
            assert torch.equal(a, b), name
    (plan,) = triton_backward._BACKWARD_PLANS.values()
    assert all(launch.compiled[1] is not None for launch in plan.launches
               if launch.descriptors), "the relaunch path was not taken"
