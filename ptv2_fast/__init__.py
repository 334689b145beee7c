"""ptv2_fast: fused P-Tuning v2 prefix attention over a bank of per-task prefixes.

Public API: ``prefix_attention``, ``prefix_decode_attention``, ``merge_attention_states``; the concatenating
spec lives in ``ptv2_fast.reference``; Triton kernels in ``ptv2_fast.kernels`` (imported lazily, only when
used); the C++/CUDA extension (``csrc/``) is built and loaded by ``ptv2_fast._ext`` on first use.
"""

from . import reference
from .attention import merge_attention_states, prefix_attention, resolve_backend
from .decode import prefix_decode_attention
from .ops.backends import BackendUnavailable

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_decode_attention", "merge_attention_states", "resolve_backend", "reference",
           "BackendUnavailable", "__version__"]
