"""The ``interp`` group: info / plot / report, and the one-line error contract.

Two layers of tests: the plumbing runs against a small stand-in model (so it is tested
whatever state the core is in), and the end-to-end tests build a tiny random model from a
JSON config through ``interp.load_pretrained`` (skipped until the core provides it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import analyses.app.common as cli_mod
from analyses.app.cli import cli
from analyses.app.report import Section
from analyses.app.sections import SECTIONS, SectionSpec, load_topics


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr starting with 'error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- stand-in model


@dataclass(frozen=True)
class FakeConfig:
    n_layers: int = 2
    n_heads: int = 3
    d_model: int = 12
    positional: str = "rope"


class FakeModel:
    """Just enough of HookedTransformer for the CLI: cfg, hooks, tokens, a pattern cache."""

    cfg = FakeConfig()

    def __init__(self) -> None:
        names = ["hook_embed", "ln_final.hook_normalized"]
        for layer in range(self.cfg.n_layers):
            names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_pattern"]
        self.hook_dict = dict.fromkeys(names)

    def parameters(self):
        return [torch.zeros(10), torch.zeros(3, 4)]

    def to_str_tokens(self, text: str) -> list[str]:
        return ["<s>", *("Ġ" + w for w in text.split())]

    def to_tokens(self, text: str) -> torch.Tensor:
        return torch.arange(len(self.to_str_tokens(text)))[None]

    def run_with_cache(self, tokens: torch.Tensor, names_filter=None):
        n = tokens.shape[-1]
        causal = torch.tril(torch.ones(n, n))
        pattern = (causal / causal.sum(-1, keepdim=True)).expand(1, self.cfg.n_heads, n, n)
        cache = {("pattern", layer): pattern for layer in range(self.cfg.n_layers)}
        return None, cache


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeModel:
    model = FakeModel()
    monkeypatch.setattr(cli_mod, "load_model", lambda *a, **k: model)
    return model


@pytest.fixture
def fake_section(monkeypatch: pytest.MonkeyPatch):
    """Register a section 'fake' whose builder behaviour a test can choose."""
    load_topics()  # real topics register first, so our monkeypatched entry wins
    behaviour: dict = {"raise": None}

    def build(model, opts, progress) -> Section:
        assert {"batch_size", "max_tokens", "seed", "model_source", "quiet"} <= set(opts)
        steps = list(progress(range(3), desc="fake"))
        if behaviour["raise"] is not None:
            raise behaviour["raise"]
        return Section(
            key="fake", title="Fake analysis", method="Counting.", source="Nobody (2024).",
            data="Nothing.", findings=[f"{len(steps)} steps"],
            tables={"fake": pd.DataFrame({"x": [1, 2]})}, show_tables={"fake": 2},
        )

    monkeypatch.setitem(SECTIONS, "fake", SectionSpec("fake", "Fake analysis", build))
    return behaviour


# --------------------------------------------------------------------------- happy paths


def test_help_has_examples() -> None:
    for cmd in ([], ["info"], ["plot"], ["report"]):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0
        assert "Example:" in result.output
    assert {"info", "plot", "report"} <= set(cli.list_commands(click.Context(cli)))


def test_every_registered_command_has_an_example() -> None:
    """The contract for topic commands too: `interp X --help` shows an Example block."""
    names = cli.list_commands(click.Context(cli))
    missing = [n for n in names if "Example:" not in invoke(n, "--help").output]
    assert missing == []


def test_info(fake: FakeModel) -> None:
    result = invoke("info", "whatever")
    assert result.exit_code == 0, result.output
    assert "parameters  22" in result.output
    assert "positional" in result.output and "rope" in result.output
    assert "blocks.0.attn.hook_pattern" in result.output
    assert "blocks.1.attn.hook_pattern" not in result.output  # one layer only
    data = json.loads(invoke("info", "whatever", "--json").output)
    assert data["parameters"] == 22 and data["config"]["n_heads"] == 3
    assert data["hooks"]["layer_0"] == ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"]


@pytest.mark.parametrize(
    ("extra", "figure"),
    [(["--layer", "1", "--head", "2"], "pattern_L1H2"), (["--layer", "0"], "pattern_L0"),
     ([], "pattern_all")],
)
def test_plot(fake: FakeModel, tmp_path: Path, extra: list[str], figure: str) -> None:
    out = tmp_path / "plot"
    result = invoke("plot", "m", "--text", "The cat costs $5", "--out", out, "-q", *extra)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out.absolute())
    assert sorted(p.name for p in (out / "figures").iterdir()) == [f"{figure}.png"]
    table = pd.read_csv(out / "data" / "patterns.csv")
    assert list(table.columns) == ["layer", "head", "q", "k", "q_token", "k_token", "weight"]
    n_heads = 1 if "--head" in extra else 3
    n_layers = 1 if "--layer" in extra else 2
    assert len(table) == n_layers * n_heads * 5 * 5
    assert np.allclose(table.groupby(["layer", "head", "q"])["weight"].sum(), 1.0)
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("interp plot m --text")
    assert run["model"]["config"]["n_layers"] == 2


def test_plot_svg_and_force(fake: FakeModel, tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert invoke("plot", "--out", out, "-q", "--layer", "0", "--svg").exit_code == 0
    assert (out / "figures" / "pattern_L0.svg").exists()
    assert_user_error(invoke("plot", "--out", out, "-q"), "already exists", "--force")
    assert invoke("plot", "--out", out, "-q", "--force").exit_code == 0
    assert (out / "figures" / "pattern_all.png").exists()
    assert not (out / "figures" / "pattern_L0.svg").exists()


def test_report_with_registered_section(fake: FakeModel, fake_section, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    result = invoke("report", "m", "--only", "fake", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    md = (out / "index.md").read_text()
    assert "## Model: m" in md and "## Fake analysis" in md and "- 3 steps" in md
    assert (out / "data" / "fake.csv").exists() and (out / "data" / "model_config.csv").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["sections"] == ["model", "fake"]
    assert run["extra"]["sections_ran"] == {"fake": "m"}
    assert "build" in run["timings"]["fake"]


def test_report_list(fake_section) -> None:
    result = invoke("report", "--list")
    assert result.exit_code == 0 and "fake" in result.output


def test_report_skips_sections_that_do_not_apply(fake: FakeModel, fake_section,
                                                 monkeypatch, tmp_path: Path) -> None:
    spec = SECTIONS["fake"]
    monkeypatch.setitem(SECTIONS, "fake", SectionSpec("fake", spec.title, spec.build,
                                                      applies=lambda m: False))
    out = tmp_path / "rep"
    assert invoke("report", "m", "--only", "fake", "--out", out, "-q").exit_code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["sections"] == ["model"]
    assert run["extra"]["sections_skipped"] == {"fake": "does not apply to m"}


# --------------------------------------------------------------------------- bad input


def test_plot_layer_out_of_range(fake: FakeModel, tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert_user_error(invoke("plot", "--layer", "5", "--out", out), "layer 5", "2 layers")
    assert_user_error(invoke("plot", "--layer", "0", "--head", "9", "--out", out), "head 9")
    assert_user_error(invoke("plot", "--head", "1", "--out", out), "--layer")
    assert_user_error(invoke("plot", "--text", "  ", "--out", out), "empty")
    assert not out.exists()


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    assert_user_error(invoke("plot", "--layer", "x"), "--layer")
    assert_user_error(invoke("plot", "--dtype", "int8"), "--dtype")
    assert_user_error(invoke("nosuchcommand"), "nosuchcommand")
    assert_user_error(invoke("report", "--only", "nosuchsection", "--out", tmp_path / "r"),
                      "nosuchsection")


def test_missing_model_file(tmp_path: Path) -> None:
    result = invoke("info", tmp_path / "nope.json")
    assert_user_error(result, "not found", "nope.json")


def test_unwritable_out(fake: FakeModel, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_user_error(invoke("plot", "--out", blocker / "rep"), "cannot write")
    assert_user_error(invoke("plot", "--out", blocker), "is a file")


def test_errors_inside_a_command(fake: FakeModel, fake_section, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    fake_section["raise"] = ValueError("the corpus is empty\nsecond line")
    assert_user_error(invoke("report", "--only", "fake", "--out", out, "-q"),
                      "the corpus is empty; second line")
    fake_section["raise"] = FileNotFoundError(2, "No such file or directory", "/x/corpus.conllu")
    assert_user_error(invoke("report", "--only", "fake", "--out", out, "-q"),
                      "No such file or directory: /x/corpus.conllu")
    assert not out.exists()


def test_interrupt_leaves_nothing(fake: FakeModel, fake_section, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    fake_section["raise"] = KeyboardInterrupt()
    result = invoke("report", "--only", "fake", "--out", out, "-q")
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_real_bugs_keep_their_traceback(fake: FakeModel, fake_section, tmp_path: Path) -> None:
    """Only user errors are flattened; a programming error must stay debuggable."""
    fake_section["raise"] = ZeroDivisionError("bug")
    result = invoke("report", "--only", "fake", "--out", tmp_path / "r", "-q")
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


# --------------------------------------------------------------------------- the real core


def _model_class_ready() -> bool:
    try:
        import interp

        return hasattr(interp, "build_model") and hasattr(interp, "ModelConfig")
    except ImportError:
        return False


@pytest.mark.skipif(not _model_class_ready(), reason="interp.build_model not available yet")
def test_plot_and_info_on_a_real_random_model(monkeypatch, tmp_path: Path) -> None:
    """The real HookedTransformer (no tokenizer: the text goes in as UTF-8 bytes)."""
    import interp

    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=300, n_ctx=64)
    model = interp.build_model(cfg).eval()
    monkeypatch.setattr(cli_mod, "load_model", lambda *a, **k: model)
    result = invoke("info", "random")
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn.hook_pattern" in result.output
    out = tmp_path / "p"
    result = invoke("plot", "random", "--text", "abcab", "--layer", "1", "--head", "3",
                    "--out", out, "-q")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "data" / "patterns.csv", keep_default_na=False)
    assert len(table) == 25 and set(table["q_token"]) == {"a", "b", "c"}
    assert np.allclose(table.groupby("q")["weight"].sum(), 1.0, atol=1e-5)
    assert table.query("k > q")["weight"].abs().max() < 1e-6  # causal
    assert "UTF-8 bytes" in (out / "index.md").read_text()



def _core_ready() -> bool:
    try:
        import interp
        from interp.loading import load_pretrained  # noqa: F401  (interp's delegates to it)

        return hasattr(interp, "load_pretrained") and hasattr(interp, "ModelConfig")
    except ImportError:
        return False


core = pytest.mark.skipif(not _core_ready(), reason="interp.load_pretrained not available yet")


@pytest.fixture
def tiny_json(tmp_path: Path) -> Path:
    cfg = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_vocab": 300, "n_ctx": 64}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


@core
def test_real_info(tiny_json: Path) -> None:
    result = invoke("info", tiny_json)
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn.hook_pattern" in result.output
    assert "n_layers" in result.output


@core
def test_real_plot_and_report(tiny_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "plot"
    result = invoke("plot", tiny_json, "--text", "the cat sat", "--layer", "1", "--out", out,
                    "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (out / "figures" / "pattern_L1.png").exists()
    assert_user_error(invoke("plot", tiny_json, "--layer", "2", "--out", tmp_path / "x"),
                      "layer 2")
    rep = tmp_path / "rep"
    result = invoke("report", tiny_json, "--only", "fake", "--out", rep, "-q", "--device", "cpu") \
        if "fake" in SECTIONS else invoke("report", tiny_json, "--out", rep, "-q",
                                          "--device", "cpu", "--max-tokens", "64")
    assert result.exit_code == 0, result.output
    assert (rep / "index.html").exists()


@core
def test_real_unknown_model_name() -> None:
    assert_user_error(invoke("info", "no-such-model-name"))


@core
def test_real_bad_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_layers": 2, "d_model": 30, "n_heads": 4}))
    assert_user_error(invoke("info", bad))


REPO = Path(__file__).resolve().parent.parent


def _machine_paths_in(folder: Path, *paths: Path) -> list[str]:
    """Each (text file, path) where a written text file names one of ``paths``."""
    hits = []
    for f in sorted(folder.rglob("*")):
        if f.suffix in (".md", ".html", ".json", ".csv", ".svg"):
            text = f.read_text(encoding="utf-8")
            hits += [f"{f.relative_to(folder)}: {p}" for p in paths if str(p) in text]
    return hits


@core
def test_reports_carry_no_machine_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17 item 8: absolute --out, model and data paths never reach a report's text.

    The model lies outside the working directory (shown by its file name), --out and the
    text file inside it (shown relative to it); the packaged MiniLM's folder (inside the
    installed package, recorded in its config) is shown relative to site-packages."""
    work, elsewhere = tmp_path / "work", tmp_path / "models"
    work.mkdir()
    elsewhere.mkdir()
    model = elsewhere / "tiny.json"
    model.write_text(json.dumps({"n_layers": 2, "d_model": 32, "n_heads": 4, "d_vocab": 300,
                                 "n_ctx": 64}))
    text = work / "sample.txt"
    text.write_text("the cat sat on the mat\nthe dog sat on the log\n")
    monkeypatch.chdir(work)
    runs = [
        ("report", model, "--max-tokens", "64"),
        ("plot", model, "--text", "the cat sat", "--layer", "1"),
        ("heads", "minilm", "--text", text, "--max-tokens", "64", "--n-random", "2"),
    ]
    for i, (command, *args) in enumerate(runs):
        out = work / "reports" / f"r{i}"
        result = invoke(command, *args, "--out", out, "-q", "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert _machine_paths_in(out, tmp_path, REPO) == []
        run = json.loads((out / "run.json").read_text())
        assert f"reports/r{i}" in run["command"]
    run = json.loads((work / "reports" / "r0" / "run.json").read_text())
    assert run["model"]["source"] == "tiny.json" and run["title"] == "interp report: tiny.json"
