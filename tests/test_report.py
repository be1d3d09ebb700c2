"""The report writer: layout, atomicity, refusal, run.json, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses.app import plots
from analyses.app.report import Report, ReportError, Section, markdown_to_html


def make_section(key: str = "heads", *, with_figure: bool = True) -> Section:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "layer": np.repeat(np.arange(2), 3),
        "head": np.tile(np.arange(3), 2),
        "label": ["sink", "previous-token", "induction"] * 2,
        "confidence": rng.random(6),
    })
    figures = {f"{key}_labels": plots.label_map(df)} if with_figure else {}
    return Section(
        key=key,
        title=f"Section {key}",
        method="Per-head scores; **positional** when `share >= 0.9`.\n\n- one\n- two",
        source="Voita et al. (2019), [ACL](https://aclanthology.org/P19-1580).",
        data="UD English EWT (CC BY-SA 4.0).",
        findings=["3 heads are sinks", "mean confidence 0.5"],
        tables={key: df, f"{key}_by_layer": df.groupby("layer")[["confidence"]].mean()},
        figures=figures,
        show_tables={key: 4},
        timings={"build": 0.5},
    )


def make_report(*sections: Section) -> Report:
    report = Report("interp test", model_source="tiny.json",
                    model_config={"n_layers": 2, "n_heads": 3, "positions": ("rope", 0.5)},
                    seed=7, command=["interp", "heads", "tiny.json", "--seed", "7"],
                    extra={"note": "x"})
    for s in sections or (make_section(),):
        report.add(s)
    return report


def test_layout(tmp_path: Path) -> None:
    out = make_report().write(tmp_path / "rep")
    assert out == (tmp_path / "rep").absolute()
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert names == sorted([
        "data", "data/heads.csv", "data/heads_by_layer.csv", "figures",
        "figures/heads_labels.png", "index.html", "index.md", "run.json",
    ])
    assert (out / "figures/heads_labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "index.md").read_text()
    for needle in ("## Section heads", "### Method", "### Source", "### Data", "### Findings",
                   "- 3 heads are sinks", "figures/heads_labels.png", "data/heads.csv",
                   "UD English EWT (CC BY-SA 4.0)", "_first 4 of 6 rows_"):
        assert needle in md
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html
    assert "<strong>positional</strong>" in html and "<li>two</li>" in html
    # the index (layer) of a grouped frame is kept in the CSV
    assert (out / "data/heads_by_layer.csv").read_text().splitlines()[0] == "layer,confidence"
    # no leftovers of the temporary build folder
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_svg_option(tmp_path: Path) -> None:
    out = make_report().write(tmp_path / "rep", svg=True)
    assert (out / "figures/heads_labels.svg").read_text().lstrip().startswith("<?xml")


def test_html_self_contained(tmp_path: Path) -> None:
    html = (make_report().write(tmp_path / "rep") / "index.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html
    assert "aclanthology.org/P19-1580" in html  # the citation stays readable


def test_refuses_existing_folder_without_force(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ReportError, match="already exists; use --force") as info:
        make_report().write(out)
    assert "\n" not in str(info.value)
    assert (out / "keep.txt").read_text() == "old"
    make_report().write(out, force=True)
    assert not (out / "keep.txt").exists() and (out / "index.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error mid-write (here: while saving a figure) leaves neither a half report nor
    the temporary folder, and a previous report survives a failing --force run."""
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "save_figure", boom)
    with pytest.raises(KeyboardInterrupt):
        make_report().write(tmp_path / "rep")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    make_report().write(tmp_path / "rep")
    before = (tmp_path / "rep" / "index.md").read_text()
    monkeypatch.setattr(plots, "save_figure", boom)
    with pytest.raises(KeyboardInterrupt):
        make_report().write(tmp_path / "rep", force=True)
    assert (tmp_path / "rep" / "index.md").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]


def test_unwritable_parent_is_a_report_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ReportError, match="cannot write to"):
        make_report().write(blocker / "rep")


def test_run_json(tmp_path: Path) -> None:
    info = json.loads((make_report().write(tmp_path / "rep") / "run.json").read_text())
    for key in ("versions", "python", "platform", "model", "seed", "command", "timings",
                "date_utc"):
        assert key in info, key
    for pkg in ("torch", "transformers", "transformer_lens", "interp", "pandas", "numpy"):
        assert pkg in info["versions"]
    assert info["versions"]["pandas"] == pd.__version__
    assert info["model"] == {"source": "tiny.json",
                             "config": {"n_layers": 2, "n_heads": 3, "positions": ["rope", 0.5]}}
    assert info["seed"] == 7
    assert info["command"] == "interp heads tiny.json --seed 7"
    assert info["timings"] == {"heads": {"build": 0.5}}
    assert info["date_utc"].endswith("Z")
    assert info["extra"] == {"note": "x"}


def test_deterministic(tmp_path: Path) -> None:
    a = make_report(make_section()).write(tmp_path / "a", svg=True)
    b = make_report(make_section()).write(tmp_path / "b", svg=True)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "run.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_figures_closed_after_write(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    section = make_section(with_figure=False)
    section.figures["pyplot_fig"] = fig
    make_report(section).write(tmp_path / "rep")
    assert not plt.fignum_exists(fig.number)


@pytest.mark.parametrize("name", ["../evil", "a b", "", "x/y"])
def test_bad_names_rejected(name: str) -> None:
    section = make_section(with_figure=False)
    section.tables = {name: pd.DataFrame({"a": [1]})}
    section.show_tables = {}
    with pytest.raises(ReportError):
        make_report(section)


def test_duplicate_keys_and_tables_rejected() -> None:
    report = make_report(make_section("heads", with_figure=False))
    with pytest.raises(ReportError, match="share the key"):
        report.add(make_section("heads", with_figure=False))
    other = make_section("ffn", with_figure=False)
    other.tables["heads"] = pd.DataFrame({"a": [1]})
    with pytest.raises(ReportError, match="used by two sections"):
        report.add(other)


def test_show_unknown_table_rejected() -> None:
    section = make_section(with_figure=False)
    section.show_tables["nope"] = 3
    with pytest.raises(ReportError, match="nope"):
        make_report(section)


def test_markdown_subset() -> None:
    html = markdown_to_html(
        "# Head\n\nText with `a<b` and *em* and [local](data/x.csv).\n\n1. first\n2. second\n"
        "\n```\ncode <here>\n```"
    )
    assert "<h4>Head</h4>" in html
    assert "<code>a&lt;b</code>" in html and "<em>em</em>" in html
    assert '<a href="data/x.csv">local</a>' in html
    assert "<ol><li>first</li>" in html.replace("\n", "")
    assert "<pre><code>code &lt;here&gt;</code></pre>" in html
    assert "<script>" not in markdown_to_html("<script>alert(1)</script>")


def test_no_machine_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Absolute paths in the source, command and config are shown relative to the working
    directory when under it, else by their base name (issue 17 item 8)."""
    from analyses.app.paths import shown_argv, shown_path

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model, conllu = tmp_path / "models" / "tiny.json", work / "data" / "dev.conllu"
    assert shown_path(model) == "tiny.json" and shown_path(str(conllu)) == "data/dev.conllu"
    assert shown_path("minilm") == "minilm" and shown_path("../x.pt") == "../x.pt"
    assert shown_argv(["interp", f"--out={work / 'r'}", "--text", "/ not a path"]) == [
        "interp", "--out=r", "--text", "/ not a path"]
    report = Report("interp test", model_source=str(model),
                    model_config={"n_layers": 2, "extra": {"source": str(model.parent)}},
                    seed=0, command=["interp", "heads", str(model), "--conllu", str(conllu),
                                     "--out", str(work / "rep")])
    report.add(make_section())
    out = report.write(work / "rep")
    for name in ("index.md", "index.html", "run.json"):
        assert str(tmp_path) not in (out / name).read_text(), name
    info = json.loads((out / "run.json").read_text())
    assert info["command"] == "interp heads tiny.json --conllu data/dev.conllu --out rep"
    assert info["model"] == {"source": "tiny.json",
                             "config": {"n_layers": 2, "extra": {"source": "models"}}}
