"""meft_ds: memory-efficient fine-tuning of pretrained transformers made reversible (MEFT)."""

from .config import MEFTConfig
from .convert import make_reversible, set_backward, set_checkpointing
from .adapter_io import ModelRecipe, load_adapter_model
from .check import check_gradients

__all__ = ["MEFTConfig", "make_reversible", "set_backward", "set_checkpointing", "load_adapter_model", "ModelRecipe",
           "check_gradients"]
__version__ = "0.1.0"

