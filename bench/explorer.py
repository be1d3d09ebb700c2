"""The attention explorer's page size and open time on the two sizes of issue 25, plus the
README's screenshots.

- MiniLM (6-layer encoder, 12 heads) on the first 10 sentences of the packaged sample;
- SmolLM2-135M (30-layer decoder, 9 heads) on 3 texts cut to 64 tokens each.

Each page is built as ``interp explore`` builds it (patterns of every layer and head, the
head taxonomy on the same texts for the grid's colours), saved, and opened ``--opens`` times
in headless Chromium (:mod:`bench.browser`, networking off); open time is the page's own
``performance.now()`` when its script has drawn everything (navigation start to ready), so
no polling delay is counted. A benchmark, not a test: the numbers go to BENCHMARKS.md.

Usage (from the repository root)::

    python -m bench.explorer --json docs/bench_explorer.json --screenshots docs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.browser import CHROMIUM, Browser

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "analyses" / "data" / "sample_text.txt"


def _sentences() -> list[str]:
    return [line.strip() for line in SAMPLE.read_text(encoding="utf-8").splitlines()
            if line.strip()]


# name -> (model, texts, max tokens per text, head to show in the screenshot, token to hover)
CASES = {
    "minilm": ("minilm", lambda s: s[:10], None, (1, 8), 4),
    "smollm2": ("smollm2-135m", lambda s: [" ".join(s[i:i + 4]) for i in (0, 4, 8)], 64,
                (1, 0), 20),
}


def build_page(name: str, out: Path) -> dict:
    """Build one case's page (with its taxonomy labels) into ``out``; sizes and timings."""
    from analyses import explorer as X
    from analyses import heads as H
    from interp import load_pretrained
    from interp.viz.attention import head_infos

    source, pick, max_tokens, _, _ = CASES[name]
    texts = pick(_sentences())
    t0 = time.perf_counter()
    model = load_pretrained(source).eval()
    t_load = time.perf_counter() - t0
    view = X.explore(model, texts, max_tokens=max_tokens, model_name=source)
    t_patterns = time.perf_counter() - t0 - t_load
    res = H.analyze(model, texts=texts, n_random=16, batch_size=8)
    view.labels = head_infos(res.heads)
    t_taxonomy = time.perf_counter() - t0 - t_load - t_patterns
    path = view.save(out / f"explorer_{name}.html")
    return {"model": source, "layers": int(model.cfg.n_layers), "heads": int(model.cfg.n_heads),
            "texts": len(view.docs), "tokens": [len(d.tokens) for d in view.docs],
            "bytes": path.stat().st_size, "path": str(path), "seconds_patterns": t_patterns,
            "seconds_taxonomy": t_taxonomy}


def open_times(path: Path, opens: int, profile: Path, screenshot: Path | None,
               head: tuple[int, int], token: int) -> list[float]:
    """Open the page ``opens`` times; ms from navigation start to drawn, per open."""
    times = []
    height = 1700 if screenshot is not None else 1000
    with Browser(profile, width=1500, height=height) as b:
        for _ in range(opens):
            b.open(path.as_uri())
            times.append(float(b.eval("document.body.dataset.readyMs")))
        assert not b.errors(), b.errors()
        assert all(u.startswith(("file:", "data:")) for u in b.requests())
        if screenshot is not None:
            b.click(f"#thumb-{head[0]}-{head[1]}")
            b.hover(f"#tok-q-{token}")
            b.eval("window.scrollTo(0, 0)")
            b.screenshot(screenshot)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="folder for explorer_<case>.png")
    parser.add_argument("--opens", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    if CHROMIUM is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            r = build_page(name, Path(tmp))
            shot = args.screenshots / f"explorer_{name}.png" if args.screenshots else None
            _, _, _, head, token = CASES[name]
            ms = open_times(Path(r.pop("path")), args.opens, Path(tmp) / f"profile_{name}",
                            shot, head, token)
            r.update(open_ms=ms, open_ms_median=statistics.median(ms))
            results[name] = r
            print(f"{name}: {r['bytes'] / 1e6:.2f} MB, open {r['open_ms_median']:.0f} ms "
                  f"(median of {len(ms)}: {', '.join(f'{x:.0f}' for x in ms)})", flush=True)
    if args.json is not None:  # cases not run this time keep their earlier numbers
        old = json.loads(args.json.read_text(encoding="utf-8")) if args.json.exists() else {}
        args.json.write_text(json.dumps({**old, **results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
