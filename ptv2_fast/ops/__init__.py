"""Raw ops (torch.library), their autograd, backend dispatch and input checks. Importing registers
``torch.ops.ptv2_fast.prefix_attention`` and ``prefix_attention_backward``."""

from . import backends, checks
from .prefix_attention import PrefixAttentionFunction, prefix_attention_op

__all__ = ["backends", "checks", "PrefixAttentionFunction", "prefix_attention_op"]
