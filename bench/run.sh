#!/usr/bin/env bash
# moecpt vs PyTorch eager on the same training step of the mini models, side by
# side in one run: for each round and model, the C++ benchmark and then the
# Python one, each in its own process (so peak RSS is that model's own).
# Writes bench/results/<date>-cpu.json and prints the ratios.
#
#   bench/run.sh [build-dir]        (default: build; the binary must be built
#                                    with -DMOECPT_BUILD_BENCH=ON)
# Environment: ROUNDS (2), STEPS (10 timed steps), THREADS (all cores), BATCH (recipe's).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
BIN=$BUILD/bench/moecpt_bench_train
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-10}
THREADS=${THREADS:-$(nproc)}
BATCH=${BATCH:-0}
MODELS=(dense switch-aux granular-aux granular-sinkhorn)
export OMP_WAIT_POLICY=PASSIVE  # busy-waiting OpenMP made steps 2.4x slower on 2 cores
[ -x "$BIN" ] || { echo "error: $BIN not built (configure with -DMOECPT_BUILD_BENCH=ON)" >&2; exit 1; }

mkdir -p bench/results
RAW=$(mktemp)
trap 'rm -f "$RAW"' EXIT
for round in $(seq 1 "$ROUNDS"); do
  for model in "${MODELS[@]}"; do
    echo "round $round: $model (moecpt)" >&2
    MOECPT_BENCH_THREADS="$THREADS" MOECPT_BENCH_STEPS="$STEPS" MOECPT_BENCH_BATCH="$BATCH" \
        "$BIN" --benchmark_filter="^train_step/$model/" --benchmark_format=json \
      | /usr/bin/python3 -c 'import json,sys; b=json.load(sys.stdin)["benchmarks"][0]; print(json.dumps({"impl":"moecpt","model":sys.argv[1],"round":int(sys.argv[2]),"step_ms":b["real_time"],"tokens_per_s":b["tokens_per_s"],"peak_rss_mib":b["peak_rss_mib"],"threads":b["threads"],"batch_tokens":b["batch_tokens"],"loss":b["loss"]}))' "$model" "$round" >>"$RAW"
    echo "round $round: $model (pytorch eager)" >&2
    /usr/bin/python3 bench/pytorch_eager.py "$model" --threads "$THREADS" --steps "$STEPS" --batch "$BATCH" \
      | /usr/bin/python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$round" >>"$RAW"
  done
done

OUT=bench/results/$(date +%Y-%m-%d)-cpu.json
/usr/bin/python3 - "$RAW" "$OUT" <<'PY'
import json, platform, statistics, subprocess, sys
import torch
raw, out = sys.argv[1], sys.argv[2]
runs = [json.loads(l) for l in open(raw)]
def med(impl, model, key):
    return statistics.median(r[key] for r in runs if r["impl"] == impl and r["model"] == model)
models = sorted({r["model"] for r in runs}, key=["dense", "switch-aux", "granular-aux", "granular-sinkhorn"].index)
summary = {}
for m in models:
    summary[m] = {impl: {k: med(impl, m, k) for k in ("tokens_per_s", "step_ms", "peak_rss_mib")}
                  for impl in ("moecpt", "pytorch_eager")}
    summary[m]["moecpt_over_pytorch_tokens_per_s"] = summary[m]["moecpt"]["tokens_per_s"] / summary[m]["pytorch_eager"]["tokens_per_s"]
for m in models:
    for impl in ("moecpt", "pytorch_eager"):
        summary[m][impl]["step_over_dense"] = summary[m][impl]["step_ms"] / summary["dense"][impl]["step_ms"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
machine = {"cpu": cpu, "cores": len([l for l in open("/proc/cpuinfo") if l.startswith("processor")]),
           "kernel": platform.release(), "torch_python": torch.__version__,
           "threads": runs[0]["threads"], "batch_tokens": runs[0]["batch_tokens"]}
json.dump({"machine": machine, "summary": summary, "runs": runs}, open(out, "w"), indent=2)
print(f"machine: {cpu}, {machine['cores']} cores, {machine['threads']} threads, batch {machine['batch_tokens']} tokens")
print(f"{'model':20s} {'moecpt tok/s':>13s} {'eager tok/s':>12s} {'ratio':>6s} {'moecpt ms':>10s} {'eager ms':>9s} "
      f"{'moecpt/dense':>12s} {'eager/dense':>11s} {'RSS MiB (m/e)':>14s}")
for m in models:
    s = summary[m]; a, b = s["moecpt"], s["pytorch_eager"]
    print(f"{m:20s} {a['tokens_per_s']:13.0f} {b['tokens_per_s']:12.0f} {s['moecpt_over_pytorch_tokens_per_s']:6.2f} "
          f"{a['step_ms']:10.1f} {b['step_ms']:9.1f} {a['step_over_dense']:12.2f} {b['step_over_dense']:11.2f} "
          f"{a['peak_rss_mib']:7.0f}/{b['peak_rss_mib']:.0f}")
print(f"wrote {out}")
PY
