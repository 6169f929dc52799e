"""Calibration data: every --data form, the labelled-loader rule, holdout by batch index, and one
line for every kind of bad data (checked before any work)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convrewrite.core.loading import ExampleInputs, load_model
from convrewrite.errors import ModelError, UsageError
from convrewrite.recovery.data import calibration_data_from, open_calibration_data, stream_is_held_out

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))


    def example_inputs():
        return torch.zeros(1, 3, 8, 8)
    """
)

TWO_INPUTS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 2)
            self.b = nn.Linear(3, 2)

        def forward(self, left, right):
            return self.a(left) + self.b(right)


    def example_inputs():
        return torch.zeros(1, 5), torch.zeros(1, 3)
    """
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def net(tmp_path: Path):
    return load_model(str(write(tmp_path, "net.py", MODEL)))


def fit_and_holdout(source) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    fit = [b.args[0] for b in source.batches("fit")]
    held = [b.args[0] for b in source.batches("holdout")]
    return fit, held


# --------------------------------------------------------------------------- tensor files


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors", ".npz"])
def test_tensor_files_hold_the_samples_along_dim_0(net, tmp_path: Path, suffix: str) -> None:
    samples = torch.randn(20, 3, 8, 8)
    path = tmp_path / f"data{suffix}"
    if suffix == ".pt":
        torch.save(samples, path)
    elif suffix == ".npy":
        np.save(path, samples.double().numpy())  # float64, as NumPy makes it: cast to float32
    elif suffix == ".safetensors":
        save_file({"x": samples}, str(path))
    else:
        np.savez(path, x=samples.numpy(), labels=np.arange(20))  # labels: not a parameter, ignored
    source = open_calibration_data(str(path), net, batch_size=8)
    assert source is not None
    fit, held = fit_and_holdout(source)
    assert source.count("fit") == 18 and source.count("holdout") == 2
    seen = torch.cat(fit + held)
    assert seen.dtype == torch.float32 and seen.shape == (20, 3, 8, 8)
    assert torch.allclose(torch.sort(seen.flatten()).values, torch.sort(samples.flatten()).values)
    if suffix == ".npz":
        assert "ignored: labels" in source.description


def test_named_tensors_are_the_forward_parameters(tmp_path: Path) -> None:
    loaded = load_model(str(write(tmp_path, "pair.py", TWO_INPUTS)))
    path = tmp_path / "pair.safetensors"
    save_file({"right": torch.randn(10, 3), "left": torch.randn(10, 5)}, str(path))
    source = open_calibration_data(str(path), loaded, batch_size=4)
    batch = next(iter(source.batches("fit")))
    assert [tuple(t.shape[1:]) for t in batch.args] == [(5,), (3,)]
    save_file({"left": torch.randn(10, 5), "other": torch.randn(10, 3)}, str(path))
    with pytest.raises(UsageError, match=r"expected tensors named left, right .*found left, other"):
        open_calibration_data(str(path), loaded)


# --------------------------------------------------------------------------- bad data: one line each


def bad(tmp_path: Path, net, content, suffix: str = ".pt", **options) -> str:
    path = tmp_path / f"bad{suffix}"
    if suffix == ".npy":
        np.save(path, content)
    else:
        torch.save(content, path)
    with pytest.raises(UsageError) as caught:
        open_calibration_data(str(path), net, **options)
    text = caught.value.one_line()
    assert "\n" not in text and caught.value.exit_code == 2
    return text


def test_wrong_shape_names_expected_and_found(net, tmp_path: Path) -> None:
    text = bad(tmp_path, net, torch.randn(10, 8, 8))
    assert "expected inputs x: N x 3 x 8 x 8 float32" in text and "found 10 x 8 x 8 float32" in text


def test_integer_data_for_a_float_input(net, tmp_path: Path) -> None:
    text = bad(tmp_path, net, torch.zeros(10, 3, 8, 8, dtype=torch.uint8))
    assert "found 10 x 3 x 8 x 8 uint8" in text


def test_nan_and_inf_are_counted_and_located(net, tmp_path: Path) -> None:
    samples = torch.randn(10, 3, 8, 8)
    samples[7, 0, 0, 0] = float("nan")
    samples[8, 1, 2, 3] = float("inf")
    text = bad(tmp_path, net, samples)
    assert "expected finite values, found 1 NaN and 1 Inf in x (first in sample 7)" in text


def test_empty_and_too_small_sets(net, tmp_path: Path) -> None:
    assert "found an empty set" in bad(tmp_path, net, torch.zeros(0, 3, 8, 8))
    assert "expected at least 2 samples (some are held out), found 1" in bad(tmp_path, net, torch.zeros(1, 3, 8, 8))


def test_pickled_objects_are_refused(net, tmp_path: Path) -> None:
    text = bad(tmp_path, net, {"x": torch.zeros(2, 3, 8, 8), "meta": Path("x")})
    assert "torch.load(weights_only=True)" in text


def test_missing_file_unknown_form_and_bad_holdout(net, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="found no file"):
        open_calibration_data(str(tmp_path / "none.npy"), net)
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(UsageError, match=r"expected a \.pt.*found a \.csv file"):
        open_calibration_data(str(tmp_path / "data.csv"), net)
    with pytest.raises(UsageError, match=r"--holdout 1.0: expected a fraction in \[0, 1\)"):
        open_calibration_data(str(tmp_path / "none.npy"), net, holdout=1.0)


def test_a_batch_that_does_not_fit_the_model(net, tmp_path: Path) -> None:
    text = bad(tmp_path, net, np.zeros((4, 5, 8, 8), dtype=np.float32), suffix=".npy")
    assert "a batch that does not fit the model: expected x: N x 3 x 8 x 8 float32, found 4 x 5 x 8 x 8" in text
    assert "the model raised RuntimeError" in text


def test_other_spatial_sizes_are_accepted_when_the_model_runs_them(net, tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save(torch.randn(6, 3, 12, 12), path)
    source = open_calibration_data(str(path), net)
    assert next(iter(source.batches("fit"))).args[0].shape[1:] == (3, 12, 12)


# --------------------------------------------------------------------------- functions and streams

STREAM = textwrap.dedent(
    """
    import torch

    CALLS = []


    def labelled():
        CALLS.append(1)
        generator = torch.Generator().manual_seed(0)
        for index in range(12):
            images = torch.full((4, 3, 8, 8), float(index))
            yield images, torch.randint(0, 4, (4,), generator=generator)


    def shuffled():
        order = torch.randperm(6)
        for index in order.tolist():
            yield torch.full((2, 3, 8, 8), float(index))


    SHARED = iter([torch.zeros(2, 3, 8, 8)] * 3)


    def one_shot():
        return SHARED


    def loader():
        from torch.utils.data import DataLoader, TensorDataset

        images = torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1).expand(30, 3, 8, 8).contiguous()
        return DataLoader(TensorDataset(images, torch.zeros(30)), batch_size=4, shuffle=True)


    def wrong():
        return [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 5)]
    """
)


def test_a_labelled_stream_is_reopened_per_pass_and_split_by_batch_index(net, tmp_path: Path) -> None:
    path = write(tmp_path, "stream.py", STREAM)
    source = open_calibration_data(f"{path}:labelled", net)
    assert "read as (inputs, labels) pairs, labels ignored" in source.description
    held = [int(b.args[0][0, 0, 0, 0]) for b in source.batches("holdout")]
    fit = [int(b.args[0][0, 0, 0, 0]) for b in source.batches("fit")]
    assert held == [0, 10] and fit == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert source.count("holdout") == 8 and source.count("fit") == 40
    shards = [[int(b.args[0][0, 0, 0, 0]) for b in source.batches("fit", rank=r, world_size=3)] for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*shards) == set(fit)


def test_stream_calls_the_function_again_for_every_pass(net, tmp_path: Path) -> None:
    calls = []

    def produce():
        calls.append(1)
        return (torch.full((2, 3, 8, 8), float(i)) for i in range(5))

    source = calibration_data_from(produce, example=net)
    opened = len(calls)
    for _ in range(3):
        list(source.batches("fit"))
    assert len(calls) == opened + 3


def test_holdout_by_batch_index_without_the_count() -> None:
    held = [i for i in range(40) if stream_is_held_out(i, 0.1)]
    assert held == [0, 10, 20, 30]
    assert sum(stream_is_held_out(i, 0.3) for i in range(100)) == 30  # ceil(0.3 * 100), no float drift
    assert not any(stream_is_held_out(i, 0.0) for i in range(10))


def test_a_shuffled_stream_is_refused(net, tmp_path: Path) -> None:
    path = write(tmp_path, "stream.py", STREAM)
    torch.manual_seed(3)
    with pytest.raises(UsageError, match="expected the same batches on every call"):
        open_calibration_data(f"{path}:shuffled", net)


def test_a_one_shot_iterator_is_refused(net, tmp_path: Path) -> None:
    path = write(tmp_path, "stream.py", STREAM)
    with pytest.raises(UsageError, match="found the same exhausted iterator again"):
        open_calibration_data(f"{path}:one_shot", net)


def test_a_later_batch_that_does_not_fit(net, tmp_path: Path) -> None:
    path = write(tmp_path, "stream.py", STREAM)
    with pytest.raises(UsageError, match=r"batch 1: expected inputs x: N x 3 x 8 x 8 float32, found 2 x 3 x 5"):
        open_calibration_data(f"{path}:wrong", net)


def test_a_map_style_loader_is_split_by_sample(net, tmp_path: Path) -> None:
    path = write(tmp_path, "stream.py", STREAM)
    source = open_calibration_data(f"{path}:loader", net)
    assert source.count("fit") == 27 and source.count("holdout") == 3
    held = torch.cat([b.args[0][:, 0, 0, 0] for b in source.batches("holdout")]).tolist()
    for epoch in range(2):
        fit = torch.cat([b.args[0][:, 0, 0, 0] for b in source.batches("fit", epoch=epoch)]).tolist()
        assert len(fit) == 27 and set(fit).isdisjoint(held)


def test_calibration_data_in_the_model_file(tmp_path: Path) -> None:
    text = MODEL + "\n\ndef calibration_data():\n    return torch.randn(12, 3, 8, 8)\n"
    loaded = load_model(str(write(tmp_path, "with_data.py", text)))
    source = open_calibration_data(None, loaded)
    assert source is not None and source.count("fit") == 10 and source.count("holdout") == 2
    plain = load_model(str(write(tmp_path, "plain.py", MODEL)))
    assert open_calibration_data(None, plain) is None


def test_missing_function_and_failing_function(net, tmp_path: Path) -> None:
    path = write(tmp_path, "stream.py", STREAM + "\n\ndef broken():\n    raise RuntimeError('disk on fire')\n")
    with pytest.raises(UsageError, match="expected a function nothing in"):
        open_calibration_data(f"{path}:nothing", net)
    with pytest.raises(ModelError, match="RuntimeError: disk on fire"):
        open_calibration_data(f"{path}:broken", net)


def test_an_error_while_producing_or_loading_names_the_batch(net) -> None:
    def stream():
        yield torch.randn(4, 3, 8, 8)
        yield torch.randn(4, 3, 8, 8)
        raise OSError("stream cut")

    with pytest.raises(ModelError, match=r"producing batch 2 raised OSError: stream cut"):
        calibration_data_from(stream, example=net)

    class Flaky(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, index: int) -> torch.Tensor:
            if index == 13:
                raise KeyError("sample 13 is missing")
            return torch.zeros(3, 8, 8)

    loader = torch.utils.data.DataLoader(Flaky(), batch_size=4)
    with pytest.raises(ModelError, match=r"loading batch 3 raised KeyError"):  # checked on opening
        list(calibration_data_from(loader, example=net, holdout=0.0).batches("fit"))  # in order: 13 is in batch 3


# --------------------------------------------------------------------------- the labelled rule


def test_a_pair_is_two_inputs_when_the_model_takes_two(tmp_path: Path) -> None:
    loaded = load_model(str(write(tmp_path, "pair.py", TWO_INPUTS)))
    pairs = [(torch.randn(4, 5), torch.randn(4, 3)) for _ in range(3)]
    source = calibration_data_from(pairs, example=loaded)
    batch = next(iter(source.batches("fit")))
    assert len(batch.args) == 2 and "labels" not in source.description


def test_a_pair_is_inputs_and_labels_when_the_model_takes_one(net) -> None:
    pairs = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    source = calibration_data_from(pairs, example=net)
    batch = next(iter(source.batches("fit")))
    assert len(batch.args) == 1 and batch.args[0].shape == (4, 3, 8, 8)
    assert "(inputs, labels)" in source.description


def test_dict_batches_drop_keys_that_are_not_parameters(net) -> None:
    batches = [{"x": torch.randn(4, 3, 8, 8), "label": torch.zeros(4)} for _ in range(3)]
    source = calibration_data_from(batches, example=net)
    assert "ignored: label" in source.description
    assert next(iter(source.batches("fit"))).kwargs == {}


def test_python_api_takes_tensors_and_refuses_a_generator(net) -> None:
    source = calibration_data_from(torch.randn(30, 3, 8, 8), example=net, batch_size=7, holdout=0.2)
    assert source.count("holdout") == 6
    with pytest.raises(UsageError, match="one-shot generator"):
        calibration_data_from((torch.randn(2, 3, 8, 8) for _ in range(3)), example=net)
    example = ExampleInputs((torch.zeros(1, 3, 8, 8),), {}, "test")
    with pytest.raises(UsageError, match="found 5 x 3 x 4 x 4"):
        calibration_data_from(torch.randn(5, 3, 4, 4), example=example)  # no model to try it on


# --------------------------------------------------------------------------- images


def test_image_directory_is_resized_cropped_and_normalised(net, tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    for index in range(5):
        picture = np.zeros((16, 24, 3), dtype=np.uint8)
        picture[:, 8:16] = 255  # the middle third white
        image_module.fromarray(picture).save(folder / f"{index}.png")
    image_module.fromarray(np.full((10, 10), 51, dtype=np.uint8)).save(folder / "grey.jpg")
    source = open_calibration_data(str(tmp_path / "images"), net, mean=0.5, std="0.5,0.5,0.5", holdout=0.2)
    assert source.count("fit") == 4 and source.count("holdout") == 2
    images = torch.cat([b.args[0] for b in source.batches("fit")] + [b.args[0] for b in source.batches("holdout")])
    assert images.shape == (6, 3, 8, 8)
    grey = images[images.std(dim=(1, 2, 3)) < 1e-3]
    assert grey.shape[0] == 1 and torch.allclose(grey, torch.full_like(grey, (0.2 - 0.5) / 0.5), atol=1e-2)
    banded = images[images.std(dim=(1, 2, 3)) >= 1e-3]
    # 16x24 is scaled by 1/2 to 8x12 (covering 8x8), then the middle 8 of 12 columns are kept:
    # white lands on columns 2..5 of the crop, black at the edges. Values are (v - 0.5) / 0.5.
    assert banded.shape[0] == 5
    assert torch.allclose(banded[..., 3:5], torch.ones_like(banded[..., 3:5]), atol=0.05)
    assert torch.allclose(banded[..., 0], -torch.ones_like(banded[..., 0]), atol=0.05)
    assert torch.allclose(banded[..., 7], -torch.ones_like(banded[..., 7]), atol=0.05)


def test_image_directory_errors(net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PIL")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="expected PNG or JPEG images, found none"):
        open_calibration_data(str(empty), net)
    (empty / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match="expected readable images, found .*broken.png"):
        open_calibration_data(str(empty), net)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UsageError) as caught:
        open_calibration_data(str(empty), net)
    assert "needs Pillow, which is not installed; pip install 'convrewrite[images]'" in caught.value.one_line()


def test_preprocess_in_the_model_file_replaces_resizing(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    text = MODEL + textwrap.dedent(
        """

        def preprocess(image):
            return torch.full((3, 8, 8), float(image.width))
        """
    )
    loaded = load_model(str(write(tmp_path, "pre.py", text)))
    folder = tmp_path / "pictures"
    folder.mkdir()
    for width in (5, 6, 7):
        image_module.fromarray(np.zeros((4, width), dtype=np.uint8)).save(folder / f"{width}.png")
    source = open_calibration_data(str(folder), loaded, holdout=0.0)
    widths = sorted(torch.cat([b.args[0][:, 0, 0, 0] for b in source.batches("fit")]).tolist())
    assert widths == [5.0, 6.0, 7.0]
    with pytest.raises(UsageError, match="either --mean/--std or a preprocess"):
        open_calibration_data(str(folder), loaded, mean=0.5)
