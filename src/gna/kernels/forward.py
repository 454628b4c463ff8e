"""Fused GNA forward kernel (Triton).

One program computes one Q tile (a box of ``T0 x T1 x T2`` tokens of one dilation group, one
batch, one head) against the KV tiles (boxes of ``K0 x K1 x K2`` tokens) in its range.
Problems of fewer than three dimensions are padded with unit dimensions by the launcher.

Which KV tiles a Q tile visits comes from :mod:`gna.geometry` through two small tables the
launcher builds (``win``: each query's window per dimension; ``rng``: each Q tile's visited
and mask-free KV tile ranges per dimension). The kernel does no geometry of its own: it walks

1. the *full* box (product of the per-dimension mask-free ranges) with no mask at all, then
2. the visited box minus the full box (enumerated as three disjoint slabs, so no iteration is
   wasted on a tile the first loop did) with per-row window masks and bounds checks, then
3. the additional (text) keys, if any, in tiles of ``BLOCK_N``.

Tokens are read straight from the heads-last layout through strides (no permute copy); the
softmax is online, in fp32, with ``exp2`` and the scale folded into ``qk_scale``.
"""

import triton
import triton.language as tl

from .tiles import (group_descriptor, in_window, load_kv_tile, load_ranges, next_full_tile,
                    load_windows, partial_count, partial_tile, program_group, split3,
                    tile_coords, tile_tokens)

# Finite stand-in for -inf as the running max: a row whose first tiles are fully masked must
# not compute exp2(-inf - -inf).
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k, v,
    kx0, kx1, kx2,
    ws0, we0, ws1, we1, ws2, we2,
    qk_scale,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """One KV tile of the online softmax. ``kx*`` are the tile's key coordinates per column;
    with ``MASKED`` each score is kept only if its key lies in the row's window."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        seen = in_window(kx0[None, :], kx1[None, :], kx2[None, :], ws0[:, None], we0[:, None],
                         ws1[:, None], we1[:, None], ws2[:, None], we2[:, None])
        s = tl.where(seen, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:
        # Scale folded into one FMA per score: exp2(s * scale - m).
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


# Dilations equal to 1 must stay run-time values (Triton folds 1s into constants otherwise).
@triton.jit(do_not_specialize=["D0", "D1", "D2"])
def gna_forward_kernel(
    Q, K, V, EK, EV, Out, Lse, Win, Rng, Counts, KD, VD,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    so_b, so_0, so_1, so_2, so_h,
    sl_b, sl_0, sl_1, sl_2, sl_h,
    sek_b, sek_n, sek_h, sev_b, sev_n, sev_h,
    L0, L1, L2, D0, D1, D2,  # full sizes and dilations of the (padded) 3 dimensions
    NT0, NT1, NT2,  # Q tiles per dimension of dilation group 0 (the longest)
    win_s0, win_s1, win_s2, rng_s0, rng_s1, rng_s2,  # strides of the geometry tables
    heads, groups_per_kv, head_dim, num_extra, qk_scale,
    T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, HAS_EXTRA: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr, HOST_DESC: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, COUNT_TILES: tl.constexpr,
):
    """``HEAD_DIM`` is head_dim rounded up to a power of two (``PAD_D`` when they differ).
    Tiles past the end of a shorter dilation group have empty ranges and masked stores.
    ``COUNT_TILES`` (a debug mode) counts the KV tiles each program's loops actually ran and
    how many of them were masked, stored as ``Counts[pid_g, pid_t] = (visited, masked)`` by the
    programs of batch 0, head 0.

    ``USE_TMA`` reads K/V through tensor descriptors: ``KD``/``VD``, made on the host over the
    whole tensors, with ``HOST_DESC`` (no dilation; see
    :func:`gna.triton_backend.host_descriptors`), else one per program over its group, batch
    and head (making the two costs each program ~1.8 us on H100, about one KV tile of
    work)."""
    BLOCK_M: tl.constexpr = T0 * T1 * T2
    BLOCK_N: tl.constexpr = K0 * K1 * K2
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // heads
    h = pid_bh % heads
    h_kv = h // groups_per_kv

    g0, g1, g2, G0, G1, G2 = program_group(pid_g, L0, L1, L2, D0, D1, D2)
    t0, t1, t2 = split3(pid_t, NT1, NT2)

    # Query rows of the tile: in-group coordinates and offsets.
    offs_m = tl.arange(0, BLOCK_M)
    i0, i1, i2, row_ok, x0, x1, x2 = tile_tokens(t0, t1, t2, offs_m, g0, g1, g2, G0, G1, G2,
                                                 D0, D1, D2, T0, T1, T2)
    offs_d = tl.arange(0, HEAD_DIM)
    d_mask = offs_d < head_dim
    tok_q = x0 * sq_0 + x1 * sq_1 + x2 * sq_2
    q_ptrs = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + tok_q[:, None] + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    # Each row's window per dimension and this Q tile's KV tile ranges per dimension (visited
    # [f, l), mask-free [ff, fl)), from the geometry tables; padding rows see nothing.
    ws0, we0, ws1, we1, ws2, we2 = load_windows(Win, win_s0, win_s1, win_s2, g0, g1, g2,
                                                i0, i1, i2, row_ok)
    f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2 = load_ranges(
        Rng, rng_s0, rng_s1, rng_s2, g0, g1, g2, t0, t1, t2)

    # Key columns of a KV tile: per-dimension offsets inside the tile, and their token offsets.
    offs_n = tl.arange(0, BLOCK_N)
    c0, c1, c2 = tile_coords(0, 0, 0, offs_n, K0, K1, K2)
    k_col = (c0 * D0).to(tl.int64) * sk_0 + (c1 * D1).to(tl.int64) * sk_1 + (c2 * D2).to(tl.int64) * sk_2
    v_col = (c0 * D0).to(tl.int64) * sv_0 + (c1 * D1).to(tl.int64) * sv_1 + (c2 * D2).to(tl.int64) * sv_2
    k_grp = K + b.to(tl.int64) * sk_b + h_kv.to(tl.int64) * sk_h + g0 * sk_0 + g1 * sk_1 + g2 * sk_2
    v_grp = V + b.to(tl.int64) * sv_b + h_kv.to(tl.int64) * sv_h + g0 * sv_0 + g1 * sv_1 + g2 * sv_2
    k_step0 = (K0 * D0).to(tl.int64) * sk_0
    k_step1 = (K1 * D1).to(tl.int64) * sk_1
    k_step2 = (K2 * D2).to(tl.int64) * sk_2
    v_step0 = (K0 * D0).to(tl.int64) * sv_0
    v_step1 = (K1 * D1).to(tl.int64) * sv_1
    v_step2 = (K2 * D2).to(tl.int64) * sv_2

    kv_row0 = b * L0  # the batch's first row of the host descriptors' merged dimension
    if USE_TMA and HOST_DESC:
        k_desc = KD
        v_desc = VD
    elif USE_TMA:
        k_desc = group_descriptor(k_grp, G0, G1, G2, D0, D1, D2, sk_0, sk_1, sk_2, head_dim,
                                  K0, K1, K2, HEAD_DIM)
        v_desc = group_descriptor(v_grp, G0, G1, G2, D0, D1, D2, sv_0, sv_1, sv_2, head_dim,
                                  K0, K1, K2, HEAD_DIM)
    else:
        k_desc = None
        v_desc = None

    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_visited = 0
    n_masked = 0

    # 1. Mask-free KV tiles: every query of the tile sees every key of these.
    j0, j1, j2 = ff0, ff1, ff2
    for n in tl.range(0, (fl0 - ff0) * (fl1 - ff1) * (fl2 - ff2),
                      warp_specialize=WARP_SPECIALIZE):
        k = load_kv_tile(k_grp + j0 * k_step0 + j1 * k_step1 + j2 * k_step2, k_desc, k_col,
                         offs_d, d_mask, j0, j1, j2, None, kv_row0, h_kv, K0, K1, K2, HEAD_DIM,
                         MASKED=False, PAD_D=PAD_D, USE_TMA=USE_TMA, HOST_DESC=HOST_DESC)
        v = load_kv_tile(v_grp + j0 * v_step0 + j1 * v_step1 + j2 * v_step2, v_desc, v_col,
                         offs_d, d_mask, j0, j1, j2, None, kv_row0, h_kv, K0, K1, K2, HEAD_DIM,
                         MASKED=False, PAD_D=PAD_D, USE_TMA=USE_TMA, HOST_DESC=HOST_DESC)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, c0, c1, c2,
                                     ws0, we0, ws1, we1, ws2, we2, qk_scale,
                                     MASKED=False, PRECISION=PRECISION)
        if COUNT_TILES:
            n_visited += 1
        j0, j1, j2 = next_full_tile(j0, j1, j2, ff1, fl1, ff2, fl2)

    # 2. Partial KV tiles: the visited box minus the full box, as three disjoint slabs.
    for n in range(0, partial_count(f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2)):
        j0, j1, j2 = partial_tile(n, f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2)
        kx0, kx1, kx2 = j0 * K0 + c0, j1 * K1 + c1, j2 * K2 + c2
        col_ok = (kx0 < G0) & (kx1 < G1) & (kx2 < G2)
        k = load_kv_tile(k_grp + j0 * k_step0 + j1 * k_step1 + j2 * k_step2, k_desc, k_col,
                         offs_d, d_mask, j0, j1, j2, col_ok, kv_row0, h_kv, K0, K1, K2,
                         HEAD_DIM, MASKED=True, PAD_D=PAD_D, USE_TMA=USE_TMA,
                         HOST_DESC=HOST_DESC)
        v = load_kv_tile(v_grp + j0 * v_step0 + j1 * v_step1 + j2 * v_step2, v_desc, v_col,
                         offs_d, d_mask, j0, j1, j2, col_ok, kv_row0, h_kv, K0, K1, K2,
                         HEAD_DIM, MASKED=True, PAD_D=PAD_D, USE_TMA=USE_TMA,
                         HOST_DESC=HOST_DESC)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, kx0, kx1, kx2,
                                     ws0, we0, ws1, we1, ws2, we2, qk_scale,
                                     MASKED=True, PRECISION=PRECISION)
        if COUNT_TILES:
            n_visited += 1
            n_masked += 1

    # 3. Additional keys/values (e.g. text tokens): seen by every query.
    if HAS_EXTRA:
        ek_base = EK + b.to(tl.int64) * sek_b + h_kv.to(tl.int64) * sek_h
        ev_base = EV + b.to(tl.int64) * sev_b + h_kv.to(tl.int64) * sev_h
        for start in range(0, num_extra, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < num_extra
            ek = tl.load(ek_base + cols.to(tl.int64)[:, None] * sek_n + offs_d[None, :],
                         mask=col_ok[:, None] & d_mask[None, :], other=0.0)
            ev = tl.load(ev_base + cols.to(tl.int64)[:, None] * sev_n + offs_d[None, :],
                         mask=col_ok[:, None] & d_mask[None, :], other=0.0)
            s = tl.dot(q, tl.trans(ek), input_precision=PRECISION) * qk_scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(ev.dtype), ev, acc, input_precision=PRECISION)
            m_i = m_new

    # Epilogue: normalize, write out and the natural-log LSE.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tok_o = x0 * so_0 + x1 * so_1 + x2 * so_2
    o_ptrs = Out + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + tok_o[:, None] + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    tok_l = x0 * sl_0 + x1 * sl_1 + x2 * sl_2
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(Lse + b.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + tok_l, lse, mask=row_ok)
    if COUNT_TILES:
        if pid_bh == 0:
            slot = Counts + (pid_g * NT0 * NT1 * NT2 + pid_t) * 2
            tl.store(slot, n_visited)
            tl.store(slot + 1, n_masked)
