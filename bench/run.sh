#!/usr/bin/env bash
# moecpt vs PyTorch eager on the same training step of the mini models, side by
# side in one run. Each round runs, for every model, in its own process (so peak
# RSS is that model's own), in this order:
#   moecpt         `moecpt bench train --config recipes/mini/<model>.toml --json`
#                  (fused head + CE, OpenBLAS at 1 thread, passive OpenMP)
#   eager          bench/pytorch_eager.py as a user runs it (OpenBLAS default threads)
#   eager_blas1    the same script with OPENBLAS_NUM_THREADS=1 (moecpt's thread setting)
#   moecpt_unfused (only if listed in IMPLS) moecpt with the unfused head, as an ablation
#   moecpt_glibc_malloc (only if listed) moecpt with MOECPT_KEEP_FREED_MEMORY=0: glibc's
#                  default of giving freed memory back to the OS (core/malloc_policy.h)
#   eager_keep_memory  the eager script with moecpt's malloc settings as GLIBC_TUNABLES
#                  (freed memory kept in the process), so the comparison is of the
#                  code, not of the allocator
# Rounds interleave the implementations, so load changes on this shared machine
# hit all of them; the summary takes medians over rounds and reports min–max.
# Writes bench/results/<date>-cpu[-bf16].json and prints the table.
#
#   bench/run.sh [build-dir]        (default: build)
# Environment: MOECPT_BIN (default <build-dir>/moecpt), ROUNDS (3), STEPS (8 timed steps), THREADS (all cores), BATCH (recipe's),
#              DTYPE (float32 | bfloat16: autocast on both sides, router fp32),
#              MODELS (default: dense switch-aux granular-aux granular-sinkhorn),
#              IMPLS (default: moecpt eager eager_blas1 eager_keep_memory).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
BIN=${MOECPT_BIN:-$BUILD/moecpt}  # any binary with the `bench train` command
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-8}
THREADS=${THREADS:-$(nproc)}
BATCH=${BATCH:-0}
DTYPE=${DTYPE:-float32}
read -r -a MODELS <<<"${MODELS:-dense switch-aux granular-aux granular-sinkhorn}"
read -r -a IMPLS <<<"${IMPLS:-moecpt eager eager_blas1 eager_keep_memory}"
# moecpt's malloc settings (core/malloc_policy.h) for the eager script
KEEP_MEMORY_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
export OMP_WAIT_POLICY=PASSIVE  # busy-waiting OpenMP made steps 2.4x slower on 2 cores
[ -x "$BIN" ] || { echo "error: $BIN not built" >&2; exit 1; }
EAGER_FLAGS=(--threads "$THREADS" --steps "$STEPS" --batch "$BATCH")
[ "$DTYPE" = bfloat16 ] && EAGER_FLAGS+=(--bf16)
BATCH_FLAG=(); [ "$BATCH" -gt 0 ] && BATCH_FLAG=(--batch "$BATCH")

# `moecpt bench train --json` → one row of the raw table
TO_ROW='import json,sys; b=json.load(sys.stdin); print(json.dumps({"impl":sys.argv[1],"model":sys.argv[2],"round":int(sys.argv[3]),"step_ms":b["step_ms"]["median"],"cpu_ms_per_step":b["cpu_ms_per_step"]["median"],"tokens_per_s":b["tokens_per_s"],"peak_rss_mib":b["peak_rss_mib"],"page_faults_per_step":b["page_faults_per_step"]["median"],"threads":b["threads"],"batch_tokens":b["tokens_per_step"],"loss":b["final_loss"],"dtype":b["dtype"]}))'
mkdir -p bench/results
RAW=$(mktemp)
trap 'rm -f "$RAW"' EXIT
for round in $(seq 1 "$ROUNDS"); do
  for model in "${MODELS[@]}"; do
    for impl in "${IMPLS[@]}"; do
      echo "round $round: $model ($impl)" >&2
      case $impl in
        moecpt)
          OPENBLAS_NUM_THREADS=1 "$BIN" bench train --config "recipes/mini/$model.toml" --steps "$STEPS" \
              --threads "$THREADS" --dtype "$DTYPE" "${BATCH_FLAG[@]}" --peak-tflops 1 --json \
            | /usr/bin/python3 -c "$TO_ROW" moecpt "$model" "$round" >>"$RAW" ;;
        moecpt_unfused)  # ablation: the trainer's logits + cross_entropy head
          OPENBLAS_NUM_THREADS=1 "$BIN" bench train --config "recipes/mini/$model.toml" --steps "$STEPS" \
              --threads "$THREADS" --dtype "$DTYPE" "${BATCH_FLAG[@]}" --peak-tflops 1 --unfused-head --json \
            | /usr/bin/python3 -c "$TO_ROW" moecpt_unfused "$model" "$round" >>"$RAW" ;;
        moecpt_glibc_malloc)  # ablation: freed memory back to the OS, as glibc does by default
          MOECPT_KEEP_FREED_MEMORY=0 OPENBLAS_NUM_THREADS=1 "$BIN" bench train --config "recipes/mini/$model.toml" --steps "$STEPS" \
              --threads "$THREADS" --dtype "$DTYPE" "${BATCH_FLAG[@]}" --peak-tflops 1 --json \
            | /usr/bin/python3 -c "$TO_ROW" moecpt_glibc_malloc "$model" "$round" >>"$RAW" ;;
        eager_keep_memory)
          GLIBC_TUNABLES=$KEEP_MEMORY_TUNABLES env -u OPENBLAS_NUM_THREADS /usr/bin/python3 bench/pytorch_eager.py "$model" "${EAGER_FLAGS[@]}" \
            | /usr/bin/python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); r["impl"]="eager_keep_memory"; print(json.dumps(r))' "$round" >>"$RAW" ;;
        eager)
          env -u OPENBLAS_NUM_THREADS /usr/bin/python3 bench/pytorch_eager.py "$model" "${EAGER_FLAGS[@]}" \
            | /usr/bin/python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$round" >>"$RAW" ;;
        eager_blas1)
          OPENBLAS_NUM_THREADS=1 /usr/bin/python3 bench/pytorch_eager.py "$model" "${EAGER_FLAGS[@]}" \
            | /usr/bin/python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); r["impl"]="eager_blas1"; print(json.dumps(r))' "$round" >>"$RAW" ;;
      esac
    done
  done
done

SUFFIX=""; [ "$DTYPE" = bfloat16 ] && SUFFIX="-bf16"
OUT=bench/results/$(date -u +%Y-%m-%dT%H%M)-cpu$SUFFIX.json
/usr/bin/python3 - "$RAW" "$OUT" "$DTYPE" <<'PY'
import json, os, platform, statistics, sys
import torch
raw, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
runs = [json.loads(l) for l in open(raw)]
for r in runs:
    if r["impl"] == "pytorch_eager":
        r["impl"] = "eager"
order = ["dense", "switch-aux", "granular-aux", "granular-sinkhorn"]
models = sorted({r["model"] for r in runs}, key=lambda m: order.index(m) if m in order else 99)
impls = [i for i in ("moecpt", "moecpt_unfused", "moecpt_glibc_malloc", "eager", "eager_blas1", "eager_keep_memory")
         if any(r["impl"] == i for r in runs)]
def vals(impl, model, key):
    return [r[key] for r in runs if r["impl"] == impl and r["model"] == model]
summary = {}
for m in models:
    summary[m] = {}
    for i in impls:
        summary[m][i] = {k: statistics.median(vals(i, m, k))
                         for k in ("tokens_per_s", "step_ms", "cpu_ms_per_step", "peak_rss_mib", "page_faults_per_step")}
        summary[m][i]["cpu_ms_min"] = min(vals(i, m, "cpu_ms_per_step"))
        summary[m][i]["cpu_ms_max"] = max(vals(i, m, "cpu_ms_per_step"))
        summary[m][i]["step_ms_min"] = min(vals(i, m, "step_ms"))
        summary[m][i]["step_ms_max"] = max(vals(i, m, "step_ms"))
        summary[m][i]["rounds"] = len(vals(i, m, "step_ms"))
    for i in impls[1:]:
        if "moecpt" in summary[m]:
            summary[m][f"moecpt_over_{i}_tokens_per_s"] = summary[m]["moecpt"]["tokens_per_s"] / summary[m][i]["tokens_per_s"]
            summary[m][f"moecpt_over_{i}_by_cpu_time"] = summary[m][i]["cpu_ms_per_step"] / summary[m]["moecpt"]["cpu_ms_per_step"]
if "dense" in summary:
    for m in models:
        for i in impls:
            summary[m][i]["step_over_dense"] = summary[m][i]["step_ms"] / summary["dense"][i]["step_ms"]
            summary[m][i]["cpu_over_dense"] = summary[m][i]["cpu_ms_per_step"] / summary["dense"][i]["cpu_ms_per_step"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
machine = {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "torch_python": torch.__version__,
           "threads": runs[0]["threads"], "batch_tokens": runs[0]["batch_tokens"], "dtype": dtype,
           "loadavg_at_end": open("/proc/loadavg").read().split()[:3]}
json.dump({"machine": machine, "summary": summary, "runs": runs}, open(out, "w"), indent=2)
print(f"machine: {cpu}, {machine['cores']} cores, {machine['threads']} threads, batch {machine['batch_tokens']} tokens, "
      f"{dtype}, load average at end {' '.join(machine['loadavg_at_end'])}")
print("wall ms/step median [min-max over rounds], tok/s, CPU ms/step median [min-max], peak RSS, minor page faults/step; "
      "x = moecpt speed-up over that implementation (wall tok/s; CPU time)")
for m in models:
    s = summary[m]
    cells = []
    for i in impls:
        a = s[i]
        ratio = (f" x{s['moecpt_over_' + i + '_tokens_per_s']:.2f}; x{s['moecpt_over_' + i + '_by_cpu_time']:.2f}"
                 if i != "moecpt" and "moecpt" in s else "")
        dense = f" /dense {a['step_over_dense']:.2f}; {a['cpu_over_dense']:.2f}" if "step_over_dense" in a else ""
        cells.append(f"{i}: {a['step_ms']:.0f} [{a['step_ms_min']:.0f}-{a['step_ms_max']:.0f}] ms {a['tokens_per_s']:.0f} tok/s"
                     f" cpu {a['cpu_ms_per_step']:.0f} [{a['cpu_ms_min']:.0f}-{a['cpu_ms_max']:.0f}] ms"
                     f" {a['peak_rss_mib']:.0f} MiB {a['page_faults_per_step']:.0f} faults{dense}{ratio}")
    print(f"{m}:\n  " + "\n  ".join(cells))
print(f"wrote {out}")
PY
