"""MODEL forms, discovery order, example inputs, weights, and import hygiene."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convrewrite.engine.loading import load_model, parse_input_shape
from convrewrite.errors import ModelError, UsageError

from .conftest import ASSETS


def test_discovery_prefers_build_model() -> None:
    loaded = load_model(str(ASSETS / "forms.py"))
    assert loaded.model.conv.out_channels == 8
    assert loaded.origin == "factory build_model()"


@pytest.mark.parametrize(
    ("name", "width", "origin"),
    [
        ("model", 6, "module instance model"),
        ("Small", 4, "class Small, built with no arguments"),
        ("make_big", 12, "factory make_big()"),
        ("Big", 12, "class Big, built with no arguments"),
    ],
)
def test_named_objects(name: str, width: int, origin: str) -> None:
    loaded = load_model(f"{ASSETS / 'forms.py'}:{name}")
    assert loaded.model.conv.out_channels == width
    assert loaded.origin == origin


def test_dotted_module_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ASSETS.parent.parent)
    loaded = load_model("tests.assets.forms:Big")
    assert loaded.model.conv.out_channels == 12


def test_sibling_imports_work_and_nothing_leaks() -> None:
    path_before = list(sys.path)
    modules_before = set(sys.modules)
    loaded = load_model(str(ASSETS / "import_sibling.py"))
    assert loaded.model.block[0].out_channels == 4
    assert sys.path == path_before
    assert set(sys.modules) == modules_before


def test_input_sources_in_order() -> None:
    assert load_model(str(ASSETS / "tiny.py")).inputs.source.startswith("INPUT_SHAPE")
    assert load_model(str(ASSETS / "forms.py")).inputs.source.startswith("example_inputs()")
    loaded = load_model(str(ASSETS / "forms.py"), input_shapes=[(2, 3, 5, 5)])
    assert loaded.inputs.source == "--input-shape"
    assert loaded.inputs.args[0].shape == (2, 3, 5, 5)


def test_tuple_example_inputs_become_positional_arguments() -> None:
    loaded = load_model(str(ASSETS / "multi_input.py"))
    assert [tuple(t.shape) for t in loaded.inputs.args] == [(1, 3, 12, 12), (1, 1, 12, 12)]
    assert loaded.inputs.call(loaded.model).shape == (1, 8, 12, 12)


def test_the_model_is_put_in_eval_mode() -> None:
    assert load_model(str(ASSETS / "tiny.py")).model.training is False


@pytest.mark.parametrize(
    ("text", "shape"), [("1,3,224,224", (1, 3, 224, 224)), ("1x1x32x320", (1, 1, 32, 320)), (" (2, 5) ", (2, 5))]
)
def test_parse_input_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,a", "1,0,3", "-1,3"])
def test_parse_input_shape_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_input_shape(text)


def _trained_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    reference = load_model(str(ASSETS / "tiny.py")).model
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    return state


def test_weights_from_safetensors_and_pt(tmp_path: Path) -> None:
    state = _trained_state(tmp_path)
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_model(str(ASSETS / "tiny.py"), weights=tmp_path / name)
        assert torch.equal(loaded.model.conv1.weight, state["conv1.weight"])


class _Payload:
    """Unpickling this would run code: weights_only=True must refuse it."""


def test_unsafe_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": _trained_state(tmp_path), "extra": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ModelError, match="refusing to load unsafe.pt"):
        load_model(str(ASSETS / "tiny.py"), weights=tmp_path / "unsafe.pt")


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    save_file({"conv1.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="do not fit the model"):
        load_model(str(ASSETS / "tiny.py"), weights=tmp_path / "other.safetensors")
