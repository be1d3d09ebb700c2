"""The bench harness compares like with like: the four ways compute the same outputs (no timing
asserts). It lives in the checkout's bench/, outside the installed package; interp bench and
python -m bench both run it."""

from __future__ import annotations

import json
import os

import pytest
import torch

import bench


@pytest.fixture(scope="module")
def small_ways():
    hf, tok, folder = bench.build_hf("gpt2-small", small=True, seed=0)
    ways, notes = bench.build_ways(hf, tok, folder)
    return hf, ways, notes


def test_four_ways_compute_identical_outputs(small_ways):
    hf, ways, notes = small_ways
    assert {"transformers", "interp", "transformer_lens"} <= set(ways)
    tokens = torch.randint(
        0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    diffs = bench.check_equivalence(ways, tokens, atol=1e-4)
    for tool, by_workload in diffs.items():
        assert set(by_workload) >= {"no_hooks", "attn_mlp", "patterns"}, tool
        assert max(by_workload.values()) <= 1e-4
    if "nnsight" not in ways:  # an optional peer: skipped with a note, not an error
        assert any(n.startswith("nnsight") for n in notes)


def test_equivalence_check_catches_a_different_model(small_ways):
    hf, ways, _ = small_ways
    tokens = torch.randint(0, hf.config.vocab_size, (1, 6))
    model = ways["interp"].model
    with torch.no_grad():
        model.blocks[0].attn.o.weight.mul_(1.5)
    try:
        with pytest.raises(AssertionError, match="interp"):
            bench.check_equivalence(
                {"transformers": ways["transformers"], "interp": ways["interp"]}, tokens
            )
    finally:
        with torch.no_grad():
            model.blocks[0].attn.o.weight.div_(1.5)


def test_time_workload_reports_medians_and_ratios(small_ways):
    hf, ways, _ = small_ways
    tokens = torch.randint(0, hf.config.vocab_size, (1, 8))
    res = bench.time_workload(ways, "patterns", tokens, rounds=2, warmup=0)
    assert set(res["medians_s"]) >= {"transformers", "interp", "transformer_lens"}
    assert res["ratio_interp_vs_transformers"] > 0
    assert "ratio_interp_vs_transformer_lens" in res
    # the reference and every tool take every position: round 2 starts with round 1's second
    assert res["order"][1] == res["order"][0][1:] + res["order"][0][:1]
    assert sorted(res["order"][0]) == sorted([bench._REF, *res["medians_s"]])
    assert res["order"][0][0] == bench._REF and res["order"][1][-1] == bench._REF
    json.dumps(res)  # JSON-able


def test_table_names_a_failed_peer_instead_of_a_ratio():
    med = {"no_patterns": {"seconds": 1.0, "peak_mib": 700.0}}
    result = {
        "workloads": {
            "long_context": {
                "smollm2-135m": {
                    "transformers": med,
                    "transformer_lens": {"error": "killed by SIGKILL (out of memory?)"},
                    "interp": med,
                }
            }
        }
    }
    table = bench.format_table(result)
    assert "killed by SIGKILL (out of memory?)" in table and "TL failed; interp ran" in table
    assert "nan" not in table


def test_cli_rejects_unknown_workload():
    from click.testing import CliRunner

    from analyses.app.cli import cli

    r = CliRunner().invoke(cli, ["bench", "--workloads", "nope"])
    assert r.exit_code == 2
    assert "valid" in r.output and "Traceback" not in r.output


def test_isolated_worker_killed_by_a_signal_is_reported(monkeypatch):
    """A peak-memory worker the kernel kills (out of memory) is named as such, not as its last
    log line."""
    import subprocess

    monkeypatch.setattr(
        subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, -9, "", "Writing model shards: 100%"),
    )
    assert bench.run_isolated(
        {"model": "gpt2-small", "tool": "interp", "workload": "long_context"}
    ) == {"error": "killed by SIGKILL (out of memory?)"}
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "boom\nValueError: bad"),
    )
    assert bench.run_isolated(
        {"model": "gpt2-small", "tool": "interp", "workload": "long_context"}
    ) == {"error": "ValueError: bad"}


def test_equivalence_tolerance_scales_with_the_tensor():
    """Float32 rounding on a massive activation (SmolLM2's MLP outputs reach ~26,000) passes;
    a difference that is a real fraction of the tensor's scale does not."""
    big = torch.full((2, 3), 2.6e4)
    small = torch.full((2, 3), 0.5)

    def ways(delta_big: float, delta_small: float) -> dict[str, bench.Way]:
        ref = bench.Way("transformers", {"no_hooks": lambda t: [big, small]})
        tool = bench.Way("interp", {"no_hooks": lambda t: [big + delta_big, small + delta_small]})
        return {"transformers": ref, "interp": tool}

    got = bench.check_equivalence(ways(0.03, 0.0), torch.zeros(1, 1, dtype=torch.long), atol=1e-3)
    assert got["interp"]["no_hooks"] == pytest.approx(0.03, rel=0.05)
    with pytest.raises(AssertionError, match="tensor 0"):
        bench.check_equivalence(ways(30.0, 0.0), torch.zeros(1, 1, dtype=torch.long), atol=1e-3)
    with pytest.raises(AssertionError, match="tensor 1"):
        bench.check_equivalence(ways(0.0, 0.01), torch.zeros(1, 1, dtype=torch.long), atol=1e-3)


def test_cli_cpu_linear_switch_is_applied_and_recorded(monkeypatch, tmp_path):
    """`--cpu-linear aten` runs interp on F.linear (the peers' kernel) in this process and in the
    peak-memory workers (the environment), and the JSON records which kernel interp used."""
    from click.testing import CliRunner

    from analyses.app.cli import cli
    from interp.perf import kernels

    monkeypatch.setenv("INTERP_CPU_LINEAR", "onednn")  # restored after the test
    monkeypatch.setattr(kernels, "_enabled", kernels._enabled)
    seen = {}

    def fake_run_bench(**kw):
        seen["onednn"] = kernels.uses_onednn_linear()
        seen["env"] = os.environ["INTERP_CPU_LINEAR"]
        return {"machine": {}, "workloads": {}, "notes": []}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    out = tmp_path / "b.json"
    r = CliRunner().invoke(cli, ["bench", "--cpu-linear", "aten", "--json", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert seen == {"onednn": False, "env": "aten"}
    assert json.loads(out.read_text())["machine"]["interp_cpu_linear"] == "F.linear (MKL)"
    bad = CliRunner().invoke(cli, ["bench", "--cpu-linear", "mkl"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_cuda_timing_and_peak_use_events_and_device_memory(monkeypatch):
    """The CUDA branch (no GPU here): time comes from CUDA events, peak memory from PyTorch's
    device allocator stats minus what was allocated before the call, never from the process RSS."""
    calls: list[str] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing

        def record(self):
            calls.append("record")

        def elapsed_time(self, end):
            return 1500.0  # ms

    allocated = {"now": 100 * 2**20, "peak": 0}

    def fake_fn():
        calls.append("fn")
        allocated["peak"] = 612 * 2**20

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda *a: allocated.__setitem__("peak", 0)
    )
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: allocated["peak"])
    monkeypatch.setattr(
        bench.memory,
        "_status_kb",
        lambda *a: pytest.fail("the CUDA path must not read the process RSS"),
    )
    seconds, peak_mib = bench.measure_peak(fake_fn, "cuda")
    assert seconds == pytest.approx(1.5)
    assert peak_mib == pytest.approx(512.0)
    assert calls.index("fn") > calls.index("record") and calls[-1] == "sync"


def test_help_is_the_same_from_interp_and_python_m_bench():
    """`python -m bench --help` (from the repository root) and `interp bench --help` both work
    and show the same options: they are one click command, defined in bench/cli.py."""
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from analyses.app.cli import cli

    root = Path(bench.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: python -m bench [OPTIONS]")
    via_interp = CliRunner().invoke(cli, ["bench", "--help"])
    assert via_interp.exit_code == 0, via_interp.output
    assert via_interp.output.startswith("Usage: interp bench [OPTIONS]")
    # the same text after the usage line (wrapped to each one's terminal width)
    texts = (via_interp.output, r.stdout)
    body = ["".join(text.split("[OPTIONS]", 1)[1].split()) for text in texts]
    assert body[0] == body[1]
    for option in ("--models", "--workloads", "--cpu-linear", "--no-reuse-recorded-memory"):
        assert option in r.stdout


def test_interp_bench_without_a_checkout_says_where_to_get_it(tmp_path):
    """A wheel install has no bench/ beside analyses/: interp bench fails with one clear line."""
    from click.testing import CliRunner

    from analyses.app.cli import CliError
    from analyses.app.sections import bench as section

    with pytest.raises(CliError, match="ships with the source checkout"):
        section.bench_package(tmp_path)
    assert section.bench_package() is bench  # the checkout's package, imported once
    r = CliRunner().invoke(section.missing_command(), ["--rounds", "3"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "clone the repository" in lines[0]
