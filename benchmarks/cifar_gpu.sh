#!/usr/bin/env bash
# The CIFAR-10 benchmarks on one GPU, as run for benchmarks/README.md: one dense ResNet-20, then
# SS-Auto vs ADMM, StructADMM vs magnitude and the ADMM-NN-S comparison from it, side by side
# (ResNet-20 leaves most of a large GPU idle, so they share it as separate processes).
#
#   bash benchmarks/cifar_gpu.sh DATA_DIR [OUT_DIR]
#
# From the environment: DENSE_EPOCHS, PRUNE_EPOCHS, RETRAIN_EPOCHS, QUANT_EPOCHS, RATES (the
# non-structured rates of the ADMM-NN-S run), BENCHMARKS (a subset of
# "ssauto_vs_admm cifar_structadmm admmnns_compare"), PYTHON.
set -euo pipefail
data=${1:?usage: bash benchmarks/cifar_gpu.sh DATA_DIR [OUT_DIR]}
out=${2:-benchmarks/results/cifar_gpu}
dense_epochs=${DENSE_EPOCHS:-40} prune=${PRUNE_EPOCHS:-10} retrain=${RETRAIN_EPOCHS:-5}
quant=${QUANT_EPOCHS:-3} rates=${RATES:-8}
benchmarks=${BENCHMARKS:-ssauto_vs_admm cifar_structadmm admmnns_compare}
here=$(dirname "$0")
py=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # the processes share the CPU cores
mkdir -p "$out"
common=(--data-dir "$data" --device cuda)
"$py" "$here/cifar_dense.py" "${common[@]}" --dense-epochs "$dense_epochs" --out "$out/dense"
common+=(--dense "$out/dense/dense.pt")

ssauto_vs_admm() {
    "$py" "$here/ssauto_vs_admm.py" "${common[@]}" --prune-epochs "$prune" \
        --retrain-epochs "$retrain" --out "$out/ssauto_vs_admm"
}
cifar_structadmm() {
    "$py" "$here/cifar_structadmm.py" "${common[@]}" --admm-epochs "$prune" \
        --retrain-epochs "$retrain" --out "$out/cifar_structadmm"
}
admmnns_compare() {
    # shellcheck disable=SC2086  # RATES is a list
    "$py" "$here/admmnns_compare.py" --model resnet20 "${common[@]}" --rates $rates \
        --prune-epochs "$prune" --retrain-epochs "$retrain" --quant-epochs "$quant" \
        --rounds 10 --out "$out/admmnns_compare_resnet20"
}
pids=()
for b in $benchmarks; do
    "$b" >"$out/$b.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for b in $benchmarks; do echo "== $b"; tail -n 12 "$out/$b.log"; done
exit $status
