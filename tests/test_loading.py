"""MODEL forms, discovery order, example inputs, weights, and import hygiene."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from convrewrite.core.loading import load_model, parse_input_shape
from convrewrite.errors import ModelError, UsageError

from .conftest import ASSETS, SAMPLES


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


ZOO_SITE = SAMPLES / "zoo_site"


def test_installed_libraries_stay_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library that registers torch operators at import cannot be imported twice in a process.

    ``zoo_custom_ops`` defines the operator namespace ``convrewrite_zoo_ops``; before the loader
    kept installed libraries, the second load (and apply's reload) failed with "Only a single
    TORCH_LIBRARY can be used to register the namespace convrewrite_zoo_ops".
    """
    monkeypatch.syspath_prepend(str(ZOO_SITE))
    first = load_model(str(SAMPLES / "zoo" / "custom_op.py"))
    library = sys.modules["zoo_custom_ops"]
    second = load_model(str(SAMPLES / "zoo" / "custom_op.py"))
    assert sys.modules["zoo_custom_ops"] is library
    assert type(first.model.clip) is type(second.model.clip) is library.SoftClip
    assert first.user_module is not None and first.user_module.__name__ not in sys.modules


def test_project_modules_are_forgotten_but_a_venv_inside_the_project_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / ".venv" / "lib" / "site-packages"
    (site / "vendored_lib").mkdir(parents=True)
    (site / "vendored_lib" / "__init__.py").write_text("from torch import nn\nLayer = nn.Identity\n")
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("from torch import nn\nWIDTH = 4\n")
    (tmp_path / "sibling.py").write_text("SCALE = 2\n")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\nimport sibling\nfrom helpers import WIDTH\n"
        "from vendored_lib import Layer\n"
        "INPUT_SHAPE = (1, 3, 8, 8)\n"
        "def build_model():\n    return nn.Sequential(nn.Conv2d(3, WIDTH * sibling.SCALE, 3), Layer())\n"
    )
    monkeypatch.syspath_prepend(str(site))
    loaded = load_model(str(tmp_path / "net.py"))
    assert loaded.model[0].out_channels == 8
    assert "vendored_lib" in sys.modules
    assert "helpers" not in sys.modules and "sibling" not in sys.modules


def test_a_file_input_that_does_not_fit_forward_fails_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "two.py").write_text(
        "import torch\nfrom torch import nn\nINPUT_SHAPE = (1, 3, 8, 8)\n"
        "class Two(nn.Module):\n    def forward(self, image, depth):\n        return image + depth\n"
    )
    expected = r"Two.forward takes 2 input\(s\) \(image, depth\) but the example input gives 1"
    with pytest.raises(ModelError, match=expected):
        load_model(str(tmp_path / "two.py"))
