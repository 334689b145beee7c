"""Materialises the attention-dropout keep mask of the prefix-attention kernels (tests and reference only)."""

import triton
import triton.language as tl

from .common import dropout_keep


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def prefix_attention_dropout_mask_kernel(KEEP, dropout_p, seed, rng_offset, L, N,
                                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B * Hq, cdiv(L, BLOCK_M), cdiv(N, BLOCK_N)); KEEP is contiguous int8 [B, Hq, L, N], N = P + S."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], dropout_p)
    ptrs = KEEP + bh.to(tl.int64) * L * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < N))
