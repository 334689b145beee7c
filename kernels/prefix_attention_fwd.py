"""Forward kernel of prefix attention: one launch, two key/value stages, one online softmax.

For batch row b, query head h (kv head hk = h // GROUP), task t = prefix_index[b]:

    s_j   = scale * q_i . k_j            over keys  [prefix_k[t, hk, :plen_t] ; k[b, hk, :S]]
    m_i   = max_j s_j                    (visible j only: prefix j < plen_t; sequence j allowed by
                                          kv_lens / key_padding_mask / bottom-right causal)
    p_ij  = exp(s_j - m_i),  l_i = sum_j p_ij
    out_i = sum_j dropout(p_ij) v_j / l_i,   lse_i = m_i + log(l_i)

The prefix is read straight from bank row t (no gather, no copy) and the running (m, l, acc) state is
carried from the prefix stage into the sequence stage, so the concatenation never exists. Scores are kept
in the log2 domain (scale * log2(e) folded into s) so the kernel uses exp2. A row that sees no key keeps
m = -inf, l = 0 and is written as out = 0, lse = -inf.

MERGE (the ``sdpa`` backend): the sequence part was computed elsewhere (out_s = sum_j p_j v_j / l_s,
lse_s = log l_s over sequence keys only). In units of 2^m with m = lse_s * log2(e) that part is exactly
l = 1, acc = out_s, so the online softmax starts from that state, runs the prefix stage only and writes the
merged output over out_s: merging costs no extra pass and the concatenation still never exists. A row that
sees no sequence key starts from the empty state (m = -inf, l = 0, acc = 0) whatever out_s / lse_s hold
there, since vendor kernels leave 0 or NaN in such rows; the kernel decides that from the masks itself.
"""

import triton
import triton.language as tl

from .common import LN2_C, LOG2E_C, dropout_keep, load_tile, row_lengths, sequence_key_end, sequence_visible


@triton.jit
def _online_softmax_step(acc, l_i, m_i, s, v, keep, dropout_scale,
                         DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    # s: [M, N] log2-domain scores with invisible entries at -inf.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet has m_new = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        p = tl.where(keep, p * dropout_scale, 0.0)
    acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _tile_ptrs(base, offs_m, offs_d, stride_m, stride_d):
    return base + offs_m.to(tl.int64)[:, None] * stride_m + offs_d.to(tl.int64)[None, :] * stride_d


@triton.jit
def _sees_sequence(KPM, b, stride_kpmb, stride_kpmn, offs_m, n_end, L, S,
                   HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """[M] bool: does query offs_m see any sequence key? Keys past n_end (sequence_key_end) are seen by no
    row of the block, so the first unpadded key below n_end decides: row i sees it iff it is causally
    allowed (j <= i + S - L), and then it sees every earlier-allowed key too."""
    if HAS_KPM:
        first = n_end + S  # past every key: "none found"
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + offs_n0
            ok = offs_n < n_end
            kpm = tl.load(KPM + b * stride_kpmb + offs_n.to(tl.int64) * stride_kpmn, mask=ok, other=0)
            first = tl.minimum(first, tl.min(tl.where(ok & (kpm != 0), offs_n, n_end + S), 0))
    else:
        first = n_end * 0
    first = first + offs_m * 0  # per row: the interpreter mistypes bool [M] & bool []
    sees = (offs_m < L) & (first < n_end)
    if CAUSAL:
        sees = sees & (first <= offs_m + (S - L))
    return sees


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, PIDX, PLENS, KVLENS, KPM, OUT, LSE,
    qk_scale, dropout_p, seed, rng_offset,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkt, stride_pkh, stride_pkn, stride_pkd,
    stride_pvt, stride_pvh, stride_pvn, stride_pvd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_kpmb, stride_kpmn,
    Hq, L, S, T, P, D, GROUP,
    SEQ_LSE, stride_slb, stride_slh, stride_slm,  # MERGE only; last, so the fused kernel's parameters keep their slots
    HAS_PIDX: tl.constexpr, HAS_PLENS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ACC: tl.constexpr, MERGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (B * Hq, cdiv(L, BLOCK_M)). Writes OUT [B, Hq, L, D] and LSE [B, Hq, L] (fp32, natural log).

    MERGE: OUT holds the sequence part's output on entry (read, then overwritten, by the program owning the
    tile) and SEQ_LSE [B, Hq, L] (fp32, strided) its lse; K and V are not read."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP

    # Indices and lengths are clamped so that unchecked input can never read outside a tensor.
    t, plen, kv_end = row_lengths(PIDX, PLENS, KVLENS, b, T, P, S, HAS_PIDX, HAS_PLENS, HAS_KVLENS)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L

    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, L, D, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if MERGE:
        # Masked loads, never arithmetic on them: rows that see no sequence key may hold NaN.
        n_end = sequence_key_end(kv_end, pid_m * BLOCK_M, L, S, BLOCK_M, CAUSAL)
        sees = _sees_sequence(KPM, b, stride_kpmb, stride_kpmn, offs_m, n_end, L, S, HAS_KPM, CAUSAL, BLOCK_N)
        sl_ptrs = SEQ_LSE + b * stride_slb + h * stride_slh + offs_m.to(tl.int64) * stride_slm
        seq_lse = tl.load(sl_ptrs, mask=sees, other=0.0).to(ACC)
        m_i = tl.where(sees, seq_lse * LOG2E_C, m_i)
        l_i = tl.where(sees, 1.0, l_i)
        o_ptrs = _tile_ptrs(OUT + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od)
        acc = tl.load(o_ptrs, mask=sees[:, None] & (offs_d[None, :] < D), other=0.0).to(ACC)
    dropout_scale = 1.0 / (1.0 - dropout_p)
    keep = row_ok[:, None] & (offs_n0[None, :] >= 0)  # [M, N]: a loop-carried value keeps its shape

    # Stage 1: the task's prefix, straight from its bank row.
    pk_base = PK + t.to(tl.int64) * stride_pkt + hk * stride_pkh
    pv_base = PV + t.to(tl.int64) * stride_pvt + hk * stride_pvh
    for start_n in range(0, plen, BLOCK_N):
        offs_n = start_n + offs_n0
        k = load_tile(pk_base, offs_n, offs_d, stride_pkn, stride_pkd, plen, D, UPCAST)
        v = load_tile(pv_base, offs_n, offs_d, stride_pvn, stride_pvd, plen, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = row_ok[:, None] & (offs_n[None, :] < plen)
        s = tl.where(visible, s, float("-inf"))
        if DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], dropout_p)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, keep, dropout_scale, DROPOUT, DOT_PREC)

    # Stage 2: the sequence, with padding and bottom-right causal masks (MERGE: already in the state).
    if not MERGE:
        n_end = sequence_key_end(kv_end, pid_m * BLOCK_M, L, S, BLOCK_M, CAUSAL)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        for start_n in range(0, n_end, BLOCK_N):
            offs_n = start_n + offs_n0
            k = load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_end, D, UPCAST)
            v = load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_end, D, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            visible = sequence_visible(KPM, b, stride_kpmb, stride_kpmn, offs_m, offs_n, n_end, L, S, HAS_KPM, CAUSAL)
            s = tl.where(visible, s, float("-inf"))
            if DROPOUT:
                keep = dropout_keep(seed, rng_offset, bh, offs_m[:, None], P + offs_n[None, :], dropout_p)
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, keep, dropout_scale, DROPOUT, DOT_PREC)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2_C)
    # Built here, not reused from the MERGE block: a pointer tile live across both loops costs registers.
    o_ptrs = _tile_ptrs(OUT + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse.to(tl.float32), mask=row_ok)
