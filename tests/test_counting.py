"""MACs and params against independent oracles: FlopCounterMode, hand formulas, plain sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convrewrite.core.loading import ExampleInputs
from convrewrite.core.profiling import profile

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


class Attention(nn.Module):
    """nn.MultiheadAttention for self- and cross-attention, and a transformer encoder."""

    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.self_attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(16, 2, batch_first=True)
        layer = nn.TransformerEncoderLayer(16, 4, 40, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.query = nn.Parameter(torch.randn(1, 3, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(x, x, x, need_weights=self.need_weights)[0]
        x = self.encoder(x)
        query = self.query.expand(x.shape[0], -1, -1)
        return self.cross_attention(query, x, x, need_weights=self.need_weights)[0]


def _attention_macs(batch: int, queries: int, keys: int, embed: int) -> int:
    """Hand formula: q, k, v and output projections plus scores and weighted values."""
    return batch * (2 * queries * embed * embed + 2 * keys * embed * embed + 2 * queries * keys * embed)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("fast_path", [True, False], ids=["eval-fused", "train-unfused"])
def test_attention_macs_with_and_without_the_fused_fast_path(need_weights: bool, fast_path: bool) -> None:
    """Under no_grad in eval mode nn.MultiheadAttention and nn.TransformerEncoderLayer run one
    fused op each (aten._native_multi_head_attention / _transformer_encoder_layer_fwd); before
    the counter knew them it reported 41,088 of these 84,864 MACs. In train mode (no dropout) the
    same layers run unfused. Both must equal FlopCounterMode with gradients and the hand formula."""
    torch.manual_seed(0)
    model = Attention(need_weights).train(not fast_path)
    inputs = _inputs(2, 6, 16)
    result = profile(model, inputs)
    layer = _attention_macs(2, 6, 6, 16) + 2 * 2 * 6 * 16 * 40
    expected = _attention_macs(2, 6, 6, 16) + 2 * layer + _attention_macs(2, 3, 6, 16)
    assert result.macs == flop_counter_macs(model, inputs.args) == expected == 84_864
    kinds = {r.name: r.macs_by_kind for r in result.records if r.macs}
    if fast_path:
        assert kinds["self_attention"] == {"attention": _attention_macs(2, 6, 6, 16)}


def test_padded_sequences_count_their_real_tokens() -> None:
    """With a padding mask in eval mode the encoder passes nested tensors between its layers (and
    the profile's shapes crashed on them); each sequence costs what its own length costs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 40, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    with pytest.warns(UserWarning, match="nested tensors is in prototype"):
        result = profile(encoder, ExampleInputs((torch.randn(2, 6, 16),), {"src_key_padding_mask": mask}))
    per_layer = sum(_attention_macs(1, n, n, 16) + 2 * n * 16 * 40 for n in (6, 4))
    assert result.macs == 2 * per_layer
    assert result.records[0].output_shapes == [[2, 6, 16]]
