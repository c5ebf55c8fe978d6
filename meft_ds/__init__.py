"""meft_ds: memory-efficient fine-tuning of pretrained transformers made reversible (MEFT)."""

from .config import MEFTConfig
from .convert import make_reversible, set_backward

__all__ = ["MEFTConfig", "make_reversible", "set_backward"]
__version__ = "0.1.0"

