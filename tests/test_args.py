"""Bad calls raise the intended error type with a message that names the rule and the values.

Convention checked here: a wrong Python/tensor *type* (floats or bools where ints go, tensors
where Python numbers go, unsupported or mismatched dtypes) is a ``TypeError``; a wrong *value*
(shapes, ranks, ranges, devices, unknown names) is a ``ValueError``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import gna


def qkv(shape=(8, 9), heads=4, heads_kv=2, head_dim=8, batch=2, dtype=torch.float32):
    q = torch.randn(batch, *shape, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, *shape, heads_kv, head_dim, dtype=dtype)
    v = torch.randn(batch, *shape, heads_kv, head_dim, dtype=dtype)
    return q, k, v


def extra(n=3, heads_kv=2, head_dim=8, batch=2, dtype=torch.float32):
    return (torch.randn(batch, n, heads_kv, head_dim, dtype=dtype),
            torch.randn(batch, n, heads_kv, head_dim, dtype=dtype))


# ---------------------------------------------------------------------------------- ranks

def test_rank_wrong_for_wrapper():
    q, k, v = qkv(shape=(8,))  # a 1-D problem passed to na2d
    with pytest.raises(ValueError, match=r"2-D neighborhood attention expects query of rank 5"):
        gna.na2d(q, k, v, 3)
    q, k, v = qkv(shape=(4, 4, 4))
    with pytest.raises(ValueError, match=r"1-D neighborhood attention expects query of rank 4"):
        gna.na1d(q, k, v, 3)


@pytest.mark.parametrize("spatial", [(), (2, 2, 2, 2)])
def test_rank_unsupported_for_generic(spatial):
    q = torch.randn(1, *spatial, 2, 8)
    with pytest.raises(ValueError, match=r"1, 2 or 3 spatial dimensions"):
        gna.neighborhood_attention(q, q, q, 1)


def test_rank_key_differs():
    q, k, v = qkv(shape=(8, 9))
    with pytest.raises(ValueError, match=r"expects key of rank 5"):
        gna.na2d(q, k[:, 0], v, 3)


def test_rank_additional_kv():
    q, k, v = qkv()
    ek, ev = extra()
    with pytest.raises(ValueError, match=r"additional_keys of rank 4"):
        gna.na2d(q, k, v, 3, additional_keys=ek[:, None], additional_values=ev[:, None])


# ------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("which,bad,message", [
    ("value", lambda t: t[..., :4], r"key and value must have the same shape"),
    ("key", lambda t: t[:1], r"key and value must have the same shape"),
    ("both", lambda t: t[:1], r"key/value must match query in batch and head_dim"),
    ("both", lambda t: t[..., :4], r"key/value must match query in batch and head_dim"),
    ("both", lambda t: t[:, :7], r"key/value must have query's spatial size \(8, 9\)"),
])
def test_shape_mismatch(which, bad, message):
    q, k, v = qkv()
    if which in ("key", "both"):
        k = bad(k)
    if which in ("value", "both"):
        v = bad(v)
    with pytest.raises(ValueError, match=message):
        gna.na2d(q, k, v, 3)


def test_heads_not_divisible():
    q, k, v = qkv(heads=6, heads_kv=4)
    with pytest.raises(ValueError, match=r"multiple of key/value heads.*heads=6.*heads_kv=4"):
        gna.na2d(q, k, v, 3)
    q, k, v = qkv(heads=2, heads_kv=4)
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        gna.na2d(q, k, v, 3)


@pytest.mark.parametrize("ek_shape,ev_shape,message", [
    ((2, 3, 1, 8), (2, 3, 1, 8),
     r"additional_keys must be \[batch, n_extra, heads_kv, head_dim\] = \[2, n, 2, 8\]"),
    ((2, 3, 2, 4), (2, 3, 2, 4), r"additional_keys must be \[batch, n_extra, heads_kv, head_dim\]"),
    ((1, 3, 2, 8), (1, 3, 2, 8), r"additional_keys must be \[batch"),
    ((2, 3, 2, 8), (2, 4, 2, 8), r"additional_keys and additional_values must have the same shape"),
    ((2, 3, 2, 8), (2, 3, 1, 8), r"additional_values must be \[batch, n_extra, heads_kv"),
])
def test_additional_kv_shape(ek_shape, ev_shape, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        gna.na2d(q, k, v, 3, additional_keys=torch.randn(ek_shape),
                 additional_values=torch.randn(ev_shape))


@pytest.mark.parametrize("given", ["keys", "values"])
def test_additional_kv_only_one(given):
    q, k, v = qkv()
    ek, ev = extra()
    kw = {"additional_keys": ek} if given == "keys" else {"additional_values": ev}
    with pytest.raises(ValueError,
                       match=r"additional_keys and additional_values must be given together"):
        gna.na2d(q, k, v, 3, **kw)
    with pytest.raises(ValueError, match=r"must be given together"):
        gna.attention(q, k, v, **kw)


# ------------------------------------------------------------------------ dtypes, devices

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.bool,
                                   torch.uint8], ids=str)
def test_unsupported_dtype(dtype):
    q = torch.ones(1, 8, 2, 4, dtype=dtype)
    message = rf"query has unsupported dtype {re.escape(str(dtype))}; use one of"
    with pytest.raises(TypeError, match=message):
        gna.na1d(q, q, q, 3)
    with pytest.raises(TypeError, match=r"unsupported dtype"):
        gna.attention(q, q, q)


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError,
                       match=r"key must have query's dtype torch.float32, got torch.float16"):
        gna.na2d(q, k.half(), v.half(), 3)
    with pytest.raises(TypeError,
                       match=r"value must have query's dtype torch.float32, got torch.float64"):
        gna.na2d(q, k, v.double(), 3)
    ek, ev = extra()
    with pytest.raises(TypeError, match=r"additional_keys must have query's dtype torch.float32, got torch.float64"):
        gna.na2d(q, k, v, 3, additional_keys=ek.double(), additional_values=ev.double())
    with pytest.raises(TypeError, match=r"additional_values must have additional_keys's dtype"):
        gna.na2d(q, k, v, 3, additional_keys=ek, additional_values=ev.half())


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key must be on query's device cpu, got meta"):
        gna.na2d(q, k.to("meta"), v.to("meta"), 3)
    with pytest.raises(ValueError, match=r"value must be on query's device cpu, got meta"):
        gna.na2d(q, k, v.to("meta"), 3)
    with pytest.raises(ValueError, match=r"key must be on query's device meta, got cpu"):
        gna.na2d(q.to("meta"), k, v, 3)


def test_device_mismatch_additional_kv():
    """Additional keys/values on another device than query: the same error type as a key on
    another device (ValueError), not a TypeError."""
    q, k, v = qkv()
    ek, ev = extra()
    with pytest.raises(Exception) as info:
        gna.na2d(q, k, v, 3, additional_keys=ek.to("meta"), additional_values=ev.to("meta"))
    assert re.search(r"additional_keys must .*device", str(info.value)), str(info.value)
    assert info.type is ValueError, (
        f"a device mismatch of additional_keys raised {info.type.__name__} "
        f"({info.value}); a device mismatch of key raises ValueError (args._check_extra "
        f"reports dtype and device mismatches together as TypeError)")


# -------------------------------------------------------------------------- empty tensors

@pytest.mark.parametrize("where", ["batch", "spatial", "heads", "head_dim"])
def test_empty_tensors(where):
    sizes = {"batch": 2, "spatial": 8, "heads": 2, "head_dim": 4}
    sizes[where] = 0
    q = torch.randn(sizes["batch"], sizes["spatial"], sizes["heads"], sizes["head_dim"])
    with pytest.raises(ValueError, match=r"query is empty: shape="):
        gna.na1d(q, q, q, 1)


def test_empty_additional_kv():
    q, k, v = qkv()
    ek, ev = extra(n=0)
    with pytest.raises(ValueError, match=r"additional_keys is empty"):
        gna.na2d(q, k, v, 3, additional_keys=ek, additional_values=ev)


# ---------------------------------------------------------------------- GNA parameters

@pytest.mark.parametrize("kernel_size", [0, -1, (3, 0)])
def test_kernel_size_below_one(kernel_size):
    q, k, v = qkv()
    with pytest.raises(ValueError,
                       match=r"kernel_size must be >= 1 in every dimension, got kernel_size=\("):
        gna.na2d(q, k, v, kernel_size)


@pytest.mark.parametrize("stride", [0, -2, (1, 4), (4, 1)])
def test_stride_out_of_range(stride):
    q, k, v = qkv()
    with pytest.raises(ValueError,
                       match=r"1 <= stride <= kernel_size.*stride=\(.*kernel_size=\(3, 3\)"):
        gna.na2d(q, k, v, 3, stride=stride)


@pytest.mark.parametrize("dilation", [0, -1, (1, 0)])
def test_dilation_below_one(dilation):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dilation must be >= 1 in every dimension"):
        gna.na2d(q, k, v, 3, dilation=dilation)


@pytest.mark.parametrize("kernel_size,dilation", [(9, 1), ((3, 5), (3, 2)), ((5, 3), 2)])
def test_window_larger_than_input(kernel_size, dilation):
    q, k, v = qkv(shape=(8, 9))
    message = r"kernel_size \* dilation must not exceed the input size.*input size \(8, 9\)"
    with pytest.raises(ValueError, match=message):
        gna.na2d(q, k, v, kernel_size, dilation=dilation)


@pytest.mark.parametrize("name,value", [
    ("kernel_size", 3.0), ("kernel_size", (3, 2.5)), ("kernel_size", True),
    ("kernel_size", "3"), ("stride", 1.0), ("stride", (1, False)), ("dilation", 2.0),
    ("dilation", (True, 1)),
])
def test_non_integer_parameters(name, value):
    q, k, v = qkv()
    kw = {"kernel_size": 3, name: value}
    with pytest.raises(TypeError, match=rf"{name} must hold ints, got {name}="):
        gna.na2d(q, k, v, **kw)


@pytest.mark.parametrize("name,value", [
    ("kernel_size", torch.tensor(3)), ("kernel_size", torch.tensor([3, 3])),
    ("stride", torch.tensor(1)), ("dilation", torch.tensor(1)), ("is_causal", torch.tensor(True)),
])
def test_tensor_parameters(name, value):
    q, k, v = qkv()
    kw = {"kernel_size": 3, name: value}
    with pytest.raises(TypeError,
                       match=rf"{name} must be a Python .* or a tuple of them, got a tensor"):
        gna.na2d(q, k, v, **kw)


@pytest.mark.parametrize("value", [1, 0, (True, 1), "yes", None])
def test_is_causal_must_be_bool(value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"is_causal must hold bools"):
        gna.na2d(q, k, v, 3, is_causal=value)


@pytest.mark.parametrize("name,value", [
    ("kernel_size", (3,)), ("kernel_size", (3, 3, 3)), ("stride", (1, 1, 1)),
    ("dilation", (1,)), ("is_causal", (True,)), ("kernel_size", ()),
])
def test_wrong_tuple_length(name, value):
    q, k, v = qkv()
    kw = {"kernel_size": 3, name: value}
    with pytest.raises(ValueError, match=rf"{name} needs one value per spatial dimension \(2\)"):
        gna.na2d(q, k, v, **kw)


@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5), 1j])
def test_bad_scale(scale):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"scale must be a real number or None"):
        gna.na2d(q, k, v, 3, scale=scale)
    with pytest.raises(TypeError, match=r"scale must be a real number or None"):
        gna.attention(q, k, v, scale=scale)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor, got list"):
        gna.na2d(q.tolist(), k, v, 3)
    with pytest.raises(TypeError, match=r"key must be a torch.Tensor, got ndarray"):
        gna.na2d(q, k.numpy(), v, 3)
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor"):
        gna.attention(q.numpy(), k, v)


# ----------------------------------------------------------------------- options, backend

@pytest.mark.parametrize("precision", ["fp32", "TF32", "", None, "highest"])
def test_bad_fp32_precision(precision):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"fp32_precision must be 'ieee' or 'tf32', got"):
        gna.na2d(q, k, v, 3, fp32_precision=precision)


@pytest.mark.parametrize("kernel", [3, (8, 9)], ids=["sparse", "dense-routable"])
def test_unknown_backend(kernel):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown backend 'cutlass'; available: .*reference"):
        gna.na2d(q, k, v, kernel, backend="cutlass")


@pytest.mark.parametrize("name,value,error,message", [
    ("q_tile_shape", (8,), ValueError, r"q_tile_shape needs one value per spatial dimension"),
    ("kv_tile_shape", (8, 8, 8), ValueError, r"kv_tile_shape needs one value"),
    ("backward_q_tile_shape", 8.0, TypeError, r"backward_q_tile_shape must hold ints"),
    ("backward_kv_tile_shape", torch.tensor(8), TypeError, r"got a tensor"),
])
def test_bad_tile_shapes(name, value, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        gna.na2d(q, k, v, 3, **{name: value})


def test_dense_attention_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query .*\[batch, \*spatial, heads, head_dim\]"):
        gna.attention(q[0, 0, 0], k, v)
    with pytest.raises(ValueError,
                       match=r"attention expects key .*\[batch, \*spatial, heads, head_dim\]"):
        gna.attention(q, k[0, 0, 0], v[0, 0, 0])
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        gna.attention(q[..., :3, :], k, v)
    with pytest.raises(ValueError, match=r"key/value must match query in batch and head_dim"):
        gna.attention(q, k[..., :4], v[..., :4])


def test_module_errors():
    with pytest.raises(ValueError, match=r"embed_dim must be divisible by num_heads"):
        gna.NeighborhoodAttention2D(embed_dim=10, num_heads=3, kernel_size=3)
    with pytest.raises(ValueError,
                       match=r"kernel_size needs one value per spatial dimension \(2\)"):
        gna.NeighborhoodAttention2D(embed_dim=8, num_heads=2, kernel_size=(3, 3, 3))
    m = gna.NeighborhoodAttention2D(embed_dim=8, num_heads=2, kernel_size=3)
    with pytest.raises(ValueError, match=r"NeighborhoodAttention2D expects x of rank 4"):
        m(torch.randn(1, 8, 8))


def test_merge_attentions_errors():
    o = torch.randn(1, 5, 2, 4)
    lse = torch.randn(1, 5, 2)
    with pytest.raises(ValueError, match=r"one lse per output, got 2 outputs and 1 lses"):
        gna.merge_attentions([o, o], [lse])
    with pytest.raises(ValueError, match=r"one lse per output, got 0 outputs"):
        gna.merge_attentions([], [])
    with pytest.raises(ValueError, match=r"output 1 .* do not match output 0"):
        gna.merge_attentions([o, o[:, :4]], [lse, lse[:, :4]])
    with pytest.raises(ValueError, match=r"output 0 .* lse \(1, 5\)"):
        gna.merge_attentions([o], [lse[..., 0]])


# ------------------------------------------------------------------------------- accepted

def test_accepted_forms():
    """Lists, numpy integers and per-dimension tuples are accepted and equivalent."""
    q, k, v = qkv(dtype=torch.float64)
    ref = gna.na2d(q, k, v, (3, 3), (2, 2), (1, 2), (False, True), backend="reference")
    for kw in [dict(kernel_size=[3, 3], stride=[2, 2], dilation=[1, 2], is_causal=[False, True]),
               dict(kernel_size=np.int64(3), stride=(np.int32(2), 2), dilation=(1, 2),
                    is_causal=(False, True))]:
        out = gna.na2d(q, k, v, backend="reference", **kw)
        assert torch.equal(out, ref), kw


def test_noncontiguous_accepted():
    fused = torch.randn(2, 6, 7, 3, 4, 8)
    q, k, v = fused.unbind(dim=-3)
    out = gna.na2d(q, k, v, 3)
    assert out.shape == q.shape
    qt = torch.randn(2, 4, 6, 7, 8).permute(0, 2, 3, 1, 4)  # heads-first storage
    ek = torch.randn(2, 4, 5, 8).transpose(1, 2)  # [B, E, Hkv, D] view of heads-first storage
    out = gna.na2d(qt, qt, qt, 3, additional_keys=ek, additional_values=ek)
    assert out.shape == qt.shape
    assert not qt.is_contiguous() and not ek.is_contiguous()
