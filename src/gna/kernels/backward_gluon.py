"""Persistent, warp-specialized GNA backward kernels for perfectly block-sparse problems
(Gluon, Hopper): dK/dV and dQ, in the style of the block-sparse forward
(:mod:`gna.kernels.forward_gluon`); both also for problems with partially masked tiles.

Where every (Q tile, KV tile) pair the iteration visits is mask-free, the backward's loops are
FlashAttention-2's with no masking at all, and what limits the Triton kernels
(:mod:`gna.kernels.backward`) is scheduling: each step's GEMMs and elementwise work run one
after the other, and each program pays its prologue and epilogue with the SM otherwise idle.
Both kernels here have

- a **producer warp** streaming the tiles each step needs through TMA copies into a ring of
  ``STAGES`` shared-memory slots, signalling mbarriers;
- two **consumer warpgroups** sharing those slots, each owning 64 rows of the program's
  resident tile; they synchronize only through the mbarriers, so one's elementwise work runs
  while the other's GEMMs use the tensor cores;
- **persistence**: one program per SM walks its work items (the dQ kernel's in the Triton
  kernel's grid order with a fixed stride; the dK/dV and fused kernels' from a table,
  :func:`gna.triton_backward.balanced_schedule`), and the producer starts the next item's
  copies while the consumers finish the current one. The table exists because KV tiles are
  seen by very different numbers of Q tiles (56 to 480 on the 3-D stride-16x8x8 benchmark
  problem, where every Q tile sees 162 KV tiles): with a fixed stride the busiest SM had 9%
  more steps than the mean and the others waited for it (session 11: dK/dV -10% on that
  problem, -7% on 2-D stride 16).

The arithmetic is the Triton kernels', step for step in the same order (scores, ``exp2`` of
the scaled scores minus the log2-LSE, ``P`` and ``dS`` rounded to the input dtype before their
GEMMs, dK scaled once at the end), so the gradients agree with theirs bit for bit.

* :func:`gna_backward_dkdv_block_sparse_kernel`: KV-major, as the Triton kernel's default on
  Hopper. A work item is one 128-key KV tile (batch, KV head); each consumer owns 64 keys and
  computes ``S^T = K Q^T`` and ``dP^T = V dO^T`` as ``[keys, queries]``, so ``P^T`` and
  ``dS^T`` feed the dV and dK GEMMs from registers. Per step (a 64-query Q tile and a query
  head of the KV head) the producer copies Q, dO and the tile's two row statistics (``lse *
  log2(e)`` and ``delta``, tile-major, see :func:`gna.kernels.backward.gna_backward_delta_kernel`)
  into shared memory: in this layout a per-query statistic is a column vector of the scores,
  16 registers a thread, and reading it from shared memory right before its use keeps the
  loop free of spills (measured, session 5 of ``benchmarks/NOTES.md``). It also takes
  problems whose KV tiles are seen by partially masked Q tiles (stride 1, causal): after an
  item's mask-free steps it walks the partial Q tiles (x query heads) in the Triton KV-major
  kernel's order and sets each key row's transposed scores outside the range of queries that
  see that key to -inf (``_mask_tile``; the per-key query ranges loaded once per item).
  Measured against the Triton dK/dV (H200, fp16, d=128, session 9): 1-D w2048 0.190 -> 0.153
  ms, 2-D w80 28.2 -> 23.8 ms, gradients bit-identical.
* :func:`gna_backward_dq_block_sparse_kernel`: query-major, the forward's loop with dO resident
  beside Q and a third GEMM: per KV tile ``S = Q K^T``, ``dP = dO V^T``, ``dS = P (dP -
  delta)``, ``dQ += dS K``; the ``dS K`` GEMM stays in flight while the next tile's two score
  GEMMs are issued, and the ``exp2`` of ``P`` runs while the ``dP`` GEMM does. (ptxas scheduled
  the ``dP`` wait above the ``exp2``; a second wait on an mbarrier already waited on, a loop it
  does not move code across, keeps them in order: -10 to -13% dQ time, session 7 of
  ``benchmarks/NOTES.md``.) The dQ kernel also takes problems with partially masked KV tiles
  (stride 1, causal): after an item's mask-free tiles it visits the partial ones in the Triton
  dQ kernel's order, masking each row's scores outside its key window (``_mask_partial``), so
  its dQ is still the Triton kernel's bit for bit (tested); the mask sits between the scores
  and the ``exp2``, while the ``dP`` GEMM runs. Measured against the Triton dQ on the
  benchmark's stride-1 rows (H200, fp16, d=128, session 8): 1-D w2048 0.108 -> 0.095 ms, 2-D
  w80 16.4 -> 14.6 ms, 3-D w18x24x24 84.5 -> 76.9 ms. Where no Q tile needs them, the
  partial tiles' code is compiled out (``PARTIAL``): its presence alone cost the mask-free
  loop 3-7% (session 10).

* :func:`gna_backward_fused_block_sparse_kernel`: dK, dV and dQ in one pass
  (FlashAttention-3's five GEMMs per tile pair, not the separate kernels' seven), on the
  problems the dK/dV kernel takes, partially masked tiles included (their dS is masked, so
  their dQ shares are too): the dK/dV kernel's loop, plus per step each consumer writes its
  ``dS^T`` rows to shared memory, and once both are there computes half the head dimension of
  ``dQ = dS K`` over the tile's 128 keys and adds it into an fp32 accumulator with the copy
  engine's reduction (``_tma_reduce_add``: Triton 3.6's Gluon has the op without a Python wrapper).
  dK and dV are the dK/dV kernel's bit for bit; dQ's additions come in whatever order the
  KV tiles finish. Measured (H200, fp16, d=128, session 11, both with the balanced
  schedule): 2-10% faster than the separate kernels on 1-D to 3-D block-sparse problems
  (equal, +-2%, on the 3-D benchmark problem), 5% faster on 2-D stride 1 (w80), 6% slower on
  1-D stride 1 (w2048); the launcher takes it unless ``deterministic``, on partially masked
  tiles in 2-D only (:func:`gna.triton_backward._fused_preferred`). (Before the schedule it
  was 0-16% slower on 2-D/3-D block-sparse problems: each step's lockstep between the
  warpgroups made it the more sensitive to the SMs' unequal loads.)

Both producers walk an item's mask-free steps and its partial ones in separate loops: with
the partial tile's coordinates (integer divisions) computed on every step, one producer warp
could not keep the dQ consumers fed (session 10: dQ 6-8% faster apart).

Which problems qualify: :func:`gna.triton_backward.gluon_backward_ineligible`.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton._C.libtriton import ir
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

from .forward_gluon import _copy_kv, _work_item, wgmma_layout
from .tiles import (in_window, load_ranges, load_windows, next_full_tile, partial_count,
                    partial_tile, split3, tile_coords, tile_tokens)

_LOG2E = gl.constexpr(1.4426950408889634)


# --- partially masked tiles (both kernels) ------------------------------------------------

@gluon.jit
def _row_windows(wins, i0, i1, i2, row_ok):
    """Each row's range per dimension from a per-token table (``load_windows``, no dilation):
    a query's key window (dQ), or the queries that see a key (dK/dV); rows outside the layout
    get empty ranges."""
    Win, win_s0, win_s2 = wins
    return load_windows(Win, win_s0, 0, win_s2, 0, 0, 0, i0, i1, i2, row_ok)


@gluon.jit
def _mask_partial(sl, m, box, ranges, C0: gl.constexpr, C1: gl.constexpr, C2: gl.constexpr):
    """Scores ``sl`` (a wgmma layout) whose columns are the item's ``m``-th partial tile
    (``partial_tile``'s order, the Triton kernels'), masked by :func:`_mask_tile`."""
    j0, j1, j2 = _partial_tile_of(m, box)
    return _mask_tile(sl, j0, j1, j2, ranges, C0, C1, C2)


@gluon.jit
def _partial_tile_of(m, box):
    """Coordinates of the item's ``m``-th partial tile in the visited ``box``
    (``load_ranges``' twelve values)."""
    f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2 = box
    return partial_tile(m, f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2)


@gluon.jit
def _mask_tile(sl, j0, j1, j2, ranges, C0: gl.constexpr, C1: gl.constexpr, C2: gl.constexpr):
    """Scores ``sl`` (a wgmma layout) whose columns are tile ``(j0, j1, j2)`` of ``C0 x C1 x
    C2`` tokens, with each column outside its row's per-dimension ``ranges`` at -inf: for dQ,
    ``[rows, keys]`` against each row's key window; for dK/dV, ``[keys, queries]`` against the
    range of queries that see each key."""
    cols = gl.arange(0, C0 * C1 * C2, layout=gl.SliceLayout(0, sl.type.layout))
    x0, x1, x2 = tile_coords(j0, j1, j2, cols, C0, C1, C2)
    a0, b0, a1, b1, a2, b2 = ranges
    seen = in_window(gl.expand_dims(x0, 0), gl.expand_dims(x1, 0), gl.expand_dims(x2, 0),
                     gl.expand_dims(a0, 1), gl.expand_dims(b0, 1), gl.expand_dims(a1, 1),
                     gl.expand_dims(b1, 1), gl.expand_dims(a2, 1), gl.expand_dims(b2, 1))
    return gl.where(seen, sl, float("-inf"))


# --- dK / dV ------------------------------------------------------------------------------

@gluon.jit
def _dkdv_item(item, geo):
    """Batch, KV head, first descriptor row of the batch, KV tile coordinates, the visited and
    mask-free boxes of Q tiles that see the tile (``load_ranges``' twelve values) and the
    item's numbers of steps (Q tiles x query heads of the KV head) on mask-free and on partial
    Q tiles. KV tiles fastest, then KV heads, then batches, as the Triton kernel's grid."""
    Inv, inv_s0, inv_s2, L0, NK1, NK2, per_head, heads_kv, groups_per_kv, G0, G1, G2 = geo
    pid_t = item % per_head
    pid_bh = item // per_head
    b = pid_bh // heads_kv
    h_kv = pid_bh % heads_kv
    j0, j1, j2 = split3(pid_t, NK1, NK2)
    box = load_ranges(Inv, inv_s0, 0, inv_s2, 0, 0, 0, j0, j1, j2)
    f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2 = box
    n_full = (fl0 - ff0) * (fl1 - ff1) * (fl2 - ff2) * groups_per_kv
    n_part = partial_count(f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2) * groups_per_kv
    return b, h_kv, b * L0, j0, j1, j2, box, n_full, n_part


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """``global[box at coord] += src``: the copy engine's reduction (Triton 3.6's Gluon has the
    op, ``ttng.async_tma_reduce``, without a Python wrapper). Completes as a TMA store
    (``tma.store_wait``)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle,
                                             coord, src.handle)


@gluon.jit
def _dq_share(HALF: gl.constexpr, ds, k_smem, fused, it):
    """The fused kernel's dQ GEMM of one step: this warpgroup's ``dS^T`` rows into shared
    memory, then, once the other warpgroup's are there too, ``dQ[:, d half] = dS K[:, d half]``
    over all 128 keys of the tile (issued, not waited on)."""
    dqa_desc, ds_smem, dq_smem, ds_ready = fused
    BLOCK_N: gl.constexpr = ds_smem.type.shape[1]
    HALF_N: gl.constexpr = BLOCK_N // 2
    BLOCK_M: gl.constexpr = ds_smem.type.shape[2]
    HALF_D: gl.constexpr = dq_smem.type.shape[5]
    slot = it % 2
    ds_smem.index(slot).slice(HALF * HALF_N, HALF_N, dim=0).store(ds)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.arrive(ds_ready.index(slot), count=1)
    mbarrier.wait(ds_ready.index(slot), (it // 2) & 1)
    k = k_smem.reshape([BLOCK_N, 2 * HALF_D]).slice(HALF * HALF_D, HALF_D, dim=1)
    return warpgroup_mma(ds_smem.index(slot).permute((1, 0)), k,
                         gl.zeros([BLOCK_M, HALF_D], gl.float32, wgmma_layout(HALF_D)),
                         use_acc=False, is_async=True)


@gluon.jit
def _dq_reduce(HALF: gl.constexpr, dq, fused, row0, t0, t1, t2, h):
    """Add one step's ``dQ[:, d half]`` into the fp32 dQ accumulator in global memory (the
    copy engine's reduction from shared memory), once the previous step's has left."""
    dqa_desc, ds_smem, dq_smem, ds_ready = fused
    T0: gl.constexpr = dqa_desc.block_type.shape[0]
    T1: gl.constexpr = dqa_desc.block_type.shape[1]
    T2: gl.constexpr = dqa_desc.block_type.shape[2]
    HALF_D: gl.constexpr = dqa_desc.block_type.shape[4]
    buf = dq_smem.index(HALF)
    tma.store_wait(0)
    gl.thread_barrier()
    buf.reshape([T0 * T1 * T2, HALF_D]).store(dq)
    fence_async_shared()
    gl.thread_barrier()
    _tma_reduce_add(dqa_desc, [row0 + t0 * T0, t1 * T1, t2 * T2, h, HALF * HALF_D], buf)


@gluon.jit
def _dkdv_step(MASKED: gl.constexpr, FUSED: gl.constexpr, HALF: gl.constexpr, k_h, v_h, bufs,
               bars, it, dk, dv, s_zero, qk_scale, masking, fused, dq_at):
    """One dK/dV step (ring slot ``it % STAGES``: a Q tile of one query head) of consumer
    ``HALF``: ``S^T``, ``dP^T``, then ``dV += P^T dO`` and ``dK += dS^T Q``, waited on before
    the slot is released. ``MASKED``: the item's ``m``-th partial Q tile, ``masking = (m, box,
    ranges)`` (``_mask_tile``). ``FUSED``: also the step's dQ share (``_dq_share``), added at
    ``dq_at = (row0, t0, t1, t2, head)`` (``_dq_reduce``), where a ``MASKED`` step's own
    partial tile replaces ``(t0, t1, t2)``."""
    q_smem, do_smem, k_smem, v_smem, st_smem = bufs
    kv_full, kv_empty, q_full, do_full, q_empty = bars
    STAGES: gl.constexpr = q_smem.type.shape[0]
    T0: gl.constexpr = q_smem.type.shape[1]
    T1: gl.constexpr = q_smem.type.shape[2]
    T2: gl.constexpr = q_smem.type.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[5]
    BLOCK_M: gl.constexpr = T0 * T1 * T2
    dtype: gl.constexpr = q_smem.dtype
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout,
                                                  k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_zero.type.layout)
    slot = it % STAGES
    phase = (it // STAGES) & 1
    q = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    do = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    mbarrier.wait(q_full.index(slot), phase)
    s = warpgroup_mma(k_h, q.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(do_full.index(slot), phase)
    dp = warpgroup_mma(v_h, do.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(1, deps=[s])
    lse2 = st_smem.index(2 * slot).load(col_layout)
    sl = s * qk_scale - gl.expand_dims(lse2, 0)
    if MASKED:
        m, box, ranges = masking
        c0, c1, c2 = _partial_tile_of(m, box)
        sl = _mask_tile(sl, c0, c1, c2, ranges, T0, T1, T2)
    p = gl.exp2(sl)
    p16 = gl.convert_layout(p.to(dtype), op_layout)
    dv = warpgroup_mma(p16, do, dv, is_async=True)
    delta = st_smem.index(2 * slot + 1).load(col_layout)
    dp = warpgroup_mma_wait(1, deps=[dp])
    ds = p * (dp - gl.expand_dims(delta, 0))
    ds16 = gl.convert_layout(ds.to(dtype), op_layout)
    dk = warpgroup_mma(ds16, q, dk, is_async=True)
    if FUSED:
        dq = _dq_share(HALF, ds.to(dtype), k_smem, fused, it)
        dk, dv, p16, ds16, dq = warpgroup_mma_wait(0, deps=[dk, dv, p16, ds16, dq])
        mbarrier.arrive(q_empty.index(slot), count=1)
        row0, t0, t1, t2, h = dq_at
        if MASKED:
            t0 = c0
            t1 = c1
            t2 = c2
        _dq_reduce(HALF, dq, fused, row0, t0, t1, t2, h)
    else:
        dk, dv, p16, ds16 = warpgroup_mma_wait(0, deps=[dk, dv, p16, ds16])
        mbarrier.arrive(q_empty.index(slot), count=1)
    return dk, dv


@gluon.jit
def _dkdv_consume(HALF: gl.constexpr, FUSED: gl.constexpr, descs, bufs, bars, geo, outs, sched,
                  stats, scales, qrs, fused):
    """Consumer warpgroup ``HALF``: keys ``[64 * HALF, 64 * HALF + 64)`` of every KV tile;
    with ``FUSED`` also the tile's share of each step's dQ (``_dq_share``, ``_dq_reduce``)."""
    q_desc = descs[0]
    k_desc = descs[2]
    k_smem = bufs[2]
    v_smem = bufs[3]
    kv_full = bars[0]
    kv_empty = bars[1]
    dK, dV, sdk_b, sdk_0, sdk_1, sdk_2, sdk_h, sdv_b, sdv_0, sdv_1, sdv_2, sdv_h = outs
    Sched, pid = sched
    qk_scale, scale = scales
    groups_per_kv = geo[8]
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
    HALF_N: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = q_desc.dtype
    # wgmma accumulators of one warpgroup: scores [keys, queries]; dK, dV [keys, head_dim].
    s_layout: gl.constexpr = wgmma_layout(BLOCK_M)
    acc_layout: gl.constexpr = wgmma_layout(HEAD_DIM)
    s_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout)
    k_h = k_smem.reshape([BLOCK_N, HEAD_DIM]).slice(HALF * HALF_N, HALF_N, dim=0)
    v_h = v_smem.reshape([BLOCK_N, HEAD_DIM]).slice(HALF * HALF_N, HALF_N, dim=0)

    it = 0  # steps consumed so far, over all work items: the ring's slot and phase
    done = 0  # work items with K/V consumed: the K/V buffer's phase
    for i in range(gl.load(Sched + pid), gl.load(Sched + pid + 1)):
        item = gl.load(Sched + i)
        b, h_kv, row0, j0, j1, j2, box, n_full, n_part = _dkdv_item(item, geo)
        n = n_full + n_part
        # The step's Q tile and query head (the producer's walk), for the fused dQ.
        t0 = box[2]
        t1 = box[6]
        t2 = box[10]
        hh = 0
        dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)
        if n > 0:
            mbarrier.wait(kv_full, done & 1)
            for j in range(n_full):
                dk, dv = _dkdv_step(False, FUSED, HALF, k_h, v_h, bufs, bars, it, dk, dv, s_zero,
                                    qk_scale, (), fused, (row0, t0, t1, t2,
                                                          h_kv * groups_per_kv + hh))
                if FUSED:  # the producer's walk
                    t0, t1, t2, hh = _next_step(t0, t1, t2, hh, box[6], box[7], box[10],
                                                box[11], groups_per_kv)
                it += 1
            # The partial Q tiles: per key (row), the range of queries that see it, loaded
            # once; per step the Q tile's query coordinates (the Triton KV-major kernel's
            # masks, in its order).
            krows = HALF * HALF_N + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, s_layout))
            kx0, kx1, kx2, key_ok, _, _, _ = tile_tokens(j0, j1, j2, krows, 0, 0, 0, G0, G1, G2,
                                                         1, 1, 1, K0, K1, K2)
            ranges = _row_windows(qrs, kx0, kx1, kx2, key_ok)
            for j in range(n_part):
                dk, dv = _dkdv_step(True, FUSED, HALF, k_h, v_h, bufs, bars, it, dk, dv, s_zero,
                                    qk_scale, (j // groups_per_kv, box, ranges), fused,
                                    (row0, 0, 0, 0, h_kv * groups_per_kv + j % groups_per_kv))
                it += 1
            mbarrier.arrive(kv_empty, count=1)  # the producer may load the next K/V
            done += 1

        # Epilogue: this warpgroup's 64 keys (unvisited tiles store zeros).
        row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
        rows = HALF * HALF_N + gl.arange(0, HALF_N, layout=row_layout)
        _, _, _, row_ok, x0, x1, x2 = tile_tokens(j0, j1, j2, rows, 0, 0, 0, G0, G1, G2, 1, 1, 1,
                                                  K0, K1, K2)
        row_ok = gl.expand_dims(row_ok, 1)
        offs_d = gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout)), 0)
        bb = b.to(gl.int64)
        hk = h_kv.to(gl.int64)
        dk_ptrs = (dK + bb * sdk_b + hk * sdk_h
                   + gl.expand_dims(x0 * sdk_0 + x1 * sdk_1 + x2 * sdk_2, 1) + offs_d)
        gl.store(dk_ptrs, (dk * scale).to(dtype), mask=row_ok)
        dv_ptrs = (dV + bb * sdv_b + hk * sdv_h
                   + gl.expand_dims(x0 * sdv_0 + x1 * sdv_1 + x2 * sdv_2, 1) + offs_d)
        gl.store(dv_ptrs, dv.to(dtype), mask=row_ok)
    if FUSED:
        tma.store_wait(0)  # the last dQ reduction has left shared memory


@gluon.jit
def _copy_q_step(descs, bufs, bars, it, row0, t0, t1, t2, h, stat_row, stat_stride):
    """Copy one dK/dV step's Q and dO tiles and row statistics into ring slot
    ``it % STAGES`` once both consumers have released it."""
    q_desc, do_desc, k_desc, v_desc, st_desc = descs
    q_smem, do_smem, k_smem, v_smem, st_smem = bufs
    kv_full, kv_empty, q_full, do_full, q_empty = bars
    STAGES: gl.constexpr = q_smem.type.shape[0]
    T0: gl.constexpr = q_desc.block_type.shape[0]
    T1: gl.constexpr = q_desc.block_type.shape[1]
    T2: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_M: gl.constexpr = T0 * T1 * T2
    slot = it % STAGES
    mbarrier.wait(q_empty.index(slot), ((it // STAGES) & 1) ^ 1)
    coords = [row0 + t0 * T0, t1 * T1, t2 * T2, h, 0]
    mbarrier.expect(q_full.index(slot), q_desc.block_type.nbytes + st_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, coords, q_full.index(slot), q_smem.index(slot))
    tma.async_copy_global_to_shared(st_desc, [stat_row * BLOCK_M], q_full.index(slot),
                                    st_smem.index(2 * slot))
    mbarrier.expect(do_full.index(slot), do_desc.block_type.nbytes + st_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(do_desc, coords, do_full.index(slot), do_smem.index(slot))
    tma.async_copy_global_to_shared(st_desc, [stat_stride + stat_row * BLOCK_M],
                                    do_full.index(slot), st_smem.index(2 * slot + 1))


@gluon.jit
def _produce_steps(FULL: gl.constexpr, descs, bufs, bars, stats, it, start, end, b, h_first,
                   hh, row0, t0, t1, t2, box, n_full, groups_per_kv):
    """Copy the item's dK/dV steps ``start`` to ``end`` (exclusive), query heads fastest:
    ``FULL``, mask-free ones, the box of Q tiles in row-major order (``(t0, t1, t2)`` and
    query head ``h_first + hh`` are where that walk stands); else partial ones, in
    ``partial_tile``'s order (the Triton kernel's order). Apart because ``partial_tile``'s
    divisions on every step made the one producer warp the dQ kernel's bottleneck (session
    10 of ``benchmarks/NOTES.md``). Returns the walk's next position."""
    heads, NT1, NT2, n_q_tiles, stat_stride = stats
    _, _, _, _, _, _, ff1, fl1, _, _, ff2, fl2 = box
    for j in range(start, end):
        if FULL:
            c0 = t0
            c1 = t1
            c2 = t2
            h = h_first + hh
        else:
            m = j - n_full  # the step's index among the partial ones
            c0, c1, c2 = _partial_tile_of(m // groups_per_kv, box)
            h = h_first + m % groups_per_kv
        stat_row = (b * heads + h) * n_q_tiles + (c0 * NT1 + c1) * NT2 + c2
        _copy_q_step(descs, bufs, bars, it, row0, c0, c1, c2, h, stat_row, stat_stride)
        it += 1
        if FULL:
            t0, t1, t2, hh = _next_step(t0, t1, t2, hh, ff1, fl1, ff2, fl2, groups_per_kv)
    return it, hh, t0, t1, t2


@gluon.jit
def _next_step(t0, t1, t2, hh, ff1, fl1, ff2, fl2, groups_per_kv):
    """The dK/dV walk's step after Q tile ``(t0, t1, t2)``, query head ``hh``: query heads
    fastest, then the mask-free box of Q tiles in row-major order (the Triton kernel's
    order)."""
    hh += 1
    wrap = (hh >= groups_per_kv).to(gl.int32)
    hh = hh * (1 - wrap)
    u0, u1, u2 = next_full_tile(t0, t1, t2, ff1, fl1, ff2, fl2)
    return (t0 * (1 - wrap) + u0 * wrap, t1 * (1 - wrap) + u1 * wrap,
            t2 * (1 - wrap) + u2 * wrap, hh)


@gluon.jit
def _dkdv_produce(descs, bufs, bars, geo, outs, sched, stats, scales, qrs):
    """Producer warp: each work item's K/V once, and Q, dO and the row statistics of every
    step, in the consumers' order."""
    k_desc = descs[2]
    v_desc = descs[3]
    k_smem = bufs[2]
    v_smem = bufs[3]
    kv_full = bars[0]
    kv_empty = bars[1]
    Sched, pid = sched
    groups_per_kv = geo[8]
    STAGES: gl.constexpr = bufs[0].type.shape[0]
    K0: gl.constexpr = k_desc.block_type.shape[0]
    K1: gl.constexpr = k_desc.block_type.shape[1]
    K2: gl.constexpr = k_desc.block_type.shape[2]
    it = 0
    done = 0
    for i in range(gl.load(Sched + pid), gl.load(Sched + pid + 1)):
        item = gl.load(Sched + i)
        b, h_kv, row0, j0, j1, j2, box, n_full, n_part = _dkdv_item(item, geo)
        n = n_full + n_part
        if n > 0:
            h_first = h_kv * groups_per_kv
            # The first steps' Q/dO go before K/V: their slots free up while the consumers
            # are still on the previous item, whose K/V they hold until its last step.
            n_first = gl.minimum(n, STAGES)
            full_first = gl.minimum(n_first, n_full)
            it, hh, t0, t1, t2 = _produce_steps(True, descs, bufs, bars, stats, it, 0,
                                                full_first, b, h_first, gl.to_tensor(0), row0,
                                                box[2], box[6], box[10], box, n_full,
                                                groups_per_kv)
            it, hh, t0, t1, t2 = _produce_steps(False, descs, bufs, bars, stats, it, full_first,
                                                n_first, b, h_first, hh, row0, t0, t1, t2, box,
                                                n_full, groups_per_kv)
            mbarrier.wait(kv_empty, (done & 1) ^ 1)
            coords = [row0 + j0 * K0, j1 * K1, j2 * K2, h_kv, 0]
            mbarrier.expect(kv_full, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, coords, kv_full, k_smem)
            tma.async_copy_global_to_shared(v_desc, coords, kv_full, v_smem)
            done += 1
            it, hh, t0, t1, t2 = _produce_steps(True, descs, bufs, bars, stats, it, n_first,
                                                n_full, b, h_first, hh, row0, t0, t1, t2, box,
                                                n_full, groups_per_kv)
            it, hh, t0, t1, t2 = _produce_steps(False, descs, bufs, bars, stats, it,
                                                gl.maximum(n_first, n_full), n, b, h_first, hh,
                                                row0, t0, t1, t2, box, n_full, groups_per_kv)


@gluon.jit
def gna_backward_dkdv_block_sparse_kernel(
    dK, dV, Inv, QR, Sched, q_desc, do_desc, k_desc, v_desc, st_desc,
    sdk_b, sdk_0, sdk_1, sdk_2, sdk_h, sdv_b, sdv_0, sdv_1, sdv_2, sdv_h,
    L0, G0, G1, G2, NK1, NK2, kv_tiles, inv_s0, inv_s2, qr_s0, qr_s2,
    heads_kv, groups_per_kv, NT1, NT2, n_q_tiles, stat_stride, qk_scale, scale,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    """dK, dV of perfectly block-sparse GNA. Launch with ``num_warps=4`` (the first consumer
    warpgroup; the kernel adds the second and the producer warp), one program per SM at most.
    ``Inv`` is the launcher's per-KV-tile table of Q tile ranges (the Triton dK/dV kernel's);
    every Q tile a KV tile is seen by must see all of it. ``st_desc`` views the delta kernel's
    tile-major statistics as one row of ``2 * stat_stride`` floats in boxes of one Q tile.
    ``kv_tiles`` = KV tiles of the layout (``NK0 * NK1 * NK2``); a work item is one of them in
    one batch and KV head (KV tiles fastest, then KV heads, then batches); ``Sched`` lists each
    program's items (:func:`gna.triton_backward.balanced_schedule`: program ``p`` takes
    ``Sched[Sched[p]:Sched[p + 1]]`` in order). ``G*`` are the padded 3-D layout's extents."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape,
                                        do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    st_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGES] + st_desc.block_type.shape,
                                        st_desc.layout)
    kv_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_full, count=1)
    mbarrier.init(kv_empty, count=2)  # both consumers release K/V
    for i in gl.static_range(STAGES):
        mbarrier.init(q_full.index(i), count=1)
        mbarrier.init(do_full.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumers release a slot

    descs = (q_desc, do_desc, k_desc, v_desc, st_desc)
    bufs = (q_smem, do_smem, k_smem, v_smem, st_smem)
    bars = (kv_full, kv_empty, q_full, do_full, q_empty)
    geo = (Inv, inv_s0, inv_s2, L0, NK1, NK2, kv_tiles, heads_kv, groups_per_kv, G0, G1, G2)
    outs = (dK, dV, sdk_b, sdk_0, sdk_1, sdk_2, sdk_h, sdv_b, sdv_0, sdv_1, sdv_2, sdv_h)
    sched = (Sched, gl.program_id(0))
    stats = (heads_kv * groups_per_kv, NT1, NT2, n_q_tiles, stat_stride)
    args = (descs, bufs, bars, geo, outs, sched, stats, (qk_scale, scale), (QR, qr_s0, qr_s2))
    gl.warp_specialize([
        (_dkdv_consume, (0, False) + args + ((),)),
        (_dkdv_consume, (1, False) + args + ((),)),
        (_dkdv_produce, args),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])



@gluon.jit
def gna_backward_fused_block_sparse_kernel(
    dK, dV, Inv, QR, Sched, q_desc, do_desc, k_desc, v_desc, st_desc, dqa_desc,
    sdk_b, sdk_0, sdk_1, sdk_2, sdk_h, sdv_b, sdv_0, sdv_1, sdv_2, sdv_h,
    L0, G0, G1, G2, NK1, NK2, kv_tiles, inv_s0, inv_s2, qr_s0, qr_s2,
    heads_kv, groups_per_kv, NT1, NT2, n_q_tiles, stat_stride, qk_scale, scale,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    """dK, dV and dQ of GNA in one pass (FlashAttention-3's five GEMMs per tile pair, not the
    separate kernels' seven), on the dK/dV kernel's problems: the dK/dV kernel's loop (partial
    Q tiles masked as there), plus per step ``dQ = dS K`` over the KV tile, added into
    ``dqa_desc``'s fp32 accumulator (zeroed by the caller, scaled and cast after) with the
    copy engine's reductions. Which KV tiles' shares
    add first varies run to run: dQ is not deterministic (dK, dV are). Same arguments as
    :func:`gna_backward_dkdv_block_sparse_kernel` plus ``dqa_desc``: boxes of one Q tile and
    half the head dimension over the ``[batch * L0, L1, L2, heads, d]`` fp32 accumulator."""
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0] * q_desc.block_type.shape[1] \
        * q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0] * k_desc.block_type.shape[1] \
        * k_desc.block_type.shape[2]
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape,
                                        do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    st_smem = gl.allocate_shared_memory(gl.float32, [2 * STAGES] + st_desc.block_type.shape,
                                        st_desc.layout)
    # dS^T of a step ([keys, queries], both warpgroups' rows; two slots, one per step parity)
    # and each warpgroup's dQ share on its way to the reduction.
    ds_smem = gl.allocate_shared_memory(
        dtype, [2, BLOCK_N, BLOCK_M], gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M],
                                                                           dtype))
    dq_smem = gl.allocate_shared_memory(gl.float32, [2] + dqa_desc.block_type.shape,
                                        dqa_desc.layout)
    kv_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_full, count=1)
    mbarrier.init(kv_empty, count=2)  # both consumers release K/V
    for i in gl.static_range(STAGES):
        mbarrier.init(q_full.index(i), count=1)
        mbarrier.init(do_full.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumers release a slot
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)  # both consumers' dS rows are in

    descs = (q_desc, do_desc, k_desc, v_desc, st_desc)
    bufs = (q_smem, do_smem, k_smem, v_smem, st_smem)
    bars = (kv_full, kv_empty, q_full, do_full, q_empty)
    geo = (Inv, inv_s0, inv_s2, L0, NK1, NK2, kv_tiles, heads_kv, groups_per_kv, G0, G1, G2)
    outs = (dK, dV, sdk_b, sdk_0, sdk_1, sdk_2, sdk_h, sdv_b, sdv_0, sdv_1, sdv_2, sdv_h)
    sched = (Sched, gl.program_id(0))
    stats = (heads_kv * groups_per_kv, NT1, NT2, n_q_tiles, stat_stride)
    args = (descs, bufs, bars, geo, outs, sched, stats, (qk_scale, scale), (QR, qr_s0, qr_s2))
    fused = (dqa_desc, ds_smem, dq_smem, ds_ready)
    gl.warp_specialize([
        (_dkdv_consume, (0, True) + args + (fused,)),
        (_dkdv_consume, (1, True) + args + (fused,)),
        (_dkdv_produce, args),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

# --- dQ -----------------------------------------------------------------------------------

@gluon.jit
def _dq_item(PARTIAL: gl.constexpr, item, geo):
    """The forward's work item (``_work_item``: batch, head, KV head, first descriptor row, Q
    tile coordinates, visited and mask-free KV boxes) and its numbers of mask-free and of
    partial KV tiles (the Triton dQ kernel's two loops, in their order; none unless
    ``PARTIAL``)."""
    b, h, h_kv, row0, t0, t1, t2, box = _work_item(item, geo)
    f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2 = box
    n_full = (fl0 - ff0) * (fl1 - ff1) * (fl2 - ff2)
    n_part = 0
    if PARTIAL:
        n_part = partial_count(f0, l0, ff0, fl0, f1, l1, ff1, fl1, f2, l2, ff2, fl2)
    return b, h, h_kv, row0, t0, t1, t2, box, n_full, n_part


@gluon.jit
def _copy_kv_steps(FULL: gl.constexpr, descs, bufs, bars, it, start, end, j0, j1, j2, box,
                   n_full, row0, h_kv):
    """Copy the item's KV tiles ``start`` to ``end`` (exclusive) into the ring: ``FULL``,
    mask-free ones (the walk of the mask-free box, standing at ``(j0, j1, j2)``); else partial
    ones, in ``partial_tile``'s order. Apart because ``partial_tile``'s divisions on every
    tile made the one producer warp the bottleneck (session 10 of ``benchmarks/NOTES.md``).
    Returns the ring position and the walk's next tile."""
    _, _, _, _, _, _, ff1, fl1, _, _, ff2, fl2 = box
    for t in range(start, end):
        if FULL:
            c0 = j0
            c1 = j1
            c2 = j2
        else:
            c0, c1, c2 = _partial_tile_of(t - n_full, box)
        _copy_kv(descs[2], descs[3], bufs[2], bufs[3], bars[2], bars[3], bars[4], it, row0, c0,
                 c1, c2, h_kv)
        if FULL:
            j0, j1, j2 = next_full_tile(j0, j1, j2, ff1, fl1, ff2, fl2)
        it += 1
    return it, j0, j1, j2


@gluon.jit
def _dq_step(MASKED: gl.constexpr, q, do, bufs, bars, it, prev, dq, ds16, s_zero, lse2,
             delta, qk_scale, m, box, windows):
    """One KV tile of a consumer's dQ loop after the first: its scores and dP GEMMs, then
    (retiring the previous tile's ``dS K``) ``P``, masked for the item's ``m``-th partial
    tile if ``MASKED``, ``dS``, and this tile's ``dS K`` left in flight."""
    k_smem = bufs[2]
    v_smem = bufs[3]
    k_full = bars[2]
    v_full = bars[3]
    kv_empty = bars[4]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    K0: gl.constexpr = k_smem.type.shape[1]
    K1: gl.constexpr = k_smem.type.shape[2]
    K2: gl.constexpr = k_smem.type.shape[3]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[5]
    BLOCK_N: gl.constexpr = K0 * K1 * K2
    slot = it % STAGES
    phase = (it // STAGES) & 1
    k = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
    v = v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
    mbarrier.wait(k_full.index(slot), phase)
    s = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_full.index(slot), phase)
    dp = warpgroup_mma(do, v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s, dq, ds16 = warpgroup_mma_wait(1, deps=[s, dq, ds16])
    mbarrier.arrive(kv_empty.index(prev), count=1)  # the previous dS K is done
    sl = s * qk_scale - gl.expand_dims(lse2, 1)
    if MASKED:
        sl = _mask_partial(sl, m, box, windows, K0, K1, K2)
    p = gl.exp2(sl)
    # V was waited on already; waiting again is a loop ptxas does not move code across,
    # which keeps the exp2 above the next wait (else scheduled after it, no overlap with the
    # dP GEMM).
    mbarrier.wait(v_full.index(slot), phase)
    dp = warpgroup_mma_wait(0, deps=[dp])
    ds = p * (dp - gl.expand_dims(delta, 1))
    ds16 = gl.convert_layout(ds.to(k.dtype), ds16.type.layout)
    dq = warpgroup_mma(ds16, k, dq, is_async=True)
    return dq, ds16, slot, it + 1


@gluon.jit
def _dq_consume(HALF: gl.constexpr, PARTIAL: gl.constexpr, descs, bufs, bars, geo, outs, sched,
                scales, wins):
    """Consumer warpgroup ``HALF``: rows ``[64 * HALF, 64 * HALF + 64)`` of every Q tile."""
    q_desc, do_desc, k_desc, v_desc = descs
    q_smem, do_smem, k_smem, v_smem = bufs
    q_full, q_empty, k_full, v_full, kv_empty = bars
    (dQ, Lse, Delta, sdq_b, sdq_0, sdq_1, sdq_2, sdq_h,
     sl_b, sl_0, sl_1, sl_2, sl_h) = outs
    first_item, num_items, num_programs = sched
    qk_scale, scale = scales
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
    # wgmma accumulators of one warpgroup (64 rows); dS goes to the dQ GEMM from registers.
    s_layout: gl.constexpr = wgmma_layout(BLOCK_N)
    acc_layout: gl.constexpr = wgmma_layout(HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM]).slice(HALF * HALF_M, HALF_M, dim=0)
    do = do_smem.reshape([BLOCK_M, HEAD_DIM]).slice(HALF * HALF_M, HALF_M, dim=0)

    it = 0  # KV tiles consumed so far, over all work items: the ring's slot and phase
    done = 0  # work items finished: Q's phase
    for item in range(first_item, num_items, num_programs):
        b, h, h_kv, row0, t0, t1, t2, box, n_full, n_part = _dq_item(PARTIAL, item, geo)
        # This warpgroup's rows: log2-LSE and delta (padding rows read 0: finite, not stored).
        rows = HALF * HALF_M + gl.arange(0, HALF_M, layout=row_layout)
        _, _, _, row_ok, i0, i1, i2 = tile_tokens(t0, t1, t2, rows, 0, 0, 0, G0, G1, G2, 1, 1, 1,
                                                  T0, T1, T2)
        l_off = (b.to(gl.int64) * sl_b + h.to(gl.int64) * sl_h + i0 * sl_0 + i1 * sl_1
                 + i2 * sl_2)
        lse2 = gl.load(Lse + l_off, mask=row_ok, other=0.0) * _LOG2E
        delta = gl.load(Delta + l_off, mask=row_ok, other=0.0)
        mbarrier.wait(q_full, done & 1)

        # First KV tile (partial only if the item has no mask-free one): its dS K stays in
        # flight while the next scores are issued.
        slot = it % STAGES
        phase = (it // STAGES) & 1
        k = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        v = v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        mbarrier.wait(k_full.index(slot), phase)
        s = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_full.index(slot), phase)
        dp = warpgroup_mma(do, v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s])
        sl = s * qk_scale - gl.expand_dims(lse2, 1)
        if PARTIAL:
            if n_full == 0:
                sl = _mask_partial(sl, 0, box, _row_windows(wins, i0, i1, i2, row_ok), K0, K1,
                                   K2)
        p = gl.exp2(sl)
        mbarrier.wait(v_full.index(slot), phase)  # done already: keeps the exp2 above the wait
        dp = warpgroup_mma_wait(0, deps=[dp])
        ds = p * (dp - gl.expand_dims(delta, 1))
        ds16 = gl.convert_layout(ds.to(dtype), op_layout)
        dq = warpgroup_mma(ds16, k, gl.zeros([HALF_M, HEAD_DIM], gl.float32, acc_layout),
                           use_acc=False, is_async=True)
        prev = slot
        it += 1
        # The other mask-free tiles, then the partial ones with each row's window.
        for j in range(1, n_full):
            dq, ds16, prev, it = _dq_step(False, q, do, bufs, bars, it, prev, dq, ds16, s_zero,
                                          lse2, delta, qk_scale, 0, box, box)
        if PARTIAL:
            windows = _row_windows(wins, i0, i1, i2, row_ok)
            for j in range(gl.maximum(n_full, 1), n_full + n_part):
                dq, ds16, prev, it = _dq_step(True, q, do, bufs, bars, it, prev, dq, ds16,
                                              s_zero, lse2, delta, qk_scale, j - n_full, box,
                                              windows)
        dq, ds16 = warpgroup_mma_wait(0, deps=[dq, ds16])
        mbarrier.arrive(kv_empty.index(prev), count=1)
        # Done with this Q tile: the producer loads the next one during the epilogue.
        mbarrier.arrive(q_empty, count=1)
        done += 1

        # Epilogue: the rows inside the layout, scaled.
        acc_rows: gl.constexpr = gl.SliceLayout(1, acc_layout)
        tok = gl.convert_layout(i0 * sdq_0 + i1 * sdq_1 + i2 * sdq_2, acc_rows)
        ok = gl.convert_layout(row_ok, acc_rows)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        dq_ptrs = (dQ + b.to(gl.int64) * sdq_b + h.to(gl.int64) * sdq_h
                   + gl.expand_dims(tok, 1) + gl.expand_dims(offs_d, 0))
        gl.store(dq_ptrs, (dq * scale).to(dtype), mask=gl.expand_dims(ok, 1))


@gluon.jit
def _dq_produce_items(PARTIAL: gl.constexpr, descs, bufs, bars, geo, sched):
    """Producer warp: Q and dO, then the K/V tiles of every work item (mask-free, then
    partial if ``PARTIAL``), in the consumers' order."""
    q_desc, do_desc, k_desc, v_desc = descs
    q_smem, do_smem, k_smem, v_smem = bufs
    q_full, q_empty, k_full, v_full, kv_empty = bars
    first_item, num_items, num_programs = sched
    STAGES: gl.constexpr = k_smem.type.shape[0]
    T0: gl.constexpr = q_desc.block_type.shape[0]
    T1: gl.constexpr = q_desc.block_type.shape[1]
    T2: gl.constexpr = q_desc.block_type.shape[2]
    it = 0
    done = 0
    for item in range(first_item, num_items, num_programs):
        b, h, h_kv, row0, t0, t1, t2, box, n_full, n_part = _dq_item(PARTIAL, item, geo)
        j0 = box[2]  # the mask-free box's walk
        j1 = box[6]
        j2 = box[10]
        n = n_full + n_part
        # The first K/V tiles go before Q/dO: their slots free up while the consumers are
        # still on the previous item, whose Q and dO they hold until its last GEMMs.
        n_first = gl.minimum(n, STAGES)
        full_first = gl.minimum(n_first, n_full)
        it, j0, j1, j2 = _copy_kv_steps(True, descs, bufs, bars, it, 0, full_first, j0, j1, j2,
                                        box, n_full, row0, h_kv)
        if PARTIAL:
            it, j0, j1, j2 = _copy_kv_steps(False, descs, bufs, bars, it, full_first, n_first,
                                            j0, j1, j2, box, n_full, row0, h_kv)
        mbarrier.wait(q_empty, (done & 1) ^ 1)
        coords = [row0 + t0 * T0, t1 * T1, t2 * T2, h, 0]
        mbarrier.expect(q_full, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, coords, q_full, q_smem)
        tma.async_copy_global_to_shared(do_desc, coords, q_full, do_smem)
        done += 1
        it, j0, j1, j2 = _copy_kv_steps(True, descs, bufs, bars, it, n_first, n_full, j0, j1,
                                        j2, box, n_full, row0, h_kv)
        if PARTIAL:
            it, j0, j1, j2 = _copy_kv_steps(False, descs, bufs, bars, it,
                                            gl.maximum(n_first, n_full), n, j0, j1, j2, box,
                                            n_full, row0, h_kv)


@gluon.jit
def gna_backward_dq_block_sparse_kernel(
    dQ, Lse, Delta, Rng, Win, q_desc, do_desc, k_desc, v_desc,
    sdq_b, sdq_0, sdq_1, sdq_2, sdq_h, sl_b, sl_0, sl_1, sl_2, sl_h,
    L0, G0, G1, G2, NT0, NT1, NT2, rng_s0, rng_s2, win_s0, win_s2,
    heads, groups_per_kv, qk_scale, scale, num_items,
    STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    PARTIAL: gl.constexpr,
):
    """dQ of perfectly block-sparse GNA without additional keys. Launch as the block-sparse
    forward (``num_warps=4``, one program per SM at most); ``Rng`` is the forward's per-Q-tile
    KV range table, ``Lse`` the forward's natural-log LSE and ``Delta`` the delta kernel's, both
    laid out as a contiguous ``[batch, *spatial, heads]``; ``num_items`` = Q tiles x batch x
    heads. ``PARTIAL``: some Q tile visits partially masked KV tiles; without it the kernel is
    compiled without the partial tiles' code (which cost the perfectly block-sparse loop ~3-5%
    on 2-D/3-D problems, session 10 of ``benchmarks/NOTES.md``)."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_full, count=1)
    mbarrier.init(q_empty, count=2)  # both consumers release Q and dO
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a slot

    descs = (q_desc, do_desc, k_desc, v_desc)
    bufs = (q_smem, do_smem, k_smem, v_smem)
    bars = (q_full, q_empty, k_full, v_full, kv_empty)
    geo = (Rng, rng_s0, rng_s2, L0, NT0, NT1, NT2, heads, groups_per_kv, G0, G1, G2)
    outs = (dQ, Lse, Delta, sdq_b, sdq_0, sdq_1, sdq_2, sdq_h, sl_b, sl_0, sl_1, sl_2, sl_h)
    sched = (gl.program_id(0), num_items, gl.num_programs(0))
    args = (descs, bufs, bars, geo, outs, sched, (qk_scale, scale), (Win, win_s0, win_s2))
    gl.warp_specialize([
        (_dq_consume, (0, PARTIAL) + args),
        (_dq_consume, (1, PARTIAL) + args),
        (_dq_produce_items, (PARTIAL, descs, bufs, bars, geo, sched)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
