"""Hugging Face integration: ``patch_model`` / ``unpatch_model``, ``PrefixEncoder``, PEFT interop.

transformers (and peft) are imported lazily, only when a model is patched or an adapter is read/written.
"""

from .models import MODEL_TABLE, UnsupportedModelError
from .patch import is_patched, patch_model, unpatch_model
from .peft import load_peft_adapters, save_peft_adapter
from .prefix_encoder import PrefixEncoder

__all__ = ["patch_model", "unpatch_model", "is_patched", "PrefixEncoder", "save_peft_adapter",
           "load_peft_adapters", "MODEL_TABLE", "UnsupportedModelError"]
