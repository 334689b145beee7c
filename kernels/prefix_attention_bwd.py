"""Backward kernels of prefix attention.

With p_ij = exp(s_ij - lse_i) recomputed from the saved lse, z_ij the replayed dropout keep mask and
r = 1 / (1 - dropout_p):

    dv_j  = sum_i  p_ij z_ij r  do_i
    dp_ij = z_ij r  (do_i . v_j)
    ds_ij = p_ij (dp_ij - delta_i),      delta_i = do_i . out_i - dlse_i
    dq_i  = scale sum_j ds_ij k_j,       dk_j = scale sum_i ds_ij q_i

At most three launches, none with atomics, so results are bitwise deterministic:
  1. dq (+ delta): one program per (query block, b, h); it computes delta for its rows from out and do,
     stores it for launch 2, then loops over the prefix and the sequence;
  2. dk/dv, one launch holding two kinds of programs:
     * prefix programs, one per (prefix block, task t, hk, split): they walk the batch rows in order,
       keep those whose prefix_index is t (no sort, no host work), and loop over their query heads and
       query blocks. A bank row's gradient is thus reduced inside the kernel: no [B, Hkv, P, D] buffer
       exists. With NSPLIT > 1 each split takes every NSPLIT-th row of the task and writes an fp32 partial;
     * sequence programs, one per (key block, b, hk), looping over the GROUP query heads of hk (the GQA
       reduction) and the query blocks that can see the key block;
  3. only with NSPLIT > 1: the partials summed in split order and cast to the bank's dtype.

Merge mode (the ``sdpa`` backend): the vendor backward, given the merged out and lse, already produced the
sequence keys' dq, dk, dv, because p_ij = exp(s_ij - lse_i) and delta_i = do_i . out_i only need the merged
statistics. The prefix keys' share is then the same kernels with the sequence stage empty (S = 0): launch 1
with DQ_ACCUM adds scale * sum_{j in prefix} ds_ij kp_j to the dq it finds in DQ, launch 2 has prefix
programs only.
"""

import triton
import triton.language as tl

from .common import LOG2E_C, dropout_keep, load_tile, row_lengths, sequence_key_end, sequence_visible


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, visible, keep, qk_scale, dropout_scale,
             DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if DROPOUT:
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def prefix_attention_bwd_dq_kernel(
    Q, K, V, PK, PV, PIDX, PLENS, KVLENS, KPM, DOUT, OUT, DLSE, LSE, DELTA, DQ,
    qk_scale, sm_scale, dropout_p, seed, rng_offset,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dlb, stride_dlh, stride_dlm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_kpmb, stride_kpmn,
    Hq, L, S, T, P, D, GROUP,
    HAS_PIDX: tl.constexpr, HAS_PLENS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DLSE: tl.constexpr, DQ_ACCUM: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (B * Hq, cdiv(L, BLOCK_M)). Writes DQ [B, Hq, L, D] and DELTA [B, Hq, L] (fp32) for the dk/dv
    launch: delta_i = do_i . out_i - dlse_i, computed here from the tiles this program owns.
    DQ_ACCUM: DQ holds a partial dq on entry (the sequence keys' share); this program adds its own to it."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    t, plen, kv_end = row_lengths(PIDX, PLENS, KVLENS, b, T, P, S, HAS_PIDX, HAS_PLENS, HAS_KVLENS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, L, D, UPCAST)
    do = load_tile(DOUT + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, L, D, UPCAST)
    o = load_tile(OUT + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, L, D, True)
    delta = tl.sum(o * do.to(tl.float32), 1)
    if HAS_DLSE:
        dl_ptrs = DLSE + b * stride_dlb + h * stride_dlh + offs_m.to(tl.int64) * stride_dlm
        delta -= tl.load(dl_ptrs, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, delta, mask=row_ok)
    lse2 = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * LOG2E_C
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    keep = row_ok[:, None] & (offs_n0[None, :] >= 0)  # [M, N]: a loop-carried value keeps its shape

    pk_base = PK + t.to(tl.int64) * stride_pkt + hk * stride_pkh
    pv_base = PV + t.to(tl.int64) * stride_pvt + hk * stride_pvh
    for start_n in range(0, plen, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(pk_base, offs_n, offs_d, stride_pkn, stride_pkd, plen, D, UPCAST)
        v = load_tile(pv_base, offs_n, offs_d, stride_pvn, stride_pvd, plen, D, UPCAST)
        visible = row_ok[:, None] & (offs_n[None, :] < plen)
        if DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], dropout_p)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, visible, keep, qk_scale, dropout_scale, DROPOUT, DOT_PREC)

    n_end = sequence_key_end(kv_end, pid_m * BLOCK_M, L, S, BLOCK_M, CAUSAL)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_end, D, UPCAST)
        v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_end, D, UPCAST)
        visible = sequence_visible(KPM, b, stride_kpmb, stride_kpmn, offs_m, offs_n, n_end, L, S, HAS_KPM, CAUSAL)
        if DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m[:, None], P + offs_n[None, :], dropout_p)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, visible, keep, qk_scale, dropout_scale, DROPOUT, DOT_PREC)

    dq_ptrs = (DQ + b * stride_dqb + h * stride_dqh + offs_m.to(tl.int64)[:, None] * stride_dqm
               + offs_d.to(tl.int64)[None, :] * stride_dqd)
    dq_mask = row_ok[:, None] & (offs_d[None, :] < D)
    dq = dq * sm_scale
    if DQ_ACCUM:
        # Summed in ACC and rounded once: the same tile is read and written by this program only.
        dq += tl.load(dq_ptrs, mask=dq_mask, other=0.0).to(ACC)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, Q, DOUT, LSE, DELTA, bh, offs_n, col0, start_m, key_ok,
                      stride_qm, stride_qd, stride_dom, stride_dod,
                      qk_scale, dropout_p, dropout_scale, seed, rng_offset, L, S, D,
                      CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Transposed formulation: rows are keys [N], columns are queries [M], so dk/dv accumulate with one dot each.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    q = load_tile(Q, offs_m, offs_d, stride_qm, stride_qd, L, D, UPCAST)
    do = load_tile(DOUT, offs_m, offs_d, stride_dom, stride_dod, L, D, UPCAST)
    lse2 = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * LOG2E_C
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    visible = key_ok[:, None] & row_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[:, None] <= offs_m[None, :] + (S - L))
    p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    pd_t = p_t
    if DROPOUT:
        keep_t = dropout_keep(seed, rng_offset, bh, offs_m[None, :], col0 + offs_n[:, None], dropout_p)
        pd_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
        dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
    dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _dkdv_seq_program(
    bhk, pid_n,
    Q, K, V, KVLENS, KPM, DOUT, LSE, DELTA, DK, DV,
    qk_scale, sm_scale, dropout_p, seed, rng_offset,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_kpmb, stride_kpmn,
    Hq, Hkv, L, S, P, D, GROUP,
    HAS_KVLENS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b * Hkv + hk, key block pid_n). Writes DK, DV [B, Hkv, S, D] there (GQA heads reduced here)."""
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    kv_end = pid_n * 0 + S
    if HAS_KVLENS:
        kv_end = tl.minimum(tl.maximum(tl.load(KVLENS + b), 0), S).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < kv_end
    if HAS_KPM:
        kpm = tl.load(KPM + b * stride_kpmb + offs_n.to(tl.int64) * stride_kpmn, mask=key_ok, other=0)
        key_ok = key_ok & (kpm != 0)
    k = load_tile(K + b * stride_kb + hk * stride_kh, offs_n, offs_d, stride_kn, stride_kd, kv_end, D, UPCAST)
    v = load_tile(V + b * stride_vb + hk * stride_vh, offs_n, offs_d, stride_vn, stride_vd, kv_end, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dropout_scale = 1.0 / (1.0 - dropout_p)

    m_begin = 0
    if CAUSAL:
        # Key j is seen by queries i >= j - (S - L); start at the block holding the first of them.
        m_begin = tl.maximum(pid_n * BLOCK_N - (S - L), 0) // BLOCK_M * BLOCK_M
    # A key block that is all padding gets gradient 0 without visiting any query.
    m_stop = tl.where(pid_n * BLOCK_N >= kv_end, 0, L)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = (b * Hq + h).to(tl.int32)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOUT + b * stride_dob + h * stride_doh
        for start_m in range(m_begin, m_stop, BLOCK_M):
            dk, dv = _dkdv_query_block(
                dk, dv, k, v, q_base, do_base, LSE, DELTA, bh, offs_n, P, start_m, key_ok,
                stride_qm, stride_qd, stride_dom, stride_dod,
                qk_scale, dropout_p, dropout_scale, seed, rng_offset, L, S, D,
                CAUSAL, DROPOUT, UPCAST, DOT_PREC, BLOCK_M, BLOCK_D)

    mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    rows = offs_n.to(tl.int64)[:, None]
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + rows * stride_dkn + offs_d.to(tl.int64)[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + rows * stride_dvn + offs_d.to(tl.int64)[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dkdv_prefix_program(
    pid_n, thk, split,
    Q, PK, PV, PIDX, PLENS, DOUT, LSE, DELTA, DPK, DPV,
    qk_scale, sm_scale, dropout_p, seed, rng_offset,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ds, stride_dt, stride_dh, stride_dn, stride_dd,
    B, Hq, Hkv, L, S, T, P, D, GROUP, NSPLIT,
    HAS_PIDX: tl.constexpr, HAS_PLENS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (prefix block pid_n, t * Hkv + hk, split).

    DPK/DPV are [NSPLIT, T, Hkv, P, D] (strides given; NSPLIT > 1 gives fp32 partials summed by launch 3).
    Every program walks the batch rows in order and keeps those of task t (the clamped prefix_index, as the
    forward reads it); split s takes the task's rows whose rank among them is s modulo NSPLIT, so the splits
    get equal shares however the task's rows sit in the batch. Unused bank rows and columns past
    prefix_lens[t] get 0.
    """
    t = thk // Hkv
    hk = (thk % Hkv).to(tl.int64)
    plen = t * 0 + P
    if HAS_PLENS:
        plen = tl.minimum(tl.maximum(tl.load(PLENS + t), 0), P).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < plen
    t64 = t.to(tl.int64)
    k = load_tile(PK + t64 * stride_pkt + hk * stride_pkh, offs_n, offs_d, stride_pkn, stride_pkd, plen, D, UPCAST)
    v = load_tile(PV + t64 * stride_pvt + hk * stride_pvh, offs_n, offs_d, stride_pvn, stride_pvd, plen, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dropout_scale = 1.0 / (1.0 - dropout_p)

    # A block past the task's prefix length is visible to no query: gradient 0 without visiting any row.
    r_end = tl.where(pid_n * BLOCK_N >= plen, 0, B)
    zero64 = r_end.to(tl.int64) * 0  # the loop variable may be a plain int (interpreter): widen through a tensor
    seen = r_end * 0  # rows of task t met so far: split s takes the task's rows seen[r] % NSPLIT == s, so the
    for r in range(0, r_end):  # splits share the task's rows evenly wherever they sit in the batch
        b = zero64 + r
        row_task = t * 0
        if HAS_PIDX:
            row_task = tl.minimum(tl.maximum(tl.load(PIDX + b), 0), T - 1).to(tl.int32)
        hit = row_task == t
        mine = hit & (seen % NSPLIT == split)
        seen += hit.to(tl.int32)
        n_groups = tl.where(mine, GROUP, 0)  # a row of another task, or of another split, contributes nothing
        for g in range(0, n_groups):
            h = hk * GROUP + g
            bh = (b * Hq + h).to(tl.int32)
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DOUT + b * stride_dob + h * stride_doh
            for start_m in range(0, L, BLOCK_M):
                dk, dv = _dkdv_query_block(
                    dk, dv, k, v, q_base, do_base, LSE, DELTA, bh, offs_n, 0, start_m, key_ok,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    qk_scale, dropout_p, dropout_scale, seed, rng_offset, L, S, D,
                    False, DROPOUT, UPCAST, DOT_PREC, BLOCK_M, BLOCK_D)

    mask = (offs_n[:, None] < P) & (offs_d[None, :] < D)
    base = split.to(tl.int64) * stride_ds + t64 * stride_dt + hk * stride_dh
    offs = base + offs_n.to(tl.int64)[:, None] * stride_dn + offs_d.to(tl.int64)[None, :] * stride_dd
    tl.store(DPK + offs, (dk * sm_scale).to(DPK.dtype.element_ty), mask=mask)
    tl.store(DPV + offs, dv.to(DPV.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def prefix_attention_bwd_dkdv_kernel(
    Q, K, V, PK, PV, PIDX, PLENS, KVLENS, KPM, DOUT, LSE, DELTA, DK, DV, DPK, DPV,
    qk_scale, sm_scale, dropout_p, seed, rng_offset,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_ds, stride_dt, stride_dh, stride_dn, stride_dd,
    stride_kpmb, stride_kpmn,
    B, Hq, Hkv, L, S, T, P, D, GROUP, NSPLIT, N_PREFIX_BLOCKS, N_SEQ_BLOCKS,
    HAS_PIDX: tl.constexpr, HAS_PLENS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (N_PREFIX_BLOCKS * T * Hkv * NSPLIT + B * Hkv * N_SEQ_BLOCKS,): the prefix programs first
    (they run longest: every row of a task), then the sequence programs. One launch for both gradients."""
    pid = tl.program_id(0)
    n_prefix = N_PREFIX_BLOCKS * T * Hkv * NSPLIT
    if pid < n_prefix:
        pid_n = pid % N_PREFIX_BLOCKS
        rest = pid // N_PREFIX_BLOCKS
        _dkdv_prefix_program(
            pid_n, rest % (T * Hkv), rest // (T * Hkv),
            Q, PK, PV, PIDX, PLENS, DOUT, LSE, DELTA, DPK, DPV,
            qk_scale, sm_scale, dropout_p, seed, rng_offset,
            stride_qb, stride_qh, stride_qm, stride_qd,
            stride_pkt, stride_pkh, stride_pkn, stride_pkd,
            stride_pvt, stride_pvh, stride_pvn, stride_pvd,
            stride_dob, stride_doh, stride_dom, stride_dod,
            stride_ds, stride_dt, stride_dh, stride_dn, stride_dd,
            B, Hq, Hkv, L, S, T, P, D, GROUP, NSPLIT,
            HAS_PIDX, HAS_PLENS, DROPOUT, UPCAST, DOT_PREC, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        pid_s = pid - n_prefix
        _dkdv_seq_program(
            pid_s // N_SEQ_BLOCKS, pid_s % N_SEQ_BLOCKS,
            Q, K, V, KVLENS, KPM, DOUT, LSE, DELTA, DK, DV,
            qk_scale, sm_scale, dropout_p, seed, rng_offset,
            stride_qb, stride_qh, stride_qm, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_dob, stride_doh, stride_dom, stride_dod,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd,
            stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_kpmb, stride_kpmn,
            Hq, Hkv, L, S, P, D, GROUP,
            HAS_KVLENS, HAS_KPM, CAUSAL, DROPOUT, UPCAST, DOT_PREC, ACC, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def prefix_attention_bwd_reduce_kernel(
    PART_K, PART_V, DPK, DPV, NSPLIT, N,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    Hkv, P, D,
    BLOCK: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK),), N = T * Hkv * P * D. DPK/DPV[...] = sum over s = 0..NSPLIT-1 of PART_*[s, ...]
    (contiguous fp32 [NSPLIT, T, Hkv, P, D]), summed in split order (deterministic), cast to DPK's dtype and
    stored through each output's own strides."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, NSPLIT):
        acc_k += tl.load(PART_K + s * N + offs, mask=ok, other=0.0)
        acc_v += tl.load(PART_V + s * N + offs, mask=ok, other=0.0)
    d = offs % D
    n = (offs // D) % P
    h = (offs // (D * P)) % Hkv
    t = offs // (D * P * Hkv)
    dst_k = t * stride_pkt + h * stride_pkh + n * stride_pkn + d * stride_pkd
    dst_v = t * stride_pvt + h * stride_pvh + n * stride_pvn + d * stride_pvd
    tl.store(DPK + dst_k, acc_k.to(DPK.dtype.element_ty), mask=ok)
    tl.store(DPV + dst_v, acc_v.to(DPV.dtype.element_ty), mask=ok)
