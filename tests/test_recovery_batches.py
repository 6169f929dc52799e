"""The batch sources behind fitting and distillation: splits, shards, re-iteration."""

from __future__ import annotations

import pytest
import torch

from convrewrite.errors import UsageError
from convrewrite.recovery.batches import BatchSource, TensorBatches, holdout_indices, shard
from convrewrite.recovery.device import resolve_device


def test_holdout_split_is_disjoint_complete_and_sized() -> None:
    fit, held = holdout_indices(101, 0.1, seed=3)
    assert len(held) == 11  # ceil(0.1 * 101)
    assert set(fit).isdisjoint(held)
    assert sorted(fit + held) == list(range(101))
    assert holdout_indices(101, 0.1, seed=3) == (fit, held)  # deterministic


def test_holdout_zero_keeps_everything_for_fitting() -> None:
    fit, held = holdout_indices(10, 0.0)
    assert held == [] and fit == list(range(10))


def test_shards_are_equal_sized_and_cover_everything() -> None:
    indices = list(range(10))
    parts = [shard(indices, rank, 3) for rank in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set().union(*parts) == set(indices)


def test_tensor_batches_never_mix_holdout_into_fit() -> None:
    x = torch.arange(50, dtype=torch.float32).reshape(50, 1)
    source = TensorBatches((x,), batch_size=8, holdout=0.2)
    assert isinstance(source, BatchSource)
    fit = torch.cat([b.args[0] for b in source.batches("fit")]).flatten().tolist()
    held = torch.cat([b.args[0] for b in source.batches("holdout")]).flatten().tolist()
    assert len(held) == 10 and len(fit) == 40
    assert set(fit).isdisjoint(held)
    again = torch.cat([b.args[0] for b in source.batches("fit", epoch=1)]).flatten().tolist()
    assert sorted(again) == sorted(fit) and again != fit  # a new pass, reshuffled


def test_tensor_batches_named_inputs_and_sizes() -> None:
    source = TensorBatches(kwargs={"a": torch.zeros(7, 2), "b": torch.ones(7, 3)}, batch_size=4, holdout=0.0)
    sizes = [b.size for b in source.batches("fit")]
    assert sizes == [4, 3]
    first = next(iter(source.batches("fit")))
    assert set(first.kwargs) == {"a", "b"} and first.kwargs["b"].shape == (4, 3)


def test_tensor_batches_reject_disagreeing_counts() -> None:
    with pytest.raises(ValueError, match="disagree"):
        TensorBatches((torch.zeros(3, 1), torch.zeros(4, 1)))


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(UsageError, match="not a device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")
