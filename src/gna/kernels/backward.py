"""Fused GNA backward kernels (Triton), FlashAttention-2 structure.

With ``P = softmax(scale * Q K^T)`` over each query's window keys plus the additional keys,
``p_ij = exp(scale * s_ij - lse_i)`` is recomputed from the forward LSE, and

    delta_i = rowsum(dO_i * O_i) - dlse_i        (d lse_i / d s_ij = p_ij folds dlse in)
    dP = dO V^T,  dS = P * (dP - delta),  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.

Four kernels, launched by :mod:`gna.triton_backward`:

* :func:`gna_backward_delta_kernel`: ``delta`` per query row, in fp32.
* :func:`gna_backward_dkdv_kernel`: one program per KV tile (a ``K0 x K1 x K2`` box of one
  dilation group), batch and KV head. It keeps its K/V tile and the dK/dV accumulators on
  chip and walks the Q tiles that see the tile (the *inverse* ranges of :mod:`gna.geometry`,
  table ``Inv``), for every query head sharing the KV head (GQA reduced in-program: no atomics,
  no repeated K/V reads). Mask-free Q tiles first, then the visited box minus the full box as
  three disjoint slabs with per-query window masks (table ``Win``), as the forward does.
* :func:`gna_backward_dq_kernel`: one program per Q tile, head: the forward's iteration (table
  ``Rng``) with the same full/partial split, then the additional keys.
* :func:`gna_backward_extra_kernel`: dK/dV of the additional keys, which every query sees: one
  program per (extra tile, split of the token range, batch, KV head) writes fp32 partial sums
  that the launcher adds in a fixed order (deterministic, no atomics).

The kernels do no geometry of their own; like the forward they read ``Win``, ``Rng`` and
``Inv`` built by the launcher from :mod:`gna.geometry`. Problems of fewer than three dimensions
are padded with unit dimensions in front.
"""

import triton
import triton.language as tl

from .tiles import (group_descriptor, in_window, load_kv_tile, load_ranges, next_full_tile,
                    load_windows, partial_count, partial_tile, program_group, split3,
                    tile_coords, tile_tokens)

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_rows(ptrs, row_ok, d_mask):
    """Rows of a ``[rows, HEAD_DIM]`` tile; rows not ``row_ok`` and padding columns read 0.
    ``head_dim`` is a constexpr in every kernel so that the compiler sees the column mask
    constant over 8-element groups (or all true): the load then vectorizes and the software
    pipeliner turns it into asynchronous copies."""
    return tl.load(ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)


# --- delta --------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["D0", "D1", "D2"])
def gna_backward_delta_kernel(
    Out, dO, Lse, dLse, Delta, Stats, DqAcc,
    so_b, so_0, so_1, so_2, so_h,
    sdo_b, sdo_0, sdo_1, sdo_2, sdo_h,
    sl_b, sl_0, sl_1, sl_2, sl_h,  # Lse, dLse and Delta (same layout)
    sa_b, sa_0, sa_1, sa_2, sa_h,
    L0, L1, L2, D0, D1, D2, NT1, NT2, n_tiles, n_groups, heads, stat_stride,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    HEAD_DIM: tl.constexpr, head_dim: tl.constexpr, HAS_DLSE: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):
    """``delta = rowsum(dO * O) - dlse`` in fp32 for one Q tile of the dK/dV kernel's tiling
    (one dilation group, batch, head). Writes ``delta`` laid out like ``lse`` (for the dQ and
    additional-key kernels) and, for the dK/dV kernel, ``lse * log2(e)`` and ``delta`` in
    tile-major order (``Stats``: per batch, head, group, tile, its ``T0*T1*T2`` rows; the
    second statistic ``stat_stride`` elements after the first). The dK/dV kernel then reads a
    Q tile's row statistics as one contiguous run, with no per-row address registers held
    through its loops; rows past the group's end hold 0 there (finite, and their Q and dO rows
    read 0). With ``ZERO_DQ`` it also zeroes the tile's rows of ``DqAcc``, the fused Gluon
    backward's fp32 dQ accumulator (:func:`gna.kernels.backward_gluon.
    gna_backward_fused_block_sparse_kernel`), which would otherwise take a memset launch."""
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    g0, g1, g2, G0, G1, G2 = program_group(pid_g, L0, L1, L2, D0, D1, D2)
    t0, t1, t2 = split3(pid_t, NT1, NT2)
    offs_m = tl.arange(0, BLOCK_M)
    _, _, _, ok, x0, x1, x2 = tile_tokens(t0, t1, t2, offs_m, g0, g1, g2, G0, G1, G2,
                                          D0, D1, D2, T0, T1, T2)
    offs_d = tl.arange(0, HEAD_DIM)
    d_mask = offs_d < head_dim
    o = _load_rows(Out + b * so_b + h * so_h + (x0 * so_0 + x1 * so_1 + x2 * so_2)[:, None]
                   + offs_d[None, :], ok, d_mask)
    do = _load_rows(dO + b * sdo_b + h * sdo_h + (x0 * sdo_0 + x1 * sdo_1 + x2 * sdo_2)[:, None]
                    + offs_d[None, :], ok, d_mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_off = b * sl_b + h * sl_h + x0 * sl_0 + x1 * sl_1 + x2 * sl_2
    if HAS_DLSE:
        delta -= tl.load(dLse + l_off, mask=ok, other=0.0)
    tl.store(Delta + l_off, delta, mask=ok)
    lse2 = tl.load(Lse + l_off, mask=ok, other=0.0) * _LOG2E
    s_off = ((pid_bh.to(tl.int64) * n_groups + pid_g) * n_tiles + pid_t) * BLOCK_M + offs_m
    tl.store(Stats + s_off, lse2)
    tl.store(Stats + stat_stride + s_off, tl.where(ok, delta, 0.0))
    if ZERO_DQ:
        a_ptrs = (DqAcc + b * sa_b + h * sa_h + (x0 * sa_0 + x1 * sa_1 + x2 * sa_2)[:, None]
                  + offs_d[None, :])
        tl.store(a_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], tl.float32),
                 mask=ok[:, None] & d_mask[None, :])


@triton.jit
def gna_backward_dq_cast_kernel(Acc, dQ, n, scale, BLOCK: tl.constexpr):
    """``dQ = Acc * scale`` in dQ's dtype, over ``n`` elements of two contiguous tensors: the
    fused Gluon backward's fp32 dQ accumulator to the gradient (the Triton dQ kernel's
    epilogue, as a pass of its own)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.load(Acc + offs, mask=ok, other=0.0)
    tl.store(dQ + offs, (acc * scale).to(dQ.dtype.element_ty), mask=ok)


# --- dK / dV ------------------------------------------------------------------------------

@triton.jit
def _load_q_box(grp, desc, h, t0, t1, t2, s0, s1, s2, row, sh, row_ok, d_mask, offs_d,
                T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, HEAD_DIM: tl.constexpr,
                USE_TMA: tl.constexpr):
    """Query-side rows (Q or dO) of Q tile ``(t0, t1, t2)``, head ``h``: through the tensor
    descriptor ``desc`` (the copy engine zero-fills rows past the group's end), or per-row
    pointers from the group origin ``grp`` (tile offsets ``s*``, row offsets ``row``)."""
    if USE_TMA:
        box = desc.load([t0 * T0, t1 * T1, t2 * T2, h.to(tl.int32), 0])
        return box.reshape(T0 * T1 * T2, HEAD_DIM)
    return _load_rows(grp + s0 + s1 + s2 + h * sh + row[:, None] + offs_d[None, :], row_ok,
                      d_mask)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, kx0, kx1, kx2, qa0, qb0, qa1, qb1, qa2, qb2, t0, t1, t2, h,
    q_grp, do_grp, q_desc, do_desc, Stats, stat_base, stat_h, stat_stride, NT1, NT2,
    q_row, do_row, sq_0, sq_1, sq_2, sq_h, sdo_0, sdo_1, sdo_2, sdo_h,
    step0, step1, step2, G0, G1, G2,
    Win, win_s0, win_s1, win_s2, g0, g1, g2, offs_d, d_mask, qk_scale,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, KV_MAJOR: tl.constexpr, USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One step of a dK/dV loop: Q tile ``(t0, t1, t2)`` and query head ``h`` (int64) against
    this program's KV tile, with per-query masks if ``MASKED``. The row statistics come from
    the tile-major ``Stats`` (see the delta kernel): contiguous, so no per-row addresses stay
    live through the loop."""
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    offs_m = tl.arange(0, BLOCK_M)
    i0, i1, i2 = tile_coords(t0, t1, t2, offs_m, T0, T1, T2)
    row_ok = (i0 < G0) & (i1 < G1) & (i2 < G2)
    s0, s1, s2 = t0 * step0, t1 * step1, t2 * step2
    q = _load_q_box(q_grp, q_desc, h, t0, t1, t2, s0 * sq_0, s1 * sq_1, s2 * sq_2, q_row, sq_h,
                    row_ok, d_mask, offs_d, T0, T1, T2, HEAD_DIM, USE_TMA)
    do = _load_q_box(do_grp, do_desc, h, t0, t1, t2, s0 * sdo_0, s1 * sdo_1, s2 * sdo_2,
                     do_row, sdo_h, row_ok, d_mask, offs_d, T0, T1, T2, HEAD_DIM, USE_TMA)
    # Padding rows hold lse = delta = 0 with q = dO = 0: finite, and they add nothing.
    s_off = stat_base + h * stat_h + ((t0 * NT1 + t1) * NT2 + t2) * BLOCK_M + offs_m
    lse2 = tl.load(Stats + s_off)
    delta = tl.load(Stats + stat_stride + s_off)
    if MASKED and not KV_MAJOR:
        ws0, we0, ws1, we1, ws2, we2 = load_windows(Win, win_s0, win_s1, win_s2, g0, g1, g2,
                                                     i0, i1, i2, row_ok)
    if KV_MAJOR:
        # Scores transposed, [keys, queries]: P^T and dS^T come out of the GEMMs in the
        # registers the dV and dK GEMMs take as their A operand (no trip through shared
        # memory); the KV tile is the M side.
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :]
        if MASKED:
            # Per key, the range of queries that see it (loaded once per program): the
            # per-query operands are only the tile's coordinates, no loaded windows.
            seen = in_window(i0[None, :], i1[None, :], i2[None, :], qa0[:, None],
                             qb0[:, None], qa1[:, None], qb1[:, None], qa2[:, None],
                             qb2[:, None])
            s = tl.where(seen, s, float("-inf"))
        p = tl.exp2(s)
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)
    else:
        # Scores [queries, keys]: the Q tile is the GEMMs' M side; P and dS reach the dV / dK
        # GEMMs transposed, through shared memory.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]
        if MASKED:
            seen = in_window(kx0[None, :], kx1[None, :], kx2[None, :], ws0[:, None],
                             we0[:, None], ws1[:, None], we1[:, None], ws2[:, None],
                             we2[:, None])
            s = tl.where(seen, s, float("-inf"))
        p = tl.exp2(s)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    return dk, dv


# Dilations equal to 1 must stay run-time values (Triton folds 1s into constants otherwise),
# as must the tile count that is cast to int64.
@triton.jit(do_not_specialize=["D0", "D1", "D2", "n_q_tiles"])
def gna_backward_dkdv_kernel(
    Q, K, V, dO, Stats, dK, dV, Win, Inv,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    sdo_b, sdo_0, sdo_1, sdo_2, sdo_h,
    sdk_b, sdk_0, sdk_1, sdk_2, sdk_h,
    sdv_b, sdv_0, sdv_1, sdv_2, sdv_h,
    L0, L1, L2, D0, D1, D2,  # full sizes and dilations of the (padded) 3 dimensions
    NK0, NK1, NK2,  # KV tiles per dimension of dilation group 0 (the longest)
    NT1, NT2, n_q_tiles, stat_stride,  # Q tiling of Stats (see the delta kernel)
    win_s0, win_s1, win_s2, inv_s0, inv_s1, inv_s2,  # strides of the geometry tables
    heads_kv, groups_per_kv, qk_scale, scale,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    HEAD_DIM: tl.constexpr, head_dim: tl.constexpr, PRECISION: tl.constexpr,
    KV_MAJOR: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dK, dV of one KV tile, one batch, one KV head. Tiles past the end of a shorter dilation
    group have empty ranges and masked stores. ``KV_MAJOR`` computes the scores transposed
    (keys x queries) and takes as ``Win`` the per-key query ranges
    (:meth:`gna.geometry.Dim.query_ranges`) instead of the per-query key windows: its masks
    then need per-key values, which in that layout cost a few registers, and no per-query
    loads. ``USE_TMA`` reads Q and dO through tensor descriptors (Hopper)."""
    BLOCK_N: tl.constexpr = K0 * K1 * K2
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // heads_kv).to(tl.int64)
    h_kv = pid_bh % heads_kv

    g0, g1, g2, G0, G1, G2 = program_group(pid_g, L0, L1, L2, D0, D1, D2)
    j0, j1, j2 = split3(pid_t, NK1, NK2)

    # The KV tile: in-group key coordinates per row, loaded once.
    offs_n = tl.arange(0, BLOCK_N)
    kx0, kx1, kx2, col_ok, x0, x1, x2 = tile_tokens(j0, j1, j2, offs_n, g0, g1, g2, G0, G1, G2,
                                                    D0, D1, D2, K0, K1, K2)
    offs_d = tl.arange(0, HEAD_DIM)
    d_mask = offs_d < head_dim
    hk = h_kv.to(tl.int64)
    k = _load_rows(K + b * sk_b + hk * sk_h + (x0 * sk_0 + x1 * sk_1 + x2 * sk_2)[:, None]
                   + offs_d[None, :], col_ok, d_mask)
    v = _load_rows(V + b * sv_b + hk * sv_h + (x0 * sv_0 + x1 * sv_1 + x2 * sv_2)[:, None]
                   + offs_d[None, :], col_ok, d_mask)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if KV_MAJOR:  # Win holds, per key, the half-open range of queries that see it
        qa0, qb0, qa1, qb1, qa2, qb2 = load_windows(Win, win_s0, win_s1, win_s2, g0, g1, g2,
                                                    kx0, kx1, kx2, col_ok)
    else:  # Win holds, per query, its key window (loaded per Q tile); placeholders here
        qa0, qb0, qa1, qb1, qa2, qb2 = kx0, kx0, kx0, kx0, kx0, kx0

    # Query rows of a Q tile: token offsets inside the tile (pointer loads), per-tile steps.
    r0, r1, r2 = tile_coords(0, 0, 0, tl.arange(0, BLOCK_M), T0, T1, T2)
    y0 = (r0 * D0).to(tl.int64)
    y1 = (r1 * D1).to(tl.int64)
    y2 = (r2 * D2).to(tl.int64)
    q_row = y0 * sq_0 + y1 * sq_1 + y2 * sq_2
    do_row = y0 * sdo_0 + y1 * sdo_1 + y2 * sdo_2
    z0 = g0.to(tl.int64)
    z1 = g1.to(tl.int64)
    z2 = g2.to(tl.int64)
    q_grp = Q + b * sq_b + z0 * sq_0 + z1 * sq_1 + z2 * sq_2
    do_grp = dO + b * sdo_b + z0 * sdo_0 + z1 * sdo_1 + z2 * sdo_2
    # Row statistics of this batch and group; a query head adds h * stat_h.
    stat_h = n_q_tiles.to(tl.int64) * (D0 * D1 * D2) * BLOCK_M
    stat_base = (b * (heads_kv * groups_per_kv) * stat_h
                 + pid_g.to(tl.int64) * n_q_tiles * BLOCK_M)
    step0 = (T0 * D0).to(tl.int64)
    step1 = (T1 * D1).to(tl.int64)
    step2 = (T2 * D2).to(tl.int64)
    h_first = h_kv * groups_per_kv
    if USE_TMA:
        heads = heads_kv * groups_per_kv
        q_desc = tl.make_tensor_descriptor(
            q_grp, shape=[G0, G1, G2, heads, head_dim],
            strides=[D0 * sq_0, D1 * sq_1, D2 * sq_2, sq_h, 1],
            block_shape=[T0, T1, T2, 1, HEAD_DIM])
        do_desc = tl.make_tensor_descriptor(
            do_grp, shape=[G0, G1, G2, heads, head_dim],
            strides=[D0 * sdo_0, D1 * sdo_1, D2 * sdo_2, sdo_h, 1],
            block_shape=[T0, T1, T2, 1, HEAD_DIM])
    else:
        q_desc = None
        do_desc = None

    # Q tile ranges of this KV tile per dimension: visited [f, l), mask-free [ff, fl).
    f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2 = load_ranges(
        Inv, inv_s0, inv_s1, inv_s2, g0, g1, g2, j0, j1, j2)

    # One flat loop over (Q tile, query head of this KV head) per kind of tile keeps it the
    # innermost loop, which Triton software-pipelines.
    # 1. Mask-free Q tiles: every query of the tile sees every key of this KV tile. The tile
    # and head are carried from step to step (no divisions in the loop).
    n_full = (fl0 - ff0) * (fl1 - ff1) * (fl2 - ff2)
    t0, t1, t2, hh = ff0, ff1, ff2, 0
    for n in range(0, n_full * groups_per_kv):
        dk, dv = _dkdv_step(
            dk, dv, k, v, kx0, kx1, kx2, qa0, qb0, qa1, qb1, qa2, qb2, t0, t1, t2,
            (h_first + hh).to(tl.int64),
            q_grp, do_grp, q_desc, do_desc, Stats, stat_base, stat_h, stat_stride, NT1, NT2,
            q_row, do_row, sq_0, sq_1, sq_2, sq_h, sdo_0, sdo_1, sdo_2, sdo_h,
            step0, step1, step2, G0, G1, G2,
            Win, win_s0, win_s1, win_s2, g0, g1, g2, offs_d, d_mask, qk_scale,
            T0, T1, T2, HEAD_DIM, MASKED=False, KV_MAJOR=KV_MAJOR, USE_TMA=USE_TMA,
            PRECISION=PRECISION)
        hh += 1
        wrap = hh >= groups_per_kv
        hh = tl.where(wrap, 0, hh)
        u0, u1, u2 = next_full_tile(t0, t1, t2, ff1, fl1, ff2, fl2)
        t0, t1, t2 = tl.where(wrap, u0, t0), tl.where(wrap, u1, t1), tl.where(wrap, u2, t2)

    # 2. Partial Q tiles: the visited box minus the full box, with per-query window masks.
    n_partial = partial_count(f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2)
    for n in range(0, n_partial * groups_per_kv):
        u0, u1, u2 = partial_tile(n // groups_per_kv, f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2,
                                  l2, ff2, fl2)
        dk, dv = _dkdv_step(
            dk, dv, k, v, kx0, kx1, kx2, qa0, qb0, qa1, qb1, qa2, qb2, u0, u1, u2,
            (h_first + n % groups_per_kv).to(tl.int64),
            q_grp, do_grp, q_desc, do_desc, Stats, stat_base, stat_h, stat_stride, NT1, NT2,
            q_row, do_row, sq_0, sq_1, sq_2, sq_h, sdo_0, sdo_1, sdo_2, sdo_h,
            step0, step1, step2, G0, G1, G2,
            Win, win_s0, win_s1, win_s2, g0, g1, g2, offs_d, d_mask, qk_scale,
            T0, T1, T2, HEAD_DIM, MASKED=True, KV_MAJOR=KV_MAJOR, USE_TMA=USE_TMA,
            PRECISION=PRECISION)

    mask = col_ok[:, None] & d_mask[None, :]
    tl.store(dK + b * sdk_b + hk * sdk_h + (x0 * sdk_0 + x1 * sdk_1 + x2 * sdk_2)[:, None]
             + offs_d[None, :], (dk * scale).to(dK.dtype.element_ty), mask=mask)
    tl.store(dV + b * sdv_b + hk * sdv_h + (x0 * sdv_0 + x1 * sdv_1 + x2 * sdv_2)[:, None]
             + offs_d[None, :], dv.to(dV.dtype.element_ty), mask=mask)


# --- dQ -----------------------------------------------------------------------------------

@triton.jit
def _dq_kv_tile(dq, q, do, lse2, delta, k, v, kx0, kx1, kx2, ws0, we0, ws1, we1, ws2, we2,
                qk_scale, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate one KV tile into a Q tile's (unscaled) dQ."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]
    if MASKED:
        seen = in_window(kx0[None, :], kx1[None, :], kx2[None, :], ws0[:, None], we0[:, None],
                          ws1[:, None], we1[:, None], ws2[:, None], we2[:, None])
        s = tl.where(seen, s, float("-inf"))
    p = tl.exp2(s)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit(do_not_specialize=["D0", "D1", "D2"])
def gna_backward_dq_kernel(
    Q, K, V, EK, EV, dO, Lse, Delta, dQ, Win, Rng,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    sdo_b, sdo_0, sdo_1, sdo_2, sdo_h,
    sl_b, sl_0, sl_1, sl_2, sl_h,  # Lse and Delta (same layout)
    sdq_b, sdq_0, sdq_1, sdq_2, sdq_h,
    sek_b, sek_n, sek_h, sev_b, sev_n, sev_h,
    L0, L1, L2, D0, D1, D2,
    NT0, NT1, NT2,  # Q tiles per dimension of dilation group 0 (the longest)
    win_s0, win_s1, win_s2, rng_s0, rng_s1, rng_s2,
    heads, groups_per_kv, num_extra, qk_scale, scale,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    HEAD_DIM: tl.constexpr, head_dim: tl.constexpr, HAS_EXTRA: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dQ of one Q tile, one batch, one head: the forward's KV iteration, then the extra keys.
    ``USE_TMA`` reads K and V through tensor descriptors (Hopper), as the forward does."""
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    BLOCK_N: tl.constexpr = K0 * K1 * K2
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    h_kv = (h // groups_per_kv).to(tl.int64)
    h = h.to(tl.int64)

    g0, g1, g2, G0, G1, G2 = program_group(pid_g, L0, L1, L2, D0, D1, D2)
    t0, t1, t2 = split3(pid_t, NT1, NT2)

    # The Q tile, its dO, LSE (as log2) and delta, loaded once.
    offs_m = tl.arange(0, BLOCK_M)
    i0, i1, i2, row_ok, x0, x1, x2 = tile_tokens(t0, t1, t2, offs_m, g0, g1, g2, G0, G1, G2,
                                                 D0, D1, D2, T0, T1, T2)
    offs_d = tl.arange(0, HEAD_DIM)
    d_mask = offs_d < head_dim
    q = _load_rows(Q + b * sq_b + h * sq_h + (x0 * sq_0 + x1 * sq_1 + x2 * sq_2)[:, None]
                   + offs_d[None, :], row_ok, d_mask)
    do = _load_rows(dO + b * sdo_b + h * sdo_h + (x0 * sdo_0 + x1 * sdo_1 + x2 * sdo_2)[:, None]
                    + offs_d[None, :], row_ok, d_mask)
    l_off = b * sl_b + h * sl_h + x0 * sl_0 + x1 * sl_1 + x2 * sl_2
    # Padding rows: lse = delta = 0 with q = dO = 0 keep them finite; their dQ is not stored.
    lse2 = tl.load(Lse + l_off, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + l_off, mask=row_ok, other=0.0)
    ws0, we0, ws1, we1, ws2, we2 = load_windows(Win, win_s0, win_s1, win_s2, g0, g1, g2,
                                                 i0, i1, i2, row_ok)
    f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2 = load_ranges(
        Rng, rng_s0, rng_s1, rng_s2, g0, g1, g2, t0, t1, t2)

    # Key columns of a KV tile: offsets inside the tile, and their token offsets.
    offs_n = tl.arange(0, BLOCK_N)
    c0, c1, c2 = tile_coords(0, 0, 0, offs_n, K0, K1, K2)
    y0 = (c0 * D0).to(tl.int64)
    y1 = (c1 * D1).to(tl.int64)
    y2 = (c2 * D2).to(tl.int64)
    k_col = y0 * sk_0 + y1 * sk_1 + y2 * sk_2
    v_col = y0 * sv_0 + y1 * sv_1 + y2 * sv_2
    z0 = g0.to(tl.int64)
    z1 = g1.to(tl.int64)
    z2 = g2.to(tl.int64)
    k_grp = K + b * sk_b + h_kv * sk_h + z0 * sk_0 + z1 * sk_1 + z2 * sk_2
    v_grp = V + b * sv_b + h_kv * sv_h + z0 * sv_0 + z1 * sv_1 + z2 * sv_2
    step0 = (K0 * D0).to(tl.int64)
    step1 = (K1 * D1).to(tl.int64)
    step2 = (K2 * D2).to(tl.int64)

    if USE_TMA:
        k_desc = group_descriptor(k_grp, G0, G1, G2, D0, D1, D2, sk_0, sk_1, sk_2, head_dim,
                                  K0, K1, K2, HEAD_DIM)
        v_desc = group_descriptor(v_grp, G0, G1, G2, D0, D1, D2, sv_0, sv_1, sv_2, head_dim,
                                  K0, K1, K2, HEAD_DIM)
    else:
        k_desc = None
        v_desc = None
    PAD_D: tl.constexpr = HEAD_DIM != head_dim

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # 1. Mask-free KV tiles (the tile is carried from step to step, as in the forward).
    j0, j1, j2 = ff0, ff1, ff2
    for n in range(0, (fl0 - ff0) * (fl1 - ff1) * (fl2 - ff2)):
        s0, s1, s2 = j0 * step0, j1 * step1, j2 * step2
        k = load_kv_tile(k_grp + s0 * sk_0 + s1 * sk_1 + s2 * sk_2, k_desc, k_col, offs_d,
                         d_mask, j0, j1, j2, None, 0, 0, K0, K1, K2, HEAD_DIM,
                         MASKED=False, PAD_D=PAD_D, USE_TMA=USE_TMA)
        v = load_kv_tile(v_grp + s0 * sv_0 + s1 * sv_1 + s2 * sv_2, v_desc, v_col, offs_d,
                         d_mask, j0, j1, j2, None, 0, 0, K0, K1, K2, HEAD_DIM,
                         MASKED=False, PAD_D=PAD_D, USE_TMA=USE_TMA)
        dq = _dq_kv_tile(dq, q, do, lse2, delta, k, v, c0, c1, c2,
                         ws0, we0, ws1, we1, ws2, we2, qk_scale,
                         MASKED=False, PRECISION=PRECISION)
        j0, j1, j2 = next_full_tile(j0, j1, j2, ff1, fl1, ff2, fl2)

    # 2. Partial KV tiles: the visited box minus the full box, masked.
    for n in range(0, partial_count(f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2)):
        j0, j1, j2 = partial_tile(n, f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2)
        kx0, kx1, kx2 = j0 * K0 + c0, j1 * K1 + c1, j2 * K2 + c2
        col_ok = (kx0 < G0) & (kx1 < G1) & (kx2 < G2)
        s0, s1, s2 = j0 * step0, j1 * step1, j2 * step2
        k = load_kv_tile(k_grp + s0 * sk_0 + s1 * sk_1 + s2 * sk_2, k_desc, k_col, offs_d,
                         d_mask, j0, j1, j2, col_ok, 0, 0, K0, K1, K2, HEAD_DIM,
                         MASKED=True, PAD_D=PAD_D, USE_TMA=USE_TMA)
        v = load_kv_tile(v_grp + s0 * sv_0 + s1 * sv_1 + s2 * sv_2, v_desc, v_col, offs_d,
                         d_mask, j0, j1, j2, col_ok, 0, 0, K0, K1, K2, HEAD_DIM,
                         MASKED=True, PAD_D=PAD_D, USE_TMA=USE_TMA)
        dq = _dq_kv_tile(dq, q, do, lse2, delta, k, v, kx0, kx1, kx2,
                         ws0, we0, ws1, we1, ws2, we2, qk_scale,
                         MASKED=True, PRECISION=PRECISION)

    # 3. Additional keys/values: seen by every query.
    if HAS_EXTRA:
        ek_base = EK + b * sek_b + h_kv * sek_h
        ev_base = EV + b * sev_b + h_kv * sev_h
        for start in range(0, num_extra, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < num_extra
            ek = _load_rows(ek_base + cols.to(tl.int64)[:, None] * sek_n + offs_d[None, :],
                            col_ok, d_mask)
            ev = _load_rows(ev_base + cols.to(tl.int64)[:, None] * sev_n + offs_d[None, :],
                            col_ok, d_mask)
            s = tl.dot(q, tl.trans(ek), input_precision=PRECISION) * qk_scale - lse2[:, None]
            p = tl.exp2(tl.where(col_ok[None, :], s, float("-inf")))
            dp = tl.dot(do, tl.trans(ev), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(ek.dtype), ek, dq, input_precision=PRECISION)

    tl.store(dQ + b * sdq_b + h * sdq_h + (x0 * sdq_0 + x1 * sdq_1 + x2 * sdq_2)[:, None]
             + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])


# --- additional keys / values -------------------------------------------------------------

@triton.jit
def gna_backward_extra_kernel(
    Q, EK, EV, dO, Lse, Delta, dEK, dEV,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sdo_b, sdo_0, sdo_1, sdo_2, sdo_h,
    sl_b, sl_0, sl_1, sl_2, sl_h,  # Lse and Delta (same layout)
    sek_b, sek_n, sek_h, sev_b, sev_n, sev_h,
    sp_s, sp_b, sp_n, sp_h,  # fp32 partial sums dEK, dEV: [split, batch, n_extra, heads_kv, d]
    L1, L2, num_tokens, tokens_per_split,
    heads_kv, groups_per_kv, num_extra, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    head_dim: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial dK/dV (unscaled dK) of ``BLOCK_N`` additional keys over one contiguous range of
    query tokens (all dilation groups alike: every query sees every additional key), summed
    over the query heads of the KV head."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // heads_kv).to(tl.int64)
    h_kv = pid_bh % heads_kv
    hk = h_kv.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < num_extra
    cols = offs_n.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    d_mask = offs_d < head_dim
    ek = _load_rows(EK + b * sek_b + hk * sek_h + cols[:, None] * sek_n + offs_d[None, :],
                    col_ok, d_mask)
    ev = _load_rows(EV + b * sev_b + hk * sev_h + cols[:, None] * sev_n + offs_d[None, :],
                    col_ok, d_mask)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    tok_lo = pid_s * tokens_per_split
    tok_hi = tl.minimum(tok_lo + tokens_per_split, num_tokens)
    offs_m = tl.arange(0, BLOCK_M)
    # One flat loop over (token block, query head), so it is the loop Triton pipelines.
    n_blocks = tl.cdiv(tok_hi - tok_lo, BLOCK_M)
    for n in range(0, n_blocks * groups_per_kv):
        x = tok_lo + (n // groups_per_kv) * BLOCK_M + offs_m
        h = (h_kv * groups_per_kv + n % groups_per_kv).to(tl.int64)
        row_ok = x < tok_hi
        x0 = (x // (L1 * L2)).to(tl.int64)
        x1 = ((x // L2) % L1).to(tl.int64)
        x2 = (x % L2).to(tl.int64)
        q = _load_rows(Q + b * sq_b + h * sq_h + (x0 * sq_0 + x1 * sq_1 + x2 * sq_2)[:, None]
                       + offs_d[None, :], row_ok, d_mask)
        do = _load_rows(dO + b * sdo_b + h * sdo_h
                        + (x0 * sdo_0 + x1 * sdo_1 + x2 * sdo_2)[:, None] + offs_d[None, :],
                        row_ok, d_mask)
        l_off = b * sl_b + h * sl_h + x0 * sl_0 + x1 * sl_1 + x2 * sl_2
        lse2 = tl.load(Lse + l_off, mask=row_ok, other=0.0) * _LOG2E
        delta = tl.load(Delta + l_off, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(ek), input_precision=PRECISION) * qk_scale - lse2[:, None]
        p = tl.exp2(tl.where(row_ok[:, None], s, float("-inf")))
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(ev), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)

    p_off = (pid_s.to(tl.int64) * sp_s + b * sp_b + hk * sp_h + cols[:, None] * sp_n
             + offs_d[None, :])
    mask = col_ok[:, None] & d_mask[None, :]
    tl.store(dEK + p_off, dk, mask=mask)
    tl.store(dEV + p_off, dv, mask=mask)
