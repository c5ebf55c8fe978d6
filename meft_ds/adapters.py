"""Bottleneck adapters and the two ways MEFT attaches them to a frozen module."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class Adapter(nn.Module):
    """Linear(d, r) -> activation -> dropout -> Linear(r, d); no internal residual (docs/method.md)."""

    def __init__(self, hidden_size: int, adapter_dim: int, activation: str, dropout: float, init: str, init_std: float):
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_dim)
        self.act = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(adapter_dim, hidden_size)
        self.reset_parameters(init, init_std)

    def reset_parameters(self, init: str, init_std: float) -> None:
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        if init == "zero_up":
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=init_std)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(hidden_states))))


class SerialAdapter(nn.Module):
    """Wraps a frozen module: out = module(x); out + adapter(out). Used after attention output projections."""

    def __init__(self, module: nn.Module, adapter: Adapter):
        super().__init__()
        self.module = module
        self.adapter = adapter

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.module(hidden_states)
        return out + self.adapter(out)
