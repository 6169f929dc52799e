"""``convrewrite plan``: scores against torch oracles, the plan object, PLAN.toml, the CLI.

Oracles: a candidate's predicted layer error is recomputed by running the candidate block and the
original layer on the held-out samples with torch; the Hutchinson gain of a linear two-layer
model is ``||B||_F² / width`` by hand; the applied plan's parameter count is counted on the
rewritten module.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from convrewrite.core.loading import load_model
from convrewrite.errors import UsageError
from convrewrite.planning.budgets import parse_budget, parse_budgets
from convrewrite.planning.candidates import parse_candidates
from convrewrite.planning.plan import Plan, rules_from_file
from convrewrite.planning.planner import make_plan
from convrewrite.planning.scoring import candidate_error, collect, hutchinson_sensitivity
from convrewrite.recovery.batches import TensorBatches
from convrewrite.rules.api import ConvSite, make_rule

ROOT = Path(__file__).resolve().parents[1]
TDNN = ROOT / "sample_models" / "tdnn.py"
CRNN = ROOT / "sample_models" / "crnn.py"


def _tdnn_data(count: int = 96) -> TensorBatches:
    x = torch.randn(count, 39, 50, generator=torch.Generator().manual_seed(0))
    return TensorBatches((x,), batch_size=32, holdout=0.25)


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(resources.files("convrewrite.report").joinpath("schema/plan-1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def tdnn_plan() -> Plan:
    torch.manual_seed(0)
    loaded = load_model(str(TDNN))
    candidates = parse_candidates(["separable:multiplier=1,low-rank,log-group"])
    return make_plan(loaded, _tdnn_data(), parse_budgets(["params=0.5x"]), candidates=candidates, device="cpu")


# ----------------------------------------------------------------------------- budgets


def test_budget_specs() -> None:
    assert parse_budget("params=0.25x").limit(1000) == 250
    assert parse_budget("params=200k").limit(10**7) == 200_000
    assert parse_budget("macs=1.5M").limit(10**9) == 1_500_000
    assert parse_budget("latency=2x").limit(10.0) == 5.0
    for bad in ("params", "params=-1x", "size=2x", "latency=3k", "params=2ms"):
        with pytest.raises(UsageError):
            parse_budget(bad)
    with pytest.raises(UsageError, match="two budgets"):
        parse_budgets(["params=0.5x", "params=100k"])


def test_candidates_are_checked_against_registered_rules() -> None:
    specs = parse_candidates(["separable,low-rank:ratio=0.25"])
    assert [s.rule for s in specs] == ["separable", "low-rank"]
    assert specs[1].options == (("ratio", "0.25"),)
    with pytest.raises(UsageError, match="unknown rule"):
        parse_candidates(["separabel"])
    with pytest.raises(UsageError, match="not a plan candidate"):
        parse_candidates(["fuse-bn"])


# ----------------------------------------------------------------------------- scoring oracles


def test_candidate_error_equals_the_error_of_running_the_block_on_held_out_samples() -> None:
    torch.manual_seed(1)
    conv = nn.Conv1d(6, 8, kernel_size=5, padding="same").double()
    model = nn.Sequential(conv)
    x = torch.randn(40, 6, 30, dtype=torch.float64)
    data = TensorBatches((x,), batch_size=16, holdout=0.3)
    stats = collect(model, ["0"], data, device=torch.device("cpu"))["0"]
    site = ConvSite("0", conv, (1, 6, 30), (1, 8, 30))
    block = make_rule("separable").build(site).module.double()
    predicted, _ = candidate_error(block, conv, stats)
    held = x[data.indices["holdout"]]
    with torch.no_grad():
        expected = float((block(held) - conv(held)).norm() / conv(held).norm())
    assert predicted == pytest.approx(expected, rel=1e-6)


def test_hutchinson_gain_of_a_linear_model_is_the_frobenius_norm_per_width() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).double()
    x = torch.randn(4000, 5, dtype=torch.float64)
    data = TensorBatches((x,), batch_size=4000, holdout=0.1)
    sensitivity = hutchinson_sensitivity(model, ["0", "1"], data, device=torch.device("cpu"), max_batches=1)
    b = model[1].weight.detach()
    assert sensitivity.gain["0"] == pytest.approx(float((b**2).sum()) / 7, rel=0.05)
    assert sensitivity.gain["1"] == pytest.approx(1.0, rel=1e-9)  # the output itself: v² = 1


# ----------------------------------------------------------------------------- the plan


def test_plan_meets_its_budget_and_validates(tdnn_plan: Plan) -> None:
    assert tdnn_plan.met and tdnn_plan.params <= 0.5 * tdnn_plan.original_params
    assert tdnn_plan.params == tdnn_plan.fixed_params + sum(layer.chosen.params for layer in tdnn_plan.layers)
    _validator().validate(tdnn_plan.to_dict())
    again = Plan.from_dict(json.loads(tdnn_plan.render("json")))
    assert again.to_dict() == tdnn_plan.to_dict()
    losses = [p["loss"] for p in tdnn_plan.front]
    assert all(b >= a - 1e-12 for a, b in zip(losses, losses[1:]))
    for fmt in ("table", "markdown", "html"):
        text = tdnn_plan.render(fmt)
        assert "tdnn2" in text
    assert "```mermaid" in tdnn_plan.render("markdown")
    assert 'class="chosen"' in tdnn_plan.render("html")


def test_saved_plan_reloads_to_the_same_rules_and_is_never_overwritten(tdnn_plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "PLAN.toml"
    tdnn_plan.save(path)
    loaded = rules_from_file(path)
    assert [r.spec() for r in loaded] == [r.spec() for r in tdnn_plan.rules()]
    assert loaded, "the plan rewrites something at half the parameters"
    before = path.read_text()
    with pytest.raises(UsageError, match="exists"):
        tdnn_plan.save(path)
    assert path.read_text() == before
    tdnn_plan.save(path, force=True)


def test_a_saved_plan_with_an_unregistered_rule_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "PLAN.toml"
    path.write_text('[tool.convrewrite]\nrules = [{ name = "os.system", include = ["x"] }]\n')
    with pytest.raises(UsageError, match="unknown rule"):
        rules_from_file(path)


def test_applying_the_plan_gives_the_planned_parameter_count(tdnn_plan: Plan) -> None:
    loaded = load_model(str(TDNN))
    result = tdnn_plan.apply(loaded.model, example_inputs=torch.randn(1, 39, 50), fit=False)
    assert sum(p.numel() for p in result.model.parameters()) == tdnn_plan.params


# ----------------------------------------------------------------------------- the command line


def _data_file(tmp_path: Path, shape: tuple[int, ...], count: int = 48) -> Path:
    path = tmp_path / "calib.pt"
    torch.save(torch.randn(count, *shape, generator=torch.Generator().manual_seed(0)), path)
    return path


def test_cli_plans_saves_and_applies_the_crnn(cli, tmp_path: Path) -> None:
    data = _data_file(tmp_path, (1, 32, 64), count=24)
    plan_file = tmp_path / "PLAN.toml"
    result = cli(
        "plan",
        CRNN,
        "--data",
        data,
        "--budget",
        "params=0.995x",
        "--budget",
        "macs=0.95x",
        "--candidates",
        "separable:multiplier=1,low-rank:ratio=0.35,low-rank:ratio=0.2",
        "--input-shape",
        "1,1,32,64",
        "--include",
        "conv[0-1]",
        "--holdout",
        "0.25",
        "--format",
        "json",
        "--save",
        plan_file,
    )
    assert result.code == 0, result.err
    report = json.loads(result.out)
    _validator().validate(report)
    assert all(b["met"] for b in report["budgets"])
    assert report["planned"]["params"] <= 0.995 * report["original"]["params"]
    assert all(
        layer["name"] in ("conv0", "conv1", "conv2", "conv3") for layer in report["layers"] if layer["chosen"]["rule"]
    )
    assert report["planned"]["macs"] <= 0.95 * report["original"]["macs"]
    assert {r.name for r in rules_from_file(plan_file)} <= {"separable", "low-rank"}
    again = cli("plan", CRNN, "--data", data, "--budget", "params=0.995x", "--save", plan_file)
    assert again.code == 2 and "exists" in again.err


def test_cli_infeasible_budget_is_exit_2_with_the_smallest_reachable_figure(cli, tmp_path: Path) -> None:
    data = _data_file(tmp_path, (39, 50))
    result = cli("plan", TDNN, "--data", data, "--budget", "params=100", "--candidates", "separable")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "smallest reachable is" in lines[0]
    # the oracle: tdnn1 and tdnn2 separable (m=1), tdnn3 separable, the Linear kept
    separable = make_rule("separable")
    loaded = load_model(str(TDNN))
    smallest = 410  # classifier 40*10+10
    for name in ("tdnn1", "tdnn2", "tdnn3"):
        conv = loaded.model.get_submodule(name)
        site = ConvSite(name, conv, (1, conv.in_channels, 50), (1, conv.out_channels, 50))
        smallest += min(separable.cost(site).params, conv.weight.numel() + conv.bias.numel())
    assert f"{smallest:,} params" in lines[0]


def test_cli_bad_budget_is_a_usage_error_before_loading(cli, tmp_path: Path) -> None:
    result = cli("plan", tmp_path / "missing.py", "--budget", "size=2x")
    assert result.code == 2 and "unknown metric" in result.err
    result = cli("plan", tmp_path / "missing.py", "--budget", "latency=2k")
    assert result.code == 2 and "latency takes a speedup" in result.err


def test_predicted_error_is_finite_and_protected_layers_say_why(tdnn_plan: Plan) -> None:
    assert math.isfinite(tdnn_plan.predicted_error)
    for layer in tdnn_plan.layers:
        if layer.protected:
            assert layer.chosen.spec == "keep" and layer.protected


def test_apply_with_a_saved_plan_and_with_a_budget(cli, tmp_path: Path) -> None:
    data = _data_file(tmp_path, (39, 50), count=64)
    plan_file = tmp_path / "PLAN.toml"
    planned = cli("plan", TDNN, "--data", data, "--budget", "params=0.5x", "--save", plan_file, "--format", "json")
    assert planned.code == 0, planned.err
    target = json.loads(planned.out)["planned"]["params"]
    for flags, out in ((("--plan", plan_file), "a"), (("--budget", "params=0.5x"), "b")):
        result = cli("apply", TDNN, "--data", data, *flags, "--out", tmp_path / out, "--format", "json")
        assert result.code == 0, result.err
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["after"]["params"] == target
    both = cli("apply", TDNN, "--data", data, "--plan", plan_file, "--rule", "separable", "--out", tmp_path / "c")
    assert both.code == 2 and "drop --rule" in both.err
    # `check --plan` gates the saved plan's rewrite: it holds at its own count and fails one below
    assert cli("check", TDNN, "--plan", plan_file, "--max-params", str(target)).code == 0
    assert cli("check", TDNN, "--plan", plan_file, "--max-params", str(target - 1)).code == 1


def test_check_gates_the_rewrite_of_a_plan_file(cli, tmp_path: Path) -> None:
    plan_file = tmp_path / "PLAN.toml"
    plan_file.write_text('[tool.convrewrite]\nrules = [{ name = "separable", multiplier = 2, include = ["tdnn2"] }]\n')
    # by hand: 24,410 params; tdnn2 (40 -> 40, k=9) has 14,440 and becomes depthwise 80x9 + 80 bias and
    # pointwise 80x40 + 40 bias = 4,040
    expected = 24_410 - 14_440 + 4_040
    result = cli("check", TDNN, "--plan", plan_file, "--max-params", str(expected), "--format", "json")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["check"]["budgets"][0]["measured"] == expected
    assert document["check"]["targets"][0]["settings"]["rules"]["source"].startswith("--plan ")
    assert cli("check", TDNN, "--plan", plan_file, "--max-params", str(expected - 1)).code == 1
    both = cli("check", TDNN, "--plan", plan_file, "--rule", "separable", "--max-params", "20k")
    assert both.code == 2 and "drop --rule" in both.err
    missing = cli("check", TDNN, "--plan", tmp_path / "nope.toml", "--max-params", "20k")
    assert missing.code == 2 and "does not exist" in missing.err and missing.err.count("\n") == 1


def test_probe_gradients_are_exact_with_in_place_activations_and_no_weight_gradient() -> None:
    """The probes need no weight gradient: the first planned output becomes a leaf, the model goes
    on with a copy (an in-place ReLU right after it must not fail), and the gradients equal those
    of plain autograd through the same model with the same Rademacher probe."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 3, 3),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
    ).double()
    data = TensorBatches((torch.randn(16, 2, 6, 6, dtype=torch.float64),), batch_size=6, holdout=0.25, shuffle=False)
    (x,) = next(iter(data.batches("fit"))).args
    flags_before = [p.requires_grad for p in model.parameters()]
    sensitivity = hutchinson_sensitivity(model, ["0", "2"], data, device=torch.device("cpu"), max_batches=1)
    assert [p.requires_grad for p in model.parameters()] == flags_before
    assert all(p.grad is None for p in model.parameters())
    # Independent: autograd on the layer outputs, the probe drawn as the estimator documents it.
    y0 = model[0](x)
    y2 = model[2](torch.relu(y0))
    z = model[5](model[4](torch.relu(y2)))
    probe = torch.randint(0, 2, z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.int8).to(z) * 2 - 1
    g0, g2 = torch.autograd.grad((z * probe).sum(), [y0, y2])
    assert sensitivity.gain["0"] == pytest.approx(float((g0**2).sum()) / g0.numel(), rel=1e-9)
    assert sensitivity.gain["2"] == pytest.approx(float((g2**2).sum()) / g2.numel(), rel=1e-9)
    assert sensitivity.gain["0"] > 0 and sensitivity.gain["2"] > 0


def test_structured_probe_loss_matches_the_exact_output_error_of_a_linear_model() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double()
    x = torch.randn(4096, 6, dtype=torch.float64)
    data = TensorBatches((x,), batch_size=32, holdout=0.1, shuffle=False)
    sensitivity = hutchinson_sensitivity(model, ["0"], data, device=torch.device("cpu"), max_batches=120)
    first = model[0]
    original = torch.cat([first.weight, first.bias[:, None]], 1).detach()
    # a structured error: one output channel of the first layer off by a rank-one change
    change = torch.zeros_like(original)
    change[2] = torch.randn(7, dtype=torch.float64)
    with torch.no_grad():
        exact_delta = model[1].weight @ (change[:, :6] @ x.t() + change[:, 6:])  # (4, samples)
        exact = float((exact_delta**2).sum() / (model(x) ** 2).sum())
    predicted = sensitivity.loss("0", original + change, original, 0.0)
    assert predicted == pytest.approx(exact, rel=0.2)


def test_python_api_plans_without_touching_the_module() -> None:
    import convrewrite

    loaded = load_model(str(TDNN))
    module = loaded.model
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(64, 39, 50, generator=torch.Generator().manual_seed(5))
    plan = convrewrite.plan(module, data=x, budget={"params": 0.5, "macs": "0.6x"}, example_inputs=x[:1], device="cpu")
    assert plan.met and [b.metric for b in plan.budgets] == ["params", "macs"]
    assert plan.macs <= 0.6 * plan.original_macs
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(type(m).__name__ != "SeparableConv1d" for m in module.modules())
