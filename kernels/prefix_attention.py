"""Launchers of the prefix-attention kernels: tensors in, tensors out. Imports torch and triton only.

Shapes (any strides): q [B, Hq, L, D]; k, v [B, Hkv, S, D]; prefix_k, prefix_v [T, Hkv, P, D];
prefix_index [B] int or None; prefix_lens [T] int or None; kv_lens [B] int or None;
key_padding_mask [B, S] bool or None. Inputs are assumed valid (the caller checks them); the kernels
still clamp every index and length they read.
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .common import LOG2E
from .dropout import prefix_attention_dropout_mask_kernel
from .prefix_attention_bwd import (
    prefix_attention_bwd_dkdv_kernel,
    prefix_attention_bwd_dq_kernel,
    prefix_attention_bwd_reduce_kernel,
)
from .prefix_attention_fwd import prefix_attention_fwd_kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _config(kind: str, L: int, N: int, D: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a kernel kind ("fwd", "dq", "dkdv").

    The interpreter runs one program at a time, so it gets the largest blocks the shape allows (unless
    PTV2_FAST_INTERPRET_GPU_BLOCKS=1, which lets tests check the GPU configurations on the CPU). On a GPU
    the blocks shrink with the head dim to stay inside registers and shared memory (tl.dot needs >= 16),
    and the query block shrinks for short queries (decode-like L) so few rows are wasted.
    """
    if _interpreting() and os.environ.get("PTV2_FAST_INTERPRET_GPU_BLOCKS", "0") != "1":
        bm = min(128, max(16, triton.next_power_of_2(L)))
        bn = min(128, max(16, triton.next_power_of_2(N)))
        return bm, bn, 4, 1
    bd = _block_d(D)
    if kind == "fwd":
        bm, bn, warps, stages = (128, 64, 4, 3) if bd <= 64 else (128, 64, 8, 2) if bd <= 128 else (64, 32, 8, 2)
    elif kind == "dq":
        bm, bn, warps, stages = (128, 32, 4, 2) if bd <= 64 else (64, 32, 4, 2) if bd <= 128 else (32, 32, 8, 1)
    else:
        # dkdv: rows are keys (BLOCK_N), the loop walks query blocks (BLOCK_M); two [BLOCK_N, D]
        # accumulators live in registers, so wider heads get fewer rows and more warps.
        bm, bn, warps, stages = (32, 64, 4, 2) if bd <= 64 else (32, 64, 8, 2) if bd <= 128 else (16, 32, 8, 1)
        return bm, bn, warps, stages
    return min(bm, max(16, triton.next_power_of_2(L))), bn, warps, stages


def _flags(q: torch.Tensor):
    """(UPCAST, DOT_PREC, ACC) constexprs for q's dtype."""
    upcast = _interpreting() and q.dtype == torch.bfloat16
    if q.dtype == torch.float64:
        return upcast, "ieee", tl.float64
    if q.dtype == torch.float32:
        # fp32 follows torch's matmul policy: IEEE unless the user allowed TF32 for CUDA matmuls.
        allow_tf32 = q.is_cuda and torch.backends.cuda.matmul.allow_tf32
        return upcast, ("tf32" if allow_tf32 else "ieee"), tl.float32
    return upcast, None, tl.float32  # 16-bit inputs: the default tensor-core path, fp32 accumulation


def _opt(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # Index/length vectors are read with unit stride: make them contiguous (they are tiny). An absent one
    # still needs a pointer; its constexpr flag keeps it unread.
    return x.contiguous() if x is not None else like


def _on_q_device(launcher):
    """Run a launcher with q's CUDA device current: Triton launches on the current device (multi-GPU)."""

    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        q = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            return launcher(*args, **kwargs)

    return wrapper


def _rng(seed: int, rng_offset: int):
    # The Philox counters are 32-bit: fold the offset (and keep the seed non-negative) the same way everywhere.
    return seed & 0x7FFFFFFFFFFFFFFF, rng_offset & 0x7FFFFFFF


def _kpm_arg(key_padding_mask: torch.Tensor | None, like: torch.Tensor):
    if key_padding_mask is None:
        return like, 0, 0
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return kpm, kpm.stride(0), kpm.stride(1)


def _launch_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
                dropout_p, seed, rng_offset, out, lse, seq_lse):
    """The forward launch; ``seq_lse`` given means merge mode (OUT holds the sequence part on entry)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    bm, bn, warps, stages = _config("fwd", L, max(S, P), D)
    upcast, dot_prec, acc = _flags(q)
    kpm, skpm_b, skpm_n = _kpm_arg(key_padding_mask, lse)
    seed, rng_offset = _rng(seed, rng_offset)
    merge = seq_lse is not None
    # Unused without MERGE: strides of 1 are specialised into constants, so the fused kernel's code is unchanged.
    seq_lse, sl_strides = (seq_lse, seq_lse.stride()) if merge else (lse, (1, 1, 1))
    grid = (B * Hq, triton.cdiv(L, bm))
    prefix_attention_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, _opt(prefix_index, lse), _opt(prefix_lens, lse), _opt(kv_lens, lse), kpm,
        out, lse,
        scale * LOG2E, dropout_p, seed, rng_offset,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(),
        skpm_b, skpm_n,
        Hq, L, S, T, P, D, Hq // Hkv,
        seq_lse, *sl_strides,
        HAS_PIDX=prefix_index is not None, HAS_PLENS=prefix_lens is not None,
        HAS_KVLENS=kv_lens is not None, HAS_KPM=key_padding_mask is not None,
        CAUSAL=causal, DROPOUT=dropout_p > 0.0, UPCAST=upcast, DOT_PREC=dot_prec, ACC=acc, MERGE=merge,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), num_warps=warps, num_stages=stages,
    )


@_on_q_device
def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                         causal: bool, scale: float, dropout_p: float, seed: int, rng_offset: int):
    """Returns (out [B, Hq, L, D] in q's dtype and layout (``torch.empty_like(q)``), lse [B, Hq, L] fp32).

    One launch."""
    B, Hq, L, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if B * Hq * L == 0:
        return out, lse
    _launch_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
                dropout_p, seed, rng_offset, out, lse, None)
    return out, lse


@_on_q_device
def prefix_attention_merge_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                               causal: bool, scale: float, dropout_p: float, seed: int, rng_offset: int,
                               out: torch.Tensor, seq_lse: torch.Tensor) -> torch.Tensor:
    """Adds the prefix to a sequence-only attention computed elsewhere (the ``sdpa`` backend) and merges.

    ``out`` [B, Hq, L, D] (q's dtype, any strides) holds the sequence part's output on entry and the merged
    output on return; ``seq_lse`` [B, Hq, L] fp32 (any strides) is the sequence part's lse. Rows that see no
    sequence key (from kv_lens / key_padding_mask / causal) are taken as empty whatever these hold there.
    k and v give S and Hkv and are never read; dropout applies to the prefix columns only, with the fused
    kernel's keep mask. Returns the merged lse, a new contiguous [B, Hq, L] fp32 tensor (-inf, with out = 0,
    where a row sees no key at all). One launch."""
    B, Hq, L, _ = q.shape
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if B * Hq * L == 0:
        return lse
    _launch_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
                dropout_p, seed, rng_offset, out, lse, seq_lse)
    return lse


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prefix_splits(B: int, T: int, Hkv: int, P: int, bn: int, device) -> int:
    """How many row splits the prefix-gradient kernel uses: enough programs to fill the GPU, never more
    than a few rows' worth, and 1 in the interpreter or when the grid is already large."""
    env = os.environ.get("PTV2_FAST_PREFIX_SPLITS")
    if env:
        return max(1, min(int(env), B))
    if _interpreting() or device.type != "cuda":
        return 1
    programs = triton.cdiv(P, bn) * T * Hkv
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    rows_per_task = max(1, B // T)
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), rows_per_task // 2, 16))


@_on_q_device
def prefix_attention_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                         key_padding_mask, out, lse, causal: bool, scale: float, dropout_p: float,
                         seed: int, rng_offset: int):
    """Returns (dq, dk, dv, dprefix_k, dprefix_v), each shaped, typed and laid out like its input
    (``torch.empty_like``; dprefix as [T, Hkv, P, D]).

    Two launches (dq with delta; dk/dv of sequence and prefix together), three when the prefix reduction is
    split over batch rows (fp32 partials, then one kernel sums them in order). No other device work: rows are
    grouped by task inside the kernel, dlse and dout are read through their strides."""
    B, Hq, L, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpk, dpv = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    if B * Hq * L == 0:
        return (dq.zero_(), dk.zero_(), dv.zero_(), dpk.zero_(), dpv.zero_())
    _launch_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                out, lse, causal, scale, dropout_p, seed, rng_offset, dq, dk, dv, dpk, dpv, False)
    return dq, dk, dv, dpk, dpv


@_on_q_device
def prefix_attention_merge_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, out, lse,
                               scale: float, dropout_p: float, seed: int, rng_offset: int, dq: torch.Tensor):
    """The prefix keys' share of the gradients of a merged attention (``prefix_attention_merge_fwd``).

    ``out`` and ``lse`` are the merged output and lse (lse read as contiguous [B * Hq, L] rows, as the merge
    forward returns it; another layout is copied); ``dq`` [B, Hq, L, D] (any strides) holds the sequence keys'
    dq, computed by the vendor backward with these merged statistics, and gets the prefix keys' dq added in
    place. The sequence keys' dk/dv are the vendor's, so k and v are never read (the kernels run with S = 0).
    Returns (dprefix_k, dprefix_v) like the fused backward: shaped, typed and laid out like the bank, reduced
    per bank row in-kernel, 0 for unused rows. Two launches (three when the prefix reduction is split)."""
    B, Hq, L, _ = q.shape
    dpk, dpv = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    if B * Hq * L == 0 or prefix_k.shape[2] == 0:  # nothing to add to dq
        return dpk.zero_(), dpv.zero_()
    k0, v0 = k[:, :, :0], v[:, :, :0]  # an empty sequence stage; never written (no sequence programs)
    _launch_bwd(dout, None, q, k0, v0, prefix_k, prefix_v, prefix_index, prefix_lens, None, None,
                out, lse, False, scale, dropout_p, seed, rng_offset, dq, k0, v0, dpk, dpv, True)
    return dpk, dpv


def _launch_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                out, lse, causal, scale, dropout_p, seed, rng_offset, dq, dk, dv, dpk, dpv, dq_accum):
    """The backward launches into the given gradient tensors; ``dq_accum`` adds to the dq found in ``dq``."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    dev = q.device
    upcast, dot_prec, acc = _flags(q)
    bd = _block_d(D)
    group = Hq // Hkv
    drop = dropout_p > 0.0
    kpm, skpm_b, skpm_n = _kpm_arg(key_padding_mask, lse)
    seed, rng_offset = _rng(seed, rng_offset)
    lse = lse.contiguous()  # read as [B * Hq, L] rows (a no-op for the forward's own lse)
    delta = torch.empty_like(lse, memory_format=torch.contiguous_format)
    dl = dlse if dlse is not None else lse
    dl_strides = dl.stride()

    bm, bn, warps, stages = _config("dq", L, max(S, P), D)
    prefix_attention_bwd_dq_kernel[(B * Hq, triton.cdiv(L, bm))](
        q, k, v, prefix_k, prefix_v, _opt(prefix_index, lse), _opt(prefix_lens, lse), _opt(kv_lens, lse), kpm,
        dout, out, dl, lse, delta, dq,
        scale * LOG2E, scale, dropout_p, seed, rng_offset,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(),
        *out.stride(), *dl_strides, *dq.stride(), skpm_b, skpm_n,
        Hq, L, S, T, P, D, group,
        HAS_PIDX=prefix_index is not None, HAS_PLENS=prefix_lens is not None,
        HAS_KVLENS=kv_lens is not None, HAS_KPM=key_padding_mask is not None, HAS_DLSE=dlse is not None,
        DQ_ACCUM=dq_accum, CAUSAL=causal, DROPOUT=drop, UPCAST=upcast, DOT_PREC=dot_prec, ACC=acc,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )

    bm, bn, warps, stages = _config("dkdv", L, max(S, P), D)
    n_pblocks, n_sblocks = triton.cdiv(P, bn), triton.cdiv(S, bn)
    nsplit = _prefix_splits(B, T, Hkv, P, bn, dev) if P > 0 else 1
    # the prefix programs write dpk and dpv with one set of strides: different layouts go through partials
    split_path = nsplit > 1 or dpk.stride() != dpv.stride()
    if not split_path:
        part_k, part_v = dpk, dpv
        part_strides = (0, *dpk.stride())
    else:
        part_k = torch.empty((nsplit, T, Hkv, P, D), dtype=torch.float32, device=dev)
        part_v = torch.empty((nsplit, T, Hkv, P, D), dtype=torch.float32, device=dev)
        part_strides = part_k.stride()
    grid = (n_pblocks * T * Hkv * nsplit + B * Hkv * n_sblocks,)
    if grid[0] > 0:
        prefix_attention_bwd_dkdv_kernel[grid](
            q, k, v, prefix_k, prefix_v, _opt(prefix_index, lse), _opt(prefix_lens, lse), _opt(kv_lens, lse), kpm,
            dout, lse, delta, dk, dv, part_k, part_v,
            scale * LOG2E, scale, dropout_p, seed, rng_offset,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(),
            *dk.stride(), *dv.stride(), *part_strides, skpm_b, skpm_n,
            B, Hq, Hkv, L, S, T, P, D, group, nsplit, n_pblocks, max(n_sblocks, 1),
            HAS_PIDX=prefix_index is not None, HAS_PLENS=prefix_lens is not None,
            HAS_KVLENS=kv_lens is not None, HAS_KPM=key_padding_mask is not None,
            CAUSAL=causal, DROPOUT=drop, UPCAST=upcast, DOT_PREC=dot_prec, ACC=acc,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
    if split_path and P > 0:
        n = T * Hkv * P * D
        block = 1024
        prefix_attention_bwd_reduce_kernel[(triton.cdiv(n, block),)](
            part_k, part_v, dpk, dpv, nsplit, n, *dpk.stride(), *dpv.stride(), Hkv, P, D, BLOCK=block,
        )


def prefix_attention_dropout_mask(B: int, Hq: int, L: int, S: int, P: int, dropout_p: float, seed: int,
                                  rng_offset: int, device) -> torch.Tensor:
    """The keep mask the kernels apply, as bool [B, Hq, L, P + S] over the concatenated key axis.

    For tests and the reference: materialises what the fused kernels never store.
    """
    keep = torch.empty((B, Hq, L, P + S), dtype=torch.int8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    n = P + S
    bm = min(64, max(16, triton.next_power_of_2(L)))
    bn = min(128, max(16, triton.next_power_of_2(n)))
    seed, rng_offset = _rng(seed, rng_offset)
    with torch.cuda.device(keep.device) if keep.is_cuda else contextlib.nullcontext():
        prefix_attention_dropout_mask_kernel[(B * Hq, triton.cdiv(L, bm), triton.cdiv(n, bn))](
            keep, dropout_p, seed, rng_offset, L, n, BLOCK_M=bm, BLOCK_N=bn,
        )
    return keep.bool()
