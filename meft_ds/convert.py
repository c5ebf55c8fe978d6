"""make_reversible / set_backward: turn a Hugging Face model's layer lists into MEFT stacks, in place."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
from torch import nn

from .adapters import Adapter, SerialAdapter
from .config import BACKWARD_MODES, MEFTConfig
from .models import Family, family_for
from .coupling import ExactCoupling, FloatCoupling
from .reversible import MEFTLayer, MEFTStack


class _Block:
    """F or G of a MEFT layer: a picklable callable over the layer's modules (no module references kept).

    kind: "layer" (attention then FFN with parallel adapter), "attention" (with the serial adapter that
    sits inside its output projection), "ffn" (with parallel adapter), "adapter" (stand-alone adapter).
    A block that contains the FFN has `parts` = (first, ffn), block = ffn o first (first None for the FFN
    alone): MEFTLayer runs the FFN, which maps every token on its own, in MEFTConfig.ffn_chunks slices of the
    tokens, and a whole layer's reversible backward recomputes the attention on its own when `split` is set
    (MEFTLayer.recompute_backward, MEFTConfig.split_layer_recompute).
    """

    def __init__(self, family: Family, kind: str, split_recompute: bool = False):
        self.family, self.kind = family, kind
        self.split = kind == "layer" and split_recompute
        self.parts = None
        if kind == "layer":
            self.parts = (_Block(family, "attention"), _Block(family, "ffn"))
        elif kind == "ffn":
            self.parts = (None, self)

    def __call__(self, owner: MEFTLayer, hidden_states, inputs):
        layer = owner.layer
        if self.kind == "adapter":
            return owner.adapter(hidden_states)
        if self.kind == "attention":
            return self.family.attention(layer, hidden_states, inputs)
        if self.kind == "ffn":
            return self.family.ffn(layer, hidden_states, layer.meft_ffn_adapter)
        return self.family.ffn(layer, self.family.attention(layer, hidden_states, inputs), layer.meft_ffn_adapter)


# variant -> (F kind, G kind, streams switched, index of the stream carrying the last pretrained block)
# MEFT1: y1 = F(x2) is the pretrained layer and is passed on as x2; MEFT2: y2 = G(y1) is, passed on as x1;
# MEFT3: y2 = FFN block output, passed on unswitched as x2 (docs/method.md, "the three variants").
_VARIANTS = {
    "meft1": ("layer", "adapter", True, 1),
    "meft2": ("adapter", "layer", True, 0),
    "meft3": ("attention", "ffn", False, 1),
}


def _make_adapter(config: MEFTConfig, model_config, reference: nn.Module, family: Family) -> Adapter:
    weight = next(reference.parameters())
    adapter = Adapter(model_config.hidden_size, config.adapter_dim, family.activation(model_config),
                      config.adapter_dropout, config.adapter_init, config.adapter_init_std)
    return adapter.to(device=weight.device, dtype=weight.dtype)


def _convert_layer(layer: nn.Module, config: MEFTConfig, model_config, family: Family) -> MEFTLayer:
    f_kind, g_kind, switched, _ = _VARIANTS[config.variant]
    if config.variant == "meft3":
        parent, name = family.output_projection(layer)
        setattr(parent, name, SerialAdapter(getattr(parent, name), _make_adapter(config, model_config, layer, family)))
    layer.meft_ffn_adapter = _make_adapter(config, model_config, layer, family)
    standalone = _make_adapter(config, model_config, layer, family) if "adapter" in (f_kind, g_kind) else None
    split = config.split_layer_recompute
    return MEFTLayer(layer, standalone, _Block(family, f_kind, split), _Block(family, g_kind, split),
                     config.lam, config.beta, switched, config.ffn_chunks, config.attention_chunks)


def _coupling(config: MEFTConfig, compute_dtype: torch.dtype):
    """The stream arithmetic for layers that compute in `compute_dtype` (MEFTStack.coupling_for)."""
    value_dtype = config.torch_stream_dtype_for(compute_dtype)
    if config.stream_arithmetic == "exact":
        # Two passes of the integer work per batch slice: measured, larger chunks would add to the peak only
        # when the batch is sliced, and each pass is more kernel launches (docs/benchmarks.md section 0).
        return ExactCoupling(value_dtype, config.frac_bits, config.torch_state_dtype, 2 * config.batch_chunks)
    return FloatCoupling(value_dtype)


def make_reversible(model: nn.Module, config: MEFTConfig) -> nn.Module:
    """Convert `model` in place into a MEFT model and return it.

    Every layer list of the model (BART: encoder and decoder, each on its own) becomes one MEFTStack:
    its lowest `num_frozen_layers` layers (None: the family's default, meft_ds.models; `model.meft_config`
    records the number used) stay original and run without gradient, the next
    `num_reversible_layers` become reversible MEFT layers and the rest cached MEFT layers.
    Afterwards only adapters, the stream mix and the task head require grad, and the model's
    save_pretrained writes the adapter directory (meft_ds.adapter_io) while its gradient-checkpointing
    switches act on the cached MEFT layers (`set_checkpointing`).

    Raises ValueError for an unsupported model_type (listing the supported ones), a model converted
    twice, or layer counts that do not fit the model.
    """
    if not isinstance(config, MEFTConfig):
        raise TypeError(f"make_reversible needs a MEFTConfig, got {type(config).__name__}.")
    if getattr(model, "meft_config", None) is not None:
        raise ValueError("This model is already reversible (make_reversible was called on it before).")
    family = family_for(model)
    model_config = model.config
    family.check_config(model_config)
    if config.num_frozen_layers is None:
        config = dataclasses.replace(config, num_frozen_layers=family.default_num_frozen_layers(model_config))
    sites = family.sites(model)
    for site in sites:
        num_layers = len(getattr(site.parent, site.attribute))
        if config.num_frozen_layers >= num_layers:
            raise ValueError(
                f"num_frozen_layers={config.num_frozen_layers} leaves no MEFT layer in the {site.name} "
                f"({num_layers} layers); use at most {num_layers - 1}."
            )
        num_meft = num_layers - config.num_frozen_layers
        if config.num_reversible_layers is not None and config.num_reversible_layers > num_meft:
            raise ValueError(
                f"num_reversible_layers={config.num_reversible_layers} exceeds the {num_meft} MEFT layers of the "
                f"{site.name} ({num_layers} layers, {config.num_frozen_layers} frozen); use at most {num_meft} or None."
            )

    model.requires_grad_(False)
    for site in sites:
        layers = list(getattr(site.parent, site.attribute))
        if getattr(site.parent, "layerdrop", 0.0):
            warnings.warn(f"MEFT runs every layer: setting {site.name} layerdrop from {site.parent.layerdrop} to 0.")
            site.parent.layerdrop = 0.0
        frozen, convertible = layers[: config.num_frozen_layers], layers[config.num_frozen_layers:]
        meft_layers = [_convert_layer(layer, config, model_config, family) for layer in convertible]
        num_reversible_layers = (len(meft_layers) if config.num_reversible_layers is None
                                 else config.num_reversible_layers)
        stack = MEFTStack(
            frozen, meft_layers, num_reversible_layers, main_stream=_VARIANTS[config.variant][3],
            make_coupling=functools.partial(_coupling, config), backward=config.backward,
            prepare_inputs=family.input_binder(layers[0]), run_frozen=family.run_frozen,
            batch_chunks=config.batch_chunks,
        )
        weight = next(layers[0].parameters())
        stack.mix.data = stack.mix.data.to(device=weight.device, dtype=weight.dtype)
        setattr(site.parent, site.attribute, nn.ModuleList([stack]))

    for module in model.modules():
        if isinstance(module, Adapter):
            module.requires_grad_(True)
        elif isinstance(module, MEFTStack):
            module.mix.requires_grad_(True)
    for name in family.head_names:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
    model.meft_config = config
    _install_hf_methods(model)
    return model


def _install_hf_methods(model: nn.Module) -> None:
    """Replace, on this model only, the transformers methods that would do the wrong thing after conversion.

    save_pretrained: the inherited one writes a full state dict with meft_layers.* names that no
    from_pretrained reads back (it reloads the bare base model with warnings only); this one writes the
    adapter directory (adapter_io.save_adapter). activation/gradient_checkpointing_enable: the inherited
    one reaches no MEFT layer and adds an input-require-grads hook that costs memory; this one
    checkpoints the cached MEFT layers (`set_checkpointing`). Plain functools.partial attributes, so the
    model's class, pickling and deepcopy are unchanged.
    """
    from .adapter_io import save_adapter

    model.save_pretrained = functools.partial(save_adapter, model)
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        setattr(model, name, functools.partial(_checkpointing_enable, model))
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        setattr(model, name, functools.partial(set_checkpointing, model, False))


def _checkpointing_enable(model: nn.Module, gradient_checkpointing_kwargs: dict | None = None,
                          activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1,
                          offload: bool = False) -> None:
    options = dict(gradient_checkpointing_kwargs or activation_checkpointing_kwargs or {})
    if options.pop("use_reentrant", False) or options or every_n_layers != 1 or offload:
        raise ValueError("MEFT models checkpoint their cached layers with torch's non-reentrant checkpoint only; "
                         f"drop use_reentrant=True, every_n_layers, offload and other options (got {options}).")
    set_checkpointing(model, True)


def set_checkpointing(model: nn.Module, enabled: bool) -> nn.Module:
    """Gradient checkpointing of the MEFT layers that use cached backprop (those above num_reversible_layers).

    Reversible layers keep no activations, and frozen layers run without gradient, so they have nothing
    to checkpoint. transformers.Trainer(args=TrainingArguments(gradient_checkpointing=True)) calls this.
    Raises ValueError when every MEFT layer is reversible: checkpointing would change nothing.
    """
    stacks = [m for m in model.modules() if isinstance(m, MEFTStack)]
    if not stacks:
        raise ValueError("set_checkpointing needs a model converted by make_reversible; this one has no MEFT stack.")
    if enabled and all(stack.num_reversible_layers == len(stack.meft_layers) for stack in stacks):
        raise ValueError("gradient checkpointing has nothing to do: every MEFT layer is reversible and keeps no "
                         "activations; turn it off, or set MEFTConfig.num_reversible_layers below the layer count "
                         "to checkpoint the cached layers above.")
    for stack in stacks:
        stack.checkpoint_cached = enabled
    return model


def set_backward(model: nn.Module, mode: str) -> nn.Module:
    """Pick how every MEFT stack of `model` is differentiated: "reversible" or "vanilla" (cached)."""
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode {mode!r} is unknown; use one of {BACKWARD_MODES}.")
    stacks = [m for m in model.modules() if isinstance(m, MEFTStack)]
    if not stacks:
        raise ValueError("set_backward needs a model converted by make_reversible; this one has no MEFT stack.")
    for stack in stacks:
        stack.backward = mode
    model.meft_config.backward = mode
    return model
