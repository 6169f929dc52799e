"""The HTML view: one self-contained page (nothing fetched, no script), every chart present, and the
numbers on the page are the report's. Read back with the standard library's html.parser."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser
from typing import Any

import pytest

from convrewrite.api import report as make_report
from convrewrite.report.model import LayerRow, Report, Totals
from convrewrite.report.views import html as html_view
from convrewrite.report.views import render
from convrewrite.report.views.html import MAX_BARS, Bar, Chart, nice_ticks, render_html

from .conftest import SAMPLES


class Page(HTMLParser):
    """Every start tag with its attributes, the text, and the style sheet."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.style = ""
        self.doctype = ""
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data
        else:
            self.text.append(data)

    def all(self, tag: str, **wanted: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in wanted.items())]

    def groups(self, chart: str) -> list[dict[str, str]]:
        """The bar groups of one chart, in order (they follow the chart's <svg> tag)."""
        found, inside = [], False
        for tag, attrs in self.tags:
            if tag == "svg":
                inside = attrs.get("data-chart") == chart
            elif inside and tag == "g" and "data-label" in attrs:
                found.append(attrs)
        return found


@pytest.fixture(scope="module")
def crnn_separable() -> Report:
    return make_report(str(SAMPLES / "crnn.py"), rules=["separable"])


@pytest.fixture(scope="module")
def page(crnn_separable: Report) -> Page:
    return Page(render(crnn_separable, "html"))


def test_the_page_is_self_contained(page: Page) -> None:
    assert page.doctype.lower() == "doctype html"
    tags = {tag for tag, _ in page.tags}
    assert "style" in tags and not tags & {"script", "link", "img", "iframe", "object", "embed"}
    for tag, attrs in page.tags:
        assert not {"src", "href", "srcset"} & set(attrs), tag
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)  # no inline handlers
        for name, value in attrs.items():
            # The SVG namespace is an identifier, never fetched; nothing else may name an address.
            if "://" in value:
                assert (tag, name, value) == ("svg", "xmlns", "http://www.w3.org/2000/svg")
    assert "url(" not in page.style and "@import" not in page.style and "@font-face" not in page.style


def test_every_chart_is_there(page: Page) -> None:
    charts = [a["data-chart"] for a in page.all("svg")]
    assert charts == ["params", "macs", "kernel_error"]
    for attrs in page.all("svg"):
        assert attrs["role"] == "img" and attrs["aria-label"]


def test_chart_bars_are_the_reports_numbers(page: Page, crnn_separable: Report) -> None:
    params = {g["data-label"]: (int(g["data-before"]), int(g["data-after"])) for g in page.groups("params")}
    # The CRNN document's figures for its largest layer, and every layer that holds parameters.
    assert params["conv5"] == (2_359_808, 267_776)
    expected = {
        row.name: (row.params_before, row.params_after)
        for row in crnn_separable.layers
        if row.call == 0 and (row.params_before or row.params_after)
    }
    assert params == expected and len(params) == 10  # 7 convs and 3 batch norms
    macs = {g["data-label"]: (int(g["data-before"]), int(g["data-after"])) for g in page.groups("macs")}
    assert macs == {row.name: (row.macs_before, row.macs_after) for row in crnn_separable.layers if row.macs_before}
    assert sum(before for before, _ in macs.values()) == crnn_separable.before.macs == 1_992_425_472
    errors = {g["data-label"]: float(g["data-before"]) for g in page.groups("kernel_error")}
    fidelity = crnn_separable.fidelity
    assert fidelity is not None
    assert errors == {layer.name: layer.kernel_relative_error for layer in fidelity.layers}


def test_totals_cards_and_table_match_the_report(page: Page, crnn_separable: Report) -> None:
    cells = {(a["data-key"], a["data-side"]): int(a["data-value"]) for a in page.all("td") if "data-key" in a}
    assert cells[("params", "before")] == 5_551_360 and cells[("params", "after")] == 781_450
    assert cells[("macs", "before")] == 1_992_425_472 and cells[("macs", "after")] == 239_361_024
    assert cells[("flops", "after")] == 2 * 239_361_024
    cards = {a["data-total"]: a["data-value"] for a in page.all("div") if "data-total" in a}
    assert float(cards["params"]) == pytest.approx(5_551_360 / 781_450)
    assert crnn_separable.fidelity is not None
    assert float(cards["cosine"]) == pytest.approx(crnn_separable.fidelity.output_cosine_similarity)
    assert int(cards["rewrites"]) == 7
    rows = [a for a in page.all("tr") if "data-layer" in a]
    assert [r["data-layer"] for r in rows] == [row.name for row in crnn_separable.layers]
    assert [r["class"] for r in rows].count("rewritten") == 7
    text = " ".join(page.text)
    assert "Conv2d → SeparableConv2d" in text and "2,359,808" in text and "7.10x fewer" in text


def test_names_are_escaped(crnn_separable: Report) -> None:
    data = crnn_separable.to_dict()
    data["layers"][0]["name"] = '<script>alert("x")</script>'
    data["model"]["name"] = "<b>net</b>"
    hostile = Page(render_html(Report.from_dict(data)))
    assert not hostile.all("script") and not hostile.all("b")
    assert any('<script>alert("x")</script>' in text for text in hostile.text)


def _synthetic(layers: int) -> Report:
    rows = [
        LayerRow(f"block{i}.conv", 0, 1, "Conv2d", "Conv2d", [1, 8, 4, 4], 100 * (i + 1), 50 * (i + 1), 7, 3)
        for i in range(layers)
    ]
    params = sum(r.params_before or 0 for r in rows)
    after = sum(r.params_after or 0 for r in rows)
    return Report(
        model={"name": "synthetic", "origin": "test", "inputs": [], "input_source": "test"},
        trace={"mode": "fx", "description": "traced with torch.fx", "leaves": []},
        rules=[{"spec": "some-rule"}],
        before=Totals(params, params, 7 * layers, 4 * params, 0),
        after=Totals(after, after, 3 * layers, 4 * after, 0),
        layers=rows,
    )


def test_a_deep_model_charts_its_largest_layers_and_tables_them_all() -> None:
    report = _synthetic(MAX_BARS + 12)
    page = Page(render_html(report))
    labels = [g["data-label"] for g in page.groups("params")]
    # The largest layers are the last ones here; the chart keeps model order.
    assert labels == [f"block{i}.conv" for i in range(12, MAX_BARS + 12)]
    assert f"The {MAX_BARS} largest of {MAX_BARS + 12} layers" in " ".join(page.text)
    assert len([a for a in page.all("tr") if "data-layer" in a]) == MAX_BARS + 12


def test_a_report_without_rules_has_one_series() -> None:
    report = dataclasses.replace(_synthetic(3), rules=[], after=None)
    page = Page(render_html(report))
    groups = page.groups("params")
    assert [int(g["data-before"]) for g in groups] == [100, 200, 300]
    assert all(g["data-after"] == "" for g in groups)
    assert not page.all("rect", **{"class": "bar before"})  # one series, drawn in the accent colour
    assert "fewer" not in " ".join(page.text)


def test_extra_sections_bring_their_own_charts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A section the report gains later (latency, say) charts itself through SECTION_CHARTS."""
    report = _synthetic(2)
    latency: dict[str, Any] = {"runs": [{"name": "onnxruntime", "before_ms": 4.5, "after_ms": 1.25}]}
    report.latency = latency  # type: ignore[attr-defined]

    def latency_charts(section: dict[str, Any]) -> list[Chart]:
        bars = [Bar(run["name"], run["before_ms"], run["after_ms"]) for run in section["runs"]]
        return [Chart("latency", "Latency", "ms", bars, integer=False)]

    monkeypatch.setitem(html_view.SECTION_CHARTS, "latency", latency_charts)
    page = Page(render_html(report))
    assert [a["data-chart"] for a in page.all("svg")] == ["params", "macs", "latency"]
    (group,) = page.groups("latency")
    assert (group["data-label"], float(group["data-before"]), float(group["data-after"])) == ("onnxruntime", 4.5, 1.25)


@pytest.mark.parametrize(
    ("largest", "ticks"),
    [
        (2_359_808, [0, 500_000, 1_000_000, 1_500_000, 2_000_000, 2_500_000]),
        (764_411_904, [0, 200e6, 400e6, 600e6, 800e6]),
        (0.93, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (7, [0, 2, 4, 6, 8]),
    ],
)
def test_axis_ticks_are_round_numbers(largest: float, ticks: list[float]) -> None:
    assert nice_ticks(largest) == pytest.approx(ticks)


def test_markdown_mermaid_chart_of_the_largest_layers() -> None:
    """The markdown view's Mermaid chart: the largest layers by parameters, before and after."""
    from convrewrite.report.views.markdown import MERMAID_LAYERS, mermaid_largest_layers

    report = _synthetic(MERMAID_LAYERS + 2)
    lines = mermaid_largest_layers(report)
    block = lines[lines.index("```mermaid") + 1 : lines.index("```", lines.index("```mermaid"))]
    assert block[1] == "xychart-beta horizontal"
    largest = [f'"block{i}.conv"' for i in range(MERMAID_LAYERS + 1, 1, -1)]
    assert block[3] == f"    x-axis [{', '.join(largest)}]"
    assert block[4] == '    y-axis "parameters" 0 --> 2000'  # 1,200 at most: the next 1, 2, 2.5 or 5 x 10^k
    assert block[5] == "    bar [" + ", ".join(str(100 * (i + 1)) for i in range(MERMAID_LAYERS + 1, 1, -1)) + "]"
    assert block[6] == "    bar [" + ", ".join(str(50 * (i + 1)) for i in range(MERMAID_LAYERS + 1, 1, -1)) + "]"
    without_rules = dataclasses.replace(_synthetic(2), rules=[], after=None)
    single = mermaid_largest_layers(without_rules)
    assert sum(line.startswith("    bar [") for line in single) == 1
    assert mermaid_largest_layers(dataclasses.replace(_synthetic(0), rules=[], after=None)) == []


def test_mermaid_labels_never_break_the_chart() -> None:
    from convrewrite.report.views.markdown import mermaid_largest_layers

    report = _synthetic(1)
    report.layers[0].name = 'odd "name"'
    (axis,) = [line for line in mermaid_largest_layers(report) if "x-axis" in line]
    assert axis == "    x-axis [\"odd 'name'\"]"


def test_the_users_metric_and_every_section_line_are_on_the_page() -> None:
    """evaluate()'s figures get a card each, and the page lists what the table view prints for
    the fitting, evaluation and distillation sections (built here from hand-written sections)."""
    report = _synthetic(2)
    report.sections["evaluation"] = {"original": {"accuracy": 0.9944, "f1": 0.99}, "result": {"accuracy": 0.9889}}
    report.sections["distillation"] = {
        "device": "cpu",
        "completed_steps": 1000,
        "best_step": 900,
        "loss": "kl",
        "total_seconds": 25.6,
        "initial": {"output_relative_error": 0.381, "top1_agreement": 0.9583},
        "best": {"output_relative_error": 0.273, "top1_agreement": 0.9931},
    }
    page = Page(render_html(report))
    cards = {a["data-total"]: a["data-value"] for a in page.all("div") if "data-total" in a}
    assert float(cards["eval:accuracy"]) == pytest.approx(0.9889)
    assert "eval:f1" not in cards  # no figure for the result: no card
    text = " ".join(" ".join(chunk.split()) for chunk in page.text)
    assert "Your metric: accuracy" in text and "original 0.9944" in text
    assert "evaluate() (your metric): accuracy 0.9944 -> 0.9889, f1 0.99 -> nan" in text
    assert "Distillation: 1,000 steps (kept step 900) of kl loss in 25.6 s on cpu" in text
    assert (
        "held out: before output error 0.381, agreement 0.9583 -> distilled output error 0.273, agreement 0.9931"
        in text
    )
    assert len(page.all("ul", **{"class": "measurements"})) == 1


def test_a_page_without_sections_has_no_measurements_list() -> None:
    page = Page(render_html(_synthetic(2)))
    assert not page.all("ul", **{"class": "measurements"})
    assert not [a for a in page.all("div") if a.get("data-total", "").startswith("eval:")]
