#!/usr/bin/env bash
# Build the libFuzzer targets (clang, ASan+UBSan, build-fuzz/) and run each for
# a bounded time from its seed corpus fuzz/corpus/<target>/.
#   scripts/fuzz.sh [seconds-per-target] [target...]
# Default 60 s per target; targets default to all that were built. New
# coverage-increasing inputs go to build-fuzz/corpus/<target>/ (not committed);
# crashing inputs to build-fuzz/crashes/<target>/. Exit status 1 if any target
# crashed. Copy a crash you fixed to fuzz/regressions/<target>/ so that
# tests/test_hostile_inputs.cpp keeps checking it. See docs/robustness.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-60}"
shift || true
BUILD=build-fuzz
CXX="${CXX:-clang++}"
command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found (apt-get install clang)" >&2; exit 2; }
if [ ! -f "$BUILD/build.ninja" ]; then
  CXX="$CXX" cmake -S . -B "$BUILD" -G Ninja -DMOECPT_FUZZ=ON >/dev/null
fi
cmake --build "$BUILD" -j"$(nproc)" >/dev/null
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for t in safetensors shard config documents tokenizer tasks; do
    [ -x "$BUILD/fuzz_$t" ] && targets+=("$t")
  done
fi
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
status=0
printf '%-12s %12s %8s %8s %s\n' target executions exec/s corpus result
for t in "${targets[@]}"; do
  work="$BUILD/corpus/$t" crashes="$BUILD/crashes/$t"
  mkdir -p "$work" "$crashes"
  log="$BUILD/fuzz_$t.log"
  set +e
  # -rss_limit_mb: a reader that allocates what a hostile header claims fails here.
  "$BUILD/fuzz_$t" "$work" "fuzz/corpus/$t" -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -artifact_prefix="$crashes/" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  size=$(ls "$work" | wc -l)
  if [ $rc -eq 0 ]; then result=ok; else result="CRASH (rc $rc): $(ls -t "$crashes" | head -1), see $log"; status=1; fi
  printf '%-12s %12s %8s %8s %s\n' "$t" "$execs" "$rate" "$size" "$result"
done
exit $status
