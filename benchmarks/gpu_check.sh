#!/usr/bin/env bash
# GPU check, one script: the GPU tests that need no second process, then the ViT-B/16 training
# step with the official views (224 px + 10 focal views of 96 px, mask 0.3, batch 64) in bf16:
# compile on/off x packed views on/off, plus the fp32 eager baseline; then the data pipeline from
# JPEG files with decoding and views on the GPU (benchmarks/decode_pipeline.py). Prints the card and
# the tables.
#
#   bash benchmarks/gpu_check.sh              # about 5-8 minutes on an H100 (two inductor compiles)
#   STEPS=50 BATCH=128 bash benchmarks/gpu_check.sh
#
# Record the card, the table and what limited it in benchmarks/RESULTS.md ("Throughput").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
BATCH=${BATCH:-64}

echo "== card"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== GPU tests (fused AdamW + bf16, packed = separate, inductor = eager, FSDP wiring on one GPU, nvJPEG)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_speed_options.py tests/data/test_decode.py -k cuda

echo "== ViT-B/16 step, official views, batch $BATCH per GPU"
"$PY" benchmarks/throughput.py preset=vitb16 batch="$BATCH" steps="$STEPS" warmup="$WARMUP" \
    variants=eager-separate-fp32,eager-separate-bf16,eager-packed-bf16,compile-separate-bf16,compile-packed-bf16

echo "== data pipeline per host core: PIL workers, CPU decode + views on the GPU, nvJPEG decode on the GPU"
"$PY" benchmarks/decode_pipeline.py images="${IMAGES:-2000}" device=cuda batch="$BATCH"
