"""Persistent, warp-specialized GNA forward for perfectly block-sparse problems (Gluon, Hopper).

Where every KV tile a Q tile visits is mask-free (strided GNA whose stride is a multiple of the
tiles, and dense attention through the kernel), the forward is FlashAttention's loop with no
masking at all, and what limits it is scheduling: on H100 the Triton kernel
(:mod:`gna.kernels.forward`) runs each tile pair's two GEMMs and its softmax one after the
other, and each program pays its prologue (tables, Q, first K/V copies) and epilogue with the
SM otherwise idle. This kernel is written in Gluon, Triton's lower-level dialect, to schedule
the work the way FlashAttention-3 does:

- a **producer warp** streams Q, K and V tiles through TMA copies into a ring of ``STAGES``
  shared-memory slots, signalling mbarriers;
- two **consumer warpgroups** each own 64 rows of the 128-row Q tile and share the K/V slots.
  They synchronize only through the mbarriers, so one runs its softmax while the other's GEMMs
  use the tensor cores. Each issues in FlashAttention-3's order: tile ``j``'s scores, then tile
  ``j - 1``'s ``P V``, both in flight, then waits for the scores only, so its own softmax starts
  while ``P V`` runs (measured against issuing ``P V`` first: -2% on the 1-D and 3-D strided
  benchmark rows, -6% dense, session 7 of ``benchmarks/NOTES.md``). ptxas schedules the
  ``P V`` wait above the softmax's ``exp2`` (only the row max overlaps it); forcing the order
  (as the dQ kernel does) measured slower here, and so did FlashAttention-3's ping-pong
  (named barriers making the consumers take turns issuing);
- the program is **persistent**: one per SM, walking the work items (Q tile, batch, head) in
  the same order as the Triton kernel's grid. The producer fetches the next item's K/V (and its
  Q, as soon as both consumers are done with the current one) while the consumers finish the
  current item, so the per-item prologue and epilogue overlap with other work.

The arithmetic (scores, online softmax in fp32 with ``exp2``, ``P`` rounded to the input dtype,
``acc`` rescaled before each ``P V``) is the Triton kernel's, tile for tile in the same order:
on the benchmark problems the outputs agree bit for bit.

Inputs come through host-made 5-D tensor descriptors over ``[batch * L0, L1, L2, heads, d]``
(:func:`gna.triton_backend.host_descriptors`); which problems qualify is decided by
:func:`gna.triton_backend.gluon_block_sparse_eligible`.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.runtime.jit import constexpr_function

from .tiles import load_ranges, next_full_tile, split3, tile_tokens


@constexpr_function
def wgmma_layout(columns):
    """The layout of a wgmma accumulator of one warpgroup (64 rows) and ``columns`` columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                     instr_shape=[16, columns, 16])


@gluon.jit
def _work_item(item, geo):
    """Batch, head, KV head, first descriptor row of the batch and Q tile coordinates of work
    item ``item`` (Q tiles fastest, then heads, then batches, as the Triton kernel's grid), and
    the tile's visited and mask-free KV boxes per dimension (``load_ranges``' twelve values)."""
    Rng, rng_s0, rng_s2, L0, NT0, NT1, NT2, heads, groups_per_kv, G0, G1, G2 = geo
    per_head = NT0 * NT1 * NT2
    pid_t = item % per_head
    pid_bh = item // per_head
    b = pid_bh // heads
    h = pid_bh % heads
    t0, t1, t2 = split3(pid_t, NT1, NT2)
    box = load_ranges(Rng, rng_s0, 0, rng_s2, 0, 0, 0, t0, t1, t2)
    return b, h, h // groups_per_kv, b * L0, t0, t1, t2, box


@gluon.jit
def _full_box(box):
    """The mask-free part of a ``load_ranges`` box: ``ff0, ff1, fl1, ff2, fl2`` (what walking
    it with ``next_full_tile`` needs) and its number of tiles."""
    _, _, ff0, fl0, _, _, ff1, fl1, _, _, ff2, fl2 = box
    return ff0, ff1, fl1, ff2, fl2, (fl0 - ff0) * (fl1 - ff1) * (fl2 - ff2)


@gluon.jit
def _consume(HALF: gl.constexpr, descs, bufs, bars, geo, outs, sched, qk_scale):
    """Consumer warpgroup ``HALF``: rows ``[64 * HALF, 64 * HALF + 64)`` of every Q tile."""
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem = bufs
    q_full, q_empty, k_full, v_full, kv_empty = bars
    Out, Lse, so_b, so_0, so_1, so_2, so_h, sl_b, sl_0, sl_1, sl_2, sl_h = outs
    first_item, num_items, num_programs = sched
    G0 = geo[9]
    G1 = geo[10]
    G2 = geo[11]
    T0: gl.constexpr = q_desc.block_type.shape[0]
    T1: gl.constexpr = q_desc.block_type.shape[1]
    T2: gl.constexpr = q_desc.block_type.shape[2]
    K0: gl.constexpr = k_desc.block_type.shape[0]
    K1: gl.constexpr = k_desc.block_type.shape[1]
    K2: gl.constexpr = k_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[4]
    BLOCK_M: gl.constexpr = T0 * T1 * T2
    BLOCK_N: gl.constexpr = K0 * K1 * K2
    HALF_M: gl.constexpr = BLOCK_M // 2
    STAGES: gl.constexpr = k_smem.type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    # wgmma accumulators of one warpgroup (64 rows); P goes to the second GEMM from registers.
    s_layout: gl.constexpr = wgmma_layout(BLOCK_N)
    o_layout: gl.constexpr = wgmma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM]).slice(HALF * HALF_M, HALF_M, dim=0)

    it = 0  # KV tiles consumed so far, over all work items: the ring's slot and phase
    done = 0  # work items finished: Q's phase
    for item in range(first_item, num_items, num_programs):
        b, h, h_kv, row0, t0, t1, t2, box = _work_item(item, geo)
        ff0, ff1, fl1, ff2, fl2, n = _full_box(box)
        acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_full, done & 1)

        # First KV tile: scores and softmax; its P V waits for the next tile's scores.
        slot = it % STAGES
        phase = (it // STAGES) & 1
        mbarrier.wait(k_full.index(slot), phase)
        s = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                          s_zero, use_acc=False)
        m_i = gl.max(s, 1) * qk_scale
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, 1)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        prev = slot
        prev_phase = phase
        it += 1
        for j in range(1, n):
            # FlashAttention-3's order: this tile's scores, then the previous tile's P V, both
            # in flight; the softmax starts while P V still uses the tensor cores (ptxas puts
            # the P V wait before the exp2, so only the row max overlaps it).
            slot = it % STAGES
            phase = (it // STAGES) & 1
            mbarrier.wait(k_full.index(slot), phase)
            s = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                              s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_full.index(prev), prev_phase)
            acc = warpgroup_mma(p16, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc,
                                is_async=True)
            s = warpgroup_mma_wait(1, deps=[s])
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
            mbarrier.arrive(kv_empty.index(prev), count=1)  # the previous P V is done
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            prev = slot
            prev_phase = phase
            it += 1
        # Every score of this Q tile is done: the producer loads the next one meanwhile.
        mbarrier.arrive(q_empty, count=1)
        mbarrier.wait(v_full.index(prev), prev_phase)
        acc = warpgroup_mma(p16, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc,
                            is_async=True)
        acc, p16 = warpgroup_mma_wait(0, deps=[acc, p16])
        mbarrier.arrive(kv_empty.index(prev), count=1)
        done += 1

        # Epilogue: normalize, store the rows inside the layout, natural-log LSE.
        row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
        l_o = gl.convert_layout(l_i, row_layout)
        acc = acc / gl.expand_dims(l_o, 1)
        rows = HALF * HALF_M + gl.arange(0, HALF_M, layout=row_layout)
        _, _, _, row_ok, i0, i1, i2 = tile_tokens(t0, t1, t2, rows, 0, 0, 0, G0, G1, G2, 1, 1, 1,
                                                  T0, T1, T2)
        tok = i0 * so_0 + i1 * so_1 + i2 * so_2
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o_ptrs = (Out + b.to(gl.int64) * so_b + h.to(gl.int64) * so_h + gl.expand_dims(tok, 1)
                  + gl.expand_dims(offs_d, 0))
        gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(row_ok, 1))
        lse = (gl.convert_layout(m_i, row_layout) + gl.log2(l_o)) * 0.6931471805599453
        tok_l = i0 * sl_0 + i1 * sl_1 + i2 * sl_2
        gl.store(Lse + b.to(gl.int64) * sl_b + h.to(gl.int64) * sl_h + tok_l, lse, mask=row_ok)


@gluon.jit
def _consume_rows_0_63(descs, bufs, bars, geo, outs, sched, qk_scale):
    _consume(0, descs, bufs, bars, geo, outs, sched, qk_scale)


@gluon.jit
def _consume_rows_64_127(descs, bufs, bars, geo, outs, sched, qk_scale):
    _consume(1, descs, bufs, bars, geo, outs, sched, qk_scale)


@gluon.jit
def _copy_kv(k_desc, v_desc, k_smem, v_smem, k_full, v_full, kv_empty, it, row0, j0, j1, j2,
             h_kv):
    """Copy KV tile ``(j0, j1, j2)`` of KV head ``h_kv`` into ring slot ``it % STAGES`` once
    both consumers have released it."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    K0: gl.constexpr = k_desc.block_type.shape[0]
    K1: gl.constexpr = k_desc.block_type.shape[1]
    K2: gl.constexpr = k_desc.block_type.shape[2]
    slot = it % STAGES
    mbarrier.wait(kv_empty.index(slot), ((it // STAGES) & 1) ^ 1)
    coords = [row0 + j0 * K0, j1 * K1, j2 * K2, h_kv, 0]
    mbarrier.expect(k_full.index(slot), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, coords, k_full.index(slot), k_smem.index(slot))
    mbarrier.expect(v_full.index(slot), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, coords, v_full.index(slot), v_smem.index(slot))


@gluon.jit
def _produce(descs, bufs, bars, geo, outs, sched, qk_scale):
    """Producer warp: Q and the K/V tiles of every work item, in the consumers' order."""
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem = bufs
    q_full, q_empty, k_full, v_full, kv_empty = bars
    first_item, num_items, num_programs = sched
    STAGES: gl.constexpr = k_smem.type.shape[0]
    T0: gl.constexpr = q_desc.block_type.shape[0]
    T1: gl.constexpr = q_desc.block_type.shape[1]
    T2: gl.constexpr = q_desc.block_type.shape[2]
    it = 0
    done = 0
    for item in range(first_item, num_items, num_programs):
        b, h, h_kv, row0, t0, t1, t2, box = _work_item(item, geo)
        ff0, ff1, fl1, ff2, fl2, n = _full_box(box)
        j0 = ff0
        j1 = ff1
        j2 = ff2
        q_coords = [row0 + t0 * T0, t1 * T1, t2 * T2, h, 0]
        if done == 0:
            # The program's first Q goes first: the first scores need only it and the first K,
            # and at launch every SM's copies compete for bandwidth.
            mbarrier.expect(q_full, q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, q_coords, q_full, q_smem)
        # Later items' first K/V tiles go before Q: their slots free up while the consumers
        # are still on the previous item, whose Q they hold until their last scores.
        n_first = gl.minimum(n, STAGES)
        for j in range(n_first):
            _copy_kv(k_desc, v_desc, k_smem, v_smem, k_full, v_full, kv_empty, it, row0, j0, j1,
                     j2, h_kv)
            j0, j1, j2 = next_full_tile(j0, j1, j2, ff1, fl1, ff2, fl2)
            it += 1
        if done > 0:
            mbarrier.wait(q_empty, (done & 1) ^ 1)
            mbarrier.expect(q_full, q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, q_coords, q_full, q_smem)
        done += 1
        for j in range(n_first, n):
            _copy_kv(k_desc, v_desc, k_smem, v_smem, k_full, v_full, kv_empty, it, row0, j0, j1,
                     j2, h_kv)
            j0, j1, j2 = next_full_tile(j0, j1, j2, ff1, fl1, ff2, fl2)
            it += 1


@gluon.jit
def gna_forward_block_sparse_kernel(
    Out, Lse, Rng, q_desc, k_desc, v_desc,
    so_b, so_0, so_1, so_2, so_h, sl_b, sl_0, sl_1, sl_2, sl_h,
    L0, G0, G1, G2, NT0, NT1, NT2, rng_s0, rng_s2,
    heads, groups_per_kv, qk_scale, num_items,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    """Launch with ``num_warps=4`` (the first consumer warpgroup; the kernel adds the second
    and the producer warp), one program per SM at most, and ``maxnreg`` such that
    ``12 warps * 32 * maxnreg`` fits the register file. ``Rng`` is the launcher's per-Q-tile
    KV range table (the Triton kernel's); every Q tile must have at least one KV tile and no
    partial one. ``G*`` are the (padded 3-D) layout's extents, ``NT*`` its Q tiles per
    dimension, ``num_items`` = Q tiles x batch x heads."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_full, count=1)
    mbarrier.init(q_empty, count=2)  # both consumers release Q
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a slot

    descs = (q_desc, k_desc, v_desc)
    bufs = (q_smem, k_smem, v_smem)
    bars = (q_full, q_empty, k_full, v_full, kv_empty)
    geo = (Rng, rng_s0, rng_s2, L0, NT0, NT1, NT2, heads, groups_per_kv, G0, G1, G2)
    outs = (Out, Lse, so_b, so_0, so_1, so_2, so_h, sl_b, sl_0, sl_1, sl_2, sl_h)
    sched = (gl.program_id(0), num_items, gl.num_programs(0))
    args = (descs, bufs, bars, geo, outs, sched, qk_scale)
    gl.warp_specialize([
        (_consume_rows_0_63, args),
        (_consume_rows_64_127, args),
        (_produce, args),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
