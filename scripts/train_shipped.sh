#!/usr/bin/env bash
# Regenerate the small checkpoints shipped in interp/data/ (each <= 5 MB).
#
# Seeds are fixed here and recorded inside every file (ckpt["train"]["seed"], with the
# command line, the thread count, versions, training history and final metrics). Training
# is deterministic given seed, torch version and thread count, so the script pins one
# thread: rerunning it reproduces the files' weights exactly (on the same torch build).
#
# Usage: scripts/train_shipped.sh [NAME ...]    (default: all; names as in interp/data/NAME.pt)
set -euo pipefail
cd "$(dirname "$0")/.."
INTERP="${INTERP:-interp}"
if ! command -v "$INTERP" >/dev/null 2>&1; then INTERP=/work/venv/bin/interp; fi
OUT=interp/data
SEED=0
COMMON=(--seed "$SEED" --threads 1 --no-optimizer-state --force --quiet)

declare -A ARGS=(
  [induction]="induction"
  [induction_sinusoidal]="induction --positional sinusoidal"
  [induction_learned]="induction --positional learned"
  [induction_rope]="induction --positional rope"
  [induction_alibi]="induction --positional alibi"
  [knowledge]="knowledge"
  [domains_moe]="domains --config moe --n-experts 8 --top-k 2"
  [retrieval_knn]="retrieval --positional relative --config {\"memory_joint\":true,\"memory_topk\":32,\"layer_types\":[\"sliding\",\"global\"],\"sliding_window\":2}"
  [retrieval_xl]="retrieval --positional relative --steps 2000 --config {\"memory_kind\":\"xl\",\"mem_len\":16,\"cmem_len\":16,\"cmem_rate\":2,\"memory_layers\":null}"
  [offsets_span]="offsets --span-coef 0.3 --steps 1500"
  [induction_gates]="induction --prune interp/data/induction.pt --l0-coef 0.3 --lr 0.05 --steps 600"
)
ORDER=(induction induction_sinusoidal induction_learned induction_rope induction_alibi knowledge domains_moe
       offsets_span induction_gates)
ORDER+=(retrieval_knn)  # kNN on layer 1, layer 0 sees 2 tokens: a previous-token head (notes/memory.md)
ORDER+=(retrieval_xl)  # XL memory on every layer: layer 0 matches the key's token (notes/memory.md)
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=("${ORDER[@]}")

for name in "${NAMES[@]}"; do
  if [ -z "${ARGS[$name]+x}" ]; then echo "unknown checkpoint $name; valid: ${ORDER[*]}" >&2; exit 2; fi
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$INTERP" train ${ARGS[$name]} "${COMMON[@]}" --out "$OUT/$name.pt" >/dev/null
  end=$(date +%s)
  size=$(stat -c %s "$OUT/$name.pt")
  echo "$name: $((end - start)) s, $size bytes"
  if [ "$size" -gt 5242880 ]; then echo "$OUT/$name.pt is larger than 5 MB" >&2; exit 1; fi
done
