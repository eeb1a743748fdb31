#!/usr/bin/env bash
# BERT-base MLM on one GPU in bf16, every case in one run (bench/gpu_bench.py): this engine eager and compiled, the
# transformers Trainer eager and with torch_compile=True, both under DeepSpeed ZeRO-2. 12 layers x 768, the 30522-token
# BERT vocabulary (padded to 30528), sequence 128, batch 128, generated text, no network.
#   bash bench/gpu_bert_base.sh                                  # MFU against the GPU's datasheet dense bf16 peak
#   bash bench/gpu_bert_base.sh --output "$OUT/bench/results.json" --cases engine_eager trainer_compiled
#   PEAK_TFLOPS=989.5 bash bench/gpu_bert_base.sh                # another peak
#   bash bench/gpu_bert_base.sh --smoke                          # no GPU: tiny sizes on the CPU, end to end
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --smoke "* ]]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
             'no CUDA GPU visible (bash bench/gpu_bert_base.sh --smoke checks the script on the CPU)')"
fi
exec env PYTHONPATH="$PWD" python bench/gpu_bench.py --layers 12 --hidden 768 --vocab_size 30522 --seq_len 128 \
    --batch_size "${BATCH_SIZE:-128}" --warmup "${WARMUP:-30}" --steps "${STEPS:-100}" --bf16 \
    ${PEAK_TFLOPS:+--peak_tflops "$PEAK_TFLOPS"} "$@"
