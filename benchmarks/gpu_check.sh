#!/usr/bin/env bash
# The GPU check in one call. Stages, in order (each logged to $LOG_DIR/<stage>.log, timed, and
# stopped at its own time limit; a failed stage does not stop the others):
#
#   env       the card, driver, clocks, and the torch / CUDA / cuDNN / lightning / timm versions
#   tests     every test marked `cuda` (pytest -m cuda), with MSN_REQUIRE_CUDA=1: none may skip
#   vitb16    ViT-B/16 step, official views (224 + 10 x 96, mask 0.3, batch 64): the official-style
#             step (fp32, separate, eager, default AdamW, EMA loop) beside fp32/bf16 x separate/
#             packed x eager/compile; images/s, peak memory, MFU; a profile of compile-packed-bf16
#   train     a real train.py run: 50 steps of ViT-B/16 in bf16 with torch.compile and packed views,
#             JPEGs decoded (nvJPEG) and viewed on the GPU, then the low-shot table and the report
#   pipeline  JPEG -> views per host core: PIL workers, CPU decode + GPU views, GPU decode, set
#             against the best ViT-B/16 images/s of the vitb16 stage
#   vits16    the vitb16 table for ViT-S/16 (mask 0.15), fewer variants
#
#   bash benchmarks/gpu_check.sh                       # all stages (not yet timed on a GPU; estimated
#                                                      # 8-9 minutes on an H100/H200, most of it compiling)
#   STAGES="tests train" bash benchmarks/gpu_check.sh  # a rerun of some stages
#   DRY=1 bash benchmarks/gpu_check.sh                 # the same stages on a CPU at tiny sizes (checks
#                                                      # the script itself; no CUDA test runs)
#   VARIANTS_B16=official,eager-packed-bf16 PROFILE=eager-packed-bf16 STAGES=vitb16 bash benchmarks/gpu_check.sh
#
# Other settings: STEPS (15 timed steps), WARMUP (3), BATCH (64), VARIANTS_S16, IMAGES_PIPELINE
# (2,000 JPEGs), LOG_DIR (benchmarks/gpu_check_logs).
#
# Python: $PY, else .venv/bin/python, else python3. A machine without a package index: put the
# missing packages' wheels in .whl/; they are installed into a temporary folder first. The msn
# package is used from this checkout (PYTHONPATH), not installed.
# Record the card, the tables and what limited them in benchmarks/RESULTS.md ("Throughput").
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
STAGES=${STAGES:-env tests vitb16 train pipeline vits16}
LOG_DIR=${LOG_DIR:-benchmarks/gpu_check_logs}
STEPS=${STEPS:-15}
WARMUP=${WARMUP:-3}
BATCH=${BATCH:-64}
mkdir -p "$LOG_DIR"
: >"$LOG_DIR/summary.txt"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

failed=()
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # stage NAME LIMIT_S COMMAND... (a program; a shell function of this script runs unlimited)
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  echo "== $name (at most $limit s)"
  local t0=$SECONDS rc run=(timeout "$limit")
  [ "$(type -t "$1")" = function ] && run=()
  set +e
  "${run[@]}" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local verdict=ok
  if [ "$rc" -ne 0 ]; then
    verdict="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
    failed+=("$name")
  fi
  echo "== $name: $verdict in $((SECONDS - t0)) s" | tee -a "$LOG_DIR/summary.txt"
}

card() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'EOF'
import platform, os, torch, lightning, timm, hydra
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| lightning", lightning.__version__, "| timm", timm.__version__, "| hydra", hydra.__version__,
      "| host cores", len(os.sched_getaffinity(0)))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB; bf16 {torch.cuda.is_bf16_supported()}; "
          f"flash SDPA {torch.backends.cuda.flash_sdp_enabled()}")
EOF
}

# Class folders of coloured noise JPEGs (a colour per class, so the low-shot table has something to
# find): root/train/cK/*.jpg and root/val/cK/*.jpg.
images() {
  "$PY" - "$1" "$2" "$3" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, per_class, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
for split, count in (("train", per_class), ("val", max(2, per_class // 5))):
    for c in range(10):
        folder = root / split / f"c{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(40, 216, 3)
        for i in range(count):
            noise = rng.normal(0, 40, (size, size, 3)) + colour
            Image.fromarray(noise.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
print(f"{root}: 10 classes, {per_class} train + {max(2, per_class // 5)} val images each, {size} px")
EOF
}

if [ "$DRY" = 1 ]; then
  TESTS=(-m cuda --collect-only -q)
  B16=(preset=cpu_small steps=2 warmup=1 variants=official,eager-separate-fp32,eager-packed-fp32 profile=eager-packed-fp32)
  S16=(preset=cpu_small model=vit_nano embed_dim=0 depth=0 heads=0 steps=2 warmup=1 variants=official,eager-packed-fp32)
  TRAIN=(model=vit_nano model.encoder.patch_size=16 data.transform.rand_size=64 data.transform.focal_size=32
         data.load_size=72 data.batch_size=16 trainer.max_steps=3 data.num_workers=2)
  IMAGES=(40 96)
  PIPE=(images=128)
else
  TESTS=(-m cuda -rs)
  B16=(preset=vitb16 batch="$BATCH" steps="$STEPS" warmup="$WARMUP" profile="${PROFILE:-compile-packed-bf16}"
       variants="${VARIANTS_B16:-official,eager-separate-fp32,eager-separate-bf16,eager-packed-bf16,compile-separate-bf16,compile-packed-bf16}")
  S16=(preset=vits16 batch="$BATCH" steps="$STEPS" warmup="$WARMUP"
       variants="${VARIANTS_S16:-official,eager-packed-bf16,compile-packed-bf16}")
  TRAIN=(model=vit_base model.encoder.patch_size=16 model.mask_ratio=0.3 data.batch_size="$BATCH"
         data.load_size=256 trainer.max_steps=50 trainer.precision=bf16-mixed model.compile=true
         model.packed_views=true data.num_workers=8)
  IMAGES=(100 256)
  PIPE=(images="${IMAGES_PIPELINE:-2000}" device=cuda batch="$BATCH")
fi

stage env 60 card
stage tests 240 env MSN_REQUIRE_CUDA=1 "$PY" -m pytest -p no:cacheprovider "${TESTS[@]}" tests
stage vitb16 300 "$PY" benchmarks/throughput.py "${B16[@]}"
wanted train && images "$WORK/images" "${IMAGES[@]}"
stage train 240 "$PY" train.py data=imagefolder data.root="$WORK/images" data.augment_on=device \
  data.decode_on=device lowshot.raw_pixels=false hydra.run.dir="$WORK/run" "${TRAIN[@]}"
best=$(sed -n 's/^# best variant [^:]*: \([0-9.]*\) images\/s.*/\1/p' "$LOG_DIR/vitb16.log" 2>/dev/null || true)
stage pipeline 150 "$PY" benchmarks/decode_pipeline.py "${PIPE[@]}" ${best:+feed=$best}
stage vits16 180 "$PY" benchmarks/throughput.py "${S16[@]}"

cat "$LOG_DIR/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
