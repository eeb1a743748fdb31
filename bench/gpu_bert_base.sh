#!/usr/bin/env bash
# BERT-base MLM on one GPU in bf16: this engine against the transformers Trainer, tokens/s and MFU.
# 12 layers, 768 wide, the 30522-token BERT vocabulary padded to 30528, sequence 128.
#   bash bench/gpu_bert_base.sh                 # MFU against the measured bf16 matrix-product peak
#   PEAK_TFLOPS=989 bash bench/gpu_bert_base.sh # ... against a datasheet peak (H100 SXM dense bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
exec python bench/mlm_vs_trainer.py --layers 12 --hidden 768 --vocab_size 30522 --seq_len 128 \
    --batch_size "${BATCH_SIZE:-64}" --steps "${STEPS:-200}" --learning_rate 1e-4 --bf16 \
    ${PEAK_TFLOPS:+--peak_tflops "$PEAK_TFLOPS"} "$@"
