"""Triton helpers shared by the forward and backward kernels: which program is which tile of
which dilation group, how the visited and mask-free KV (or Q) tile boxes are enumerated, and
the reads of the geometry tables that :mod:`gna.geometry` fills through the launchers."""

import triton
import triton.language as tl


@triton.jit
def program_group(pid_g, L0, L1, L2, D0, D1, D2):
    """Dilation group ``(g0, g1, g2)`` of program-id ``pid_g`` and the group's lengths
    ``ceil((L - g) / D)`` per dimension."""
    g2 = pid_g % D2
    g1 = (pid_g // D2) % D1
    g0 = pid_g // (D2 * D1)
    return g0, g1, g2, (L0 - g0 + D0 - 1) // D0, (L1 - g1 + D1 - 1) // D1, (L2 - g2 + D2 - 1) // D2


@triton.jit
def split3(idx, N1, N2):
    """Row-major coordinates of ``idx`` in a box whose last two extents are ``N1, N2``."""
    return idx // (N2 * N1), (idx // N2) % N1, idx % N2


@triton.jit
def tile_coords(t0, t1, t2, offs, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """In-group coordinates of the tokens ``offs`` (row-major inside a ``T0 x T1 x T2`` box)
    of tile ``(t0, t1, t2)``; tile ``(0, 0, 0)`` gives the offsets inside a tile."""
    return t0 * T0 + offs // (T1 * T2), t1 * T1 + (offs // T2) % T1, t2 * T2 + offs % T2


@triton.jit
def tile_tokens(t0, t1, t2, offs, g0, g1, g2, G0, G1, G2, D0, D1, D2,
                T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr):
    """Tokens ``offs`` of tile ``(t0, t1, t2)`` of dilation group ``(g0, g1, g2)`` (lengths
    ``G*``, dilations ``D*``): their in-group coordinates, whether they lie inside the group,
    and their coordinates in the full layout (int64, for address arithmetic)."""
    i0, i1, i2 = tile_coords(t0, t1, t2, offs, T0, T1, T2)
    ok = (i0 < G0) & (i1 < G1) & (i2 < G2)
    return (i0, i1, i2, ok, (g0 + i0 * D0).to(tl.int64), (g1 + i1 * D1).to(tl.int64),
            (g2 + i2 * D2).to(tl.int64))


@triton.jit
def pick(idx, lo, n_lo, hi):
    """The idx-th element of [lo, lo + n_lo) followed by [hi, ...)."""
    return tl.where(idx < n_lo, lo + idx, hi + idx - n_lo)


@triton.jit
def next_full_tile(j0, j1, j2, ff1, fl1, ff2, fl2):
    """The tile after ``(j0, j1, j2)`` in the row-major order of the full box ``[ff, fl)``
    (dimension 0 needs no bound: the loop's trip count ends the walk). The loops over the
    box carry their tile from step to step with this instead of dividing the step index
    by the box's extents: three integer divisions per iteration, ~60 of the forward loop's
    ~560 instructions on sm_90."""
    j2 += 1
    wrap2 = j2 >= fl2
    j2 = tl.where(wrap2, ff2, j2)
    j1 = tl.where(wrap2, j1 + 1, j1)
    wrap1 = j1 >= fl1
    j1 = tl.where(wrap1, ff1, j1)
    j0 = tl.where(wrap1, j0 + 1, j0)
    return j0, j1, j2


@triton.jit
def partial_count(f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2):
    """Number of tiles in the visited box ``[f, l)`` minus the full box ``[ff, fl)``."""
    in0, in1, in2 = fl0 - ff0, fl1 - ff1, fl2 - ff2
    vis0, vis1, vis2 = l0 - f0, l1 - f1, l2 - f2
    return (vis0 - in0) * vis1 * vis2 + in0 * (vis1 - in1) * vis2 + in0 * in1 * (vis2 - in2)


@triton.jit
def partial_tile(n, f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2):
    """The n-th tile of the visited box minus the full box, as three disjoint slabs:
    A: dim 0 outside the full range; B: dim 0 inside, dim 1 outside; C: dims 0 and 1 inside,
    dim 2 outside. ``partial_count`` of them in all; none is also in the full box."""
    in0, in1, in2 = fl0 - ff0, fl1 - ff1, fl2 - ff2
    vis1, vis2 = l1 - f1, l2 - f2
    out1, out2 = vis1 - in1, vis2 - in2
    count_a = (l0 - f0 - in0) * vis1 * vis2
    count_b = in0 * out1 * vis2
    in_a = n < count_a
    in_b = (n >= count_a) & (n < count_a + count_b)
    m = tl.where(in_a, n, tl.where(in_b, n - count_a, n - count_a - count_b))
    e1 = tl.maximum(tl.where(in_a, vis1, tl.where(in_b, out1, in1)), 1)
    e2 = tl.maximum(tl.where(in_a | in_b, vis2, out2), 1)
    u2 = m % e2
    u1 = (m // e2) % e1
    u0 = m // (e2 * e1)
    j0 = tl.where(in_a, pick(u0, f0, ff0 - f0, fl0), ff0 + u0)
    j1 = tl.where(in_a, f1 + u1, tl.where(in_b, pick(u1, f1, ff1 - f1, fl1), ff1 + u1))
    j2 = tl.where(in_a | in_b, f2 + u2, pick(u2, f2, ff2 - f2, fl2))
    return j0, j1, j2


@triton.jit
def load_ranges(Tab, s0, s1, s2, g0, g1, g2, t0, t1, t2):
    """Per-dimension ``(first, last, full_first, full_last)`` of tile ``(t0, t1, t2)``."""
    r0 = Tab + g0 * s1 + t0 * s2
    r1 = Tab + s0 + g1 * s1 + t1 * s2
    r2 = Tab + 2 * s0 + g2 * s1 + t2 * s2
    return (tl.load(r0), tl.load(r0 + 1), tl.load(r0 + 2), tl.load(r0 + 3),
            tl.load(r1), tl.load(r1 + 1), tl.load(r1 + 2), tl.load(r1 + 3),
            tl.load(r2), tl.load(r2 + 1), tl.load(r2 + 2), tl.load(r2 + 3))


@triton.jit
def load_windows(Win, s0, s1, s2, g0, g1, g2, i0, i1, i2, ok):
    """Key window ``[start, end)`` per dimension of queries ``(i0, i1, i2)``; rows not ``ok``
    get empty windows."""
    w0 = Win + g0 * s1 + i0 * s2
    w1 = Win + s0 + g1 * s1 + i1 * s2
    w2 = Win + 2 * s0 + g2 * s1 + i2 * s2
    return (tl.load(w0, mask=ok, other=0), tl.load(w0 + 1, mask=ok, other=0),
            tl.load(w1, mask=ok, other=0), tl.load(w1 + 1, mask=ok, other=0),
            tl.load(w2, mask=ok, other=0), tl.load(w2 + 1, mask=ok, other=0))


@triton.jit
def in_window(x0, x1, x2, ws0, we0, ws1, we1, ws2, we2):
    return ((ws0 <= x0) & (x0 < we0) & (ws1 <= x1) & (x1 < we1) & (ws2 <= x2) & (x2 < we2))


@triton.jit
def load_kv_tile(base, desc, col, offs_d, d_mask, j0, j1, j2, col_ok, row0, hk,
                 K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MASKED: tl.constexpr, PAD_D: tl.constexpr, USE_TMA: tl.constexpr,
                 HOST_DESC: tl.constexpr = False):
    """A ``[K0*K1*K2, HEAD_DIM]`` box of keys (or values) of KV tile ``(j0, j1, j2)`` (forward
    and dQ kernels).

    With ``USE_TMA`` the copy engine fetches the box through a tensor descriptor and zero-fills
    what lies outside the group: one made by the program over its group, batch and head
    (:func:`group_descriptor`), or with ``HOST_DESC`` one made on the host over the whole
    tensor (``[batch * L0, L1, L2, heads, head_dim]``, see
    :func:`gna.triton_backend.host_descriptors`), addressed from row ``row0`` (the batch's
    first) and head ``hk``. Otherwise per-row pointers (``base`` is the tile's origin).
    """
    if USE_TMA:
        if HOST_DESC:
            box = desc.load([row0 + j0 * K0, j1 * K1, j2 * K2, hk, 0])
        else:
            box = desc.load([j0 * K0, j1 * K1, j2 * K2, 0])
        return box.reshape(K0 * K1 * K2, HEAD_DIM)
    ptrs = base + col[:, None] + offs_d[None, :]
    if MASKED:  # columns past the group's end (and padding of the head dim) read 0
        return tl.load(ptrs, mask=col_ok[:, None] & d_mask[None, :], other=0.0)
    if PAD_D:
        return tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def group_descriptor(base, G0, G1, G2, D0, D1, D2, s0, s1, s2, head_dim,
                     K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
    """A tensor descriptor (TMA) over one dilation group's ``G0 x G1 x G2`` tokens of one batch
    and head, in boxes of ``K0 x K1 x K2`` tokens: ``base`` is the group's first token, ``s*``
    the token strides, ``D*`` the dilations. The copy engine zero-fills what lies past the
    group's end (and past ``head_dim``)."""
    return tl.make_tensor_descriptor(
        base, shape=[G0, G1, G2, head_dim], strides=[D0 * s0, D1 * s1, D2 * s2, 1],
        block_shape=[K0, K1, K2, HEAD_DIM])
