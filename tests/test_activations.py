"""Activations streamed to disk: ``interp.write_activations``, ``interp activations`` and
``interp.ActivationStore`` (issue 21): real tokens only, values equal to a direct run, shards
readable one by one, shuffled reading, and a resumed run byte-identical to an uninterrupted
one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import interp
from analyses.app import common
from analyses.app.cli import cli
from interp.tokenize import encode

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]


def _model() -> interp.HookedTransformer:
    torch.manual_seed(0)
    cfg = interp.ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=256, n_ctx=64)
    return interp.HookedTransformer(cfg).eval()


def _texts(n: int = 30) -> list[str]:
    return [("" if i % 11 == 5 else f"doc {i}: " + "abc xyz " * (1 + i % 9)) for i in range(n)]


@pytest.fixture
def model() -> interp.HookedTransformer:
    return _model()


def test_rows_are_real_tokens_with_their_values(model, tmp_path: Path) -> None:
    texts = _texts()
    meta = interp.write_activations(model, texts, HOOKS, tmp_path, seq_len=24,
                                    batch_tokens=150, shard_tokens=100)
    real = sum(len(encode(model, t)) for t in texts if t.strip())
    store = interp.ActivationStore(tmp_path)
    assert meta["complete"] and store.complete and store.n_tokens == real
    assert sum(store.shard(i)["doc"].shape[0] for i in range(len(store.shards))) == real
    assert all(s["n_tokens"] == 100 for s in meta["shards"][:-1])
    shard = store.shard(len(store.shards) // 2)
    assert shard["blocks.1.attn.hook_z"].shape[1:] == (4, 8)
    for row in (0, 37, shard["doc"].shape[0] - 1):
        doc, pos = int(shard["doc"][row]), int(shard["pos"][row])
        ids = encode(model, texts[doc])
        start = pos - pos % 24
        _, cache = model.run_with_cache(torch.tensor([ids[start:start + 24]]))
        assert int(shard["token"][row]) == ids[pos]
        for h in HOOKS:
            torch.testing.assert_close(shard[h][row], cache[h][0, pos - start])


def test_shuffled_batches_cover_every_row_once_and_repeat_by_seed(model, tmp_path) -> None:
    interp.write_activations(model, _texts(), HOOKS[:1], tmp_path, seq_len=24,
                             batch_tokens=150, shard_tokens=64)
    store = interp.ActivationStore(tmp_path)
    keys = [(int(d), int(p)) for i in range(len(store.shards))
            for d, p in zip(store.shard(i)["doc"], store.shard(i)["pos"], strict=True)]

    def order(seed: int, shuffle: bool = True) -> list[tuple[int, int]]:
        out = []
        for b in store.batches(50, shuffle=shuffle, seed=seed):
            assert b[HOOKS[0]].shape == (b["doc"].shape[0], 32)
            out += [(int(d), int(p)) for d, p in zip(b["doc"], b["pos"], strict=True)]
        return out

    assert order(0, shuffle=False) == keys
    assert sorted(order(3)) == sorted(keys) and len(set(keys)) == len(keys)
    assert order(3) == order(3) and order(3) != order(4) and order(3) != keys


def _cli(tmp_path: Path, monkeypatch, out: Path, *extra: str):
    monkeypatch.setattr(common, "load_model", lambda *a, **k: _model())
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(_texts(60)) + "\n")
    args = ["activations", "tiny", "--hooks", ",".join(HOOKS), "--corpus", str(corpus),
            "--out", str(out), "--seq-len", "32", "--batch-tokens", "200",
            "--shard-tokens", "150", *extra]
    return CliRunner().invoke(cli, args)


def test_resumed_run_is_byte_identical(tmp_path: Path, monkeypatch) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    r = _cli(tmp_path, monkeypatch, whole)
    assert r.exit_code == 0, r.output
    r = _cli(tmp_path, monkeypatch, parts, "--max-shards", "3")
    assert r.exit_code == 0 and "incomplete" in r.output, r.output
    index = json.loads((parts / "index.json").read_text())
    assert len(index["shards"]) == 3 and not index["complete"]
    assert interp.ActivationStore(parts).shard(2)["doc"].shape[0] == 150  # readable already
    (parts / "shard_00003.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    r = _cli(tmp_path, monkeypatch, parts, "--max-shards", "2")
    r = _cli(tmp_path, monkeypatch, parts)
    assert r.exit_code == 0 and "complete" in r.output, r.output
    files = sorted(p.name for p in whole.iterdir())
    assert files == sorted(p.name for p in parts.iterdir()) and len(files) > 6
    for name in files:
        assert (whole / name).read_bytes() == (parts / name).read_bytes(), name


def test_bad_input_is_one_line(tmp_path: Path, monkeypatch, model) -> None:
    out = tmp_path / "a"
    assert _cli(tmp_path, monkeypatch, out, "--max-shards", "1").exit_code == 0
    (tmp_path / "corpus.txt").write_text("another corpus\n")
    r = _cli(tmp_path, monkeypatch, out)
    assert r.exit_code == 2 and "different run" in r.output
    with pytest.raises(interp.InterpError, match="closest"):
        interp.write_activations(model, ["x"], ["blocks.0.hook_resid_pots"], tmp_path / "b")
    with pytest.raises(interp.InterpError, match="not one row per token"):
        interp.write_activations(model, ["x"], ["blocks.0.attn.hook_pattern"], tmp_path / "b")
    with pytest.raises(interp.InterpError, match="no index.json"):
        interp.ActivationStore(tmp_path / "nowhere")


_KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import interp
from test_activations import HOOKS, _model, _texts
m = _model()
m.blocks[0].hook_resid_pre.add_hook(lambda t, hook: time.sleep(0.2))  # slow enough to kill
interp.write_activations(m, _texts(60), HOOKS, {out!r}, seq_len=32, batch_tokens=200,
                         shard_tokens=150)
"""


@pytest.mark.slow  # a second interpreter and a deliberately slowed run: ~20 s
def test_run_killed_by_sigkill_resumes_byte_identical(tmp_path: Path, model) -> None:
    """A real kill (SIGKILL, whatever it was writing) between or inside shards."""
    import os
    import signal
    import subprocess
    import sys
    import time

    kw = {"seq_len": 32, "batch_tokens": 200, "shard_tokens": 150}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    interp.write_activations(model, _texts(60), HOOKS, whole, **kw)
    code = _KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(killed))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        index = killed / "index.json"
        if index.exists() and len(json.loads(index.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((killed / "index.json").read_text())["complete"]
    interp.write_activations(_model(), _texts(60), HOOKS, killed, **kw)
    files = sorted(p.name for p in whole.iterdir())
    assert files == sorted(p.name for p in killed.iterdir())
    for name in files:
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
