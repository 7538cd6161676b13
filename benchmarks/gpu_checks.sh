#!/usr/bin/env bash
# The checks of issues #19 / #20 that need a GPU, in one call: the CUDA tests, 2:4 latency on the
# sparse tensor cores, and the channel-compacted models' latency (plain and as deploy serves them,
# CUDA graphs among the candidates), ADMM on FSDP2 shards (nccl), 2:4 decoding of a LLaMA-shaped
# model. Every result lands in OUT_DIR: gpu_checks.log and 5-6 JSONs.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR
#
# On the lent GPU machine (its image has torch, transformers, onnx, pytest; not pydantic or
# torch-pruning), with the wheels downloaded here into .whl/ (ignored by git; see the device
# tool's README for the pip download line) and carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#     PYTHONPATH=/tmp/site bash benchmarks/gpu_checks.sh $OUT
# Each step has its own time limit (STEP_LIMIT seconds, default 110; 1.5× that for the compact
# models, whose pruning bisection runs on the CPU; 60 for the first), so one that hangs cannot
# take the others' time: at most ~8.5 minutes, never measured (no GPU since it was written), so
# give the first call the whole 10-minute command limit and read the log's per-step seconds.
# LM_MINUTES=N adds oneshot_lm.py on the GPU (an 8 × 512 LLaMA trained N minutes, SparseGPT vs
# ADMM at 70 % / 80 %; its limit is STEP_LIMIT too).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
limit=${STEP_LIMIT:-110}
log="$out/gpu_checks.log"
status=0

step() {  # step NAME SECONDS COMMAND...: run it under that limit, its output appended to the log
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee -a "$log"
    local t0=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}

step env 60 "$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
step cuda-tests "$limit" "$py" -m pytest -q -rs tests/test_cuda.py
step two-four "$limit" "$py" benchmarks/semi_structured_speed.py --batches 1 16 64 \
    --out "$out/semi_structured_speed.json"
step compact-latency $((limit * 3 / 2)) "$py" benchmarks/structured_speed.py --device cuda \
    --kinds channels --models resnet20 resnet56 vgg16 --batches 1 64 512 --rounds 20 \
    --out "$out/structured_speed_cuda.json"
# each deploy compiles up to 2 modes per model and batch: kept to 4 compiles
step compact-deploy "$limit" "$py" benchmarks/structured_speed.py --device cuda --deploy \
    --kinds channels --models resnet20 --reductions 4 --batches 512 --rounds 20 \
    --out "$out/structured_speed_cuda_deploy.json"
# issue 28: ADMM on FSDP2 shards over every GPU of the machine (nccl), masks vs one process
step fsdp-admm 60 "$py" -m torch.distributed.run --standalone \
    --nproc_per_node "$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')" \
    benchmarks/fsdp_admm.py --device cuda --out "$out"
# issue 30: generate on a LLaMA-shaped 2 × 4096 model, masked dense vs 2:4 on the sparse
# tensor cores (to_semi_structured, fp16), greedy tokens compared
step sparse-decode "$limit" "$py" benchmarks/sparse_decode.py --device cuda --hidden 4096 \
    --layers 2 --new-tokens 128 --no-checkpoint --out "$out"
if [ "${LM_MINUTES:-0}" != 0 ]; then  # opt-in: a larger LM trained, pruned and evaluated on the GPU
    step lm "$limit" "$py" benchmarks/oneshot_lm.py --device cuda --layers 8 --hidden 512 \
        --train-minutes "$LM_MINUTES" --settings 70%,80% --solvers sparsegpt,admm --skip-joint \
        --out /tmp/oneshot_lm_cuda
    cp /tmp/oneshot_lm_cuda/results.json "$out/oneshot_lm_cuda.json" 2>/dev/null
fi
exit $status
