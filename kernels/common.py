"""Triton helpers shared by the prefix-attention kernels.

Nothing here knows about ptv2_fast: only ``triton`` is imported.
"""

import triton
import triton.language as tl

# Plain floats for the launchers; constexpr twins for jitted code (compiled Triton cannot read Python globals).
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


@triton.jit
def dropout_keep(seed, offset, bh, rows, cols, dropout_p):
    """Counter-based keep mask for attention dropout.

    One Philox draw per attention entry, keyed by (seed, offset, b * Hq + h, i, j), where i is the query
    row and j the column of the *concatenated* key axis (prefix columns 0..P-1, then sequence columns
    P..P+S-1). Because the key is the coordinate and not a running counter, the backward kernels replay
    exactly the mask of the forward, in any block order, and a test can rebuild it element by element.

    ``rows`` and ``cols`` are int32 tensors that broadcast against each other ([M, 1] and [1, N], or
    transposed); the result has their broadcast shape and is True where the entry is kept.
    """
    c0 = (cols + rows * 0).to(tl.int32)
    c1 = (rows + cols * 0).to(tl.int32)
    c2 = c0 * 0 + bh.to(tl.int32)
    c3 = c0 * 0 + offset.to(tl.int32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def load_tile(ptr, offs_r, offs_d, stride_r, stride_d, n_rows, n_dim, UPCAST: tl.constexpr):
    """Load a [R, D] tile at rows ``offs_r`` (masked to ``n_rows``) and columns ``offs_d`` (masked to ``n_dim``).

    Out-of-range elements read as 0 so they add nothing to any dot product. ``UPCAST`` converts to fp32
    right after the load: the Triton CPU interpreter computes bf16 arithmetic wrongly, so it must never see it.
    """
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < n_dim)
    # 64-bit offsets: rows * stride passes 2**31 for long sequences in [B, L, H, D] layouts, and a column
    # stride can be as large (any stride pattern is valid input).
    rows = offs_r.to(tl.int64)[:, None] * stride_r
    x = tl.load(ptr + rows + offs_d.to(tl.int64)[None, :] * stride_d, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def row_lengths(PIDX, PLENS, KVLENS, b, T, P, S,
                HAS_PIDX: tl.constexpr, HAS_PLENS: tl.constexpr, HAS_KVLENS: tl.constexpr):
    """(t, plen, kv_end) of batch row b: its bank row, its prefix length and its sequence length.

    Clamped into [0, T), [0, P] and [0, S] before any use, so unchecked input never reads out of bounds.
    """
    t = tl.program_id(0) * 0
    if HAS_PIDX:
        t = tl.minimum(tl.maximum(tl.load(PIDX + b), 0), T - 1).to(tl.int32)
    plen = t * 0 + P
    if HAS_PLENS:
        plen = tl.minimum(tl.maximum(tl.load(PLENS + t), 0), P).to(tl.int32)
    kv_end = t * 0 + S
    if HAS_KVLENS:
        kv_end = tl.minimum(tl.maximum(tl.load(KVLENS + b), 0), S).to(tl.int32)
    return t, plen, kv_end


@triton.jit
def sequence_key_end(kv_end, start_m, L, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the sequence keys a query block [start_m, start_m + BLOCK_M) can see: with bottom-right
    causal alignment query i sees key j iff j <= i + S - L, so no key past the block's last query."""
    n_end = kv_end
    if CAUSAL:
        n_end = tl.minimum(n_end, tl.maximum(start_m + BLOCK_M + S - L, 0))
    return n_end


@triton.jit
def sequence_visible(KPM, b, stride_kpmb, stride_kpmn, offs_m, offs_n, n_end, L, S,
                     HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr):
    """[M, N] visibility of sequence keys offs_n to queries offs_m: in range, not padded, causal."""
    visible = (offs_m[:, None] < L) & (offs_n[None, :] < n_end)
    if HAS_KPM:
        kpm = tl.load(KPM + b * stride_kpmb + offs_n.to(tl.int64) * stride_kpmn, mask=offs_n < n_end, other=0)
        visible = visible & (kpm != 0)[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (S - L))
    return visible
