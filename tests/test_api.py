"""Public API beyond the GNA function itself: merge_attentions, dense attention, modules.

float64 bounds: ``1e-10`` absolute against the oracle (observed ~1e-15).
"""

from __future__ import annotations

import pytest
import torch

import gna
import oracle
from oracle import assert_close

ATOL = 1e-10


def randn(gen, *shape, requires_grad=False):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)


# ---------------------------------------------------------------------- merge_attentions

@pytest.mark.parametrize("shape,kernel,stride,dilation,causal", [
    ((12,), 5, 2, 2, True),
    ((7, 8), (3, 4), (1, 2), (2, 1), (False, True)),
    ((4, 5, 6), (2, 3, 3), (2, 1, 3), (1, 1, 2), (True, False, False)),
])
def test_merge_neighborhood_and_additional_kv(shape, kernel, stride, dilation, causal):
    """GNA over the layout merged with dense attention over the extra tokens equals the
    single call with additional_keys/values, in value and in every gradient."""
    gen = torch.Generator().manual_seed(len(shape))
    q = randn(gen, 2, *shape, 4, 8, requires_grad=True)
    k = randn(gen, 2, *shape, 2, 8, requires_grad=True)
    v = randn(gen, 2, *shape, 2, 8, requires_grad=True)
    ek = randn(gen, 2, 5, 2, 8, requires_grad=True)
    ev = randn(gen, 2, 5, 2, 8, requires_grad=True)
    leaves = [q, k, v, ek, ev]
    kw = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal, scale=0.7)
    g = randn(gen, 2, *shape, 4, 8)
    g_lse = randn(gen, 2, *shape, 4)

    joint, joint_lse = gna.neighborhood_attention(q, k, v, **kw, additional_keys=ek,
                                                  additional_values=ev, return_lse=True,
                                                  backend="reference")
    joint_grads = torch.autograd.grad((joint * g).sum() + (joint_lse * g_lse).sum(), leaves)

    local, local_lse = gna.neighborhood_attention(q, k, v, **kw, return_lse=True,
                                                  backend="reference")
    # Dense over the extra tokens only; spatial dims are flattened, so give them as 1 x E.
    ext_shape = (2,) + (1,) * (len(shape) - 1) + (5, 2, 8)
    glob, glob_lse = gna.attention(q, ek.reshape(ext_shape), ev.reshape(ext_shape), scale=0.7,
                                   return_lse=True)
    merged, merged_lse = gna.merge_attentions([local, glob], [local_lse, glob_lse])
    merged_grads = torch.autograd.grad((merged * g).sum() + (merged_lse * g_lse).sum(), leaves)

    case = f"shape={shape}, {kw}"
    assert merged.dtype == torch.float64 and merged.shape == q.shape
    assert_close(merged, joint, atol=ATOL, name="merged out", case=case)
    assert_close(merged_lse, joint_lse, atol=ATOL, name="merged lse", case=case)
    for name, a, b in zip(["dq", "dk", "dv", "d_extra_k", "d_extra_v"], merged_grads,
                          joint_grads):
        assert_close(a, b, atol=ATOL, name=name, case=case)
    exp, exp_lse = oracle.neighborhood_attention(q, k, v, **kw, additional_keys=ek,
                                                 additional_values=ev)
    assert_close(merged, exp, atol=ATOL, name="merged vs oracle", case=case)


def test_merge_three_parts_and_permutation():
    """Splitting a dense key set into three disjoint parts and merging in any order."""
    gen = torch.Generator().manual_seed(3)
    q = randn(gen, 1, 6, 2, 4)
    k = randn(gen, 1, 9, 2, 4)
    v = randn(gen, 1, 9, 2, 4)
    parts = [gna.attention(q, k[:, s], v[:, s], return_lse=True)
             for s in (slice(0, 2), slice(2, 7), slice(7, 9))]
    exp, exp_lse = oracle.masked_attention(q, k, v)
    for order in ([0, 1, 2], [2, 0, 1]):
        out, lse = gna.merge_attentions([parts[i][0] for i in order], [parts[i][1] for i in order])
        assert_close(out, exp, atol=ATOL, name="out", case=order)
        assert_close(lse, exp_lse, atol=ATOL, name="lse", case=order)
    out, lse = gna.merge_attentions([parts[0][0]], [parts[0][1]])
    assert torch.equal(out, parts[0][0]) and torch.equal(lse, parts[0][1])


def test_merge_gradcheck():
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(randn(gen, *shape, requires_grad=True)
                   for shape in [(1, 3, 2, 2), (1, 3, 2, 2), (1, 3, 2), (1, 3, 2)])

    def fn(o1, o2, l1, l2):
        return gna.merge_attentions([o1, o2], [l1, l2])

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_merge_low_precision(dtype):
    gen = torch.Generator().manual_seed(1)
    q = randn(gen, 1, 10, 2, 8).to(dtype)
    k = randn(gen, 1, 10, 1, 8).to(dtype)
    v = randn(gen, 1, 10, 1, 8).to(dtype)
    a = gna.attention(q, k[:, :4], v[:, :4], return_lse=True)
    b = gna.attention(q, k[:, 4:], v[:, 4:], return_lse=True)
    out, lse = gna.merge_attentions([a[0], b[0]], [a[1], b[1]])
    assert out.dtype == dtype and lse.dtype == torch.float32
    exp, exp_lse = oracle.masked_attention(q, k, v)
    oracle.assert_rel_norm(out, exp, bound={torch.float32: 2e-6}.get(dtype, 1.2e-2), name="out",
                           case=dtype)
    oracle.assert_rel_norm(lse, exp_lse, bound=2e-6, name="lse", case=dtype)


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("q_shape,kv_shape,heads,heads_kv,extra", [
    ((10,), (10,), 4, 4, 0),
    ((10,), (7,), 4, 2, 3),  # query and key lengths may differ
    ((3, 4), (3, 4), 6, 1, 2),  # MQA, 2-D layout flattened
    ((2, 3, 2), (4, 1, 3), 4, 2, 0),
    ((3, 4), (5,), 2, 1, 1),  # key layout of another rank: both are flattened
])
def test_attention_vs_oracle(q_shape, kv_shape, heads, heads_kv, extra):
    gen = torch.Generator().manual_seed(heads * 7 + heads_kv + extra)
    q = randn(gen, 2, *q_shape, heads, 8, requires_grad=True)
    k = randn(gen, 2, *kv_shape, heads_kv, 8, requires_grad=True)
    v = randn(gen, 2, *kv_shape, heads_kv, 8, requires_grad=True)
    leaves = [q, k, v]
    kw = {}
    if extra:
        ek = randn(gen, 2, extra, heads_kv, 8, requires_grad=True)
        ev = randn(gen, 2, extra, heads_kv, 8, requires_grad=True)
        kw = dict(additional_keys=ek, additional_values=ev)
        leaves += [ek, ev]
    g = randn(gen, 2, *q_shape, heads, 8)
    g_lse = randn(gen, 2, *q_shape, heads)
    results = []
    for impl in ("gna", "oracle"):
        if impl == "gna":
            out, lse = gna.attention(q, k, v, scale=0.45, return_lse=True, **kw)
        else:
            out, lse = oracle.masked_attention(q, k, v, None, 0.45, kw.get("additional_keys"),
                                               kw.get("additional_values"))
        grads = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), leaves)
        results.append((out, lse, *grads))
    case = f"q {q_shape}, kv {kv_shape}, {heads=}, {heads_kv=}, {extra=}"
    assert results[0][0].shape == q.shape and results[0][1].shape == q.shape[:-1]
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "d_extra_k", "d_extra_v"], *results):
        assert_close(a, b, atol=ATOL, name=name, case=case)
    # Without return_lse: the output alone, same values; default scale is head_dim ** -0.5.
    out = gna.attention(q, k, v, **kw)
    exp, _ = oracle.masked_attention(q, k, v, None, 8 ** -0.5, kw.get("additional_keys"),
                                     kw.get("additional_values"))
    assert_close(out, exp, atol=ATOL, name="out (default scale)", case=case)


@pytest.mark.gpu
def test_attention_cuda_sdpa_path():
    """On CUDA without return_lse, gna.attention goes through SDPA (GQA + extra KV)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = randn(gen, 1, 33, 4, 16), randn(gen, 1, 33, 2, 16), randn(gen, 1, 33, 2, 16)
    ek, ev = randn(gen, 1, 3, 2, 16), randn(gen, 1, 3, 2, 16)
    exp, _ = oracle.masked_attention(q, k, v, None, 0.3, ek, ev)
    cuda = [t.cuda().half() for t in (q, k, v, ek, ev)]
    out = gna.attention(*cuda[:3], scale=0.3, additional_keys=cuda[3], additional_values=cuda[4])
    assert out.dtype == torch.float16
    oracle.assert_rel_norm(out.cpu(), exp, bound=2e-3, name="sdpa out")


# ------------------------------------------------------------------------------ modules

MODULES = {1: gna.NeighborhoodAttention1D, 2: gna.NeighborhoodAttention2D,
           3: gna.NeighborhoodAttention3D}


@pytest.mark.parametrize("ndim,shape,kw", [
    (1, (11,), dict(kernel_size=4, stride=2, dilation=2, is_causal=True)),
    (2, (6, 7), dict(kernel_size=(3, 2), stride=(3, 1), dilation=(1, 3), is_causal=(False, True))),
    (3, (4, 5, 6), dict(kernel_size=3, stride=(1, 2, 3), dilation=(1, 1, 2))),
    (2, (5, 5), dict(kernel_size=5)),  # dense-routed
])
@pytest.mark.parametrize("qk_scale", [None, 0.25])
def test_module_matches_manual(ndim, shape, kw, qk_scale):
    torch.manual_seed(ndim)
    embed_dim, heads = 24, 3
    module = MODULES[ndim](embed_dim, heads, qk_scale=qk_scale, **kw).double()
    x = torch.randn(2, *shape, embed_dim, dtype=torch.float64, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    g = torch.randn_like(y)
    params = list(module.parameters())
    grads = torch.autograd.grad((y * g).sum(), [x] + params)

    # The same computation by hand: qkv Linear, split heads, oracle GNA, output Linear.
    qkv = torch.nn.functional.linear(x, module.qkv.weight, module.qkv.bias)
    qkv = qkv.reshape(2, *shape, 3, heads, embed_dim // heads)
    q, k, v = qkv.unbind(dim=-3)
    manual_ref = gna.neighborhood_attention(q, k, v, scale=qk_scale, backend="reference", **kw)
    attn, _ = oracle.neighborhood_attention(q, k, v, scale=qk_scale, **kw)
    assert_close(manual_ref, attn, atol=ATOL, name="gna reference vs oracle", case=kw)
    manual = torch.nn.functional.linear(attn.reshape(2, *shape, embed_dim), module.proj.weight,
                                        module.proj.bias)
    manual_grads = torch.autograd.grad((manual * g).sum(), [x] + params)
    case = f"{MODULES[ndim].__name__}, {kw}, {qk_scale=}"
    assert_close(y, manual, atol=ATOL, name="module out", case=case)
    names = ["x"] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, grads, manual_grads):
        assert a.shape == b.shape
        assert_close(a, b, atol=ATOL, name=f"grad {name}", case=case)


def test_module_options_and_repr():
    m = gna.NeighborhoodAttention2D(16, 2, kernel_size=(3, 5), stride=(1, 2), dilation=2,
                                    is_causal=(True, False), qkv_bias=False,
                                    backend="reference")
    assert m.qkv.bias is None
    assert m.kernel_size == (3, 5) and m.stride == (1, 2) and m.dilation == (2, 2)
    assert m.is_causal == (True, False)
    text = repr(m)
    assert "kernel_size=(3, 5)" in text and "num_heads=2" in text
    x = torch.randn(1, 8, 11, 16)
    assert m(x).shape == x.shape
    bad = gna.NeighborhoodAttention1D(8, 2, kernel_size=3, backend="nope")
    with pytest.raises(ValueError, match=r"unknown backend 'nope'"):
        bad(torch.randn(1, 5, 8))


def test_module_dropout_train_eval():
    torch.manual_seed(0)
    m = gna.NeighborhoodAttention1D(8, 2, kernel_size=3, proj_drop=0.5)
    x = torch.randn(2, 9, 8)
    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    m.train()
    assert not torch.equal(m(x), a)


# ---------------------------------------------------------------------- per-call memo
# gna.neighborhood_attention validates and plans a call once per (arguments, shapes, strides,
# dtypes, devices) and reuses that for later calls. These check that the reuse never skips a
# check or a re-plan that a different call needs.

def test_call_memo_reuses_plan_and_stays_correct():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (randn(gen, 2, 9, 10, 2, 8) for _ in range(3))
    kw = dict(kernel_size=(3, 5), stride=(2, 1), dilation=(1, 2), is_causal=(True, False))
    gna.api._CALLS.clear()
    first = gna.na2d(q, k, v, **kw)
    assert len(gna.api._CALLS) == 1
    q2 = randn(gen, 2, 9, 10, 2, 8)
    second = gna.na2d(q2, k, v, **kw)  # same signature: the memo's plan, new data
    assert len(gna.api._CALLS) == 1
    assert_close(first, oracle.neighborhood_attention(q, k, v, **kw)[0], atol=ATOL)
    assert_close(second, oracle.neighborhood_attention(q2, k, v, **kw)[0], atol=ATOL)
    # A strided view (one fused qkv tensor) is another signature, with its own entry.
    qkv = randn(gen, 2, 9, 10, 6, 8)
    qs, ks, vs = qkv.split(2, dim=-2)
    assert_close(gna.na2d(qs, ks, vs, **kw), oracle.neighborhood_attention(qs, ks, vs, **kw)[0],
                 atol=ATOL)
    assert len(gna.api._CALLS) == 2


def test_call_memo_does_not_skip_validation():
    """After a valid call is memoized, calls that differ only in what validation rejects
    still raise: a bool for an int, a window larger than another input, a changed dtype."""
    q = torch.randn(1, 16, 2, 8, dtype=torch.float64)
    gna.na1d(q, q, q, kernel_size=1)
    with pytest.raises(TypeError, match="kernel_size"):
        gna.na1d(q, q, q, kernel_size=True)
    with pytest.raises(TypeError, match="kernel_size"):
        gna.na1d(q, q, q, kernel_size=(True,))
    gna.na1d(q, q, q, kernel_size=5)
    small = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="must not exceed the input size"):
        gna.na1d(small, small, small, kernel_size=5)
    with pytest.raises(TypeError, match="dtype"):
        gna.na1d(q, q, q.float(), kernel_size=5)
    with pytest.raises(TypeError, match="scale"):
        gna.na1d(q, q, q, kernel_size=5, scale="0.5")
    # Unhashable arguments (lists) take the full path every time, and work.
    out = gna.na1d(q, q, q, kernel_size=[5], stride=[2])
    assert_close(out, oracle.neighborhood_attention(q, q, q, kernel_size=5, stride=2)[0],
                 atol=ATOL)


def test_call_memo_follows_grad_mode():
    """One memo entry serves inference and training calls: gradients still flow."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(gen, 1, 12, 2, 8) for _ in range(3))
    with torch.no_grad():
        gna.na1d(q, k, v, kernel_size=5, stride=2)
    q.requires_grad_()
    out = gna.na1d(q, k, v, kernel_size=5, stride=2)
    (grad,) = torch.autograd.grad(out.sum(), q)
    qr = q.detach().requires_grad_()
    (expected,) = torch.autograd.grad(
        oracle.neighborhood_attention(qr, k, v, kernel_size=5, stride=2)[0].sum(), qr)
    assert_close(grad, expected, atol=ATOL)
