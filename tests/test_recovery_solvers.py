"""Statistics solvers: every structure against oracles that do not go through the code under test.

The statistics are built here by brute force (im2col with ``torch.nn.functional.unfold`` or
``Tensor.unfold``, a ones column, plain sums), from random inputs and targets made by random
dense convs. Optimality is checked on the raw data through the block's own ``forward`` (the
gradient of the data loss vanishes at a least-squares optimum), by ``torch.linalg.lstsq``, or by
long L-BFGS runs, never by the statistics formulas the solvers use.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convrewrite.layers.channelwise import ChannelwiseConv2d
from convrewrite.layers.log_group import LogGroupConv1d
from convrewrite.layers.low_rank import LowRankConv2d, LowRankLinear
from convrewrite.layers.padding import PaddedConv
from convrewrite.layers.separable import SeparableConv1d, SeparableConv2d
from convrewrite.layers.shuffle import GroupShuffleConv2d
from convrewrite.layers.winograd import WinogradConv2d
from convrewrite.recovery.solvers import SolveResult, register_solver, solve_from_statistics, statistics_kernel
from convrewrite.recovery.statistics import LayerStatistics


def patches(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(rows, n) unfolded patches of ``x`` for ``layer``'s geometry, ones column last (brute force)."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    elif x.ndim == 3:
        (k,), (s,), (p,), (d,) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        assert d == 1
        padded = F.pad(x, (p, p))
        windows = padded.unfold(2, k, s)  # (N, C, L, k)
        rows = windows.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * k)
    else:
        unfolded = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        rows = unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)


def targets(y: torch.Tensor) -> torch.Tensor:
    """(rows, out) target rows in the order ``patches`` unfolds positions."""
    if y.ndim == 2:
        return y
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def statistics(a: torch.Tensor, y: torch.Tensor) -> LayerStatistics:
    return LayerStatistics(gram=a.t() @ a, cross=a.t() @ y, energy=(y * y).sum(0), rows=a.shape[0])


def make_case(target: nn.Module, x: torch.Tensor, geometry: nn.Module | None = None):
    geometry = geometry if geometry is not None else target
    with torch.no_grad():
        y = target(x)
    a, rows = patches(x, geometry), targets(y)
    return statistics(a, rows), a, rows, y


def data_loss(block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((block(x) - y) ** 2).sum())


def relative(block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return math.sqrt(data_loss(block, x, y) / float((y**2).sum()))


def stationarity(block: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest gradient of the data loss over any parameter, relative to the target's energy."""
    block.zero_grad()
    with torch.enable_grad():
        loss = ((block(x) - y) ** 2).sum()
        loss.backward()
    worst = max(float(p.grad.abs().max()) for p in block.parameters())
    return worst / float((y**2).sum())


def _closure(optimizer, block, x, y):
    def closure():
        optimizer.zero_grad()
        loss = ((block(x) - y) ** 2).sum()
        loss.backward()
        return loss

    return closure


def solve(block, stats, geometry, **options) -> SolveResult:
    result = solve_from_statistics(block, stats, geometry=geometry, **options)
    assert result is not None
    # Non-increasing, up to the float64 rounding of E - 2 tr(K C) + tr(K G Kᵀ) near zero.
    slack = 1e-12 * float(stats.energy.sum())
    assert all(b <= a + slack for a, b in zip(result.losses, result.losses[1:])), result.losses
    return result


@pytest.fixture(autouse=True)
def seeded():
    """float64 modules and tensors, a fixed seed; the default dtype is restored for other test files."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


# -- full capacity: exact ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_target, shape",
    [
        (lambda: nn.Conv2d(3, 5, 3, padding=1), (6, 3, 7, 7)),
        (lambda: nn.Conv2d(4, 6, 3, stride=2, bias=False), (6, 4, 9, 9)),
        (lambda: nn.Conv1d(3, 4, 5, padding=2), (8, 3, 20)),
        (lambda: nn.Linear(7, 4), (50, 7)),
        (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=4), (6, 8, 6, 6)),
        (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 6, 6, 6)),
    ],
)
def test_full_capacity_replacement_is_exact(make_target, shape):
    target = make_target()
    x = torch.randn(*shape)
    stats, _, _, y = make_case(target, x)
    block = type(target)(*_arguments(target))
    assert relative(block, x, y) > 0.1
    result = solve(block, stats, target)
    assert relative(block, x, y) < 1e-6
    assert torch.allclose(block.weight, target.weight, atol=1e-6)
    assert result.losses[-1] <= 1e-12 * float(stats.energy.sum())


def _arguments(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.out_features, layer.bias is not None)
    return (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        1,
        layer.groups,
        layer.bias is not None,
    )


def test_dense_target_least_squares_matches_lstsq():
    """A target no conv computes exactly (a nonlinearity): the solve equals torch.linalg.lstsq."""
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh())
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        y = target(x)
    geometry = target[0]
    a, rows = patches(x, geometry), targets(y)
    block = nn.Conv2d(3, 4, 3)
    solve(block, statistics(a, rows), geometry)
    expected = torch.linalg.lstsq(a, rows).solution.t()
    assert torch.allclose(block.weight.reshape(4, -1), expected[:, :-1], atol=1e-7)
    assert torch.allclose(block.bias, expected[:, -1], atol=1e-7)


def test_grouped_solve_is_block_diagonal_least_squares_of_a_dense_target():
    """groups=2 against a dense target: each group equals lstsq on its own input channels."""
    target = nn.Conv2d(4, 4, 3)
    x = torch.randn(6, 4, 7, 7)
    stats, a, rows, _ = make_case(target, x)
    block = nn.Conv2d(4, 4, 3, groups=2)
    solve(block, stats, target)
    for group in range(2):
        columns = list(range(group * 18, (group + 1) * 18)) + [36]
        expected = torch.linalg.lstsq(a[:, columns], rows[:, group * 2 : (group + 1) * 2]).solution.t()
        assert torch.allclose(block.weight[group * 2 : (group + 1) * 2].reshape(2, -1), expected[:, :-1], atol=1e-7)
    assert stationarity(block, x, target(x).detach()) < 1e-6


def test_group_shuffle_and_log_group_exact_when_the_target_has_their_structure():
    shuffle_target = GroupShuffleConv2d(8, 8, 3, padding=1, groups=4)
    x = torch.randn(5, 8, 6, 6)
    stats, _, _, y = make_case(shuffle_target, x, geometry=nn.Conv2d(8, 8, 3, padding=1))
    block = GroupShuffleConv2d(8, 8, 3, padding=1, groups=4)
    solve(block, stats, nn.Conv2d(8, 8, 3, padding=1))
    assert relative(block, x, y) < 1e-6

    log_target = LogGroupConv1d(10, 12, 3, groups=3)
    x1 = torch.randn(6, 10, 16)
    geometry = nn.Conv1d(10, 12, 3)
    stats, _, _, y = make_case(log_target, x1, geometry=geometry)
    block = LogGroupConv1d(10, 12, 3, groups=3)
    result = solve(block, stats, geometry)
    assert "branch" in result.method
    assert relative(block, x1, y) < 1e-6


def test_shuffled_and_log_group_solves_are_optimal_on_a_dense_target():
    target = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(5, 8, 6, 6)
    stats, _, _, y = make_case(target, x)
    for block in (GroupShuffleConv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 8, 3, padding=1, groups=4)):
        start = data_loss(block, x, y)
        solve(block, stats, target)
        assert data_loss(block, x, y) < start
        assert stationarity(block, x, y) < 1e-6
    target1 = nn.Conv1d(10, 12, 3)
    x1 = torch.randn(6, 10, 16)
    stats, _, _, y1 = make_case(target1, x1)
    block = LogGroupConv1d(10, 12, 3, groups=3)
    solve(block, stats, target1)
    assert stationarity(block, x1, y1) < 1e-6


def test_winograd_and_padded_conv_are_solved_in_their_dense_kernel():
    target = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    stats, _, _, y = make_case(target, x)
    winograd = WinogradConv2d(3, 4, padding=1)
    solve(winograd, stats, target)
    assert relative(winograd, x, y) < 1e-6

    padded = PaddedConv((3, 3), (1, 1), (1, 1), same=False, amounts=(1, 1, 1, 1))
    padded.conv = nn.Conv2d(3, 4, 3)
    solve(padded, stats, target)
    assert relative(padded, x, y) < 1e-6


# -- low rank -------------------------------------------------------------------------------------


def _optimal_bias_loss(weight: torch.Tensor, a: torch.Tensor, rows: torch.Tensor) -> float:
    """Data loss of a weight (out, n_w) with the best bias for it (the mean residual)."""
    residual = rows - a[:, :-1] @ weight.t()
    centred = residual - residual.mean(0)
    return float((centred**2).sum())


def _correlated_input(shape) -> torch.Tensor:
    """Inputs with very unequal channel scales and correlations, where plain SVD is far from optimal."""
    x = torch.randn(*shape)
    mix = torch.randn(shape[1], shape[1]) * torch.logspace(0, -2, shape[1]).unsqueeze(0)
    return torch.einsum("dc,nc...->nd...", mix, x) + 0.5


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_low_rank_beats_truncated_svd_and_is_optimal(rank):
    target = nn.Conv2d(4, 6, 3)
    x = _correlated_input((4, 4, 6, 6))
    stats, a, rows, y = make_case(target, x)
    block = LowRankConv2d(4, 6, 3, rank)
    solve(block, stats, target)
    solved = data_loss(block, x, y)

    # Truncated SVD of the least-squares solution, with the best bias for it.
    full = torch.linalg.lstsq(a, rows).solution.t()[:, :-1]
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    svd = _optimal_bias_loss(u[:, :rank] * s[:rank] @ vh[:rank], a, rows)
    assert solved <= svd * (1 + 1e-9)
    if rank < 4:
        assert solved < svd * 0.999

    # A long L-BFGS on the data loss, from the solution perturbed and from random starts, finds nothing lower.
    best = math.inf
    for trial in range(3):
        other = LowRankConv2d(4, 6, 3, rank)
        if trial == 0:
            other.load_state_dict(block.state_dict())
            with torch.no_grad():
                for p in other.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        optimizer = torch.optim.LBFGS(
            other.parameters(),
            max_iter=800,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        optimizer.step(_closure(optimizer, other, x, y))
        best = min(best, data_loss(other, x, y))
    assert solved <= best * (1 + 1e-6)


def test_low_rank_at_full_rank_is_exact_and_linear_too():
    target = nn.Linear(6, 5)
    x = torch.randn(40, 6)
    stats, _, _, y = make_case(target, x)
    block = LowRankLinear(6, 5, 5)
    solve(block, stats, target)
    assert relative(block, x, y) < 1e-6
    low = LowRankLinear(6, 5, 2)
    solve(low, stats, target)
    assert stationarity(low, x, y) < 1e-6


# -- separable ------------------------------------------------------------------------------------


def test_separable_line_search_never_loses_to_plain_rounds(monkeypatch):
    import convrewrite.recovery.solvers.separable as separable

    target = nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(5, 6, 7, 7)
    stats, _, _, y = make_case(target, x)
    start = SeparableConv2d(6, 8, 3, padding=1)
    results = {}
    for extrapolate in (False, True):
        monkeypatch.setattr(separable, "EXTRAPOLATE", extrapolate)
        block = SeparableConv2d(6, 8, 3, padding=1)
        block.load_state_dict(start.state_dict())
        solve(block, stats, target, rounds=1)
        results[extrapolate] = data_loss(block, x, y)
    assert results[True] <= results[False] * (1 + 1e-12)


def test_separable_als_is_monotone_and_never_worse_than_the_start():
    target = nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(5, 6, 7, 7)
    stats, _, _, y = make_case(target, x)
    block = SeparableConv2d(6, 8, 3, padding=1, multiplier=2)
    start = data_loss(block, x, y)
    result = solve(block, stats, target, rounds=12)
    assert len(result.losses) >= 3
    assert math.isclose(result.losses[0], start, rel_tol=1e-9)
    assert math.isclose(result.losses[-1], data_loss(block, x, y), rel_tol=1e-9)
    assert result.losses[-1] < start


@pytest.mark.parametrize("depthwise_bias, pointwise_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_separable_matches_a_brute_force_optimum_on_a_tiny_case(monkeypatch, depthwise_bias, pointwise_bias):
    import convrewrite.recovery.solvers.separable as separable

    monkeypatch.setattr(separable, "TOLERANCE", 1e-13)  # run to convergence, not to the default stop
    target = nn.Conv1d(2, 3, 3)
    x = torch.randn(10, 2, 12) + 0.3
    stats, _, _, y = make_case(target, x)
    block = SeparableConv1d(2, 3, 3, depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias)
    solve(block, stats, target, rounds=400)
    solved = data_loss(block, x, y)
    best = math.inf
    for _ in range(8):
        other = SeparableConv1d(2, 3, 3, depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias)
        optimizer = torch.optim.LBFGS(
            other.parameters(),
            max_iter=2000,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        optimizer.step(_closure(optimizer, other, x, y))
        best = min(best, data_loss(other, x, y))
    assert solved <= best * (1 + 1e-5)


def test_separable_exact_when_the_target_is_separable():
    target = SeparableConv2d(4, 5, 3, padding=1)
    x = torch.randn(5, 4, 6, 6)
    geometry = nn.Conv2d(4, 5, 3, padding=1)
    stats, _, _, y = make_case(target, x, geometry=geometry)
    block = SeparableConv2d(4, 5, 3, padding=1)
    block.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    solve(block, stats, geometry, rounds=200)
    assert relative(block, x, y) < 1e-6

    # A block that is already exact stays exactly where it is.
    exact = SeparableConv2d(4, 5, 3, padding=1)
    exact.load_state_dict(target.state_dict())
    solve(exact, stats, geometry)
    for name, value in target.state_dict().items():
        assert torch.allclose(exact.state_dict()[name], value, atol=1e-9)


def _transferred(block: nn.Module, target: nn.Conv2d | nn.Conv1d) -> nn.Module:
    """``block`` with the separable rule's SVD transfer of ``target`` (the start the fit gets)."""
    from convrewrite.rules.separable import svd_factors

    multiplier = block[0].out_channels // block[0].in_channels
    depthwise, pointwise, _ = svd_factors(target.weight, multiplier)
    with torch.no_grad():
        block[0].weight.copy_(depthwise)
        block[1].weight.copy_(pointwise.reshape(block[1].weight.shape))
        if block[0].bias is not None:
            block[0].bias.zero_()
        if block[1].bias is not None:
            block[1].bias.copy_(target.bias)
    return block


def _start_only(block: nn.Module, stats: LayerStatistics) -> str:
    """Apply the separable solver's start choice alone (no ALS round) to ``block``; which start."""
    import convrewrite.recovery.solvers.separable as separable

    state = separable._Separable(block, stats)
    _, which = separable.choose_start(state, state.loss(), 1e-7)
    state.write(block)
    return which


def _correlated_sequence(shape) -> torch.Tensor:
    """Inputs whose taps are strongly correlated (a random walk) and whose channels differ in scale."""
    walk = torch.randn(*shape).cumsum(-1) / 3
    return walk * torch.logspace(0, -1, shape[1]).reshape(1, -1, 1) + 0.5


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("depthwise_bias, pointwise_bias", [(False, True), (True, True), (True, False), (False, False)])
def test_separable_start_is_never_worse_than_the_transfer(multiplier, depthwise_bias, pointwise_bias):
    target = nn.Conv1d(4, 6, 5, padding=2)
    x = _correlated_sequence((6, 4, 30))
    stats, _, _, y = make_case(target, x)
    block = SeparableConv1d(
        4, 6, 5, padding=2, multiplier=multiplier, depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias
    )
    block = _transferred(block, target)
    transfer = data_loss(block, x, y)
    which = _start_only(block, stats)
    started = data_loss(block, x, y)  # measured on the data through the block's forward
    assert started <= transfer * (1 + 1e-9)
    if which == "the whitened start":
        assert started < transfer
    # On this correlated input the plain SVD is not the whitened one: the start must win.
    if pointwise_bias:
        assert which == "the whitened start"
        assert started < 0.95 * transfer


@pytest.mark.parametrize("multiplier", [1, 3])
@pytest.mark.parametrize("depthwise_bias, pointwise_bias", [(True, True), (False, True), (True, False)])
def test_separable_start_alone_is_exact_on_a_separable_target(multiplier, depthwise_bias, pointwise_bias):
    target = SeparableConv2d(
        4, 5, 3, padding=1, multiplier=multiplier, depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias
    )
    x = torch.randn(5, 4, 6, 6) + 0.5
    geometry = nn.Conv2d(4, 5, 3, padding=1)
    stats, _, _, y = make_case(target, x, geometry=geometry)
    block = SeparableConv2d(
        4, 5, 3, padding=1, multiplier=multiplier, depthwise_bias=depthwise_bias, pointwise_bias=pointwise_bias
    )
    assert relative(block, x, y) > 0.5
    assert _start_only(block, stats) == "the whitened start"
    assert relative(block, x, y) < 1e-6


def test_separable_start_is_optimal_for_a_single_channel():
    """With one input channel the channel's metric is the whole gram: the start is the optimum itself."""
    target = nn.Conv1d(1, 4, 5)
    x = _correlated_sequence((8, 1, 40))
    stats, _, _, y = make_case(target, x)
    block = _transferred(SeparableConv1d(1, 4, 5, depthwise_bias=False), target)
    assert _start_only(block, stats) == "the whitened start"
    started = data_loss(block, x, y)
    best = math.inf
    for _ in range(6):
        other = SeparableConv1d(1, 4, 5, depthwise_bias=False)
        optimizer = torch.optim.LBFGS(
            other.parameters(),
            max_iter=3000,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )
        optimizer.step(_closure(optimizer, other, x, y))
        best = min(best, data_loss(other, x, y))
    assert started <= best * (1 + 1e-6)


def test_separable_als_from_the_start_is_monotone_and_reported():
    target = nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(5, 6, 7, 7) + 0.3
    stats, _, _, y = make_case(target, x)
    block = _transferred(SeparableConv2d(6, 8, 3, padding=1, multiplier=2), target)
    transfer = data_loss(block, x, y)
    result = solve(block, stats, target, rounds=20)  # checks the history never rises
    assert "from the whitened start" in result.method
    assert math.isclose(result.losses[0], transfer, rel_tol=1e-9)
    assert result.losses[1] < result.losses[0]  # the start, a step of its own
    assert len(result.losses) >= 4
    assert math.isclose(result.losses[-1], data_loss(block, x, y), rel_tol=1e-9)


def test_separable_start_can_be_switched_off(monkeypatch):
    import convrewrite.recovery.solvers.separable as separable

    monkeypatch.setattr(separable, "WHITENED_START", False)
    target = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(4, 3, 6, 6)
    stats, _, _, _ = make_case(target, x)
    result = solve(_transferred(SeparableConv2d(3, 4, 3, padding=1), target), stats, target, rounds=3)
    assert "from the transfer" in result.method


# -- channelwise and the generic path --------------------------------------------------------------


def test_channelwise_least_squares_in_the_shared_taps():
    target = ChannelwiseConv2d(8, 4, 3, groups=2)
    x = torch.randn(5, 8, 5, 5)
    geometry = nn.Conv2d(8, 4, 1)
    stats, _, _, y = make_case(target, x, geometry=geometry)
    block = ChannelwiseConv2d(8, 4, 3, groups=2)
    result = solve(block, stats, geometry)
    assert "shared taps" in result.method
    assert relative(block, x, y) < 1e-6
    dense_target = nn.Conv2d(8, 4, 1)
    stats, _, _, y = make_case(dense_target, x)
    solve(block, stats, dense_target)
    assert stationarity(block, x, y) < 1e-6


class SymmetricConv2d(nn.Module):
    """A plugin block: a KxK conv whose kernel is mirror-symmetric left to right (linear in ``left``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kernel_size, kernel_size)
        self.left = nn.Parameter(0.1 * torch.randn(out_channels, in_channels, kernel_size, (kernel_size + 1) // 2))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def kernel(self) -> torch.Tensor:
        mirrored = self.left.flip(-1)[..., 1:] if self.kernel_size[1] % 2 else self.left.flip(-1)
        return torch.cat([self.left, mirrored], dim=-1)

    def forward(self, x):
        return F.conv2d(x, self.kernel(), self.bias)

    def to_dense(self):
        return self.kernel().detach(), self.bias.detach()


def test_generic_path_solves_a_plugin_block_exactly():
    target = nn.Conv2d(3, 4, 3)
    x = torch.randn(5, 3, 8, 8)
    stats, _, _, y = make_case(target, x)
    block = SymmetricConv2d(3, 4)
    result = solve(block, stats, target)
    assert result.method == "least squares through to_dense()"
    assert stationarity(block, x, y) < 1e-6


def test_a_registered_plugin_solver_is_used():
    class Plugin(SymmetricConv2d):
        pass

    calls = []

    @register_solver(Plugin)
    def solver(block, stats, ridge, rounds):
        calls.append(block)
        return None  # decline: the generic path takes over

    block = Plugin(3, 4)
    target = nn.Conv2d(3, 4, 3)
    stats, *_ = make_case(target, torch.randn(3, 3, 6, 6))
    result = solve(block, stats, target)
    assert calls == [block] and result.method == "least squares through to_dense()"


def test_composition_goes_through_the_generic_path_and_improves():
    """A separable block whose pointwise became a channel-wise conv: bilinear, block-coordinate."""
    target = nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(5, 8, 6, 6)
    stats, _, _, y = make_case(target, x)
    block = SeparableConv2d(8, 4, 3, padding=1)
    block.pointwise = ChannelwiseConv2d(8, 4, 3, groups=2)
    start = data_loss(block, x, y)
    result = solve(block, stats, target, rounds=6)
    assert "block-coordinate" in result.method
    assert data_loss(block, x, y) < start
    assert math.isclose(result.losses[-1], data_loss(block, x, y), rel_tol=1e-9)


def test_no_statistics_path_returns_none_and_touches_nothing():
    target = nn.Conv2d(3, 4, 3)
    stats, *_ = make_case(target, torch.randn(3, 3, 6, 6))
    other = nn.Conv2d(3, 4, 5)  # another kernel size: another geometry
    before = other.weight.detach().clone()
    assert statistics_kernel(other, target) is None
    assert solve_from_statistics(other, stats, geometry=target) is None
    assert torch.equal(other.weight, before)
    assert solve_from_statistics(nn.ReLU(), stats, geometry=target) is None

    class Standardized(nn.Conv2d):  # a conv subclass whose forward is not its weight: no to_dense
        pass

    assert solve_from_statistics(Standardized(3, 4, 3), stats, geometry=target) is None


def test_statistics_without_ones_column():
    target = nn.Linear(5, 3, bias=False)
    x = torch.randn(30, 5)
    with torch.no_grad():
        y = target(x)
    stats = LayerStatistics(gram=x.t() @ x, cross=x.t() @ y, energy=(y * y).sum(0), rows=30, with_ones=False)
    block = nn.Linear(5, 3, bias=False)
    solve(block, stats, target)
    assert torch.allclose(block.weight, target.weight, atol=1e-8)


def test_float32_block_is_written_in_its_dtype():
    target = nn.Conv2d(3, 4, 3).float()
    x = torch.randn(4, 3, 8, 8).float()
    with torch.no_grad():
        y = target(x)
    a, rows = patches(x.double(), target), targets(y.double())
    block = SeparableConv2d(3, 4, 3).float()
    solve(block, statistics(a, rows), target)
    assert block[0].weight.dtype == torch.float32


# -- with the fit's own geometry ------------------------------------------------------------------


def _every_block(target: nn.Conv2d) -> list[nn.Module]:
    c, o = target.in_channels, target.out_channels
    padded = PaddedConv((3, 3), (1, 1), (1, 1), same=False, amounts=(1, 1, 1, 1))
    padded.conv = nn.Conv2d(c, o, 3)
    return [
        nn.Conv2d(c, o, 3, padding=1),
        nn.Conv2d(c, o, 3, padding=1, groups=2),
        GroupShuffleConv2d(c, o, 3, padding=1, groups=2),
        WinogradConv2d(c, o, padding=1),
        padded,
        LowRankConv2d(c, o, 3, 3, padding=1),
        SeparableConv2d(c, o, 3, padding=1),
    ]


def test_every_block_is_solved_under_a_patch_geometry_and_never_gets_worse():
    from convrewrite.recovery.statistics import PatchGeometry

    target = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(4, 4, 6, 6)
    stats, _, _, y = make_case(target, x)
    geometry = PatchGeometry.of(target)
    for block in _every_block(target):
        assert statistics_kernel(block, geometry) is not None, type(block).__name__
        start = data_loss(block, x, y)
        result = solve(block, stats, geometry)
        assert data_loss(block, x, y) < start, type(block).__name__
        assert math.isclose(result.losses[-1], data_loss(block, x, y), rel_tol=1e-7, abs_tol=1e-12)
    # Another stride, or another padding, is another geometry.
    assert statistics_kernel(nn.Conv2d(4, 6, 3, padding=1, stride=2), geometry) is None
    assert statistics_kernel(nn.Conv2d(4, 6, 3, padding=0), geometry) is None
    assert statistics_kernel(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), geometry) is None
    linear = nn.Linear(5, 3)
    assert statistics_kernel(nn.Linear(5, 3), PatchGeometry.of(linear)) is not None


@pytest.mark.parametrize("multiplier, depthwise_bias", [(1, True), (2, False)])
def test_separable_conjugate_gradients_agree_with_cholesky(monkeypatch, multiplier, depthwise_bias):
    """Large depthwise systems go through matrix-free CG: same solution as the direct solve."""
    import convrewrite.recovery.solvers.separable as separable

    monkeypatch.setattr(separable, "EXTRAPOLATE", False)  # the line search's grid would amplify 1e-9 differences
    target = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(5, 6, 7, 7) + 0.2
    stats, _, _, y = make_case(target, x)
    start = SeparableConv2d(6, 5, 3, padding=1, multiplier=multiplier, depthwise_bias=depthwise_bias)
    direct = SeparableConv2d(6, 5, 3, padding=1, multiplier=multiplier, depthwise_bias=depthwise_bias)
    direct.load_state_dict(start.state_dict())
    solve(direct, stats, target, rounds=3)
    monkeypatch.setattr(separable, "DIRECT_LIMIT", 0)
    iterative = SeparableConv2d(6, 5, 3, padding=1, multiplier=multiplier, depthwise_bias=depthwise_bias)
    iterative.load_state_dict(start.state_dict())
    solve(iterative, stats, target, rounds=3)
    assert math.isclose(data_loss(iterative, x, y), data_loss(direct, x, y), rel_tol=1e-7)
    # Biases are partly redundant (P b_d + b_p): compare what the block computes, its dense kernel.
    for got, want in zip(iterative.to_dense(), direct.to_dense()):
        assert torch.allclose(got, want, atol=1e-6)


def test_separable_recycled_factor_gives_the_direct_solution(monkeypatch):
    """Rounds that precondition CG with an earlier round's factor reach the direct solves' result,
    and do recycle (the counts are those of the solver's own state)."""
    import convrewrite.recovery.solvers.separable as separable

    monkeypatch.setattr(separable, "EXTRAPOLATE", False)
    target = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(6, 6, 7, 7) + 0.2
    stats, _, _, y = make_case(target, x)
    start = SeparableConv2d(6, 5, 3, padding=1)
    states: list = []
    original_init = separable._Separable.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        states.append(self)

    monkeypatch.setattr(separable._Separable, "__init__", recording_init)
    results = {}
    for name, smallest in (("direct", 10**9), ("recycled", 0)):
        monkeypatch.setattr(separable, "RECYCLE_MIN", smallest)
        block = SeparableConv2d(6, 5, 3, padding=1)
        block.load_state_dict(start.state_dict())
        states.clear()
        solve(block, stats, target, rounds=12)
        results[name] = (block, states[-1].recycled, states[-1].factored)
    direct, recycled = results["direct"][0], results["recycled"][0]
    assert results["direct"][1] == 0
    assert results["recycled"][1] > 0, "no round reused the factor"
    assert results["recycled"][2] < results["direct"][2]
    assert math.isclose(data_loss(recycled, x, y), data_loss(direct, x, y), rel_tol=1e-7)
    for got, want in zip(recycled.to_dense(), direct.to_dense()):
        assert torch.allclose(got, want, atol=1e-6)


def test_docs_plugin_example_runs(capsys):
    """The plugin example of docs/solvers.md, run as written: the generic path solves it exactly."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "solvers.md").read_text(encoding="utf-8")
    code = text.split("<!-- plugin-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/solvers.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.startswith("least squares through to_dense()")
    block, images, original = namespace["block"], namespace["images"], namespace["original"]
    with torch.no_grad():
        target = original(images)
    assert stationarity(block.double(), images.double(), target.double()) < 1e-6


def test_padded_conv_takes_the_statistics_path_only_with_the_statistics_padding():
    from convrewrite.recovery.statistics import PatchGeometry

    padded_geometry = PatchGeometry.of(nn.Conv2d(3, 4, 3, padding=1))
    unpadded_geometry = PatchGeometry.of(nn.Conv2d(3, 4, 3))

    def padded(same: bool, stride: int = 1, amounts: tuple = ()) -> PaddedConv:
        block = PaddedConv((3, 3), (stride, stride), (1, 1), same=same, amounts=amounts)
        block.conv = nn.Conv2d(3, 4, 3, stride=stride)
        return block

    assert statistics_kernel(padded(False, amounts=(1, 1, 1, 1)), padded_geometry) is not None
    assert statistics_kernel(padded(True), padded_geometry) is not None  # stride 1: 'SAME' is static
    # The block's input is unpadded and the padding lives in the block: unfolding that input
    # without padding (a conv subclass that pads in forward) would not describe it.
    assert statistics_kernel(padded(True), unpadded_geometry) is None
    assert statistics_kernel(padded(False, amounts=(0, 1, 0, 1)), padded_geometry) is None
    # With a stride, 'SAME' padding depends on the input size: no static geometry.
    assert statistics_kernel(padded(True, stride=2), PatchGeometry.of(nn.Conv2d(3, 4, 3, 2, 1))) is None


# -- separable: the gauge and the held-out stop ----------------------------------------------------


def test_separable_leaves_each_middle_channel_balanced_with_the_kernel_it_solved(monkeypatch):
    import convrewrite.recovery.solvers.separable as separable

    target = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(6, 4, 8, 8) + 0.2
    stats, _, _, y = make_case(target, x)
    block = SeparableConv2d(4, 6, 3, padding=1, multiplier=2).double()
    unbalanced = SeparableConv2d(4, 6, 3, padding=1, multiplier=2).double()
    monkeypatch.setattr(separable._Separable, "balance", lambda self: None)
    unbalanced.load_state_dict(block.state_dict())
    solve(unbalanced, stats, target, rounds=6)
    monkeypatch.undo()
    solve(block, stats, target, rounds=6)
    # Same rounds, same kernel: balancing moves only along the gauge (scale per middle channel).
    dense = statistics_kernel(block, target)
    assert torch.allclose(dense, statistics_kernel(unbalanced, target), rtol=1e-9, atol=1e-12)
    rows = torch.cat([block[0].weight.flatten(1), block[0].bias.unsqueeze(1)], dim=1).norm(dim=1)
    columns = block[1].weight.flatten(1).norm(dim=0)
    assert torch.allclose(rows, columns, rtol=1e-9)

    # ... the balanced point minimizes ||D||² + ||P||² over that gauge (its sum is no larger).
    def size(b):
        return float(sum(p.detach().square().sum() for n, p in b.named_parameters() if n.endswith("weight")))

    assert size(block) <= size(unbalanced) * (1 + 1e-9)


def _holdout_case():
    """A layer with a small fit split (ALS overfits it) and a large held-out split."""
    target = nn.Conv1d(6, 5, 5)
    fit_x, held_x = torch.randn(4, 6, 12) + 0.1, torch.randn(60, 6, 12) + 0.1
    noise = nn.Conv1d(6, 5, 5)  # the fit split's targets carry noise the held-out split does not share
    fit_stats, _, _, _ = make_case(target, fit_x)
    with torch.no_grad():
        y = target(fit_x) + 0.3 * noise(torch.randn_like(fit_x))
    fit_stats = statistics(patches(fit_x, target), targets(y))
    held_stats, _, _, _ = make_case(target, held_x)
    return target, fit_stats, held_stats


def test_separable_keeps_the_round_with_the_lowest_held_out_loss():
    from convrewrite.recovery.solvers.base import block_loss

    target, fit_stats, held_stats = _holdout_case()
    start = SeparableConv1d(6, 5, 5, multiplier=2).double()
    # Independent reference: the held-out loss after every round count, with no held-out stop.
    held_by_rounds = []
    for rounds in range(1, 30):
        block = SeparableConv1d(6, 5, 5, multiplier=2).double()
        block.load_state_dict(start.state_dict())
        solve(block, fit_stats, target, rounds=rounds)
        held_by_rounds.append(block_loss(held_stats, statistics_kernel(block, target)))
    watched = SeparableConv1d(6, 5, 5, multiplier=2).double()
    watched.load_state_dict(start.state_dict())
    result = solve(watched, fit_stats, target, rounds=29, holdout=held_stats)
    kept = block_loss(held_stats, statistics_kernel(watched, target))
    assert "stopped on the held-out loss" in result.method
    assert kept < held_by_rounds[-1]  # overfitting was real: 29 rounds end worse on held-out data
    run = int(result.method.split("(")[1].split(" ")[0])
    assert 0 < run < 29
    assert math.isclose(kept, held_by_rounds[run - 1], rel_tol=1e-6)  # the state after that many rounds
    assert kept <= min(held_by_rounds[:run]) * (1 + 1e-6)  # and the best of the rounds it ran


def test_separable_without_held_out_statistics_ignores_the_stop():
    target, fit_stats, _ = _holdout_case()
    block = SeparableConv1d(6, 5, 5, multiplier=2).double()
    result = solve(block, fit_stats, target, rounds=5)
    assert "held-out" not in result.method


# -- the generic path: batched probing and assembly ------------------------------------------------


def _composed_block() -> nn.Module:
    """A separable block whose pointwise became a group channel-wise conv (a composition)."""
    from convrewrite.layers.channelwise import GroupChannelwiseConv2d

    block = SeparableConv2d(8, 8, 3, padding=1)
    block[1] = GroupChannelwiseConv2d(8, 8, 4, groups=2)
    return block.double()


def test_generic_batched_probe_equals_probing_one_entry_at_a_time(monkeypatch):
    from convrewrite.layers.channelwise import GroupChannelwiseConv2d
    from convrewrite.recovery.solvers import generic

    torch.manual_seed(0)
    for block in (GroupChannelwiseConv2d(8, 8, 4, groups=2).double(), _composed_block()):
        n = block.to_dense()[0][0].numel() + 1
        a = torch.randn(50, n, dtype=torch.float64)
        stats = LayerStatistics(
            gram=a.t() @ a,
            cross=a.t() @ torch.randn(50, 8, dtype=torch.float64),
            energy=torch.ones(8, dtype=torch.float64),
            rows=50,
        )
        tensors = [p for p in block.parameters()]
        batched = generic._probe_batched(block, tensors, stats)
        assert batched is not None, type(block).__name__
        monkeypatch.setattr(generic, "PROBE_BATCHED", False)
        looped = generic._probe(block, tensors, stats)
        monkeypatch.setattr(generic, "PROBE_BATCHED", True)
        count = sum(p.numel() for p in tensors)

        def densify(jacobian: tuple[torch.Tensor, ...], n: int = n, count: int = count) -> torch.Tensor:
            outputs, entries, columns, values = jacobian
            dense = torch.zeros(8, n, count, dtype=torch.float64)
            return dense.index_put_((outputs, entries, columns), values, accumulate=True)

        # The loop's ``θ + 1 - 1`` leaves rounding-level entries the batched probe does not have.
        dense = densify(looped)
        assert torch.allclose(densify(batched), dense, rtol=0, atol=1e-12)
        want = torch.einsum("oec,ef,ofd->cd", dense, stats.gram, dense)
        monkeypatch.setattr(generic, "ASSEMBLY_ELEMENTS", 200)  # several groups of outputs
        got = generic._normal_matrix(stats.gram, 8, count, *batched)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_generic_probe_falls_back_when_to_dense_cannot_be_vmapped():
    from convrewrite.recovery.solvers import generic

    class Opaque(nn.Module):
        """A plugin-style block whose to_dense() writes through .item() (vmap cannot batch it)."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))

        def to_dense(self):
            weight = torch.zeros(2, 2, 1, 1, dtype=torch.float64)
            weight[0, 0, 0, 0] = float(self.scale.item())
            return weight, None

    block = Opaque()
    stats = LayerStatistics(
        gram=torch.eye(3, dtype=torch.float64),
        cross=torch.zeros(3, 2, dtype=torch.float64),
        energy=torch.zeros(2, dtype=torch.float64),
        rows=1,
    )
    assert generic._probe_batched(block, [block.scale], stats) is None
    outputs, entries, columns, values = generic._probe(block, [block.scale], stats)
    assert outputs.tolist() == [0] and entries.tolist() == [0] and values.tolist() == [1.0]


def test_grouped_conv_dense_kernel_is_block_diagonal():
    from convrewrite.layers.dense import conv_dense_kernel

    conv = nn.Conv2d(6, 4, 3, groups=2)
    dense, _ = conv_dense_kernel(conv)
    want = torch.zeros(4, 6, 3, 3)
    want[:2, :3] = conv.weight[:2].detach()
    want[2:, 3:] = conv.weight[2:].detach()
    assert torch.equal(dense, want)


def test_generic_rounds_stop_on_the_held_out_loss_and_keep_its_best_round(monkeypatch):
    """Few fit rows (so later rounds fit their noise): the rounds stop on the held-out rule and
    the block is left at the round whose held-out loss was lowest of all it computed."""
    from convrewrite.layers.channelwise import GroupChannelwiseConv2d
    from convrewrite.recovery.solvers import generic

    torch.manual_seed(3)
    teacher = torch.randn(8, 9, dtype=torch.float64)

    def stats_of(rows: int) -> LayerStatistics:
        a = torch.randn(rows, 9, dtype=torch.float64)
        a[:, -1] = 1
        y = a @ teacher.t() + 0.5 * torch.randn(rows, 8, dtype=torch.float64)
        return LayerStatistics(gram=a.t() @ a, cross=a.t() @ y, energy=(y * y).sum(0), rows=rows)

    fit, holdout = stats_of(12), stats_of(400)
    block = GroupChannelwiseConv2d(8, 8, 4, groups=2).double()
    start_held = holdout.squared_error(generic._kernel(block, True))
    seen: list[float] = []
    measure = generic._loss

    def recording(stats: LayerStatistics, kernel: torch.Tensor) -> float:
        value = measure(stats, kernel)
        if stats is holdout:
            seen.append(value)
        return value

    monkeypatch.setattr(generic, "_loss", recording)
    method, losses = generic.solve_generic(block, fit, 1e-7, 64, holdout=holdout)
    final_held = measure(holdout, generic._kernel(block, True))
    assert "stopped on the held-out loss" in method
    assert len(seen) - 1 < 64  # the start, then one per round: fewer rounds than allowed
    assert final_held == pytest.approx(min(seen), rel=1e-12)
    assert final_held < start_held
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:]))  # the fit loss stays monotone
