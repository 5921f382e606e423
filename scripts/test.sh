#!/usr/bin/env bash
# README command 2: install dependencies, build, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
start=$(date +%s)
bash scripts/build.sh
echo "moecpt: build took $(( $(date +%s) - start )) s" >&2
export OMP_WAIT_POLICY=PASSIVE
cd build && ctest -j"$(nproc)" --output-on-failure --timeout 600
