"""index.html renders offline in a real browser and every image loads.

The report promises a page that opens from a USB stick on an air-gapped machine. A static
check (no http(s) src/href) catches remote resources; headless Chromium with every host
name unresolvable catches what a static check cannot (a broken data URI, a PNG the browser
rejects). The check script is injected into a copy of the page, never into the report.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses.app import plots
from analyses.app.report import Report, Section

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p and Path(p).exists()), None)

CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement("div");
  out.id = "img-check";
  out.textContent = `loaded=${ok} total=${imgs.length}`;
  document.body.appendChild(out);
});
</script>
"""


def build_report(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 8
    pat = np.tril(rng.random((4, n, n)))
    pat /= pat.sum(-1, keepdims=True)
    tokens = ["<s>", "ĠThe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "."]
    df = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                       "label": ["sink", "local", "sink", "induction"],
                       "confidence": [0.9, 0.5, 0.7, 0.8]})
    section = Section(
        key="heads", title="Heads", method="Scores.",
        source="Clark et al. (2019), [What Does BERT Look At?](https://arxiv.org/abs/1906.04341).",
        data="UD English EWT (CC BY-SA 4.0).", findings=["two sinks"],
        tables={"heads": df}, show_tables={"heads": 4},
        figures={
            "heads_pattern": plots.head_pattern(pat[0], tokens, title="L0H0"),
            "heads_grid": plots.head_grid(pat, tokens, layer=0, title="layer 0"),
            "heads_labels": plots.label_map(df),
        },
    )
    report = Report("render test", model_source="tiny.json", model_config={}, seed=0,
                    command="interp heads tiny.json")
    report.add(section)
    return report.write(tmp_path / "rep")


def test_no_remote_references(tmp_path: Path) -> None:
    html = (build_report(tmp_path) / "index.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', html)
    assert refs, "expected images and links"
    remote = [r for r in refs if re.match(r"^(?:[a-z]+:)?//", r, re.I)]
    assert remote == []
    assert all(r.startswith(("data:image/png;base64,", "#", "data/")) for r in refs), refs
    assert "@import" not in html and "url(" not in html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_images_load_in_headless_chromium(tmp_path: Path) -> None:
    report = build_report(tmp_path)
    html = (report / "index.html").read_text()
    n_images = html.count("<img ")
    assert n_images == 3
    probe = report / "probe.html"
    probe.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
        # Every host name fails to resolve: a remote image could not load even if present.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000", "--dump-dom", probe.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<div id="img-check">loaded=(\d+) total=(\d+)</div>', proc.stdout)
    assert match, f"no result from chromium (rc={proc.returncode}): {proc.stderr[-2000:]}"
    assert (int(match.group(1)), int(match.group(2))) == (n_images, n_images)
