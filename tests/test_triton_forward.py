"""The Triton forward kernel against the reference backend (float64).

Without a GPU these run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) on
tiny fp16/fp32 problems; on a GPU the same sweep runs larger, with bf16 too, plus the
GPU-only checks (>2^31-element tensors, torch.compile, CUDA graphs).

Error bounds, relative to a float64 reference, ||out - ref|| / ||ref||:
fp32 ieee 1e-5, fp32 tf32 5e-3, fp16 5e-3, bf16 3e-2; LSE absolute: 1e-4 fp32 ieee, 2e-2
otherwise.
"""

import dataclasses
import math
import random

import pytest
import torch

import gna
from gna.args import normalize
from gna.backends import Options
from gna.triton_backend import LaunchConfig, count_tiles, default_config, launch_forward
from gna import triton_backend
from gna.profiler import capture_graph

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
triton = pytest.importorskip("triton")

REL_BOUND = {"fp32": 1e-5, "tf32": 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_BOUND = {"fp32": 1e-4, "tf32": 2e-2, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _pow2_tiles(rng, ndim, volume):
    """A random power-of-two tile of ``volume`` tokens over ``ndim`` dimensions."""
    tile = [1] * ndim
    for _ in range(int(math.log2(volume))):
        tile[rng.randrange(ndim)] *= 2
    return tuple(tile)


def _random_case(seed, small):
    rng = random.Random(seed)
    ndim = rng.choice([1, 2, 3])
    shape, ks, st, dl, cs = [], [], [], [], []
    for _ in range(ndim):
        n = rng.randint(4, {1: 40, 2: 12, 3: 7}[ndim] if small else {1: 700, 2: 40, 3: 16}[ndim])
        d = rng.randint(1, min(3, n))
        k = rng.randint(1, n // d)
        shape.append(n)
        ks.append(k)
        st.append(rng.randint(1, k))
        dl.append(d)
        cs.append(rng.random() < 0.35)
    heads_kv = rng.choice([1, 2])
    heads = heads_kv * rng.choice([1, 2])
    head_dim = rng.choice([16, 32] if small else [24, 32, 64, 128, 256])
    extra = rng.choice([0, 0, 3, 70])
    q_tile = _pow2_tiles(rng, ndim, rng.choice([16, 32] if small else [64, 128]))
    kv_tile = _pow2_tiles(rng, ndim, rng.choice([16, 32] if small else [32, 64]))
    if not small and head_dim == 256:
        q_tile, kv_tile = _pow2_tiles(rng, ndim, 64), _pow2_tiles(rng, ndim, 32)
    return dict(shape=tuple(shape), kernel_size=tuple(ks), stride=tuple(st), dilation=tuple(dl),
                is_causal=tuple(cs), heads=heads, heads_kv=heads_kv, head_dim=head_dim,
                extra=extra, q_tile=q_tile, kv_tile=kv_tile, batch=rng.choice([1, 2]))


def _inputs(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    b, shape = case["batch"], case["shape"]
    q = torch.randn(b, *shape, case["heads"], case["head_dim"], generator=g)
    k = torch.randn(b, *shape, case["heads_kv"], case["head_dim"], generator=g)
    v = torch.randn(b, *shape, case["heads_kv"], case["head_dim"], generator=g)
    ek = ev = None
    if case["extra"]:
        ek = torch.randn(b, case["extra"], case["heads_kv"], case["head_dim"], generator=g)
        ev = torch.randn(b, case["extra"], case["heads_kv"], case["head_dim"], generator=g)
    return [t if t is None else t.to(DEVICE, dtype) for t in (q, k, v, ek, ev)]


def _check(case, dtype, precision="ieee", seed=0):
    q, k, v, ek, ev = _inputs(case, dtype, seed)
    args = (case["kernel_size"], case["stride"], case["dilation"], case["is_causal"])
    out, lse = gna.neighborhood_attention(
        q, k, v, *args, additional_keys=ek, additional_values=ev, return_lse=True,
        backend="triton", q_tile_shape=case["q_tile"], kv_tile_shape=case["kv_tile"],
        fp32_precision=precision)
    as64 = [t if t is None else t.double() for t in (q, k, v, ek, ev)]  # reference, on DEVICE
    ref, ref_lse = gna.neighborhood_attention(*as64[:3], *args, additional_keys=as64[3],
                                              additional_values=as64[4], return_lse=True,
                                              backend="reference")
    ref, ref_lse = ref.cpu(), ref_lse.cpu()
    key = dtype if dtype != torch.float32 else ("tf32" if precision == "tf32" else "fp32")
    assert out.dtype == dtype and out.shape == q.shape
    out = out.cpu().double()
    assert torch.isfinite(out).all(), f"non-finite output for {case}"
    rel = ((out - ref).norm() / ref.norm()).item()
    worst = (out - ref).abs().flatten().argmax().item()
    where = [int(i) for i in torch.unravel_index(torch.tensor(worst), out.shape)]
    assert rel <= REL_BOUND[key], f"{case} {dtype}: rel err {rel:.2e} (worst at {where})"
    lse_err = (lse.cpu().double() - ref_lse).abs().max().item()
    assert lse_err <= LSE_BOUND[key], f"{case} {dtype}: lse err {lse_err:.2e}"


SMALL_DTYPES = [torch.float32, torch.float16]  # the interpreter computes bf16 dots wrongly


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
def test_forward_matches_reference_small(seed, dtype):
    _check(_random_case(seed, small=True), dtype, seed=seed)


@pytest.mark.extended
@pytest.mark.parametrize("seed", range(6, 30))
@pytest.mark.parametrize("dtype", SMALL_DTYPES, ids=str)
def test_forward_matches_reference_small_extended(seed, dtype):
    _check(_random_case(seed, small=True), dtype, seed=seed)


@pytest.mark.parametrize("seed", range(3))
def test_forward_tma_path_matches_reference(seed):
    """The tensor-descriptor (TMA) path, forced on; the interpreter runs it too."""
    case = _random_case(100 + seed, small=True)
    q, k, v, ek, ev = _inputs(case, torch.float32, seed)
    problem = normalize(None, q, k, v, case["kernel_size"], case["stride"], case["dilation"],
                        case["is_causal"], None, ek, ev)
    config = LaunchConfig(case["q_tile"], case["kv_tile"], 4, 2, use_tma=True)
    out, lse = launch_forward(q, k, v, ek, ev, problem.geometry, problem.scale, config)
    ref, ref_lse = gna.neighborhood_attention(
        *(t.double() for t in (q, k, v)), case["kernel_size"], case["stride"], case["dilation"],
        case["is_causal"], additional_keys=None if ek is None else ek.double(),
        additional_values=None if ev is None else ev.double(), return_lse=True,
        backend="reference")
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel <= REL_BOUND["fp32"], f"{case}: rel err {rel:.2e}"
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_BOUND["fp32"]


def _tma_forward(q, k, v, window, stride, dilation, q_tile, kv_tile, causal=None):
    """The TMA path forced on: ``(out, reference out, whether K/V descriptors came from the
    host)``."""
    ndim = q.dim() - 3
    causal = causal or (False,) * ndim
    problem = normalize(None, q, k, v, window, stride, dilation, causal)
    config = LaunchConfig(q_tile, kv_tile, 4, 2, use_tma=True)
    plan = triton_backend._plan(problem.geometry, q_tile, kv_tile)
    host = triton_backend.host_descriptors(k, v, plan.geo3, plan.kv_tile, 16, ndim) is not None
    out, _ = launch_forward(q, k, v, None, None, problem.geometry, problem.scale, config)
    ref = gna.neighborhood_attention(q.double(), k.double(), v.double(), window, stride,
                                     dilation, causal, backend="reference")
    return out, ref, host


@pytest.mark.parametrize("case", ["1d-gqa", "2d-batch2", "3d-batch2-fused-qkv"])
def test_forward_host_descriptors_match_reference(case):
    """K/V tensor descriptors made on the host over whole tensors (batch merged with the
    first spatial dimension): 1-D with GQA, 2-D with two batches, 3-D (KV tiles one frame
    deep) with two batches and q/k/v viewed out of one fused tensor; each is checked to take
    the host path."""
    g = torch.Generator().manual_seed(3)
    if case == "1d-gqa":
        q = torch.randn(1, 45, 4, 16, generator=g)
        k, v = (torch.randn(1, 45, 2, 16, generator=g) for _ in range(2))
        args = ((7,), (2,), (1,), (16,), (16,), (True,))
    elif case == "2d-batch2":
        q, k, v = (torch.randn(2, 9, 11, 2, 16, generator=g) for _ in range(3))
        args = ((3, 5), (1, 2), (1, 1), (4, 4), (2, 8), None)
    else:
        qkv = torch.randn(2, 6, 5, 7, 3 * 2, 16, generator=g)
        q, k, v = qkv.split([2, 2, 2], dim=-2)
        args = ((3, 3, 5), (1, 2, 1), (1, 1, 1), (2, 2, 4), (1, 4, 4), (True, False, False))
    out, ref, host = _tma_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), *args)
    assert host, "expected host-made descriptors for this case"
    rel = ((out.double().cpu() - ref.cpu()).norm() / ref.norm()).item()
    assert rel <= REL_BOUND["fp32"], f"{case}: rel err {rel:.2e}"


def test_forward_descriptors_never_read_into_the_next_batch():
    """With two batches and a first dimension (5) that is not a multiple of the KV tile's
    (2), a host descriptor's last box along it would overhang into the next batch, where a
    per-group descriptor reads zeros. The kernel must then make its own descriptors:
    infinities in batch 1's values must not reach batch 0's outputs (the masked keys'
    probabilities are 0, and 0 * inf = nan)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 4, 6, 1, 16, generator=g) for _ in range(3))
    v[1] = float("inf")
    out, ref, host = _tma_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), (3, 3, 3),
                                  (1, 1, 1), (1, 1, 1), (2, 2, 4), (2, 2, 4))
    assert not host
    out0, ref0 = out[0].double().cpu(), ref[0].cpu()
    assert torch.isfinite(out0).all()
    assert ((out0 - ref0).norm() / ref0.norm()).item() <= REL_BOUND["fp32"]


def test_forward_every_causal_combination_3d():
    for mask in range(8):
        causal = tuple(bool(mask >> a & 1) for a in range(3))
        case = dict(shape=(4, 5, 6), kernel_size=(3, 2, 4), stride=(2, 1, 3), dilation=(1, 2, 1),
                    is_causal=causal, heads=2, heads_kv=1, head_dim=16, extra=0,
                    q_tile=(2, 2, 4), kv_tile=(1, 4, 4), batch=1)
        _check(case, torch.float32, seed=mask)


def test_forward_tf32_and_extra_keys():
    case = dict(shape=(11, 9), kernel_size=(5, 3), stride=(1, 3), dilation=(2, 1),
                is_causal=(False, True), heads=2, heads_kv=2, head_dim=16, extra=19,
                q_tile=(4, 4), kv_tile=(2, 8), batch=1)
    _check(case, torch.float32, precision="tf32" if CUDA else "ieee")


def test_forward_accepts_fused_qkv_views():
    qkv = torch.randn(1, 9, 10, 3, 2, 16, device=DEVICE)
    q, k, v = qkv.unbind(dim=3)
    assert not q.is_contiguous()
    kw = dict(kernel_size=(3, 5), stride=(1, 2), backend="triton", q_tile_shape=(4, 4),
              kv_tile_shape=(4, 4))
    out = gna.na2d(q, k, v, **kw)
    out_contig = gna.na2d(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    torch.testing.assert_close(out, out_contig, rtol=0, atol=0)


def test_triton_backend_rejects_float64_and_bad_tiles():
    q = torch.randn(1, 8, 8, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        gna.na2d(q, q, q, 3, backend="triton")
    q = q.float()
    with pytest.raises(ValueError, match="powers of two"):
        gna.na2d(q, q, q, 3, backend="triton", q_tile_shape=(3, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_default_config_fits_shared_memory(dtype, head_dim):
    """Default tiles and stages fit an H100's shared memory for every dtype and head dim (fp32
    at d=128/256 did not before the fitting; the compiler refused to launch)."""
    from gna.triton_backend import H100_SHARED, _forward_shared, _next_pow2

    for shape, window, stride in [((32768,), 2048, 1), ((256, 256), 80, 16),
                                  ((30, 48, 80), (18, 24, 24), 1)]:
        q = torch.empty(1, *shape, 1, head_dim, device="meta", dtype=dtype)
        config = default_config(normalize(None, q, q, q, window, stride), Options())
        need = _forward_shared(config.q_tile, config.kv_tile, _next_pow2(head_dim),
                               q.element_size(), config.num_stages)
        assert need <= H100_SHARED, (shape, dtype, head_dim, config, need)


def test_oversized_user_tiles_raise_with_advice():
    q = torch.empty(1, 64, 64, 1, 256, device="meta", dtype=torch.float32)
    problem = normalize(None, q, q, q, 7)
    with pytest.raises(ValueError, match="shared memory.*pass smaller tiles"):
        default_config(problem, Options(q_tile_shape=(16, 16), kv_tile_shape=(16, 16)))


def test_default_tiles_make_block_sparse_settings_mask_free():
    """With the default tiles, the perfectly block-sparse benchmark settings visit no partial
    KV tile (the kernel's masked loop is empty), per the geometry the kernel reads."""
    settings = [((32768,), 2048, 2048), ((256, 256), (80, 80), (16, 16)),
                ((30, 48, 80), (18, 24, 24), (16, 8, 8))]
    for shape, window, stride in settings:
        q = torch.empty(1, *shape, 1, 128, device="meta", dtype=torch.float16)
        problem = normalize(None, q, q, q, window, stride)
        config = default_config(problem, Options())
        visited, full = problem.geometry.tile_counts(config.q_tile, config.kv_tile)
        assert (visited == full).all(), (shape, window, stride, config)


def _tile_count_case(seed):
    """Layouts several tiles long per axis, so programs see mask-free and masked KV tiles."""
    rng = random.Random(seed)
    ndim = rng.choice([1, 2, 3])
    shape = [rng.randint(*{1: (60, 200), 2: (12, 24), 3: (6, 10)}[ndim]) for _ in range(ndim)]
    dilation = [rng.choice([1, 1, 2]) for _ in shape]
    kernel = [rng.randint(1, n // d) for n, d in zip(shape, dilation)]
    stride = [rng.choice([1, rng.randint(1, k)]) for k in kernel]
    causal = [rng.random() < 0.3 for _ in shape]
    q_tile = _pow2_tiles(rng, ndim, rng.choice([16, 32]))
    kv_tile = _pow2_tiles(rng, ndim, rng.choice([16, 32]))
    return shape, kernel, stride, dilation, causal, q_tile, kv_tile


@pytest.mark.parametrize("seed", range(6))
def test_kernel_tile_counts_equal_simulator(seed):
    """The forward kernel's debug counters (KV tiles each program's loops ran, and how many were
    masked) equal the simulator's per-Q-tile counts, on random problems and tiles: the kernel
    walks exactly the tiles gna.sim (through gna.geometry) says it does."""
    shape, kernel, stride, dilation, causal, q_tile, kv_tile = _tile_count_case(seed)
    q = torch.randn(1, *shape, 1, 16, device=DEVICE, dtype=torch.float16)
    problem = normalize(None, q, q, q, kernel, stride, dilation, causal)
    config = default_config(problem, Options(q_tile_shape=q_tile, kv_tile_shape=kv_tile))
    visited, masked = count_tiles(q, q, q, problem.geometry, config)
    report = gna.sim.simulate_geometry(problem.geometry, q_tile, kv_tile, flat=False)
    case = (shape, kernel, stride, dilation, causal, q_tile, kv_tile)
    assert visited.tolist() == report.tiled.visited.tolist(), case
    assert masked.tolist() == report.tiled.masked.tolist(), case


def test_forward_repeated_calls_reuse_plan():
    """Later calls with the same shapes reuse the launch plan; they must see new data (and a
    fused-qkv view with other strides gets a plan of its own)."""
    case = dict(shape=(6, 12), kernel_size=(3, 5), stride=(2, 2), dilation=(1, 2),
                is_causal=(False, True), heads=2, heads_kv=1, head_dim=16, extra=3,
                q_tile=(4, 4), kv_tile=(2, 8), batch=1)
    for seed in range(3):
        _check(case, torch.float32, seed=seed)
    qkv = torch.randn(1, 6, 12, 4, 16, device=DEVICE)
    q, k, v = qkv.split([2, 1, 1], dim=-2)
    args = (case["kernel_size"], case["stride"], case["dilation"], case["is_causal"])
    out = gna.neighborhood_attention(q, k, v, *args, backend="triton")
    ref = gna.neighborhood_attention(q.double(), k.double(), v.double(), *args,
                                     backend="reference")
    assert ((out.double() - ref).norm() / ref.norm()).item() <= REL_BOUND["fp32"]


# --- GPU only -------------------------------------------------------------------------------

gpu = pytest.mark.gpu  # skipped without a CUDA device (conftest)


@gpu
@pytest.mark.parametrize("seed", range(16))
def test_forward_matches_reference_gpu(seed):
    dtype = [torch.float16, torch.bfloat16, torch.float32][seed % 3]
    _check(_random_case(1000 + seed, small=False), dtype, seed=seed)


@gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_head_dims_gpu(head_dim, dtype):
    case = dict(shape=(12, 20, 24), kernel_size=(5, 7, 9), stride=(2, 3, 4), dilation=(1, 2, 1),
                is_causal=(True, False, False), heads=4, heads_kv=2, head_dim=head_dim, extra=77,
                q_tile=(2, 4, 8) if head_dim < 256 else (1, 4, 8), kv_tile=(2, 4, 8)
                if head_dim < 256 else (1, 4, 8), batch=2)
    _check(case, dtype)


@gpu
def test_forward_repeated_calls_reuse_launch_gpu():
    """Later calls with the same shapes take the cached-launch path; they must see new data."""
    case = dict(shape=(9, 40), kernel_size=(5, 9), stride=(2, 4), dilation=(1, 2),
                is_causal=(False, True), heads=4, heads_kv=2, head_dim=64, extra=5,
                q_tile=(4, 16), kv_tile=(4, 16), batch=2)
    for seed in range(3):
        _check(case, torch.float16, seed=seed)


@gpu
def test_forward_64bit_offsets_gpu():
    """A fused qkv view of 3 x 2^31+ elements: offsets past 2^31 must not wrap."""
    heads, head_dim = 16, 128
    n = (1 << 31) // (heads * head_dim) + 4096
    qkv = torch.empty(1, n, 3, heads, head_dim, device="cuda", dtype=torch.float16)
    qkv.normal_()
    q, k, v = qkv.unbind(dim=2)
    out = gna.na1d(q, k, v, kernel_size=5, backend="triton")
    assert q.numel() > 2**31
    tail = slice(n - 256, n)
    ref = gna.na1d(*(t[:, tail].double().cpu() for t in (q, k, v)), kernel_size=5,
                   backend="reference")
    rel = (out[:, tail][:, 8:].double().cpu() - ref[:, 8:]).norm() / ref[:, 8:].norm()
    assert rel < REL_BOUND[torch.float16], rel


def test_forward_torch_compile_fullgraph():
    """A module using the kernel compiles as one graph (the op hides all host planning)."""
    torch._dynamo.reset()
    kw = {} if CUDA else dict(backend="triton", q_tile_shape=(4, 4), kv_tile_shape=(4, 4))
    module = gna.NeighborhoodAttention2D(32, 2, kernel_size=5, stride=2, **kw).to(DEVICE)
    x = torch.randn(2, 12, 12, 32, device=DEVICE)
    compiled = torch.compile(module, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-4)
    compiled(x).sum().backward()  # autograd through the op compiles too
    assert module.qkv.weight.grad is not None


def _check_cuda_graph(shape, head_dim, **kw):
    """``gna.na3d`` captured in a CUDA graph and replayed on new query values equals an eager
    call on them."""
    q, k, v = (torch.randn(1, *shape, 2, head_dim, device="cuda", dtype=torch.float16)
               for _ in range(3))
    expected = gna.na3d(q, k, v, **kw)  # warm-up: compiles the kernel and caches tables
    graph, out = capture_graph(lambda: gna.na3d(q, k, v, **kw))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, gna.na3d(q, k, v, **kw), rtol=0, atol=0)
    assert not torch.equal(out, expected)


@gpu
def test_forward_cuda_graph_gpu():
    _check_cuda_graph((16, 16, 16), 64, kernel_size=(3, 5, 5), stride=(1, 2, 2),
                      backend="triton")


def test_default_config_uses_saved_tuned_tiles(tmp_path, monkeypatch):
    """Tiles saved by ``gna profile --optimize --save`` (gna.tuned) become the kernels' default
    for that problem on that device; tiles passed by the caller still win."""
    from gna import tuned

    monkeypatch.setenv("GNA_CACHE_DIR", str(tmp_path))
    tuned.forget()
    q = torch.empty(1, 12, 20, 1, 16, device=DEVICE, dtype=torch.float16)
    problem = normalize(None, q, q, q, (5, 7), (1, 2))
    before = default_config(problem, Options())
    assert (before.q_tile, before.kv_tile) != ((2, 8), (4, 4))
    tuned.store(problem.geometry, 16, torch.float16, tuned.device_name(q.device), (2, 8), (4, 4))
    after = default_config(problem, Options())
    assert (after.q_tile, after.kv_tile) == ((2, 8), (4, 4))
    mine = default_config(problem, Options(q_tile_shape=(4, 4), kv_tile_shape=(2, 8)))
    assert (mine.q_tile, mine.kv_tile) == ((4, 4), (2, 8))
    tuned.forget()


def test_api_call_memo_sees_newly_tuned_tiles(tmp_path, monkeypatch):
    """The API memoizes each call's plan (tiles included); saving tuned tiles for the problem
    re-plans the next call."""
    from gna import tuned

    monkeypatch.setenv("GNA_CACHE_DIR", str(tmp_path))
    tuned.forget()
    used = []
    real = triton_backend.launch_forward

    def spy(q, k, v, ek, ev, geo, scale, config, *args, **kw):
        used.append((config.q_tile, config.kv_tile))
        return real(q, k, v, ek, ev, geo, scale, config, *args, **kw)

    monkeypatch.setattr(triton_backend, "launch_forward", spy)
    q = torch.randn(1, 12, 20, 1, 16, device=DEVICE, dtype=torch.float16)
    kw = dict(kernel_size=(5, 7), stride=(1, 2), backend="triton")
    first = gna.na2d(q, q, q, **kw)
    gna.na2d(q, q, q, **kw)
    assert used[0] == used[1] != ((2, 8), (4, 4))
    problem = normalize(None, q, q, q, (5, 7), (1, 2))
    tuned.store(problem.geometry, 16, torch.float16, tuned.device_name(q.device), (2, 8), (4, 4))
    again = gna.na2d(q, q, q, **kw)
    assert used[2] == ((2, 8), (4, 4))
    torch.testing.assert_close(again, first, rtol=2e-3, atol=2e-3)
    tuned.forget()


# --- The Gluon block-sparse forward (Hopper) ------------------------------------------------
# Perfectly block-sparse problems (every visited KV tile mask-free) with 128-token tiles.
GLUON_CASES = {
    "1d": ((4096,), (512,), (512,)),
    "2d": ((64, 64), (48, 48), (16, 16)),
    "3d": ((8, 16, 32), (4, 8, 16), (4, 8, 16)),
    "3d-dense": ((16, 16, 16), (16, 16, 16), (1, 1, 1)),
}


def _gluon_config(q, k, v, window, stride, dilation=1, **options):
    problem = normalize(None, q, k, v, window, stride, dilation)
    config = dataclasses.replace(default_config(problem, Options(**options)),
                                 gluon_block_sparse=True)
    return problem, config


def test_gluon_forward_eligibility_rules():
    """Which calls the Gluon kernel takes, decided before any GPU is needed: perfectly
    block-sparse problems with 128-token tiles qualify (and then need a Hopper GPU); partial
    tiles, dilation, additional keys, other dtypes and head dims do not."""
    ineligible = triton_backend.gluon_block_sparse_ineligible

    def reason(shape, window, stride, dilation=1, dtype=torch.float16, head_dim=128,
               extra=False, **options):
        q = torch.zeros(1, *shape, 2, head_dim, dtype=dtype)
        problem, config = _gluon_config(q, q, q, window, stride, dilation, **options)
        return ineligible(q, q, q, q if extra else None, problem.geometry, config)

    for shape, window, stride in GLUON_CASES.values():
        assert reason(shape, window, stride) == "needs a Hopper GPU (sm_90)"
        assert reason(shape, window, stride, head_dim=64) == "needs a Hopper GPU (sm_90)"
    assert reason((4096,), (512,), (1,)) == "some Q tiles visit partially masked KV tiles"
    assert reason((4096,), (512,), (512,), dilation=(2,)) == "dilation"
    assert reason((4096,), (512,), (512,), extra=True) == "additional keys/values"
    assert reason((4096,), (512,), (512,), dtype=torch.float32).startswith("needs fp16")
    assert reason((4096,), (512,), (512,), head_dim=32).startswith("needs head_dim")
    assert reason((4096,), (512,), (512,), q_tile_shape=(64,)).startswith("needs 128-token")
    q = torch.zeros(1, 4096, 2, 128, dtype=torch.float16)
    problem, config = _gluon_config(q, q, q, (512,), (512,))
    config = dataclasses.replace(config, gluon_block_sparse=False)
    assert ineligible(q, q, q, None, problem.geometry, config).startswith("not requested")


def _gluon_run(q, k, v, window, stride):
    """The forward through the Gluon kernel (checked to be taken) and through the Triton
    kernel, on the same inputs."""
    problem, config = _gluon_config(q, k, v, window, stride)
    why = triton_backend.gluon_block_sparse_ineligible(q, k, v, None, problem.geometry, config)
    assert why is None, why
    plans = {}
    gluon = launch_forward(q, k, v, None, None, problem.geometry, problem.scale, config,
                           plans=plans)
    assert next(iter(plans.values())).gluon is not None
    tri = launch_forward(q, k, v, None, None, problem.geometry, problem.scale,
                         dataclasses.replace(config, gluon_block_sparse=False), plans={})
    return gluon, tri


@gpu
@pytest.mark.hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(GLUON_CASES))
def test_gluon_forward_matches_reference_gpu(case, dtype, head_dim):
    """Two batches, GQA (4 query heads on 2 KV heads), against the float64 reference."""
    shape, window, stride = GLUON_CASES[case]
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, *shape, 4, head_dim, generator=g)
    k, v = (torch.randn(2, *shape, 2, head_dim, generator=g) for _ in range(2))
    (out, lse), _ = _gluon_run(*(t.to("cuda", dtype) for t in (q, k, v)), window, stride)
    ref, ref_lse = gna.neighborhood_attention(
        *(t.double() for t in (q, k, v)), window, stride, return_lse=True, backend="reference")
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel <= REL_BOUND[dtype], f"{case} {dtype} d={head_dim}: rel err {rel:.2e}"
    assert (lse.double().cpu() - ref_lse).abs().max().item() <= LSE_BOUND[dtype]


@gpu
@pytest.mark.hopper
def test_gluon_forward_equals_triton_kernel_gpu():
    """Same arithmetic in the same order as the Triton kernel: bit-identical outputs and
    LSE (measured on every benchmark problem), here on a fused qkv view (strided heads)."""
    g = torch.Generator(device="cuda").manual_seed(8)
    qkv = torch.randn(1, 64, 64, 3 * 4, 128, device="cuda", dtype=torch.float16, generator=g)
    q, k, v = qkv.split([4, 4, 4], dim=-2)
    (out, lse), (tri, tri_lse) = _gluon_run(q, k, v, (48, 48), (16, 16))
    assert torch.equal(out, tri)
    assert torch.equal(lse, tri_lse)


@gpu
@pytest.mark.hopper
def test_gluon_forward_cuda_graph_gpu():
    _check_cuda_graph((8, 16, 32), 128, kernel_size=(4, 8, 16), stride=(4, 8, 16),
                      backend="triton")


@gpu
@pytest.mark.hopper
def test_gluon_forward_64bit_offsets_gpu():
    """A fused qkv view of 3 x 2^31+ elements through the Gluon kernel: the output offsets
    past 2^31 must not wrap."""
    heads, head_dim = 16, 128
    n = (1 << 31) // (heads * head_dim) + 4096  # a multiple of 128
    qkv = torch.empty(1, n, 3, heads, head_dim, device="cuda", dtype=torch.float16)
    qkv.normal_()
    q, k, v = qkv.unbind(dim=2)
    (out, _), _ = _gluon_run(q, k, v, (128,), (128,))
    tail = slice(n - 256, n)
    ref = gna.na1d(*(t[:, tail].double().cpu() for t in (q, k, v)), kernel_size=128,
                   stride=128, backend="reference")
    rel = (out[:, tail].double().cpu() - ref).norm() / ref.norm()
    assert rel < REL_BOUND[torch.float16], rel


@gpu
@pytest.mark.hopper
def test_gluon_forward_trains_gpu():
    """Under autograd the Gluon forward's LSE feeds the backward kernels: gradients against
    the float64 reference."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2048, 2, 128, generator=g) for _ in range(3))
    grad = torch.randn(1, 2048, 2, 128, generator=g)
    leaves = [t.to("cuda", torch.float16).requires_grad_() for t in (q, k, v)]
    problem, config = _gluon_config(*leaves, (256,), (256,))
    assert triton_backend.gluon_block_sparse_ineligible(
        *leaves, None, problem.geometry, config) is None
    gna.na1d(*leaves, kernel_size=256, stride=256, backend="triton").backward(
        grad.to("cuda", torch.float16))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    gna.na1d(*ref_leaves, kernel_size=256, stride=256, backend="reference").backward(
        grad.double())
    for name, got, ref in zip("qkv", leaves, ref_leaves):
        rel = ((got.grad.double().cpu() - ref.grad).norm() / ref.grad.norm()).item()
        assert rel <= 1e-2, f"d{name}: rel err {rel:.2e}"


@gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", ["gluon", "triton-host-descriptors"])
def test_relaunch_takes_each_calls_tensors_gpu(case):
    """A plan relaunches its compiled kernel with tensor maps cached by address
    (``_Relaunch``): calls on other tensors, and on the same tensors refilled in place, give
    each call's own result (equal to a freshly planned launch's)."""
    stride = 256 if case == "gluon" else 1
    x = torch.empty(1, 2048, 2, 128, device="cuda", dtype=torch.float16)
    problem, config = _gluon_config(x, x, x, 256, stride)
    config = dataclasses.replace(config, gluon_block_sparse=case == "gluon")
    plans = {}

    def run(q, k, v, plans):
        return launch_forward(q, k, v, None, None, problem.geometry, problem.scale, config,
                              plans=plans)

    sets = [[torch.randn(1, 2048, 2, 128, device="cuda", dtype=torch.float16)
             for _ in range(3)] for _ in range(3)]
    for q, k, v in sets + sets[::-1]:
        out, lse = run(q, k, v, plans)
        fresh, fresh_lse = run(q, k, v, {})
        assert torch.equal(out, fresh) and torch.equal(lse, fresh_lse)
    (plan,) = plans.values()
    assert plan.compiled[1] is not None, "the relaunch path was not taken"
    q, k, v = sets[0]
    for t, other in zip((q, k, v), sets[1]):
        t.copy_(other)
    out, _ = run(q, k, v, plans)
    assert torch.equal(out, run(*sets[1], {})[0])
