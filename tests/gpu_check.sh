#!/usr/bin/env bash
# One command for a GPU machine: every CUDA check of the project and the figures of docs/benchmarks.md,
# in at most 8 minutes on one H100 with a stock CUDA PyTorch image (PyTorch 2.11+, transformers,
# onnxruntime; no DeepSpeed, datasets or optuna).
#
#   bash tests/gpu_check.sh                 # on the GPU
#   GPTRAIN_GPU_CHECK_DEVICE=cpu bash tests/gpu_check.sh   # dry run on the CPU: tiny sizes, every step
#                                           # chained the same way (tests/test_plan.py runs it)
#
# Steps: the CUDA tests (pytest -m gpu), train.bench on gpt2-124m in bf16 with and without compile
# (tokens/s, MFU, peak memory), the planner's estimate beside the measured peak memory and step time
# of the same config, FP8 against bf16 step time (both compiled; CUDA only, the dry run skips it), a short
# race of race-fast against race-nanogpt, eval.bench. Prints one summary
# table; exits 1 when any step failed. Work files go to GPU_CHECK_OUT (default runs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPTRAIN_GPU_CHECK_DEVICE:-cuda}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}

if [[ $DEVICE == cuda ]]; then
    BENCH_ARGS=(--config configs/gpt2-124m.yaml --settings bf16,bf16-compile --steps 10 --warmup 3 --device cuda
        train.micro_batch=16 train.tokens_per_step=65536)
    PYTEST_ARGS=(-m gpu -q -x)
    RACE_SET=(--set train.max_steps=200 --set train.dtype=bfloat16 --set train.device=cuda)
    RACE_ARGS=(--eval-every 50 --budget-s 60)
    EVAL_ARGS=(--models demo --batch-sizes 1,8 --repeats 1 --device cuda)
    PLAN_GPU=h100-sxm
else  # the dry run: the same steps at sizes a CPU core runs in seconds
    BENCH_ARGS=(--settings baseline --steps 1 --warmup 1 --device cpu model.n_layer=2 model.n_embd=64
        model.n_head=2 model.block_size=64 train.micro_batch=2 train.tokens_per_step=256)
    PYTEST_ARGS=(-m gpu -q --collect-only tests/test_dist_gpu.py)
    RACE_SET=(--set train.max_steps=4 --set train.device=cpu --set model.n_layer=1 --set model.n_embd=32
        --set model.n_head=2 --set model.block_size=32 --set train.micro_batch=2
        --set train.tokens_per_step=128 --set data.seq_len=null)
    RACE_ARGS=(--eval-every 2 --eval-tokens 256 --quiet)
    EVAL_ARGS=(--models demo --batch-sizes 1 --new-tokens 4 --prompt-len 4 --prefill-len 8 --nocache-steps 1
        --repeats 1 --loss-batches 1 --backends torch)
    PLAN_GPU=h100-sxm
fi

declare -a NAMES STATUS NOTES
run_step() {  # run_step NAME NOTE-COMMAND -- COMMAND...: runs COMMAND, logs to OUT/NAME.log
    local name=$1 note_cmd=$2
    shift 3
    local start=$SECONDS
    echo "== $name: $*"
    if "$@" >"$OUT/$name.log" 2>&1; then
        STATUS+=("ok")
    else
        STATUS+=("FAILED (rc $?, see $OUT/$name.log)")
        tail -n 20 "$OUT/$name.log"
    fi
    NAMES+=("$name")
    NOTES+=("$(eval "$note_cmd" 2>/dev/null | tr '\n' ' ' | cut -c1-150) [$((SECONDS - start)) s]")
}

run_step cuda-tests "tail -n 1 '$OUT/cuda-tests.log'" -- "$PYTHON" -m pytest "${PYTEST_ARGS[@]}"

run_step train-bench "grep -E '^(bf16|fp32)' '$OUT/train-bench.log'" -- \
    "$PYTHON" -m train.bench "${BENCH_ARGS[@]}" --json "$OUT/bench.json"

# The planner's one-GPU estimate of the benchmarked config, beside what train.bench measured.
run_step plan-vs-measured "cat '$OUT/plan-vs-measured.log'" -- "$PYTHON" - "$OUT/bench.json" "$PLAN_GPU" "${BENCH_ARGS[@]}" <<'EOF'
import json, sys

from train.bench import REFERENCE
from train.config import load_config
from train.footprint import Layout, meta_model
from train.hardware import BY_KEY
from train.plan import Hardware, estimate, model_config

bench, gpu, args = json.load(open(sys.argv[1])), BY_KEY[sys.argv[2]], sys.argv[3:]
config = args[args.index("--config") + 1] if "--config" in args else None
overrides = [a for a in args if "=" in a and not a.startswith("-")]
cfg = load_config(config, (REFERENCE if config is None else []) + overrides)
name, r = next(iter(bench["results"].items()))  # the first setting: bf16 eager on the GPU
cfg.train.dtype = "bfloat16" if "bf16" in name else "float32"
e = estimate(cfg, meta_model(model_config(cfg)), Layout(micro_batch=cfg.train.micro_batch), Hardware(gpu, 1, 1, gpu.link_gbps, 50.0))
mem = "n/a on CPU" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
print(f"{name}: memory planned {e.footprint.total / 2**30:.2f} GiB, measured {mem}; "
      f"step planned {1000 * e.step_s:.1f} ms ({gpu.name} at 50% of peak), measured {r['ms']:.1f} ms "
      f"(MFU {100 * r['mfu']:.1f}%)")
EOF

if [[ $DEVICE == cuda ]] && ! "$PYTHON" -c "import torchao" 2>/dev/null; then  # not in a stock image
    NAMES+=("fp8-vs-bf16") STATUS+=("skipped") NOTES+=("torchao is not installed: pip install torchao")
elif [[ $DEVICE == cuda ]]; then  # fp8 tensor cores (train/fp8.py); a CPU has none, emulation is no speed figure
    run_step fp8-vs-bf16 "grep -E '^(bf16|fp8)' '$OUT/fp8-vs-bf16.log'" -- \
        "$PYTHON" -m train.bench --config configs/gpt2-124m.yaml --settings bf16-compile,fp8-compile --steps 10 \
        --warmup 3 --device cuda train.micro_batch=16 train.tokens_per_step=65536
fi

if [[ ! -f datasets/pydoc-bytes/meta.json ]]; then
    "$PYTHON" -m data.prepare --source pydoc --tokenizer bytes --out datasets/pydoc-bytes >"$OUT/prepare.log" 2>&1
fi
run_step race "grep -iE 'x the|reach|target' '$OUT/race.log' | tail -n 3" -- \
    "$PYTHON" -m train.race --data datasets/pydoc-bytes --configs configs/race-nanogpt.yaml,configs/race-fast.yaml \
    --target auto --out "$OUT/race" "${RACE_SET[@]}" "${RACE_ARGS[@]}"

run_step eval-bench "grep -E 'tok/s|tokens/s' '$OUT/eval-bench.log' | head -n 3" -- \
    "$PYTHON" -m eval.bench "${EVAL_ARGS[@]}"

echo
echo "gpu_check on $DEVICE: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device", "| torch", torch.__version__)')"
printf '%-18s %-10s %s\n' step status figures
failed=0
for i in "${!NAMES[@]}"; do
    printf '%-18s %-10s %s\n' "${NAMES[$i]}" "${STATUS[$i]%% *}" "${NOTES[$i]}"
    [[ ${STATUS[$i]} == ok || ${STATUS[$i]} == skipped ]] || failed=1
done
exit $failed
