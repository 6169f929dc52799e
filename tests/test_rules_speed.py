"""The exact speed rewrites: ``winograd`` (its block, its honest MAC count) and ``fuse-bn``.

Oracles: ``F.conv2d`` for what the Winograd block computes, hand formulas and torch's
FlopCounterMode for what it multiplies, a conv followed by its BatchNorm for the fold.
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import convrewrite.layers.winograd as winograd_module
from convrewrite.core.loading import ExampleInputs, LoadedModel
from convrewrite.core.profiling import profile
from convrewrite.engine.pipeline import analyse
from convrewrite.layers import WinogradConv2d
from convrewrite.layers.dense import kernel_error

from .rule_test_support import relative, rule, site_of


def _block_like(conv: nn.Conv2d, tile: int) -> WinogradConv2d:
    block = WinogradConv2d(
        conv.in_channels,
        conv.out_channels,
        padding=conv.padding,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        tile=tile,
    ).to(conv.weight.dtype)
    with torch.no_grad():
        block.weight.copy_(conv.weight)
        if conv.bias is not None:
            block.bias.copy_(conv.bias)
    return block


# (in, out, groups, padding, padding_mode, H, W, batch): dense, grouped, depthwise (with a channel
# multiplier), odd sizes that do not fill whole tiles, no padding, padding in one dimension only.
GEOMETRIES = [
    (3, 5, 1, 1, "zeros", 7, 9, 2),
    (4, 6, 2, 1, "zeros", 5, 11, 3),
    (6, 6, 6, 1, "zeros", 9, 7, 2),
    (4, 8, 4, 0, "zeros", 8, 5, 1),
    (4, 4, 1, (1, 0), "zeros", 6, 13, 2),
    (4, 4, 2, 1, "reflect", 7, 6, 2),
    (3, 3, 3, 1, "circular", 5, 5, 3),
]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_winograd_block_computes_the_conv(tile: int, geometry: tuple) -> None:
    cin, cout, groups, padding, mode, height, width, batch = geometry
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=padding, groups=groups, padding_mode=mode).double()
    x = torch.randn(batch, cin, height, width, dtype=torch.float64)
    block = _block_like(conv, tile)
    with torch.no_grad():
        expected, actual = conv(x), block(x)
    assert actual.shape == expected.shape
    assert relative(actual, expected) < 1e-12
    # float32: what users run. F(4x4,3x3)'s larger transform coefficients cost some precision.
    conv32, block32, x32 = conv.float(), block.float(), x.float()
    with torch.no_grad():
        assert relative(block32(x32), conv32(x32)) < (1e-6 if tile == 2 else 1e-5)
    assert kernel_error(block, conv) == 0.0  # to_dense() is the conv's own kernel


def test_winograd_block_trains_like_the_conv_and_follows_weight_changes() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    block = _block_like(conv, 2)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    conv(x).square().sum().backward()
    block(x).square().sum().backward()
    assert torch.allclose(block.weight.grad, conv.weight.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(block.bias.grad, conv.bias.grad, rtol=1e-10, atol=1e-12)
    # Inference caches the transformed kernel; an in-place change of the weight must invalidate it.
    with torch.no_grad():
        block(x)
        block.weight.mul_(-2.0)
        conv.weight.mul_(-2.0)
        assert relative(block(x), conv(x)) < 1e-12


def test_winograd_counts_what_it_multiplies_by_hand_formula() -> None:
    """2 x 4 x 7 x 9 input, 6 outputs, groups 2, padding 1, F(2x2,3x3): 7x9 outputs -> 4 x 5 tiles
    of 2x2 per image, 40 tiles; a = 4 transform points per side."""
    block = WinogradConv2d(4, 6, padding=1, groups=2, tile=2)
    result = profile(block, ExampleInputs((torch.randn(2, 4, 7, 9),)))
    # F(2x2,3x3)'s transforms are additions: the MACs are the products alone.
    assert result.records[0].macs_by_kind == {"winograd_product": 40 * 16 * 2 * 6}  # tiles x a^2 x Cin/g x Cout
    assert result.macs == 7_680
    # Input: per image and channel, the row step is 4 additions per tile row (4) and padded column
    # (2 x 5 + 2 = 12), the column step 16 per tile (20 per image): 192 + 320 = 512; x 2 x 4 = 4,096.
    # Output: 24 per tile (16 on the rows, 8 on the columns) and output channel: 40 x 6 x 24 = 5,760.
    assert block.additions_breakdown(2, 7, 9) == {
        "winograd_input_transform": 2 * 4 * (4 * 4 * 12 + 16 * 20),
        "winograd_output_transform": 40 * 6 * 24,
    }
    # F(4x4,3x3) on 1 x 3 x 10 x 10, no padding, depthwise: 8x8 outputs -> 2 x 2 tiles of 4x4, a = 6.
    depthwise = WinogradConv2d(3, 3, padding=0, groups=3, tile=4)
    counted = profile(depthwise, ExampleInputs((torch.randn(1, 3, 10, 10),))).records[0].macs_by_kind
    assert counted == {
        "winograd_product": 4 * 36 * 1 * 3,
        "winograd_input_transform": 4 * 3 * 6**4,
        "winograd_output_transform": 4 * 3 * 16 * 36,
    }


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("groups,depthwise", [(1, False), (2, False), (4, True)])
def test_winograd_declared_count_agrees_with_flop_counter_mode(groups: int, depthwise: bool, tile: int) -> None:
    """FlopCounterMode sees the matmuls (F(4x4)'s transforms, grouped products) but not elementwise
    products nor additions: F(2x2)'s transforms are additions, so it must see the products of a
    dense or grouped block and nothing of a depthwise one; F(4x4)'s transforms are matmuls."""
    block = WinogradConv2d(4, 8, padding=1, groups=groups, tile=tile)
    x = torch.randn(3, 4, 9, 10)
    with torch.no_grad():
        block(x)  # compute and cache the transformed kernel, as in steady-state inference
        counter = FlopCounterMode(display=False)
        with counter:
            block(x)
    declared = profile(block, ExampleInputs((x,))).records[0].macs_by_kind
    seen = counter.get_total_flops() // 2
    if tile == 2:
        assert set(declared) == {"winograd_product"}
        assert seen == (0 if depthwise else declared["winograd_product"])
        return
    transforms = declared["winograd_input_transform"] + declared["winograd_output_transform"]
    assert seen == (transforms if depthwise else transforms + declared["winograd_product"])


def test_winograd_2x2_transforms_by_additions_are_lavin_and_grays_matrices() -> None:
    """Oracle: B^T d B on each 4x4 tile (cut out by hand at stride 2) and A^T M A as matrix
    products with the paper's matrices, in float64."""
    from convrewrite.layers.winograd import _input_transform_2x2, _output_transform_2x2

    b_t = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
    a_t = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)
    rows, columns = 3, 4
    image = torch.randn(2, 3, 2 * rows + 2, 2 * columns + 2, dtype=torch.float64)  # (C, N, H, W)
    got = _input_transform_2x2(image, rows, columns)
    assert got.shape == (16, 2, 3, rows, columns)
    for r in range(rows):
        for c in range(columns):
            tile = image[:, :, 2 * r : 2 * r + 4, 2 * c : 2 * c + 4]
            expected = torch.einsum("ik,cnkl,jl->ijcn", b_t, tile, b_t).reshape(16, 2, 3)
            assert torch.equal(got[:, :, :, r, c], expected)  # sums of two +-1 terms: exact
    products = torch.randn(4, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(
        _output_transform_2x2(products), torch.einsum("ik,klc,jl->ijc", a_t, products, a_t), rtol=1e-15, atol=1e-15
    )


def test_winograd_layer_file_is_standalone() -> None:
    tree = ast.parse(inspect.getsource(winograd_module))
    imported = {
        alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"torch", "__future__"}


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"stride": 2, "padding": 1}, "stride (2, 2): Winograd needs stride 1"),
        ({"dilation": 2, "padding": 2}, "dilation (2, 2): Winograd needs dilation 1"),
    ],
)
def test_winograd_skips_what_it_cannot_compute(kwargs: dict, reason: str) -> None:
    conv = nn.Conv2d(4, 4, 3, **kwargs)
    assert rule("winograd").skip_reason(site_of(conv, torch.randn(1, 4, 9, 9))) == reason
    five = nn.Conv2d(4, 4, 5)
    assert "needs 3x3" in rule("winograd").skip_reason(site_of(five, torch.randn(1, 4, 9, 9)))
    line = nn.Conv1d(4, 4, 3)
    assert "2-D" in rule("winograd").skip_reason(site_of(line, torch.randn(1, 4, 9)))


class SeparableNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorms: running statistics and affine parameters far from 0 / 1."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            count = module.num_features
            with torch.no_grad():
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.randn(count, generator=generator))
                    module.running_var.copy_(torch.rand(count, generator=generator) * 3 + 0.2)
                if module.affine:
                    module.weight.copy_(torch.randn(count, generator=generator))
                    module.bias.copy_(torch.randn(count, generator=generator))
    return model.eval()


def _analyse(model: nn.Module, x: torch.Tensor, specs: list[str]):
    with torch.no_grad():
        expected = model(x)
    result = analyse(LoadedModel(model, ExampleInputs((x,)), "m", "m", "test"), [rule(s) for s in specs])
    return expected, result


def test_separable_then_winograd_on_the_depthwise_half_is_exact() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(SeparableNet())
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        separable_only = _analyse(model, x, ["separable:multiplier=9"])[1].after.output
    torch.manual_seed(0)
    model = _randomize_norms(SeparableNet())
    _, result = _analyse(model, x, ["separable:multiplier=9", "winograd:include=*.depthwise"])
    assert type(result.model.conv2.depthwise) is WinogradConv2d
    assert type(result.model.conv2.pointwise) is nn.Conv2d
    assert relative(result.after.output, separable_only) < 1e-5
    for record in result.rewrites:
        assert (record.params_after, record.macs_after) == (record.analytic_params, record.analytic_macs)


def test_fuse_bn_folds_exactly_and_removes_the_norms() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(SeparableNet())
    x = torch.randn(2, 3, 9, 11)
    expected, result = _analyse(model, x, ["fuse-bn"])
    assert [(r.name, r.notes["batchnorm"]) for r in result.rewrites] == [("conv1", "norm1"), ("conv2", "norm2")]
    assert type(result.model.norm1) is nn.Identity and type(result.model.norm2) is nn.Identity
    assert result.model.conv2.bias is not None  # the BN shift becomes the bias
    assert relative(result.after.output, expected) < 1e-6
    # BN params (2 x 8 x 2) go; conv2 gains a bias of 8.
    assert result.before.params - result.after.params == 32 - 8
    errors = {layer.name: layer.kernel_relative_error for layer in result.fidelity.layers}
    assert errors["conv1"] < 1e-6 and errors["conv2"] < 1e-6  # rounding of the fold only


def test_fuse_bn_then_exact_separable_keeps_the_output_and_sees_the_scale() -> None:
    torch.manual_seed(0)
    model = _randomize_norms(SeparableNet())
    x = torch.randn(2, 3, 9, 11)
    expected, result = _analyse(model, x, ["fuse-bn", "separable:multiplier=9"])
    assert relative(result.after.output, expected) < 1e-5
    pointwise = result.model.conv2.pointwise
    # The folded kernel (scaled per output channel) was factored: its pointwise bias is the BN shift.
    norm = SeparableNet().norm2
    assert pointwise.bias is not None and not torch.allclose(pointwise.bias, torch.zeros_like(pointwise.bias))
    assert type(result.model.norm2) is nn.Identity and isinstance(norm, nn.BatchNorm2d)
    errors = {layer.name: layer.kernel_relative_error for layer in result.fidelity.layers}
    assert errors["conv2"] < 1e-5  # measured against the fold, not against the unscaled conv


def test_separable_then_fuse_bn_folds_each_norm_into_the_blocks_pointwise_conv() -> None:
    """The pointwise conv is the last module of the separable block, so it produces the block's
    output and the BatchNorm after the block is folded into it, exactly."""
    torch.manual_seed(0)
    model = _randomize_norms(SeparableNet())
    x = torch.randn(2, 3, 9, 11)
    separable_only = _analyse(model, x, ["separable:multiplier=9"])[1].after.output
    torch.manual_seed(0)
    model = _randomize_norms(SeparableNet())
    expected, result = _analyse(model, x, ["separable:multiplier=9", "fuse-bn"])
    folded = [(r.name, r.notes["batchnorm"]) for r in result.rewrites if r.rule == "fuse-bn"]
    assert folded == [("conv1.pointwise", "norm1"), ("conv2.pointwise", "norm2")]
    assert type(result.model.norm1) is nn.Identity and type(result.model.norm2) is nn.Identity
    assert relative(result.after.output, separable_only) < 1e-5
    assert relative(result.after.output, expected) < 1e-5  # multiplier=9 is full rank: exact
    skipped = {s.name: s.reason for s in result.skipped if s.rule == "fuse-bn"}
    assert "does not show what reads its output" in skipped["conv1.depthwise"]


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, groups=2, bias=False)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_fuse_bn_on_grouped_conv1d_without_bias() -> None:
    model = _randomize_norms(Conv1dNet())
    x = torch.randn(3, 4, 10)
    expected, result = _analyse(model, x, ["fuse-bn"])
    assert [r.name for r in result.rewrites] == ["conv"]
    assert relative(result.after.output, expected) < 1e-6


class Branches(nn.Module):
    """Every case fuse-bn must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.residual = nn.Conv2d(4, 4, 3, padding=1)
        self.residual_norm = nn.BatchNorm2d(4)
        self.fork = nn.Conv2d(4, 4, 1)
        self.fork_a = nn.BatchNorm2d(4)
        self.fork_b = nn.BatchNorm2d(4)
        self.shared_one = nn.Conv2d(4, 4, 1)
        self.shared_two = nn.Conv2d(4, 4, 1)
        self.shared_norm = nn.BatchNorm2d(4)
        self.batch_stats = nn.Conv2d(4, 4, 1)
        self.batch_norm = nn.BatchNorm2d(4, track_running_stats=False)
        self.activated = nn.Conv2d(4, 4, 1)
        self.after_relu = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.residual(x)
        x = self.residual_norm(r) + r
        f = self.fork(x)
        x = self.fork_a(f) + self.fork_b(f)
        x = self.shared_norm(self.shared_one(x)) + self.shared_norm(self.shared_two(x))
        x = self.batch_norm(self.batch_stats(x))
        return self.after_relu(torch.relu(self.activated(x)))


def test_fuse_bn_skips_with_reasons() -> None:
    model = _randomize_norms(Branches())
    expected, result = _analyse(model, torch.randn(2, 4, 5, 5), ["fuse-bn"])
    assert result.rewrites == []
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["residual"] == "its output also goes to operator.add, which would see the folded values"
    assert reasons["fork"] == "feeds several BatchNorms (fork_a, fork_b)"
    assert reasons["shared_one"] == "shared_norm is called 2 times (shared); folding it here would break the others"
    assert reasons["batch_stats"].startswith("batch_norm has no running statistics")
    assert reasons["activated"] == "its output does not go to a BatchNorm"
    assert relative(result.after.output, expected) == 0.0


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, 3, 1, bias=False)
        self.right = nn.Conv2d(3, 3, 1, bias=False)
        self.right.weight = self.left.weight
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.left(x)) + self.right(x)


def test_fuse_bn_never_folds_into_a_tied_kernel() -> None:
    model = _randomize_norms(Tied())
    expected, result = _analyse(model, torch.randn(1, 3, 4, 4), ["fuse-bn"])
    assert result.rewrites == []
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons["left"].startswith("weight is tied to right")
    assert relative(result.after.output, expected) == 0.0


def test_fuse_bn_and_winograd_apply_writes_a_standalone_model(tmp_path, monkeypatch, capsys) -> None:
    from convrewrite.cli import run

    from .rule_test_support import REPO_SAMPLES

    monkeypatch.chdir(tmp_path)
    argv = ["apply", str(REPO_SAMPLES / "crnn.py"), "--input-shape", "1,1,32,24", "--out", str(tmp_path / "out")]
    argv += ["--rule", "fuse-bn", "--rule", "separable", "--rule", "winograd:include=*.depthwise,tile=4"]
    assert run(argv) == 0, capsys.readouterr().err
    source = (tmp_path / "out" / "model.py").read_text()
    assert "class WinogradConv2d(nn.Module)" in source
    assert "self.batchNorm2 = nn.Identity()" in source
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if "convrewrite" in line]
    _ = F  # the functional API is the oracle of the block tests above
