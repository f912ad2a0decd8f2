#!/usr/bin/env bash
# Everything saekit checks and measures on a CUDA machine, in one go: the kernel, SAE, trainer
# and recipe tests on the GPU (Triton compiled, not interpreted), the kernels' tile settings,
# the decode table and the training-step table, and a profile of saekit's step. Logs go to ${OUT:-benchmarks/gpu-logs}.
# eai-sparsify is used when importable: with no network, put its wheels (and simple-parsing,
# docstring-parser, natsort) in .whl/ first; sae-lens is not installed there and is skipped.
#     bash benchmarks/gpu.sh
set -o pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-benchmarks/gpu-logs}
mkdir -p "$LOGS"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$LOGS/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOGS/gpu.txt"
python3 benchmarks/tune_triton.py --d 2304 --m 65536 --k 32 --batch 16384 2>&1 | tee "$LOGS/tune.txt"
python3 benchmarks/tune_triton.py --d 576 --m 9216 --k 32 --batch 4096 2>&1 | tee -a "$LOGS/tune.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_sae.py tests/test_trainer.py \
    tests/test_recipes.py 2>&1 | tee "$LOGS/pytest.txt" | tail -n 15
python3 benchmarks/bench_decode.py --skip-scaling --d 2304 --dtype bfloat16 --reps 20 2>&1 | tee "$LOGS/decode.txt"
python3 benchmarks/bench_decode.py --skip-scaling --d 2304 --m 65536 --k 32 --reps 20 2>&1 | tee -a "$LOGS/decode.txt"
for size in "--d 576 --m 9216 --k 32 --batch 4096" "--d 2304 --m 65536 --k 32 --batch 16384"; do
    python3 benchmarks/bench_step.py --device cuda --no-venv --reps 20 --only saekit,sparsify,dense,matmul $size \
        2>&1 | tee -a "$LOGS/step.txt"
    python3 benchmarks/bench_step.py --device cuda --reps 20 --only saekit,matmul --architecture batchtopk $size \
        2>&1 | tee -a "$LOGS/step.txt"
done
for arch in topk batchtopk; do
    python3 benchmarks/bench_step.py --device cuda --only saekit --profile --architecture $arch \
        --d 2304 --m 65536 --k 32 --batch 16384 > "$LOGS/profile_$arch.txt" 2>&1
done
# matching pursuit: its tests on the GPU, then its step against TopK and the plain unrolled loop
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_pursuit.py 2>&1 | tee "$LOGS/pytest_mp.txt" | tail -n 5
python3 benchmarks/bench_mp.py --device cuda --reps 10 2>&1 | tee "$LOGS/mp.txt"
python3 benchmarks/bench_mp.py --device cuda --reps 5 --d 2304 --m 65536 --batch 16384 --skip plain,select-dense \
    2>&1 | tee -a "$LOGS/mp.txt"
# every trainable family's step at the GPU size, against the encoder matmul
for arch in topk batchtopk matryoshka jumprelu mp; do
    python3 benchmarks/bench_step.py --device cuda --reps 10 --only saekit,matmul --architecture $arch \
        --d 2304 --m 65536 --k 32 --batch 16384 2>&1 | tee -a "$LOGS/families.txt"
done
