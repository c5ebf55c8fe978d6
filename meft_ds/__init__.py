"""meft_ds: memory-efficient fine-tuning of pretrained transformers made reversible (MEFT)."""

from .config import MEFTConfig
from .convert import make_reversible, set_backward


def load_adapter_model(adapter_dir: str, model_name_or_path: str | None = None):
    """The trained model from an adapter export (adapter_model.safetensors + adapter_config.json) put back
    onto its original pretrained model. Imported lazily: the training package pulls in DeepSpeed."""
    from .training.checkpoint import load_adapter_model as load

    return load(adapter_dir, model_name_or_path)


__all__ = ["MEFTConfig", "make_reversible", "set_backward", "load_adapter_model"]
__version__ = "0.1.0"

