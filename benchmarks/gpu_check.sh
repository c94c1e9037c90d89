#!/usr/bin/env bash
# The GPU path, in under 5 minutes, on a machine with one CUDA GPU and this repository's .venv:
#
#   bash benchmarks/gpu_check.sh        # output: logs/gpu_check/<time>/ (or GPU_CHECK_OUT=<dir>)
#
# 1. stops at once, before writing anything, without a CUDA GPU that torch can use in bf16;
# 2. the tiny pipeline: scripts/demo.py on a small generated dataset (5 base / 5 val / 5 novel
#    classes), every training stage with trainer=gpu (bf16-mixed; frozen teachers run in bf16 under
#    inference_mode), one epoch each, 100 evaluation episodes (the demo evaluates on CPU);
# 3. the demo's 1-shot logistic-regression evaluation again with trainer=gpu, in bf16-mixed and
#    in 32-true, on the demo's saved episodes: accuracy differences and wall-time ratio vs CPU;
#    and DDP over NCCL (trainer=gpu_ddp trainer.devices=1): one epoch of the tiny pretraining;
# 4. the benchmarks at reduced sizes (they measure CPU paths: none has a GPU option yet);
# 5. prints the GPU, each stage's wall time and status, GPU memory and utilisation, and the figures.
#
# Every stage has a time limit and the stages together a deadline (GPU_CHECK_SECONDS, default 285 s:
# with the check and the figures, under 5 minutes); a stage that no longer fits is skipped and
# reported. Exit status: 0 when no stage failed or timed out. A slower machine: raise
# GPU_CHECK_SECONDS (the stage limits grow in proportion).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
fail() { echo "gpu_check: $*" >&2; exit 1; }

# ------------------------------------------------------------------ 1. a usable GPU, or stop here
[ -x "$PY" ] || fail "no $PY: create the virtual environment first (make install)"
command -v nvidia-smi >/dev/null 2>&1 || fail "no CUDA GPU: nvidia-smi not found"
nvidia-smi -L >/dev/null 2>&1 || fail "no CUDA GPU: nvidia-smi -L fails (driver not loaded?)"
"$PY" - <<'EOF' || fail "no CUDA GPU that torch can use (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})"
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() is False")
if not torch.cuda.is_bf16_supported():
    sys.exit(f"{torch.cuda.get_device_name(0)} does not support bf16 (trainer=gpu uses bf16-mixed)")
EOF

START=$SECONDS
BUDGET=${GPU_CHECK_SECONDS:-285}
DEADLINE=$((START + BUDGET))
OUT=$(realpath -m "${GPU_CHECK_OUT:-logs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}")
DATA=$OUT/data
DEMO=$OUT/demo
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 WANDB_MODE=offline PYTHONWARNINGS=ignore
echo "gpu_check: output $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
"$PY" - <<'EOF'
import lightning, torch
cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
print(f"torch {torch.__version__} ({cuda}), lightning {lightning.__version__}, {torch.cuda.get_device_name(0)}")
EOF

nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
    >"$OUT/gpu_usage.csv" 2>/dev/null &
MONITOR=$!
trap 'kill $MONITOR 2>/dev/null' EXIT
: >"$OUT/stages.tsv"
STATUS=0

# stage NAME MAX_SECONDS COMMAND...: run COMMAND (log: $OUT/logs/NAME.log) for at most
# MAX_SECONDS (at the default budget) and at most until the deadline; record status and wall time.
stage() {
    local name=$1 limit=$(($2 * BUDGET / 285))
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        printf '%s\tskipped (time budget)\t0\n' "$name" >>"$OUT/stages.tsv"
        echo "--- $name: skipped, the time budget is spent"
        return 1
    fi
    echo "--- $name (at most ${limit} s)"
    local t0=$SECONDS rc
    timeout --kill-after=5 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0)) status=ok
    if ((rc == 124 || rc == 137)); then
        status="timed out after ${limit} s"
    elif ((rc != 0)); then
        status="failed (exit $rc)"
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$took" >>"$OUT/stages.tsv"
    echo "    $status, ${took} s"
    if [ "$status" != ok ]; then
        STATUS=1
        tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    | /'
        return 1
    fi
}

# ------------------------------------------------------------------ 2. the tiny pipeline on the GPU
stage demo 160 "$PY" scripts/demo.py --out "$DEMO" --episodes 100 --data-root "$DATA" \
    --generator "classes_per_split={base: 5, val: 5, novel: 5}" \
    --override trainer=gpu --override trainer.max_epochs=1 --override trainer.check_val_every_n_epoch=1 \
    --override data.num_workers=4 --tasks 8 --quiet

# ------------------------------------------------------------------ 3. evaluation on the GPU vs the demo's on CPU
LOGREG=(rgb flow pose student_mm_cdfsl)
ENCODERS=$(printf "$DEMO/%s/encoder.pt," "${LOGREG[@]}")
EPISODES=$(ls "$DEMO"/eval_1shot_logreg/0/episodes_*.json 2>/dev/null | head -n 1)
if [ -n "$EPISODES" ]; then
    stage eval_gpu 40 "$PY" lit_main_eval.py -m experiment=demo/eval trainer=gpu fewshot/classifier=logreg \
        "encoder=${ENCODERS%,}" trainer.precision=bf16-mixed,32-true fewshot.k_shot=1 fewshot.episodes=100 \
        "fewshot.episode_file=$EPISODES" data=folder "data.root=$DATA" "hydra.sweep.dir=$OUT/eval_gpu" \
        ++trainer.enable_progress_bar=false
else
    printf 'eval_gpu\tskipped (no demo episodes)\t0\n' >>"$OUT/stages.tsv"
fi

# DDP over NCCL (trainer=gpu_ddp), one process: the process group starts, one epoch trains
if [ -f "$DATA/meta.json" ]; then
    stage ddp_nccl 30 "$PY" lit_main_pretrain.py experiment=mm_cdfsl_tiny/pretrain trainer=gpu_ddp trainer.devices=1 \
        trainer.max_epochs=1 trainer.check_val_every_n_epoch=1 data=folder "data.root=$DATA" data.num_workers=4 \
        logger=null print_config=false callbacks.model_summary=null "hydra.run.dir=$OUT/ddp_nccl" \
        && grep -m 1 -o "distributed_backend=[a-z]*" "$OUT/logs/ddp_nccl.log" | sed 's/^/    /'
fi

# ------------------------------------------------------------------ 4. the benchmarks (CPU paths)
# the demo's dataset, or (when the demo could not make it) the default one, generated on first use
if [ -f "$DATA/meta.json" ]; then ROOT=(--root "$DATA"); EVAL_DATA=(--data "$DATA"); else ROOT=(); EVAL_DATA=(); fi
bench() {
    local name=$1 limit=$2
    shift 2
    stage "$name" "$limit" bash -c '"$@" >"$0"' "$OUT/$name.json" "$PY" "benchmarks/$name.py" "$@"
}
bench bench_eval 30 "${EVAL_DATA[@]}" --episodes 600 --repeats 1 --reencode-episodes 6 --logreg-episodes 200 --workers 4
bench bench_distill 30 "${ROOT[@]}" --recipes mm_cdfsl,lite_mkd --repeats 2 --threads 0
bench bench_logreg 20 --repeats 1
bench bench_episodic 25 "${ROOT[@]}" --repeats 2 --workers 4
bench bench_data 20 "${ROOT[@]}" --clips 100 --loader-clips 128 --repeats 1 --workers 4

# ------------------------------------------------------------------ 5. the figures
kill $MONITOR 2>/dev/null
"$PY" - "$OUT" <<'EOF'
import csv, json, sys

import yaml
from pathlib import Path

out = Path(sys.argv[1])
print("\n================ gpu_check figures ================")
print("stage wall times:")
for name, status, took in csv.reader((out / "stages.tsv").open(), delimiter="\t"):
    print(f"  {name:<16} {took:>4} s  {status}")
usage_file = out / "gpu_usage.csv"
usage = [r for r in csv.reader(usage_file.open()) if len(r) == 2] if usage_file.is_file() else []
if usage:
    util, memory = [float(u) for u, _ in usage], [float(m) for _, m in usage]
    print(f"GPU: peak memory {max(memory):.0f} MiB, mean utilisation {sum(util) / len(util):.0f}% over {len(usage)} s")

demo = out / "demo"
if (demo / "timings.json").is_file():
    print("demo stages (s):", json.loads((demo / "timings.json").read_text()))
if (demo / "results.md").is_file():
    print((demo / "results.md").read_text())

def results(sweep):
    """(job folder, record, trainer precision) of every job of an evaluation sweep."""
    rows = []
    for path in sorted(sweep.glob("*/results.json")):
        precision = yaml.safe_load((path.parent / ".hydra" / "config.yaml").read_text())["trainer"]["precision"]
        rows.append((path.parent, json.loads(path.read_text()), precision))
    return rows

cpu = {r["encoder"]: r for _, r, _ in results(demo / "eval_1shot_logreg")}
gpu = results(out / "eval_gpu")
if cpu and gpu:
    print("1-shot logreg on the same episodes, GPU vs the demo's CPU evaluation (accuracy %):")
    for _, r, precision in gpu:
        ref = cpu.get(r["encoder"])
        if ref is not None:
            name = Path(r["encoder"]).parent.name
            diff = r["mean"] - ref["mean"]
            print(f"  {name:<18} GPU {precision:<10} {r['mean']:6.2f}   CPU 32-true {ref['mean']:6.2f}   {diff:+.2f}")
    stages = {row[0]: row for row in csv.reader((out / "stages.tsv").open(), delimiter="\t")}
    cpu_s = json.loads((demo / "timings.json").read_text()).get("evaluate 5-way 1-shot, logreg")
    if cpu_s and stages.get("eval_gpu", ["", ""])[1] == "ok":
        gpu_s = float(stages["eval_gpu"][2])
        per_job = f"CPU {cpu_s / len(cpu):.1f} s, GPU {gpu_s / len(gpu):.1f} s"
        print(f"  wall time per job (process start included): {per_job}")

def figures(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from figures(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node[:4]):
            yield from figures(v, f"{prefix}{i}.")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        key = prefix[:-1]
        if any(s in key for s in ("over", "speedup", "ratio", "per_s", "_ms", "seconds", "accuracy", "mean")):
            yield key, node

for path in sorted(out.glob("bench_*.json")):
    text = path.read_text()
    if "{" not in text:
        continue
    try:
        report = json.loads(text[text.index("{"):])
    except json.JSONDecodeError:
        continue
    print(f"{path.stem}:")
    for key, value in list(figures(report))[:25]:
        print(f"  {key} = {value:.4g}")
print(f"\nlogs and reports: {out}")
EOF
VERDICT="some stages failed (see above)"
[ $STATUS = 0 ] && VERDICT="no stage failed"
echo "gpu_check: total $((SECONDS - START)) s, $VERDICT"
exit $STATUS
