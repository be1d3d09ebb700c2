"""Loading never runs code from a model folder (issue 24, security).

A Hugging Face folder can name Python files of its own in ``auto_map`` (``config.json`` for
the config and model classes, ``tokenizer_config.json`` for the tokenizer); transformers runs
them when asked to ``trust_remote_code``, and otherwise prompts "run the custom code? [y/N]"
on a terminal, or reads the answer from piped stdin. interp trusts nothing in a folder but
tensors and JSON: every public path must refuse such a folder with one line naming the file,
without a prompt and without running it, whatever stdin holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interp
from interp.errors import InterpError

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
"""


def _evil_folder(root: Path, where: str) -> tuple[Path, Path]:
    """A tiny GPT-2 folder whose ``where`` ("config", "model" or "tokenizer") auto_map names a
    Python file in the folder that writes a marker file when imported."""
    import transformers

    folder, marker = root / f"evil_{where}", root / f"ran_{where}"
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    code = EVIL.format(marker=str(marker))
    raw = json.loads((folder / "config.json").read_text())
    if where == "config":
        (folder / "configuration_evil.py").write_text(code)
        raw["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    elif where == "model":
        (folder / "modeling_evil.py").write_text(code)
        raw["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    else:
        (folder / "tokenization_evil.py").write_text(code)
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
                    "tokenizer_class": "EvilTokenizer",
                }
            )
        )
    (folder / "config.json").write_text(json.dumps(raw))
    return folder, marker


WHERE = ["config", "model", "tokenizer"]


@pytest.mark.parametrize("where", WHERE)
def test_python_load_refuses_folder_code(tmp_path: Path, where: str) -> None:
    folder, marker = _evil_folder(tmp_path, where)
    if where == "tokenizer":  # the folder's tokenizer exists only as code: refuse, naming it
        with pytest.raises(InterpError) as err:
            interp.load_pretrained(folder)
        msg = str(err.value)
        assert "auto_map" in msg and "tokenization_evil.py" in msg and "\n" not in msg, msg
    else:  # interp builds its own model from config.json's fields: the code is never needed
        model = interp.load_pretrained(folder)
        assert model.cfg.n_layers == 1
    assert not marker.exists(), "code from the model folder ran"


CLI_CALLS = [
    ["info", "{folder}"],
    ["plot", "{folder}", "--text", "a b c", "--layer", "0", "--out", "{out}"],
    ["heads", "{folder}", "--out", "{out}"],
]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("call", CLI_CALLS, ids=lambda c: c[0])
def test_cli_refuses_folder_code_with_piped_yes(
    tmp_path: Path, where: str, call: list[str]
) -> None:
    folder, marker = _evil_folder(tmp_path, where)
    args = [a.format(folder=folder, out=tmp_path / "out") for a in call]
    env = {**os.environ, "INTERP_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "analyses.app.cli", *args],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert not marker.exists(), "code from the model folder ran"
    out = proc.stdout + proc.stderr
    assert "[y/N]" not in out and "custom code" not in out
    assert "Traceback" not in proc.stderr
    if where == "tokenizer":
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error:") and "tokenization_evil.py" in lines[-1], proc.stderr
        assert not (tmp_path / "out").exists()
