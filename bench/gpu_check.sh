#!/usr/bin/env bash
# Everything issue 12 still needs a GPU for, for the device machine (torch + CUDA, transformers, accelerate, peft,
# tensorboard installed; datasets, evaluate, deepspeed, pytest absent). Carry .wheels/ (see bench/README.md).
#   bash bench/gpu_check.sh all      # install, CUDA-only tests, then the benchmark   (about 10-12 min on an H100)
#   bash bench/gpu_check.sh tests    # install + tests only                           (about 3-4 min)
#   bash bench/gpu_check.sh bench    # install + benchmark only                       (about 7-9 min)
# Writes under $OUT (default ./gpu-check-out): env.txt, install.log, tests.log, bench/results.json, bench/<case>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out/bench"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
             torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

{
  # Wheels only, none of their dependencies from an index (there is none): the recipe's list is complete.
  wheels=$(ls .wheels/*.whl 2>/dev/null)
  [ -n "$wheels" ] && python -m pip install --no-index --no-deps $wheels
  # DeepSpeed from its source archive, no ops built (none is used: the engine gives it torch's fused AdamW).
  sdist=$(ls .wheels/deepspeed-*.tar.gz 2>/dev/null | head -1)
  [ -n "$sdist" ] && DS_BUILD_OPS=0 python -m pip install --no-index --no-deps --no-build-isolation "$sdist"
  python -c "import datasets, evaluate, deepspeed, pytest; print('imports ok: datasets', datasets.__version__,
             'deepspeed', deepspeed.__version__)"
} > "$out/install.log" 2>&1
tail -3 "$out/install.log"

status=0
if [ "$what" = all ] || [ "$what" = tests ]; then
  # The CUDA-only sync test, MFU's device lookup, and the compile test with inductor (aot_eager on CPUs).
  TRAINER_TEST_COMPILE_BACKEND=inductor PYTHONPATH="$PWD" timeout 300 python -m pytest -q -rs -p no:cacheprovider \
      tests/test_gpu_step.py tests/test_compile.py tests/test_throughput.py tests/test_loader.py \
      > "$out/tests.log" 2>&1 || status=1
  tail -15 "$out/tests.log"
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  timeout 540 bash bench/gpu_bert_base.sh --output "$out/bench/results.json" 2>&1 | tail -30 | tee "$out/bench/summary.txt"
  [ -f "$out/bench/results.json" ] || status=1
fi
exit $status
