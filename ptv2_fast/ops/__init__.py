"""Custom ops (torch.library), backend dispatch and input checks. Importing registers ``torch.ops.ptv2_fast.*``."""

from . import backends, checks
from .prefix_attention import prefix_attention_backward_op, prefix_attention_op

__all__ = ["backends", "checks", "prefix_attention_op", "prefix_attention_backward_op"]
