#!/usr/bin/env bash
# README command 1: install dependencies, build, prepare the shipped corpora and
# run the miniature continual-pre-training job: pre-train a Granular MoE on
# English, then continue pre-training on German with 40 % English replay and a
# re-warmed cosine, and print forgetting / adaptation / routing imbalance.
# Re-running skips finished phases. Outputs: runs/quickstart/{pt,cpt}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
export OMP_WAIT_POLICY=PASSIVE
M=./build/moecpt
[ -f data/tokenizer/moecpt.model ] || $M data tokenizer train --config recipes/data/corpora.toml
[ -f data/shards/code/val.bin ] || $M data prepare --config recipes/data/corpora.toml
for phase in pt cpt; do
  out=runs/quickstart/$phase
  if [ -f "$out/summary.json" ]; then
    echo "moecpt: $out already finished (delete it to re-run)" >&2
  else
    $M train --config recipes/quickstart/$phase.toml --resume "$@"
  fi
done
