"""The reference backend against the independent brute-force oracle (``tests/oracle.py``).

Every case is built from its own seed, so a failure reproduces from the test id alone. Bounds:

* float64 inputs: out, lse and every gradient within ``1e-10`` absolute of the float64 oracle
  (observed ~1e-15; the reference computes in float64).
* float32 inputs: relative norm error ``<= 2e-5`` for out/lse/gradients (observed ~1e-7).
* float16: ``<= 2e-3`` (the fp16 output/gradients are rounded, half-ulp = 2^-11 ~ 4.9e-4).
* bfloat16: ``<= 1.2e-2`` (half-ulp = 2^-8 ~ 3.9e-3).

Low-precision cases feed the oracle the very same (rounded) inputs, upcast to float64, so
the bounds measure the backend's arithmetic and the final rounding only.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import pytest
import torch

import gna
import gna.api
import oracle
from oracle import assert_close, assert_rel_norm

F64_ATOL = 1e-10
REL_BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    batch: int = 1
    heads: int = 2
    heads_kv: int = 1
    head_dim: int = 8
    num_extra: int = 0
    scale: float | None = None
    seed: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return (f"Case(shape={self.shape}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, batch={self.batch}, "
                f"heads={self.heads}, heads_kv={self.heads_kv}, head_dim={self.head_dim}, "
                f"num_extra={self.num_extra}, scale={self.scale}, seed={self.seed})")

    def na_kwargs(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                    is_causal=self.is_causal, scale=self.scale)


def make_inputs(case: Case, dtype=torch.float64):
    """Seeded ``q, k, v, extra_k, extra_v`` (extra ones None without additional KV)."""
    gen = torch.Generator().manual_seed(case.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q = randn(case.batch, *case.shape, case.heads, case.head_dim)
    k = randn(case.batch, *case.shape, case.heads_kv, case.head_dim)
    v = randn(case.batch, *case.shape, case.heads_kv, case.head_dim)
    extra_k = extra_v = None
    if case.num_extra:
        extra_k = randn(case.batch, case.num_extra, case.heads_kv, case.head_dim)
        extra_v = randn(case.batch, case.num_extra, case.heads_kv, case.head_dim)
    return q, k, v, extra_k, extra_v


def random_case(seed: int, ndim: int, max_tokens: int, extended: bool = False) -> Case:
    """A random valid case: odd/even kernels, strides 1..kernel, dilation 1..3, any causal
    flags, GQA/MQA, additional KV and custom scale, at most ``max_tokens`` tokens."""
    rng = random.Random(seed * 7919 + ndim)
    max_kernel = ({1: 17, 2: 8, 3: 5} if extended else {1: 9, 2: 5, 3: 4})[ndim]
    max_pad = 11 if extended else 5
    while True:
        kernel = tuple(rng.randint(1, max_kernel) for _ in range(ndim))
        dilation = tuple(rng.choice([1, 1, 2, 3]) for _ in range(ndim))
        shape = tuple(k * d + rng.randint(0, max_pad) for k, d in zip(kernel, dilation))
        if math.prod(shape) <= max_tokens:
            break
    stride = tuple(rng.randint(1, k) for k in kernel)
    causal = tuple(rng.random() < 0.4 for _ in range(ndim))
    heads_kv = rng.choice([1, 1, 2])
    heads = heads_kv * rng.choice([1, 2, 3])
    return Case(
        shape=shape, kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal,
        batch=rng.choice([1, 2]), heads=heads, heads_kv=heads_kv,
        head_dim=rng.choice([4, 8, 16]), num_extra=rng.choice([0, 0, 1, 3]),
        scale=rng.choice([None, rng.uniform(0.05, 1.5)]), seed=seed,
    )


def run_both(case: Case, dtype=torch.float64):
    """Forward + backward of the reference and of the oracle on identical inputs.

    The loss is ``<out, g_out> + <lse, g_lse>`` with random upstream gradients, so gradients
    flowing through the LSE are checked too. Returns two dicts name -> tensor.
    """
    inputs = make_inputs(case, dtype)
    names = ["q", "k", "v", "additional_keys", "additional_values"]
    results = []
    for impl in ("reference", "oracle"):
        leaves = [None if t is None else t.clone().requires_grad_(True) for t in inputs]
        q, k, v, ek, ev = leaves
        if impl == "reference":
            out, lse = gna.neighborhood_attention(
                q, k, v, **case.na_kwargs(), additional_keys=ek, additional_values=ev,
                return_lse=True, backend="reference")
        else:
            out, lse = oracle.neighborhood_attention(
                q, k, v, **case.na_kwargs(), additional_keys=ek, additional_values=ev)
        gen = torch.Generator().manual_seed(case.seed + 1)
        g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
        g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
        loss = ((out.to(torch.float64) * g_out.to(torch.float64)).sum()
                + (lse.to(torch.float64) * g_lse).sum())
        present = [(n, t) for n, t in zip(names, leaves) if t is not None]
        grads = torch.autograd.grad(loss, [t for _, t in present])
        res = {"out": out, "lse": lse}
        res.update({f"grad_{n}": g for (n, _), g in zip(present, grads)})
        results.append(res)
    return results


def check_float64(case: Case) -> None:
    ref, expected = run_both(case, torch.float64)
    assert ref["out"].dtype == torch.float64 and ref["lse"].dtype == torch.float64, case
    assert set(ref) == set(expected)
    for name in expected:
        assert_close(ref[name], expected[name], atol=F64_ATOL, name=name, case=case)


# ------------------------------------------------------------------- random sweeps, float64

QUICK = {1: 60, 2: 60, 3: 50}
EXTENDED = {1: 1000, 2: 800, 3: 500}
MAX_TOKENS = {"quick": {1: 64, 2: 200, 3: 300}, "extended": {1: 400, 2: 1000, 3: 1200}}


def _seeds(counts, first_seed=0):
    return [pytest.param(ndim, seed, id=f"{ndim}d-seed{seed}")
            for ndim, n in counts.items() for seed in range(first_seed, first_seed + n)]


@pytest.mark.parametrize("ndim,seed", _seeds(QUICK))
def test_random_float64(ndim, seed):
    check_float64(random_case(seed, ndim, MAX_TOKENS["quick"][ndim]))


@pytest.mark.extended
@pytest.mark.parametrize("ndim,seed", _seeds(EXTENDED, first_seed=1000))
def test_random_float64_extended(ndim, seed):
    check_float64(random_case(seed, ndim, MAX_TOKENS["extended"][ndim], extended=True))


# --------------------------------------------------- systematic sweeps (every valid stride)

def _sweep_1d():
    for kernel in range(1, 7):
        for stride in range(1, kernel + 1):
            for dilation in (1, 2, 3):
                for causal in (False, True):
                    yield kernel, stride, dilation, causal


@pytest.mark.parametrize("kernel,stride,dilation,causal", list(_sweep_1d()))
def test_1d_every_stride(kernel, stride, dilation, causal):
    length = kernel * dilation + 3  # not a multiple of the stride or dilation in general
    seed = 1000 * kernel + 100 * stride + 10 * dilation + causal
    check_float64(Case((length,), (kernel,), (stride,), (dilation,), (causal,), heads=2,
                       heads_kv=1, head_dim=4, seed=seed))


@pytest.mark.parametrize("stride", list(itertools.product(range(1, 4), range(1, 5))))
@pytest.mark.parametrize("dilation", [(1, 1), (2, 3)])
def test_2d_every_stride(stride, dilation):
    kernel = (3, 4)  # one odd, one even
    shape = (kernel[0] * dilation[0] + 2, kernel[1] * dilation[1] + 1)
    seed = 100 * stride[0] + 10 * stride[1] + dilation[0]
    check_float64(Case(shape, kernel, stride, dilation, (False, False), heads=2, heads_kv=2,
                       head_dim=4, seed=seed))


@pytest.mark.parametrize("causal", list(itertools.product([False, True], repeat=3)),
                         ids=lambda c: "".join("C" if x else "n" for x in c))
def test_3d_every_causal_combination(causal):
    """All 8 combinations of per-dimension causal flags in 3-D, with strides and dilation."""
    seed = sum(b << i for i, b in enumerate(causal))
    case = Case((6, 7, 5), (3, 2, 4), (2, 2, 3), (2, 3, 1), causal, batch=2, heads=4,
                heads_kv=2, head_dim=8, num_extra=2, scale=0.3, seed=seed)
    check_float64(case)


@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize("num_extra", [0, 5])
def test_gqa_mqa_additional_kv(heads, heads_kv, num_extra):
    case = Case((7, 6), (3, 4), (1, 2), (2, 1), (False, True), batch=2, heads=heads,
                heads_kv=heads_kv, head_dim=8, num_extra=num_extra, scale=0.9,
                seed=heads * 10 + heads_kv + num_extra)
    check_float64(case)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.37, 4.0])
def test_custom_scale(scale):
    """Including ``scale=0.0`` (uniform weights): 0.0 is a value, not 'use the default'."""
    case = Case((11,), (5,), (2,), (1,), (False,), heads=2, heads_kv=1, head_dim=8,
                num_extra=2, scale=scale, seed=int(scale * 100))
    check_float64(case)
    if scale == 0.0:
        # Uniform weights over each query's 5 window keys and the 2 extra keys: lse = log(7).
        q, k, v, ek, ev = make_inputs(case)
        _, lse = gna.na1d(q, k, v, 5, 2, scale=0.0, additional_keys=ek, additional_values=ev,
                          return_lse=True, backend="reference")
        assert_close(lse, torch.full_like(lse, math.log(7)), atol=1e-12, name="lse", case=case)


@pytest.mark.parametrize("chunk_elements", [1, 60_000])
@pytest.mark.parametrize("case", [
    Case((150,), (9,), (2,), (2,), (False,), 2, 4, 2, 8, 3, 0.5, seed=40),
    Case((20, 13), (5, 4), (3, 1), (1, 2), (True, False), 2, 3, 1, 8, 2, None, seed=41),
    Case((13, 6, 5), (3, 2, 4), (1, 2, 4), (2, 1, 1), (False, True, False), 1, 2, 2, 8, 1, 0.8,
         seed=42),
], ids=["1d", "2d", "3d"])
def test_chunked_reference(monkeypatch, chunk_elements, case):
    """The reference splits work into chunks of tile rows along the first axis to bound
    memory; force many chunks (one tile row each, or several with a ragged last chunk) and
    check the same results, for neighborhood and dense attention."""
    import gna.reference

    monkeypatch.setattr(gna.reference, "_CHUNK_ELEMENTS", chunk_elements)
    check_float64(case)
    q, k, v, ek, ev = make_inputs(case)
    out, lse = gna.attention(q, k, v, scale=case.scale, additional_keys=ek, additional_values=ev,
                             return_lse=True)
    exp_out, exp_lse = oracle.masked_attention(q, k, v, None, case.scale, ek, ev)
    assert_close(out, exp_out, atol=F64_ATOL, name="chunked dense out", case=case)
    assert_close(lse, exp_lse, atol=F64_ATOL, name="chunked dense lse", case=case)


# ------------------------------------------------------------- float32 / float16 / bfloat16

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("ndim,seed", [(1, 0), (1, 1), (2, 2), (2, 3), (3, 4), (3, 5)])
def test_low_precision(dtype, ndim, seed):
    case = random_case(500 + seed, ndim, MAX_TOKENS["quick"][ndim])
    ref, expected = run_both(case, dtype)
    assert ref["out"].dtype == dtype, case
    assert ref["lse"].dtype == torch.float32, (ref["lse"].dtype, case)
    for name in expected:
        if name.startswith("grad_"):
            assert ref[name].dtype == dtype, (name, ref[name].dtype, case)
        assert_rel_norm(ref[name], expected[name], bound=REL_BOUND[dtype],
                        name=f"{name} ({dtype})", case=case)


@pytest.mark.extended
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("seed", range(60))
def test_low_precision_extended(dtype, ndim, seed):
    case = random_case(600 + seed, ndim, MAX_TOKENS["extended"][ndim], extended=True)
    ref, expected = run_both(case, dtype)
    for name in expected:
        assert_rel_norm(ref[name], expected[name], bound=REL_BOUND[dtype],
                        name=f"{name} ({dtype})", case=case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense-routed"])
def test_output_dtype(dtype, dense):
    shape = (6, 5)
    q = torch.randn(1, *shape, 2, 8).to(dtype)
    kernel = shape if dense else (3, 3)
    out, lse = gna.na2d(q, q, q, kernel, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == q.shape[:-1]


# ------------------------------------------------------------------------ special settings

def _block_axis_mask(length: int, window: int, causal: bool) -> torch.Tensor:
    """Blocked attention built independently: queries of block ``b`` see block ``b``; the
    trailing partial block (length not a multiple of the window) sees the last ``window``
    keys. Causal: the same, cut at the query."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    full_blocks = length // window
    for x in range(length):
        b = x // window
        lo, hi = (b * window, (b + 1) * window) if b < full_blocks else (length - window, length)
        if causal:
            hi = x + 1
        mask[x, lo:hi] = True
    return mask


@pytest.mark.parametrize("shape,window,causal", [
    ((12,), (4,), (False,)), ((14,), (4,), (False,)), ((14,), (4,), (True,)),
    ((8, 9), (4, 3), (False, False)), ((10, 9), (4, 2), (False, True)),
    ((4, 6, 6), (2, 3, 2), (False, False, False)), ((5, 6, 7), (2, 3, 3), (True, False, False)),
])
def test_blocked_attention(shape, window, causal):
    """stride == kernel_size is blocked (window) attention."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for n, w, c in zip(shape, window, causal):
        m = _block_axis_mask(n, w, c)
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
            mask.shape[0] * n, mask.shape[0] * n)
    case = Case(shape, window, window, (1,) * len(shape), causal, heads=2, heads_kv=1,
                head_dim=8, seed=len(shape))
    q, k, v, _, _ = make_inputs(case)
    out, lse = gna.neighborhood_attention(q, k, v, window, stride=window, is_causal=causal,
                                          return_lse=True, backend="reference")
    exp_out, exp_lse = oracle.masked_attention(q, k, v, mask)
    assert_close(out, exp_out, atol=F64_ATOL, name="out", case=case)
    assert_close(lse, exp_lse, atol=F64_ATOL, name="lse", case=case)
    # The oracle's reading of the rule agrees with the block construction.
    assert torch.equal(oracle.dense_mask(shape, window, window, 1, causal), mask)


@pytest.mark.parametrize("shape,stride", [((9,), 1), ((9,), 4), ((5, 6), (2, 3)),
                                          ((3, 4, 5), (1, 4, 5))])
@pytest.mark.parametrize("extra", [0, 3])
def test_full_window_equals_dense(shape, stride, extra):
    """kernel_size == input size, not causal: every query sees every key, any stride."""
    case = Case(shape, shape, oracle.as_tuple(stride, len(shape)), (1,) * len(shape),
                (False,) * len(shape), batch=2, heads=4, heads_kv=2, head_dim=8,
                num_extra=extra, scale=0.6, seed=len(shape) + extra)
    q, k, v, ek, ev = make_inputs(case)
    out, lse = gna.neighborhood_attention(q, k, v, shape, stride, scale=0.6, additional_keys=ek,
                                          additional_values=ev, return_lse=True,
                                          backend="reference")
    dense_out, dense_lse = gna.attention(q, k, v, scale=0.6, additional_keys=ek,
                                         additional_values=ev, return_lse=True)
    exp_out, exp_lse = oracle.masked_attention(q, k, v, None, 0.6, ek, ev)
    assert_close(out, dense_out, atol=F64_ATOL, name="out vs gna.attention", case=case)
    assert_close(lse, dense_lse, atol=F64_ATOL, name="lse vs gna.attention", case=case)
    assert_close(dense_out, exp_out, atol=F64_ATOL, name="gna.attention out", case=case)
    assert_close(dense_lse, exp_lse, atol=F64_ATOL, name="gna.attention lse", case=case)


@pytest.mark.parametrize("fn,shape", [(gna.na1d, (10,)), (gna.na2d, (4, 5)),
                                      (gna.na3d, (3, 4, 2))], ids=["na1d", "na2d", "na3d"])
def test_dense_routing(monkeypatch, fn, shape):
    """Without a forced backend, kernel == size and no causal goes to gna.attention; with a
    causal dimension it does not; forcing the reference skips the routing."""
    calls = []
    real_attention = gna.api.attention

    def spy(*args, **kwargs):
        calls.append(args)
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(gna.api, "attention", spy)
    case = Case(shape, shape, (1,) * len(shape), (1,) * len(shape), (False,) * len(shape),
                heads=2, heads_kv=1, head_dim=8, num_extra=2, scale=0.5, seed=3)
    q, k, v, ek, ev = make_inputs(case)
    out, lse = fn(q, k, v, shape, scale=0.5, additional_keys=ek, additional_values=ev,
                  return_lse=True)
    assert len(calls) == 1, "dense setting was not routed to gna.attention"
    exp_out, exp_lse = oracle.masked_attention(q, k, v, None, 0.5, ek, ev)
    assert_close(out, exp_out, atol=F64_ATOL, name="routed out", case=case)
    assert_close(lse, exp_lse, atol=F64_ATOL, name="routed lse", case=case)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]

    # Not routed: the last dimension causal.
    causal = (False,) * (len(shape) - 1) + (True,)
    out_c = fn(q, k, v, shape, is_causal=causal, scale=0.5)
    assert len(calls) == 1, "a causal setting must not be routed to dense attention"
    exp_c, _ = oracle.neighborhood_attention(q, k, v, shape, 1, 1, causal, scale=0.5)
    assert_close(out_c, exp_c, atol=F64_ATOL, name="causal full-window out", case=case)

    # Forced reference backend: no routing, same numbers.
    out_r = fn(q, k, v, shape, scale=0.5, additional_keys=ek, additional_values=ev,
               backend="reference")
    assert len(calls) == 1
    assert_close(out_r, exp_out, atol=F64_ATOL, name="reference out", case=case)


# -------------------------------------------------------------------- non-contiguous inputs

@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_noncontiguous_fused_qkv(ndim):
    """q, k, v unbound from a fused ``[B, *S, 3, H, D]`` tensor (what modules do) give the
    same outputs and gradients as contiguous copies."""
    shape = {1: (13,), 2: (7, 6), 3: (6, 5, 4)}[ndim]
    kw = dict(kernel_size=3, stride=2, dilation=(2,) + (1,) * (ndim - 1),
              is_causal=(True,) + (False,) * (ndim - 1), scale=0.4, backend="reference",
              return_lse=True)
    gen = torch.Generator().manual_seed(ndim)
    fused = torch.randn(2, *shape, 3, 4, 8, generator=gen, dtype=torch.float64,
                        requires_grad=True)
    q, k, v = fused.unbind(dim=-3)
    assert not q.is_contiguous()
    out, lse = gna.neighborhood_attention(q, k, v, **kw)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad_fused,) = torch.autograd.grad((out * g).sum() + lse.sum(), [fused])

    copies = [t.detach().contiguous().requires_grad_(True) for t in (q, k, v)]
    out_c, lse_c = gna.neighborhood_attention(*copies, **kw)
    grads_c = torch.autograd.grad((out_c * g).sum() + lse_c.sum(), copies)
    case = f"fused qkv, ndim={ndim}, {kw}"
    assert_close(out, out_c, atol=0, name="out", case=case)
    assert_close(lse, lse_c, atol=0, name="lse", case=case)
    assert_close(grad_fused, torch.stack(grads_c, dim=-3), atol=0, name="grad", case=case)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_noncontiguous_permuted_views(ndim):
    """Heads-first storage permuted to heads-last, spatial transposes, strided slices, and
    additional KV as a permuted view."""
    shape = {1: (12,), 2: (6, 7), 3: (4, 5, 3)}[ndim]
    gen = torch.Generator().manual_seed(10 + ndim)

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    # q: stored [B, H, *S, D], viewed heads-last.
    q = rand(2, 4, *shape, 8).movedim(1, -2)
    # k: spatial axes stored reversed, then transposed back (for 1-D: a strided slice).
    if ndim == 1:
        k = rand(2, 2 * shape[0], 2, 8)[:, ::2]
    else:
        k = rand(2, *shape[::-1], 2, 8).permute(0, *range(ndim, 0, -1), ndim + 1, ndim + 2)
    # v: head_dim stored before heads.
    v = rand(2, *shape, 8, 2).transpose(-1, -2)
    ek = rand(2, 2, 8, 3).permute(0, 3, 1, 2)  # stored [B, Hkv, D, E]
    ev = rand(2, 2, 3, 8).transpose(1, 2)  # stored [B, Hkv, E, D]
    views = [q, k, v, ek, ev]
    assert tuple(k.shape) == (2, *shape, 2, 8)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    assert not ek.is_contiguous() and not ev.is_contiguous()
    kw = dict(kernel_size=2, stride=(1,) + (2,) * (ndim - 1), is_causal=False,
              backend="reference", return_lse=True)

    leaves = [t.detach().requires_grad_(True) for t in views]
    copies = [t.detach().contiguous().requires_grad_(True) for t in views]
    results = []
    for ts in (leaves, copies):
        out, lse = gna.neighborhood_attention(ts[0], ts[1], ts[2], additional_keys=ts[3],
                                              additional_values=ts[4], **kw)
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        grads = torch.autograd.grad((out * g).sum() + lse.sum(), ts)
        results.append((out, lse, *grads))
    case = f"permuted views, ndim={ndim}"
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "d_extra_k", "d_extra_v"], *results):
        assert_close(a, b, atol=0, name=name, case=case)
    exp_out, exp_lse = oracle.neighborhood_attention(*copies[:3], 2, kw["stride"],
                                                     additional_keys=copies[3],
                                                     additional_values=copies[4])
    assert_close(results[0][0], exp_out, atol=F64_ATOL, name="out vs oracle", case=case)


# ------------------------------------------------------------------------------- wrappers

@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_wrappers_match_generic(ndim):
    fn = {1: gna.na1d, 2: gna.na2d, 3: gna.na3d}[ndim]
    case = random_case(900 + ndim, ndim, 200)
    q, k, v, ek, ev = make_inputs(case)
    for backend in ("reference", None):
        kw = dict(scale=case.scale, additional_keys=ek, additional_values=ev, return_lse=True,
                  backend=backend)
        out, lse = fn(q, k, v, case.kernel_size, case.stride, case.dilation, case.is_causal,
                      **kw)
        g_out, g_lse = gna.neighborhood_attention(q, k, v, case.kernel_size, case.stride,
                                                  case.dilation, case.is_causal, **kw)
        assert torch.equal(out, g_out) and torch.equal(lse, g_lse), case
    # Scalars broadcast to every dimension.
    k0 = min(case.shape) // max(case.dilation)
    out = fn(q, k, v, k0, 1, 1, False, backend="reference")
    expected = gna.neighborhood_attention(q, k, v, (k0,) * ndim, (1,) * ndim, (1,) * ndim,
                                          (False,) * ndim, backend="reference")
    assert torch.equal(out, expected)
    exp_oracle, _ = oracle.neighborhood_attention(q, k, v, k0)
    assert_close(out, exp_oracle, atol=F64_ATOL, name="broadcast scalars", case=case)
