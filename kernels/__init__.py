"""Triton kernels of ptv2_fast, installed as ``ptv2_fast.kernels``.

This layer knows nothing of ptv2_fast: launchers take and return tensors and import only torch and triton.
Set ``TRITON_INTERPRET=1`` before importing it to run the kernels on the CPU.
"""

from .prefix_attention import (
    prefix_attention_bwd,
    prefix_attention_dropout_mask,
    prefix_attention_fwd,
    prefix_attention_merge_bwd,
    prefix_attention_merge_fwd,
)

__all__ = ["prefix_attention_fwd", "prefix_attention_bwd", "prefix_attention_merge_fwd", "prefix_attention_merge_bwd",
           "prefix_attention_dropout_mask"]
