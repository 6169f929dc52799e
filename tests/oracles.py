"""Independent oracles for counts: torch's FlopCounterMode and plain parameter sums."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter


def flop_counter_macs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> int:
    """FlopCounterMode's total / 2 for one forward pass, with gradients enabled.

    With gradients on, nn.MultiheadAttention and nn.TransformerEncoderLayer take their ordinary
    path (separate GEMMs FlopCounterMode sees); under no_grad in eval mode they run one fused ATen
    op that FlopCounterMode counts as 0. Nothing is backpropagated, so only the forward counts.

    torch 2.13's FlopCounterMode has no formula for the CPU flash-attention kernel that
    F.scaled_dot_product_attention dispatches to on CPU (it would count 0), so torch's own
    ``sdpa_flop`` formula is registered for it: still torch's arithmetic, not ours.
    """
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:

        def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):  # type: ignore[no-untyped-def]
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

        mapping[cpu_sdpa] = cpu_sdpa_flops
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.enable_grad(), counter, warnings.catch_warnings():
        # A model that reads a tensor as a Python number (a data-dependent branch) warns about
        # requires_grad here; the value is the same.
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True to a scalar")
        model(*args, **(kwargs or {}))
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2


def unique_params(model: nn.Module) -> int:
    """nn.Module.parameters() de-duplicates shared parameters."""
    return sum(p.numel() for p in model.parameters())
