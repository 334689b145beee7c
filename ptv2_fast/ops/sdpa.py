"""The ``sdpa`` backend: the sequence part through PyTorch's own fused attention kernels, the prefix through ours.

For query row i (keys: the task's prefix Kp, then the sequence K):

    forward   (o_s, lse_s) = vendor attention of q over K, V alone (padding and bottom-right causal as a bias or
              the kernel's own flag); then our kernel starts its online softmax from that state
              (m = lse_s, l = 1, acc = o_s), adds the prefix keys read from the bank row in place, and writes
              the merged out and lse. That is the log-sum-exp merge, in the prefix kernel's epilogue: no
              concatenation and no separate merge pass. Rows that see no sequence key start empty, whatever the
              vendor wrote there (it writes 0 with lse 0, or NaN).
    backward  the vendor backward of the sequence part, called with the MERGED out and lse: its
              P = exp(s - lse) and delta = rowsum(dout * out) are then those of the whole softmax, so it
              returns exactly the sequence keys' dk, dv and the sequence part of dq (as ring attention uses
              it). Our prefix kernel then adds the prefix part of dq in place and reduces the bank gradient per
              task with the same statistics.

Where the vendor kernels cannot run a case, the whole op runs on our fused kernel of that device (``cpp`` on the
CPU, ``triton`` on CUDA) — see ``sequence_kernel``, which names what a call uses:

- the CPU flash kernel has no dropout; and its float16 backward missed the error rule of DESIGN.md section 5 in
  one case of the test matrix (dv 1.5e-2 off at |dv| = 21, one fp16 ulp; the plain-torch path is 5e-3 off there;
  float32 and bfloat16 pass everywhere), so float16 on the CPU runs fused;
- a gradient through lse (``return_lse`` with lse in the loss) is outside what any vendor backward takes (they
  differentiate out only): that backward runs on our fused kernel, which is exact with the same merged statistics
  (no dropout came from a vendor kernel, see below);
- CUDA: flash (fp16/bf16, no padding, GQA native, causal bottom-right) or memory-efficient attention (padding as
  an additive bias; equal head counts only: GQA through it would need K/V repeated in memory); attention dropout
  through the vendor kernels needs their RNG state carried from forward to backward, which the op does not do
  yet, so dropout runs on the fused Triton kernel.
"""

from __future__ import annotations

import torch

from . import backends

_aten = torch.ops.aten

# the additive sequence bias of a padding tensor, cached on that tensor (a patched model passes one kv_lens or
# key_padding_mask tensor to all of its layers: the bias is built once per forward, not once per layer)
_BIAS_ATTR = "_ptv2_fast_sdpa_bias"


def sequence_kernel(q, k, kv_lens=None, key_padding_mask=None, causal=False, dropout_p=0.0) -> str:
    """The kernel that computes the sequence part of a ``backend="sdpa"`` call with these arguments:
    ``"cpu_flash"``, ``"flash"`` or ``"efficient"`` (PyTorch's), or ``"fused:<backend>"`` when the whole op runs on
    our fused kernel instead (the reason is in the module docstring)."""
    B, Hq, L, D = q.shape
    S = k.shape[2]
    if B * Hq * L == 0 or S == 0:  # nothing for a vendor kernel (the CPU one dies on empty sizes)
        return "fused:cpp" if q.device.type == "cpu" else "fused:triton"
    if q.device.type == "cpu":
        return "fused:cpp" if dropout_p > 0.0 or q.dtype == torch.float16 else "cpu_flash"
    if q.device.type != "cuda" or dropout_p > 0.0:
        return "fused:triton"
    aligned = D % 8 == 0 and D <= 256 and all(x.stride(-1) == 1 for x in (q, k))
    if not aligned:
        return "fused:triton"
    padded = kv_lens is not None or key_padding_mask is not None
    if not padded and q.dtype in (torch.float16, torch.bfloat16):
        return "flash"
    if Hq == k.shape[1]:
        return "efficient"
    return "fused:triton"


def _fused(kernel: str) -> bool:
    return kernel.startswith("fused:")


def _bias(q, S, kv_lens, key_padding_mask, causal, pad_to: int = 1):
    """(additive bias [B or 1, 1, L or 1, S] in q's dtype, or None; is_causal flag for the vendor kernel).

    The vendor's own ``is_causal`` is top-left aligned; the op's causal is bottom-right, the same only for
    L == S. ``pad_to``: the bias row pitch is rounded up to this many elements (memory-efficient attention reads
    16-element-aligned rows); the returned bias is a view of S columns."""
    L = q.shape[2]
    pad = kv_lens if kv_lens is not None else key_padding_mask
    if pad is None and (not causal or L == S):
        return None, causal
    key = (pad._version if pad is not None else None, q.dtype, q.device, L, S, causal, pad_to)
    if pad is not None:
        hit = getattr(pad, _BIAS_ATTR, None)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
    pitch = -(-S // pad_to) * pad_to
    cols = torch.arange(S, device=q.device)
    if kv_lens is not None:
        hidden = cols[None, :] >= kv_lens.to(q.device)[:, None]
    elif key_padding_mask is not None:
        hidden = ~key_padding_mask
    else:
        hidden = None
    is_causal = causal and L == S
    if causal and L != S:  # query i sees sequence key j iff j <= i + S - L
        late = cols[None, :] > torch.arange(L, device=q.device)[:, None] + (S - L)  # [L, S]
        hidden = late[None] if hidden is None else hidden[:, None, :] | late[None]
    elif hidden is not None:
        hidden = hidden[:, None, :]
    bias = torch.zeros((hidden.shape[0], 1, hidden.shape[1], pitch), dtype=q.dtype, device=q.device)[..., :S]
    bias.masked_fill_(hidden[:, None], float("-inf"))
    if pad is not None:
        setattr(pad, _BIAS_ATTR, (key, bias, is_causal))
    return bias, is_causal


def _in_layout(x, like):
    """x laid out as ``torch.empty_like(like)`` (the op's layout contract, which its fake promises): the vendor
    kernels pick their own layouts ([B, L, H, D] memory on the CPU), equal to it for Hugging Face's tensors, so
    this copies only for other layouts."""
    if x.stride() == like.stride() or x.numel() == 0:
        return x
    y = torch.empty_like(like)
    y.copy_(x)
    return y


def _cpp_merge(name):
    return backends._cpp_op(name)


def sdpa_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
             dropout_p, seed, rng_offset):
    """(out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] float32), the backends' forward contract."""
    kernel = sequence_kernel(q, k, kv_lens, key_padding_mask, causal, dropout_p)
    if _fused(kernel):
        return backends.FWD[kernel[6:]](q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                        key_padding_mask, causal, scale, dropout_p, seed, rng_offset)
    if kernel == "cpu_flash":
        bias, is_causal = _bias(q, k.shape[2], kv_lens, key_padding_mask, causal)
        out, seq_lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=bias,
                                                                          scale=scale)
        out = _in_layout(out, q)
        lse = _cpp_merge("prefix_attention_merge_fwd")(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens,
                                                       kv_lens, key_padding_mask, causal, scale, out, seq_lse)
        return out, lse
    out, seq_lse = _cuda_sequence_fwd(kernel, q, k, v, kv_lens, key_padding_mask, causal, scale)
    out = _in_layout(out, q)
    lse = backends._triton_kernels().prefix_attention_merge_fwd(
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale, 0.0, 0, 0,
        out, seq_lse)
    return out, lse


def sdpa_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, out,
             lse, causal, scale, dropout_p, seed, rng_offset):
    """(dq, dk, dv, dprefix_k, dprefix_v), the backends' backward contract."""
    kernel = sequence_kernel(q, k, kv_lens, key_padding_mask, causal, dropout_p)
    if _fused(kernel) or dlse is not None:
        # A gradient through lse: no vendor backward takes one. Our fused backward is exact with the merged
        # statistics (both parts' dropout came from our kernels here: the vendor runs none).
        name = kernel[6:] if _fused(kernel) else ("cpp" if q.device.type == "cpu" else "triton")
        return backends.BWD[name](dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                  key_padding_mask, out, lse, causal, scale, dropout_p, seed, rng_offset)
    # A row that sees no key at all has lse = -inf; the vendor would compute exp(-inf - -inf) = NaN there. Any
    # finite value is exact for such a row (every score is -inf).
    vendor_lse = torch.nan_to_num(lse, neginf=0.0)
    if kernel == "cpu_flash":
        bias, is_causal = _bias(q, k.shape[2], kv_lens, key_padding_mask, causal)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, vendor_lse, 0.0, is_causal, attn_mask=bias, scale=scale)
        dq, dk, dv = _in_layout(dq, q), _in_layout(dk, k), _in_layout(dv, v)
        dpk, dpv = _cpp_merge("prefix_attention_merge_bwd")(dout, q, k, v, prefix_k, prefix_v, prefix_index,
                                                            prefix_lens, out, lse, scale, dq)
        return dq, dk, dv, dpk, dpv
    dq, dk, dv = _cuda_sequence_bwd(kernel, dout, q, k, v, kv_lens, key_padding_mask, out, vendor_lse, causal, scale)
    dq, dk, dv = _in_layout(dq, q), _in_layout(dk, k), _in_layout(dv, v)
    dpk, dpv = backends._triton_kernels().prefix_attention_merge_bwd(
        dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, out, lse, scale, 0.0, 0, 0, dq)
    return dq, dk, dv, dpk, dpv


# ---------------------------------------------------------------------------------------------------------
# CUDA vendor kernels (no dropout: see the module docstring)

def _cuda_sequence_fwd(kernel, q, k, v, kv_lens, key_padding_mask, causal, scale):
    """(out_s [B, Hq, L, D], lse_s [B, Hq, L] float32, any strides) over the sequence keys."""
    L = q.shape[2]
    if kernel == "flash":
        # FlashAttention-2 aligns causal bottom-right when L != S, as the op does (SDPA's is_causal is top-left,
        # which is why SDPA itself never routes that case here); GQA is native.
        res = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    bias, is_causal = _bias(q, k.shape[2], kv_lens, key_padding_mask, causal, pad_to=16)
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], L, k.shape[2])
    res = _aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, is_causal, scale=scale)
    return res[0], res[1][:, :, :L]  # its lse rows are padded to a multiple of 32


def _cuda_sequence_bwd(kernel, dout, q, k, v, kv_lens, key_padding_mask, out, lse, causal, scale):
    """(dq, dk, dv) of the sequence keys, given the MERGED out and lse."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    no_rng = torch.empty((2,), dtype=torch.int64, device=q.device)  # read only with dropout (none here)
    if kernel == "flash":
        # no cumulative lengths: the dense (not varlen) kernel, as the forward ran
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, L, S, 0.0, causal, no_rng, no_rng, scale=scale)
    bias, is_causal = _bias(q, S, kv_lens, key_padding_mask, causal, pad_to=16)
    if bias is not None:
        bias = bias.expand(B, Hq, L, S)
    lse_rows = -(-L // 32) * 32
    padded = torch.zeros((B, Hq, lse_rows), dtype=torch.float32, device=q.device)
    padded[:, :, :L] = lse
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, bias, out, padded, no_rng, no_rng, 0.0, [True, True, True, False], is_causal, scale=scale)
    return dq, dk, dv
