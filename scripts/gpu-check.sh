#!/usr/bin/env bash
# One bounded check of the GPU path on a CUDA machine with PyTorch installed
# (docs/performance.md "GPU"). In order, each step under `timeout`, skipped when
# the remaining budget is too small (most important first):
#   1. nvidia-smi, PyTorch / CUDA versions
#   2. configure against the LibTorch of python3's torch, build `moecpt`
#   3. `moecpt bench train` on recipes/paper/{granular-sinkhorn,dense}.toml,
#      --device cuda --dtype bfloat16 (fused AdamW, grouped expert GEMMs)
#   4. A/B: Granular with the Sinkhorn kernel (MOECPT_SINKHORN_KERNEL=1) and
#      with the MoE combine kernel (MOECPT_MOE_COMBINE=kernel), neither measured
#      yet; session 7's changes (measured in session 8): dense with the composite RoPE ops
#      (MOECPT_FUSED_ROPE=0), dense with bf16 logits cast to fp32 in the head
#      (MOECPT_HEAD_FP32_MM=0), Granular with the index_add MoE combine
#      (MOECPT_MOE_COMBINE=index_add); Granular and dense with the bf16 residual
#      stream (run.residual_dtype = "bfloat16"); Granular with LibTorch's AdamW
#      loop (MOECPT_FUSED_ADAMW=0) and with activation checkpointing at twice
#      the batch
#   5. one profiled step each of dense and Granular-Sinkhorn (`--profile`:
#      GPU time per op from CUDA events)
#   6. the PyTorch eager peer (bench/pytorch_eager.py --device cuda) on dense
#      and Granular-Sinkhorn, same batch (when eager's Granular runs out of
#      memory: both sides again at half the batch)
#   7. `moecpt bench moe-layer` (both expert-GEMM paths, compared); the other
#      MoE recipes; the per-expert loop (ALL_LOOPS=1 for all); accumulation 4
#   8. the test suite (built in the background since step 2, niced) run with
#      what is left (ctest -j16 --timeout 120); the failed tests are rerun with
#      their output ($OUT/tests-failed.log)
# Results: $OUT/results.jsonl (one JSON object per bench run, tagged), logs
# $OUT/run.log (this output), $OUT/build.log, $OUT/build-tests.log, $OUT/tests.log.
#
# Dependencies the machine may lack (toml++, CLI11, nlohmann-json, GoogleTest,
# sentencepiece) are taken from third_party_local/ when it exists: copies of the
# Debian packages' headers, libraries and CMake files, made on the dev machine
# with `scripts/gpu-check.sh --stage-deps` (the folder is git-ignored).
#
#   OUT=/tmp/out BUDGET_S=470 BATCH=8 STEPS=8 LAYERS=0 EXTRA=1 SKIP_TESTS=0 OPENMP=ON scripts/gpu-check.sh
# (EXTRA=0 skips step 7, which repeats what the first GPU run measured; AB=1 runs
# only the A/B block below instead of 3-7: the switches written without a GPU,
# all on against the defaults, then the GPU tests, a profile and each switch
# left out, in phases (AB_PHASES); TESTS_REGEX limits the tests (ctest -R);
# DRY_RUN=1 logs the plan without a GPU on a virtual clock (DRY_RUN_S per run);
# CUDA_KERNELS=OFF builds without moecpt's CUDA kernels; PROFILE_ROWS=N prints N
# rows of each profile.)
# (OPENMP=OFF: build moecpt's CPU kernels without OpenMP, if the wheel's own
# libgomp and the system's ever clash.)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TP=$ROOT/third_party_local

if [ "${1:-}" = "--stage-deps" ]; then  # on the Debian dev machine
  set -e
  mkdir -p "$TP/include" "$TP/lib/x86_64-linux-gnu/cmake" "$TP/share/cmake"
  cp -r /usr/include/toml++ /usr/include/CLI /usr/include/nlohmann /usr/include/gtest /usr/include/gmock \
        /usr/include/sentencepiece_processor.h /usr/include/sentencepiece_trainer.h "$TP/include/"
  cp -a /usr/lib/x86_64-linux-gnu/libsentencepiece* /usr/lib/x86_64-linux-gnu/libgtest* \
        /usr/lib/x86_64-linux-gnu/libgmock* "$TP/lib/x86_64-linux-gnu/"
  cp -r /usr/share/cmake/CLI11 /usr/share/cmake/nlohmann_json "$TP/share/cmake/"
  cp -r /usr/lib/x86_64-linux-gnu/cmake/GTest "$TP/lib/x86_64-linux-gnu/cmake/"
  du -sh "$TP"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
BUDGET_S=${BUDGET_S:-470}
BUILD=${BUILD:-build-gpu}
BATCH=${BATCH:-8}
STEPS=${STEPS:-8}
LAYERS=${LAYERS:-0}  # 0 = the recipes' 24
JOBS=${JOBS:-$(nproc)}
T0=$(date +%s)
# DRY_RUN=1: no GPU, no build, no benchmark: every step is logged as it would
# run, each run "takes" DRY_RUN_S seconds (the build DRY_BUILD_S) of a virtual
# clock, so the log shows which arms a budget leaves out (tests/test_gpu_check.cpp).
DRY_RUN=${DRY_RUN:-0}
FAKE_S=0
elapsed() { echo $(( $(date +%s) - T0 + FAKE_S )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
log() { echo "[gpu-check +$(elapsed)s] $*"; }

if [ "$DRY_RUN" = 1 ]; then
  log "1-2. dry run: no machine check, no build"
  FAKE_S=$(( FAKE_S + ${DRY_BUILD_S:-105} ))
  BIN=$BUILD/moecpt
  TESTS_BUILD=dry
  echo "rc 0" >"$OUT/build-tests.log"
else
log "1. machine"
nvidia-smi || { log "no nvidia-smi: not a GPU machine"; exit 1; }
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))'
TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
g++ --version | head -1; cmake --version | head -1; ninja --version
for h in toml++/toml.h CLI/CLI.hpp nlohmann/json.hpp gtest/gtest.h sentencepiece_processor.h; do
  [ -e /usr/include/$h ] && echo "system has $h" || echo "system lacks $h"
done

log "2. configure + build moecpt"
PREFIX="$TORCH_PREFIX"
EXTRA=()
if [ -d "$TP" ]; then
  PREFIX="$TORCH_PREFIX;$TP"
  SPM=$TP/lib/x86_64-linux-gnu
  EXTRA+=(-DSENTENCEPIECE_LIB=$SPM/libsentencepiece.so -DSENTENCEPIECE_TRAIN_LIB=$SPM/libsentencepiece_train.so
          -DSENTENCEPIECE_INCLUDE_DIR=$TP/include -DMOECPT_TOMLPP_INCLUDE_DIR=$TP/include)
elif [ ! -e /usr/include/gtest/gtest.h ]; then
  EXTRA+=(-DMOECPT_BUILD_TESTS=OFF)  # no GoogleTest: the benchmarks only
fi
timeout 120 cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOECPT_USE_CCACHE=OFF \
  -DMOECPT_BUILD_BENCH=OFF -DMOECPT_CUDA_KERNELS="${CUDA_KERNELS:-ON}" -DMOECPT_OPENMP="${OPENMP:-ON}" -DCMAKE_PREFIX_PATH="$PREFIX" "${EXTRA[@]}" >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; log "configure FAILED"; exit 2; }
grep -E "toml\+\+|Found Torch|CUDA" "$OUT/build.log" | head -5
# -k 0: on failure, every file's errors in one go (a fresh machine per try is costly)
if ! timeout 330 cmake --build "$BUILD" -j"$JOBS" --target moecpt -- -k 0 >>"$OUT/build.log" 2>&1; then
  grep -E "error|FAILED:" "$OUT/build.log" | head -60; tail -20 "$OUT/build.log"
  # moecpt's own CUDA kernels are the part no CI machine compiles: without
  # them the rest still builds and runs (their ATen fallbacks).
  if grep -q "moecpt CUDA kernels: ON" "$OUT/build.log"; then
    log "build FAILED with moecpt's CUDA kernels; again without them (MOECPT_CUDA_KERNELS=OFF)"
    cmake -S . -B "$BUILD" -DMOECPT_CUDA_KERNELS=OFF >>"$OUT/build.log" 2>&1
    timeout 330 cmake --build "$BUILD" -j"$JOBS" --target moecpt -- -k 0 >>"$OUT/build.log" 2>&1 \
      || { grep -E "error:|FAILED:" "$OUT/build.log" | tail -40; log "build of moecpt FAILED"; exit 3; }
  else
    log "build of moecpt FAILED"; exit 3
  fi
fi
grep -E "moecpt CUDA kernels" "$OUT/build.log" | tail -1
log "moecpt built"
BIN=$BUILD/moecpt
# The test suite builds in the background, niced, two cores left to the
# benchmarks' host threads (their timings are GPU-bound); step 8 waits for it.
TESTS_BUILD=none
if [ "${SKIP_TESTS:-0}" != 1 ] && [ -d "$TP" -o -e /usr/include/gtest/gtest.h ]; then
  ( nice -n 19 timeout $(( $(left) - 60 )) cmake --build "$BUILD" -j$(( JOBS > 4 ? JOBS - 2 : 1 )) \
      --target moecpt_tests -- -k 0 >"$OUT/build-tests.log" 2>&1
    echo "rc $?" >>"$OUT/build-tests.log" ) &
  TESTS_BUILD=$!
fi
fi  # DRY_RUN

# One run: tag, timeout, command (its stdout ends with one JSON object). Appends
# {"tag":…, "result":{…}} or {"tag":…, "error":…, "rc":…} to results.jsonl and
# prints a one-line summary.
record() {
  local tag=$1 limit=$2; shift 2
  if [ "$(left)" -lt $(( limit / 2 )) ]; then log "skip $tag (budget)"; return; fi
  local t=$(( limit < $(left) ? limit : $(left) ))
  log "run $tag: $*"
  if [ "$DRY_RUN" = 1 ]; then
    FAKE_S=$(( FAKE_S + ${DRY_RUN_S:-25} ))
    printf '{"tag": "%s", "result": {"dry_run": true, "step_ms": {"median": 100.0}, "mfu": 0.2, "final_loss": 4.0}}\n' \
      "$tag" >>"$OUT/results.jsonl"
    return
  fi
  if timeout "$t" "$@" >"$OUT/cur.json" 2>"$OUT/cur.err"; then
    python3 - "$tag" "$OUT/cur.json" >>"$OUT/results.jsonl" <<'PY'
import json, sys
text = open(sys.argv[2]).read().strip()
try:
    r = json.loads(text)
except json.JSONDecodeError:  # the eager script prints one line, maybe after warnings
    r = json.loads(text.splitlines()[-1])
print(json.dumps({"tag": sys.argv[1], "result": r}))
if r.get("impl") == "pytorch_eager":
    print(f"  eager: {r['n_layers']} layers, {r['batch_tokens']} tokens: {r['step_ms']:.1f} ms/step, "
          f"{r['tokens_per_s']:.0f} tok/s, GPU peak {r['gpu_peak_allocated_mib']:.0f} MiB, loss {r['loss']:.3f}",
          file=sys.stderr)
elif "tokens_per_s" in r:
    e = r.get("expert_gemm", {})
    print(f"  {r['model']['n_layers']} layers, batch {r['batch_sequences']}x{r['model']['seq_len']}: "
          f"{r['step_ms']['median']:.1f} ms/step (host {r.get('host_ms_per_step', {}).get('median', -1):.1f}), "
          f"{r['tokens_per_s']:.0f} tok/s, {r['tflops']:.1f} TFLOP/s, "
          f"MFU {100*r['mfu']:.1f}% of {r['peak_tflops']:.0f}"
          + (f" ({100*r['mfu_without_optimizer']:.1f}% without the optimizer's "
             f"{r['optimizer_ms']['median']:.1f} ms)" if r.get('mfu_without_optimizer') else "")
          + f"; experts {e.get('path')}, combine {r.get('moe_combine')}, sinkhorn kernel {r.get('sinkhorn_kernel')}, "
          f"graph {r.get('cuda_graph', {}).get('enabled')}, q/k {r.get('qkv_layout')}, "
          f"rmsnorm {r.get('rms_norm')}, add+rmsnorm {r.get('add_rms_norm')}, cast cache {r.get('cast_cache', {}).get('on')}; "
          f"GPU mem {r.get('gpu_memory_used_mib')} MiB; loss {r['final_loss']:.3f}", file=sys.stderr)
else:
    print(json.dumps(r, indent=1), file=sys.stderr)
PY
  else
    local rc=$?
    tail -5 "$OUT/cur.err"
    python3 -c 'import json,sys; print(json.dumps({"tag": sys.argv[1], "error": open(sys.argv[2]).read()[-2000:], "rc": int(sys.argv[3])}))' \
      "$tag" "$OUT/cur.err" "$rc" >>"$OUT/results.jsonl"
    log "$tag failed (rc $rc)"
  fi
  rm -f "$OUT/cur.json" "$OUT/cur.err"
}
# moecpt's benchmarks, and the peer: the same model as idiomatic PyTorch eager
# code (bench/pytorch_eager.py: bf16 autocast, SDPA, fused AdamW; MoE experts
# one matmul each), same batch.
bench() { local tag=$1 limit=$2; shift 2; record "$tag" "$limit" "$BIN" "$@" --json; }
# The same with environment assignments first: bench_env TAG LIMIT VAR=VALUE… -- ARGS…
bench_env() {
  local tag=$1 limit=$2 envs=(); shift 2
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  record "$tag" "$limit" env "${envs[@]}" "$BIN" "$@" --json
}
eager() { local tag=$1 limit=$2; shift 2; record "$tag" "$limit" python3 bench/pytorch_eager.py "$@"; }

# The A/B arms side by side: per tag without its "-<round>" suffix, the median
# step over the rounds, and its difference to its model's baseline arm (the
# first tag of its model: granular-sinkhorn, dense). Also each arm's final loss
# against the baseline's: the same seed and data, so a switch that computes
# something else shows here (bf16 runs agree to ~1e-3, not to the bit).
print_ab() {
python3 - "$OUT/results.jsonl" <<'PY'
import json, re, statistics, sys
arms = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    res = r.get("result", {})
    if "step_ms" not in res or "profile" in res: continue
    m = re.fullmatch(r"(.*)-(\d+)", r["tag"])
    if m: arms.setdefault(m.group(1), []).append(res)
bases = {}
for tag in arms: bases.setdefault(tag.split("-")[0], tag)
print("  A/B, median over rounds (vs each model's first arm, a leave-one-out arm vs its model's 'all' arm;")
print("  loss: the last step's, vs the reference arm's):")
for tag, xs in arms.items():
    model = tag.split("-")[0]
    base = model + "-all" if "-all-but-" in tag and model + "-all" in arms else bases[model]
    ms = statistics.median(x["step_ms"]["median"] for x in xs)
    mfu = statistics.median(x["mfu"] for x in xs)
    loss = statistics.median(x["final_loss"] for x in xs)
    b = statistics.median(x["step_ms"]["median"] for x in arms[base])
    bl = statistics.median(x["final_loss"] for x in arms[base])
    rel = "" if tag == base else f"  {ms - b:+7.1f} ms ({ms / b:.3f}x)  loss {loss - bl:+.4f}  vs {base}"
    print(f"    {tag:44s} {len(xs)} run(s) {ms:8.1f} ms  MFU {100 * mfu:5.1f}%  loss {loss:.4f}{rel}")
# What the leave-one-out arms say about each switch as a default: slower by more
# than 1 % without it, and "all" keeping the defaults' loss (within 0.01).
med = lambda tag, key: statistics.median(x[key]["median"] if key == "step_ms" else x[key] for x in arms[tag])
for model, base in bases.items():
    if model + "-all" not in arms: continue
    all_ms, all_loss = med(model + "-all", "step_ms"), med(model + "-all", "final_loss")
    loss_ok = abs(all_loss - med(base, "final_loss")) < 0.01
    print(f"  {model}: all switches {all_ms:.1f} ms vs {med(base, 'step_ms'):.1f} ms with the defaults; loss "
          + ("agrees" if loss_ok else "DIFFERS: check the tests before making any switch a default"))
    for tag in arms:
        if not tag.startswith(model + "-all-but-"): continue
        d = med(tag, "step_ms") - all_ms
        verdict = ("a default candidate" if loss_ok else "faster, but the loss differs") if d > 0.01 * all_ms else \
                  "slower: keep it off" if d < -0.01 * all_ms else "within 1 %: no evidence either way"
        print(f"    {tag[len(model) + 9:]:28s} worth {d:+7.1f} ms in 'all': {verdict}")
PY
}

print_profiles() {
python3 - "$OUT/results.jsonl" <<'PY'
import json, os, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    p = r.get("result", {}).get("profile")
    if not p: continue
    t = p.get("time_split")
    if t:
        c = t.get("mfu_ceiling_matmul_attention")
        print(f"  {r['tag']}: matmuls {t['matmul_ms']:.1f} ms, attention {t['attention_ms']:.1f} ms, the rest "
              f"{t['other_ms']:.1f} ms" + (f"; MFU ceiling {100 * c:.1f}%" if c else ""))
    print(f"  {r['tag']}: {p['device_ms']:.1f} ms GPU; top ops by GPU self time:")
    for o in p["ops"][:int(os.environ.get("PROFILE_ROWS", "15"))]:
        name = (o['op'] + ' ' + o.get('shapes', '')).strip()
        print(f"    {name[:70]:70s} {o['calls']:6d} {o['device_self_ms']:9.2f} ms")
PY
}
LFLAG=(); [ "$LAYERS" -gt 0 ] && LFLAG=(--layers "$LAYERS")
COMMON=(--device cuda --dtype bfloat16 --batch "$BATCH" --steps "$STEPS" --warmup 2 "${LFLAG[@]}")
G=recipes/paper/granular-sinkhorn.toml
# The test suite (built in the background since step 2), at most $1 seconds
# (default: what is left); once per call. Failed tests are rerun with output.
TESTS_DONE=0
run_tests() {
  local cap=${1:-$(left)}
  [ "$TESTS_DONE" = 1 ] && return
  if [ "${SKIP_TESTS:-0}" = 1 ]; then log "skipped the test suite (SKIP_TESTS=1)"; TESTS_DONE=1; return; fi
  if [ "$TESTS_BUILD" = none ]; then log "skipped the test suite (no GoogleTest)"; TESTS_DONE=1; return; fi
  if [ "$(left)" -le 60 ]; then log "skipped the test suite (budget)"; return; fi
  # wait for the background build, at most half the cap
  local until=$(( $(elapsed) + cap / 2 ))
  while ! grep -q "^rc " "$OUT/build-tests.log" 2>/dev/null && [ "$(elapsed)" -lt "$until" ]; do sleep 2; done
  if ! grep -q "^rc " "$OUT/build-tests.log" 2>/dev/null; then log "the tests are still building: later"; return; fi
  TESTS_DONE=1
  if ! tail -1 "$OUT/build-tests.log" | grep -q "^rc 0$"; then
    grep -E "error:|FAILED:" "$OUT/build-tests.log" | head -30; tail -2 "$OUT/build-tests.log"
    log "test build failed or ran out of time"
    return
  fi
  local t=$(( cap < $(left) - 5 ? cap : $(left) - 5 ))
  TR=(); [ -n "${TESTS_REGEX:-}" ] && TR=(-R "$TESTS_REGEX")
  log "tests built; running ctest ${TR[*]:-(all)} (at most ${t}s)"
  if [ "$DRY_RUN" = 1 ]; then FAKE_S=$(( FAKE_S + t / 2 )); return; fi
  timeout "$t" ctest --test-dir "$BUILD" -j"$JOBS" --timeout 120 "${TR[@]}" >"$OUT/tests.log" 2>&1
  local rc=$?
  log "ctest rc $rc"
  grep -E "tests passed|tests failed|\*\*\*Failed|Timeout|Not Run" "$OUT/tests.log" | head -30
  if [ "$rc" != 0 ] && [ "$(left)" -gt 30 ]; then
    timeout $(( $(left) - 10 )) ctest --test-dir "$BUILD" --rerun-failed --output-on-failure --timeout 120 \
      >"$OUT/tests-failed.log" 2>&1
    tail -c 6000 "$OUT/tests-failed.log"
  fi
}

if [ "${AB:-0}" = 1 ]; then
  # What was written without a GPU (sessions 8-13) against the defaults, most
  # important first, each phase skipped when the budget is short (sections 3-7
  # are not run). The switches, all opt-in until measured:
  #   MOECPT_SINKHORN_KERNEL=1     the Sinkhorn router as one kernel, its stopping
  #                                test on the device (no host sync per layer)
  #   MOECPT_MOE_COMBINE=kernel    the MoE combine and the dispatch's backward as
  #                                moecpt's kernels
  #   MOECPT_SLOT_SORT_KERNEL=1    the MoE slot order as a counting sort
  #   MOECPT_QKV_LAYOUT=seq_major  q and k written seq-major, so cuDNN's output
  #                                needs no copy for the out-projection
  #   MOECPT_RMSNORM_KERNEL=1      RMSNorm forward and backward as moecpt's kernels
  #   MOECPT_ADD_RMSNORM_KERNEL=1  the residual adds fused into those kernels
  # and --cuda-graph (each micro-batch replayed as a CUDA graph; the Granular
  # model needs the Sinkhorn kernel for it). With --accum > 1 the weights' bf16
  # copies are kept across a step's micro-batches (default; MOECPT_CAST_CACHE=0).
  # Phases (AB_PHASES picks, e.g. "4 5" for a second call on a warm machine):
  #   1. defaults vs all switches on ("all"), eager and as CUDA graphs, Granular and dense
  #   2. "all" with 4 micro-batches per step, with and without the cast cache
  #   3. the GPU tests (TESTS_REGEX), at most 120 s
  #   4. one profiled step of Granular "all" by shapes
  #   5. each switch left out of "all" in turn: what it is worth where it would be the default
  #   6. phase 1 again (a second round for the medians)
  # (Measured in session 8: MOECPT_CUDA_KERNELS=0, MOECPT_MOE_COMBINE=index_add,
  # run.residual_dtype=bfloat16.)
  D=recipes/paper/dense.toml
  GG=(--config $G "${COMMON[@]}" --expert-gemm grouped)
  DD=(--config $D "${COMMON[@]}")
  DENSE_ALL=(MOECPT_QKV_LAYOUT=seq_major MOECPT_RMSNORM_KERNEL=1 MOECPT_ADD_RMSNORM_KERNEL=1)
  ALL=(MOECPT_SINKHORN_KERNEL=1 MOECPT_MOE_COMBINE=kernel MOECPT_SLOT_SORT_KERNEL=1 "${DENSE_ALL[@]}")
  PHASES=" ${AB_PHASES:-1 2 3 4 5 6} "
  phase() { [[ "$PHASES" == *" $1 "* ]]; }
  core_round() {
    bench granular-sinkhorn-$1 60 bench train "${GG[@]}"
    bench_env granular-all-$1 60 "${ALL[@]}" -- bench train "${GG[@]}"
    bench_env granular-all-graph-$1 75 "${ALL[@]}" -- bench train "${GG[@]}" --cuda-graph
    bench dense-$1 45 bench train "${DD[@]}"
    bench_env dense-all-$1 45 "${DENSE_ALL[@]}" -- bench train "${DD[@]}"
    bench_env dense-all-graph-$1 60 "${DENSE_ALL[@]}" -- bench train "${DD[@]}" --cuda-graph
  }
  # "MOECPT_SINKHORN_KERNEL=1" -> "sinkhorn-kernel"
  arm_name() { local n=${1%%=*}; n=${n#MOECPT_}; n=${n,,}; echo "${n//_/-}"; }
  # the arguments but $1
  all_but() { local s=$1 t; shift; for t in "$@"; do [ "$t" != "$s" ] && echo "$t"; done; }
  if phase 1; then log "A/B 1: defaults vs all switches, eager and as CUDA graphs"; core_round 1; fi
  if phase 2; then
    log "A/B 2: all switches, 4 micro-batches per step"
    bench_env granular-all-accum4 90 "${ALL[@]}" -- bench train "${GG[@]}" --accum 4
    bench_env granular-all-accum4-no-cast-cache 90 "${ALL[@]}" MOECPT_CAST_CACHE=0 -- bench train "${GG[@]}" --accum 4
  fi
  if phase 3; then log "A/B 3: the GPU tests"; run_tests 120; fi
  if phase 4; then
    log "A/B 4: one profiled Granular step, all switches"
    bench_env granular-all-profile 60 "${ALL[@]}" -- bench train --config $G --device cuda --dtype bfloat16 \
      --batch "$BATCH" --steps 1 --warmup 2 "${LFLAG[@]}" --expert-gemm grouped --profile 60 --profile-shapes
  fi
  if phase 5; then
    log "A/B 5: each switch left out of all"
    for sw in "${ALL[@]}"; do
      mapfile -t rest < <(all_but "$sw" "${ALL[@]}")
      bench_env "granular-all-but-$(arm_name "$sw")-1" 60 "${rest[@]}" -- bench train "${GG[@]}"
    done
    for sw in "${DENSE_ALL[@]}"; do
      mapfile -t rest < <(all_but "$sw" "${DENSE_ALL[@]}")
      bench_env "dense-all-but-$(arm_name "$sw")-1" 45 "${rest[@]}" -- bench train "${DD[@]}"
    done
  fi
  if phase 6; then
    if [ "$(left)" -ge 200 ]; then log "A/B 6: phase 1 again"; core_round 2; else log "skip A/B 6 (budget)"; fi
  fi
  print_ab
  print_profiles
else
log "3. training steps, paper recipes, bf16"
bench granular-sinkhorn-grouped 90 bench train --config $G "${COMMON[@]}" --expert-gemm grouped
bench dense 90 bench train --config recipes/paper/dense.toml "${COMMON[@]}"
log "4. A/B: RoPE, MoE combine, bf16 residual stream, optimizer; activation checkpointing at twice the batch"
MOECPT_SINKHORN_KERNEL=1 bench granular-sinkhorn-grouped-sinkhorn-kernel 90 bench train --config $G "${COMMON[@]}" \
  --expert-gemm grouped
MOECPT_FUSED_ROPE=0 bench dense-composite-rope 90 bench train --config recipes/paper/dense.toml "${COMMON[@]}"
MOECPT_HEAD_FP32_MM=0 bench dense-head-bf16-logits 90 bench train --config recipes/paper/dense.toml "${COMMON[@]}"
MOECPT_MOE_COMBINE=kernel bench granular-sinkhorn-grouped-combine-kernel 90 bench train --config $G "${COMMON[@]}" \
  --expert-gemm grouped
MOECPT_MOE_COMBINE=index_add bench granular-sinkhorn-grouped-index-add 90 bench train --config $G "${COMMON[@]}" \
  --expert-gemm grouped
bench granular-sinkhorn-grouped-bf16-residual 90 bench train --config $G "${COMMON[@]}" --expert-gemm grouped \
  --set run.residual_dtype=bfloat16
bench dense-bf16-residual 60 bench train --config recipes/paper/dense.toml "${COMMON[@]}" \
  --set run.residual_dtype=bfloat16
MOECPT_FUSED_ADAMW=0 bench granular-sinkhorn-grouped-adamw-loop 90 bench train --config $G "${COMMON[@]}" \
  --expert-gemm grouped
bench granular-sinkhorn-grouped-ac-b2x 120 bench train --config $G --device cuda --dtype bfloat16 \
  --batch $((BATCH * 2)) --steps "$STEPS" --warmup 2 "${LFLAG[@]}" --expert-gemm grouped \
  --set train.activation_checkpointing=full
log "5. one profiled step (GPU time per op)"
bench dense-profile 75 bench train --config recipes/paper/dense.toml --device cuda --dtype bfloat16 \
  --batch "$BATCH" --steps 1 --warmup 2 "${LFLAG[@]}" --profile 60 --profile-shapes
bench granular-sinkhorn-profile 75 bench train --config $G --device cuda --dtype bfloat16 \
  --batch "$BATCH" --steps 1 --warmup 2 "${LFLAG[@]}" --expert-gemm grouped --profile 40
print_profiles
log "6. the PyTorch eager peer, same models and batch"
EAGER=(--recipes paper --device cuda --bf16 --batch "$BATCH" --steps 3 --warmup 2 --layers "${LAYERS/#0/24}")
eager eager-dense 90 dense "${EAGER[@]}"
eager eager-granular-sinkhorn 120 granular-sinkhorn "${EAGER[@]}"
# Eager's Granular model ran out of memory at batch 8 (full fp32 logits): then
# both sides at half the batch, for a Granular ratio on the same batch.
if [ "$BATCH" -ge 2 ] && grep -q '"tag": "eager-granular-sinkhorn", "error"' "$OUT/results.jsonl" 2>/dev/null; then
  HB=$((BATCH / 2))
  eager eager-granular-sinkhorn-b$HB 90 granular-sinkhorn --recipes paper --device cuda --bf16 --batch $HB --steps 3 \
    --warmup 2 --layers "${LAYERS/#0/24}"
  bench granular-sinkhorn-grouped-b$HB 60 bench train --config $G --device cuda --dtype bfloat16 --batch $HB \
    --steps "$STEPS" --warmup 2 "${LFLAG[@]}" --expert-gemm grouped
fi
if [ "${EXTRA:-1}" = 1 ]; then
log "7. one MoE layer (both expert-GEMM paths); the other recipes"
bench moe-layer-granular 60 bench moe-layer --config $G --device cuda --tokens $((BATCH * 2048)) --reps 10
bench granular-aux-grouped 90 bench train --config recipes/paper/granular-aux.toml "${COMMON[@]}" --expert-gemm grouped
bench switch-aux-grouped 90 bench train --config recipes/paper/switch-aux.toml "${COMMON[@]}" --expert-gemm grouped
bench granular-sinkhorn-loop 90 bench train --config $G "${COMMON[@]}" --expert-gemm loop
# The optimizer and clip once per 4 micro-batches (gradient accumulation, as the
# paper's 1024-sequence steps would run): MFU without most of their share.
bench granular-sinkhorn-grouped-accum4 90 bench train --config $G "${COMMON[@]}" --expert-gemm grouped --accum 4
if [ "${ALL_LOOPS:-0}" = 1 ]; then
  bench moe-layer-switch 45 bench moe-layer --config recipes/paper/switch-aux.toml --device cuda \
    --tokens $((BATCH * 2048)) --reps 10
  bench granular-aux-loop 90 bench train --config recipes/paper/granular-aux.toml "${COMMON[@]}" --expert-gemm loop
  bench switch-aux-loop 90 bench train --config recipes/paper/switch-aux.toml "${COMMON[@]}" --expert-gemm loop
fi
else
  log "7. skipped (EXTRA=0)"
fi
fi  # AB
log "8. test suite (CPU maths) with what is left: $(left)s"
run_tests
log "done"
