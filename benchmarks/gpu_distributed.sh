#!/usr/bin/env bash
# What the CPU tests cannot run: DeepSpeed ZeRO-2/ZeRO-3 (no CPU support here), and DDP and FSDP2 on NCCL, through
# TRL's packaged accelerate configs. On a machine with 1 or more CUDA GPUs, from the repository root:
#
#   bash benchmarks/gpu_distributed.sh                 # every GPU; WORK=/tmp/x NGPU=2 to choose
#
# 1. The runs of tests/scripts/multiprocess_dpo.py (a live reference, precomputed reference log-probs from files and
#    from an in-memory dataset, the SFT-on-chosen reference; SGD, float32, 3 steps, global batch 8): once on one
#    process without accelerate, then under `multi_gpu` (with 2+ GPUs), `zero2`, `zero3` and `fsdp2` on NGPU
#    processes. benchmarks/distributed_check.py compares each with the one-process run: losses within 1e-5, weights
#    within 1e-4, and the distributed type the config asks for. On one GPU the sharded runs have one process: they
#    check DeepSpeed's and FSDP2's code paths (engines, reference wrapping, gathers, saving), not sharding itself.
# 2. `trl-dpo-ext dpo --accelerate_config zero3 --num_processes NGPU` end to end in bf16, as a user runs it.
#
# DeepSpeed: imported if installed, else installed from .whl/deepspeed-*.whl (carried beside the repo), else the
# DeepSpeed runs are reported NOT CHECKED (exit 3 with REQUIRE_DEEPSPEED=1). About 3 minutes on one H200.
# benchmarks/gpu_suite.sh may call this script; it prints one PASS/FAIL line per run and setting, and exits non-zero
# on a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TQDM_DISABLE=1 OMP_NUM_THREADS=1
NGPU=${NGPU:-$(python -c "import torch; print(torch.cuda.device_count())")}
WORK=${WORK:-$(mktemp -d)}
GLOBAL_BATCH=8
SCRIPT=tests/scripts/multiprocess_dpo.py
if [ "$NGPU" -lt 1 ]; then echo "gpu_distributed.sh: no CUDA GPU"; exit 1; fi
if [ $((GLOBAL_BATCH % NGPU)) -ne 0 ]; then echo "gpu_distributed.sh: NGPU=$NGPU must divide $GLOBAL_BATCH"; exit 1; fi
BATCH=$((GLOBAL_BATCH / NGPU))

if ! python -c "import deepspeed" 2>/dev/null && ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-deps --no-index .whl/*.whl || true  # deepspeed and the wheels it needs
fi
CONFIGS="fsdp2"
[ "$NGPU" -ge 2 ] && CONFIGS="multi_gpu $CONFIGS"  # accelerate refuses multi_gpu with one process
if python -c "import deepspeed" 2>/dev/null; then
    CONFIGS="$CONFIGS zero2 zero3"
    DEEPSPEED="checked"
else
    DEEPSPEED="NOT CHECKED (deepspeed is not installed)"
fi

config_path() { python -c "from trl_dpo_ext.launch import resolve_accelerate_config as r; print(r(['--accelerate_config', '$1'])[1])"; }

status=0
python benchmarks/distributed_check.py prepare "$WORK" || exit 1
python "$SCRIPT" "$WORK/rows.jsonl" "$WORK/tiny-model" "$WORK/one" --per_device_train_batch_size "$GLOBAL_BATCH" \
    --device cuda >"$WORK/one.log" 2>&1 || { echo "one process: FAIL (log: $WORK/one.log)"; exit 1; }
for config in $CONFIGS; do
    if ! accelerate launch --config_file "$(config_path "$config")" --num_processes "$NGPU" --mixed_precision no \
        "$SCRIPT" "$WORK/rows.jsonl" "$WORK/tiny-model" "$WORK/$config" --per_device_train_batch_size "$BATCH" \
        --device cuda >"$WORK/$config.log" 2>&1; then
        echo "$config: FAIL to run (log: $WORK/$config.log)"; tail -20 "$WORK/$config.log"; status=1
    fi
done
# shellcheck disable=SC2086
python benchmarks/distributed_check.py compare "$WORK" one $CONFIGS || status=1

if [ "$DEEPSPEED" = "checked" ]; then
    mkdir -p "$WORK/data" && cp "$WORK/rows.jsonl" "$WORK/data/train.jsonl"
    if python -m trl_dpo_ext dpo --accelerate_config zero3 --num_processes "$NGPU" \
        --model_name_or_path "$WORK/tiny-model" --dataset_name "$WORK/data" --output_dir "$WORK/cli_zero3" \
        --max_steps 2 --per_device_train_batch_size 2 --bf16 true --report_to none --save_strategy no \
        --precompute_ref_log_probs true >"$WORK/cli_zero3.log" 2>&1 \
        && grep -q "trained on $NGPU processes" "$WORK/cli_zero3.log"; then
        echo "trl-dpo-ext dpo --accelerate_config zero3 (bf16): PASS"
    else
        echo "trl-dpo-ext dpo --accelerate_config zero3 (bf16): FAIL (log: $WORK/cli_zero3.log)"; status=1
    fi
fi
echo "DeepSpeed: $DEEPSPEED; GPUs: $NGPU; logs and results: $WORK"
if [ "$DEEPSPEED" != "checked" ] && [ "${REQUIRE_DEEPSPEED:-0}" = 1 ] && [ "$status" = 0 ]; then status=3; fi
exit "$status"
