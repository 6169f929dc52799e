"""MACs and params against independent oracles: FlopCounterMode, hand formulas, plain sums."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from convrewrite.engine.loading import ExampleInputs
from convrewrite.engine.profiling import profile

from .oracles import flop_counter_macs, unique_params


class Mixed(nn.Module):
    """Modules and functional calls of every counted kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.kernel = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.q = nn.Linear(6, 12)
        self.k = nn.Linear(6, 12)
        self.v = nn.Linear(6, 12)
        self.mix = nn.Conv1d(12, 6, 5, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(torch.relu(self.grouped(self.conv(x))))
        x = F.conv2d(x, self.kernel, padding=1)  # functional conv on a registered parameter
        tokens = x.flatten(2).transpose(1, 2)  # (N, L, 6)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        scores = torch.softmax(q @ k.transpose(1, 2) / 12**0.5, dim=-1)
        mixed = torch.bmm(scores, v)
        heads = F.scaled_dot_product_attention(
            q.view(1, -1, 3, 4).transpose(1, 2),
            k.view(1, -1, 3, 4).transpose(1, 2),
            v.view(1, -1, 3, 4).transpose(1, 2),
        )
        y = mixed + heads.transpose(1, 2).reshape(1, -1, 12)
        return self.mix(y.transpose(1, 2))


def _inputs(*shape: int) -> ExampleInputs:
    return ExampleInputs((torch.randn(*shape),), {})


def test_macs_equal_flop_counter_mode() -> None:
    model = Mixed().eval()
    inputs = _inputs(1, 3, 8, 8)
    result = profile(model, inputs)
    assert result.macs == flop_counter_macs(model, inputs.args)


def test_conv_macs_follow_the_hand_formula() -> None:
    conv = nn.Conv2d(16, 32, (3, 5), stride=2, padding=1, groups=4)
    result = profile(conv, _inputs(2, 16, 20, 30))
    out_h, out_w = (20 + 2 - 3) // 2 + 1, (30 + 2 - 5) // 2 + 1
    assert result.macs == 2 * 32 * out_h * out_w * (16 // 4) * 3 * 5


def test_conv_transpose_is_counted_on_the_input_size() -> None:
    up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
    result = profile(up, _inputs(1, 8, 5, 5))
    assert result.macs == 1 * 8 * 5 * 5 * 4 * 4 * 4  # N * Cin * in_pixels * Cout * k * k


def test_rows_sum_to_totals() -> None:
    model = Mixed().eval()
    result = profile(model, _inputs(1, 3, 8, 8))
    assert sum(r.params for r in result.records) == result.params == unique_params(model)
    assert sum(r.macs for r in result.records) == result.macs


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(10, 10, bias=False)
        self.decode = nn.Linear(10, 10, bias=False)
        self.decode.weight = self.embed.weight
        self.block = nn.Conv1d(10, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.block(x.transpose(1, 2))).transpose(1, 2)  # one module, two calls
        return self.decode(self.embed(y))


def test_shared_and_tied_parameters_are_counted_once() -> None:
    model = Tied().eval()
    inputs = _inputs(1, 7, 10)
    result = profile(model, inputs)
    assert result.params == unique_params(model) == 100 + 10 * 10 * 3 + 10
    assert result.macs == flop_counter_macs(model, inputs.args)
    block_calls = [r for r in result.records if r.name == "block"]
    assert [r.call_number for r in block_calls] == [0, 1]
    assert block_calls[0].params == 310 and block_calls[1].params == 0
    assert block_calls[0].macs == block_calls[1].macs == 7 * 10 * 10 * 3
