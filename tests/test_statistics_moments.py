"""Patch moments from shifted products (recovery/moments.py) against the unfolded definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convrewrite.recovery.moments import patch_moments, supported
from convrewrite.recovery.statistics import PatchGeometry, StatisticsAccumulator

CONVS = [
    lambda: nn.Conv2d(4, 5, 3, padding=1),
    lambda: nn.Conv2d(4, 5, 3, padding=0),
    lambda: nn.Conv2d(3, 2, (5, 3), dilation=(2, 1), padding=(4, 1)),
    lambda: nn.Conv2d(3, 4, 4, padding="same"),
    lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    lambda: nn.Conv2d(4, 5, (1, 3), padding=(0, 1)),
    lambda: nn.Conv2d(2, 3, 3, padding=2),
    lambda: nn.Conv1d(6, 5, 9, padding=4),
    lambda: nn.Conv1d(6, 5, 3, dilation=2, padding=2),
    lambda: nn.Conv1d(3, 4, 64, padding=3),
    lambda: nn.Conv3d(2, 3, 3, padding=1),
]
SHAPES = {1: (3, 70), 2: (3, 7, 6), 3: (2, 5, 4, 6)}


def _input(conv: nn.Module) -> torch.Tensor:
    dims = len(conv.kernel_size)
    samples, *size = SHAPES[dims]
    generator = torch.Generator().manual_seed(1)
    return torch.randn(samples, conv.in_channels, *size, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("make", CONVS)
@pytest.mark.parametrize("with_ones", [True, False])
def test_shifted_moments_equal_the_unfolded_ones(make, with_ones: bool) -> None:
    conv = make().double()
    geometry = PatchGeometry.of(conv)
    assert supported(geometry)
    x = _input(conv)
    with torch.no_grad():
        y = conv(x)
    gram, cross, energy, rows = patch_moments(geometry, x, y, with_ones=with_ones)
    patches = geometry.unfold(x, with_ones)
    targets = geometry.target_rows(y)
    assert rows == patches.shape[0]
    torch.testing.assert_close(gram, patches.t() @ patches, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(cross, patches.t() @ targets, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(energy, (targets**2).sum(0), rtol=1e-12, atol=1e-10)


def test_shifted_moments_of_a_3x3_conv_equal_torch_unfold() -> None:
    """An oracle outside the package: ``F.unfold`` gives the same channel-major patch order."""
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = conv(x)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    gram, cross, _, rows = patch_moments(PatchGeometry.of(conv), x, y, with_ones=False)
    assert rows == 2 * 6 * 5
    torch.testing.assert_close(gram, patches.t() @ patches, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(cross, patches.t() @ y.movedim(1, -1).reshape(-1, 4), rtol=1e-12, atol=1e-10)


def test_the_accumulator_gives_the_same_statistics_either_way_across_chunks() -> None:
    conv = nn.Conv2d(8, 6, 3, padding=1).double()
    geometry = PatchGeometry.of(conv)
    shifted = StatisticsAccumulator(geometry, chunk_elements=500)  # several chunks of samples
    unfolded = StatisticsAccumulator(geometry)
    assert shifted.shifted
    unfolded.shifted = False
    for seed in range(3):
        x = torch.randn(5, 8, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = conv(x)
        shifted.add(x, y)
        unfolded.add(x, y)
    a, b = shifted.stats, unfolded.stats
    assert a.rows == b.rows == 3 * 5 * 9 * 7
    assert torch.equal(a.gram, a.gram.t())
    for left, right in ((a.gram, b.gram), (a.cross, b.cross), (a.energy, b.energy)):
        torch.testing.assert_close(left, right, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 4, 1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_strided_pointwise_and_reflect_padded_convs_are_unfolded(conv: nn.Module) -> None:
    assert not supported(PatchGeometry.of(conv))
    assert not StatisticsAccumulator(PatchGeometry.of(conv)).shifted


def test_a_target_of_another_geometry_is_refused() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="geometry"):
        patch_moments(PatchGeometry.of(conv), x, torch.randn(2, 4, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize(
    "layer", [nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Linear(7, 3)]
)
def test_statistics_of_a_layers_own_output_derive_cross_and_energy_from_the_gram(layer: nn.Module) -> None:
    layer = layer.double()
    geometry = PatchGeometry.of(layer)
    derived = StatisticsAccumulator(geometry, target_kernel=geometry.dense_kernel(layer))
    measured = StatisticsAccumulator(geometry)
    shape = (6, 7) if isinstance(layer, nn.Linear) else (3, 4, 8, 7)
    for seed in range(2):
        x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = layer(x)
        derived.add(x, y)
        measured.add(x, y)
    a, b = derived.stats, measured.stats
    torch.testing.assert_close(a.gram, b.gram, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(a.cross, b.cross, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(a.energy, b.energy, rtol=1e-10, atol=1e-9)


def test_collect_statistics_measures_the_cross_moment_of_a_conv_subclass() -> None:
    """A subclass may not compute ``K a`` (here: weight standardization), so its cross is measured."""
    from convrewrite.recovery.batches import TensorBatches
    from convrewrite.recovery.statistics import collect_statistics

    class Standardized(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Standardized(4, 4, 3, padding=1)).double()
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    data = TensorBatches((x,), batch_size=8, holdout=0.0, shuffle=False)
    stats = collect_statistics(model, ["0", "1"], data, splits=("fit",))
    inner = model[0](x).detach()
    with torch.no_grad():
        target = model[1](inner)
    geometry = PatchGeometry.of(model[1])
    patches = geometry.unfold(inner)
    measured = patches.t() @ geometry.target_rows(target)
    torch.testing.assert_close(stats["1"]["fit"].cross, measured, rtol=1e-9, atol=1e-8)
    first = PatchGeometry.of(model[0]).unfold(x)
    with torch.no_grad():
        own = PatchGeometry.of(model[0]).target_rows(model[0](x))
    torch.testing.assert_close(stats["0"]["fit"].cross, first.t() @ own, rtol=1e-9, atol=1e-8)


def test_batches_of_other_spatial_sizes_are_summed_right() -> None:
    """A model fed variable sizes: the kept segment sums are flushed when the size changes."""
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    geometry = PatchGeometry.of(conv)
    shifted = StatisticsAccumulator(geometry)
    patches, targets = [], []
    for seed, size in enumerate([(6, 5), (6, 5), (4, 9), (6, 5)]):
        x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = conv(x)
        shifted.add(x, y)
        patches.append(geometry.unfold(x))
        targets.append(geometry.target_rows(y))
    a, t = torch.cat(patches), torch.cat(targets)
    torch.testing.assert_close(shifted.stats.gram, a.t() @ a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(shifted.stats.cross, a.t() @ t, rtol=1e-12, atol=1e-10)
    assert shifted.stats.rows == a.shape[0]
