#!/usr/bin/env bash
# README command 1: install dependencies, build, and run the miniature
# replication of the paper (`moecpt study`, recipe recipes/study/mini.toml):
# pre-train dense, Switch and Granular MoEs (Z+Aux and Sinkhorn routers) on
# English, continue pre-training them on German with and without replay, with
# re-warm/re-decay and with the infinite schedule, train the full re-training
# reference, analyse the routers, and write runs/study/report.html.
# The study prepares the tokenizer and shards itself when they are missing.
# Re-running skips finished arms and resumes an interrupted one.
# Extra arguments go to `moecpt study` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
export OMP_WAIT_POLICY=PASSIVE
start=$(date +%s)
./build/moecpt study "$@"   # defaults: --recipe recipes/study/mini.toml --out runs/study
echo "moecpt: study took $(( $(date +%s) - start )) s; report: runs/study/report.html (or the --out given)" >&2
