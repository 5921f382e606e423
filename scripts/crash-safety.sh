#!/usr/bin/env bash
# Crash-safety check: SIGKILL `moecpt train` at random moments, resume each
# time, and compare with an uninterrupted run (bit-identical final weights and
# per-step losses; every checkpoint directory complete and loadable after every
# kill). The logic lives in tests/test_crash_safety.cpp; this script runs it
# with more kills and steps than the ctest entry (10 kills, 30 steps).
#   scripts/crash-safety.sh [kills] [steps] [seed]      (defaults: 50 200 random)
#   BUILD_DIR=build scripts/crash-safety.sh 20
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
BIN="$BUILD_DIR/tests/moecpt_tests"
[ -x "$BIN" ] || { echo "crash-safety.sh: $BIN not found; build first (scripts/build.sh, or set BUILD_DIR)" >&2; exit 2; }
export MOECPT_CRASH_KILLS="${1:-50}"
export MOECPT_CRASH_STEPS="${2:-200}"
[ -n "${3:-}" ] && export MOECPT_CRASH_SEED="$3"
exec "$BIN" --gtest_filter='CrashSafety.*' --gtest_brief=0
