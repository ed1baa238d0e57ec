#!/usr/bin/env bash
# One command for a GPU machine: the CUDA test suite, the GPU benchmark rows and a 3-minute run of the
# vit_cifar10 recipe on CIFAR-10-shaped synthetic data, in about 10 minutes. It prints one markdown block
# (also written to gpu-check.md, or to the file given as $1) ready to paste into docs/benchmarks.md.
#   pip install -r requirements.txt && bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check.md}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 2

GPU="$(python -c "import torch; print(torch.cuda.get_device_name())")"
VERSIONS="$(python -c "import torch, torchvision, sys; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, Python {sys.version.split()[0]}')")"

echo "== 1/3 CUDA test suite (pytest -m cuda)" >&2
timeout 180 python -m pytest -m cuda -q -s -p no:cacheprovider tests/test_cuda.py >"$WORK/cuda.log" 2>&1
CUDA_RC=$?
tail -n 5 "$WORK/cuda.log" >&2

echo "== 2/3 GPU benchmark rows (pipeline, real vs synthetic, ViT-S/16 MFU with compile)" >&2
timeout 240 python -m vitexp.bench --device cuda --what pipeline,gpu --model vit_small --img-size 224 \
  --batch-size 128 --steps 20 --images 1024 --workers 8 --compile --out "$WORK/bench.md" >&2
BENCH_RC=$?

echo "== 3/3 vit_cifar10 recipe on CIFAR-10-shaped synthetic data, 3 minutes" >&2
# the run is stopped after 180 s (SIGTERM: it checkpoints and exits 75); its epochs say how fast it trains
timeout --signal=TERM 180 python train.py +experiment=vit_cifar10 data=synthetic data.img_size=32 \
  data.crop_pct=1.0 data.num_workers=8 logger=none "hydra.run.dir=$WORK/recipe" >"$WORK/recipe.log" 2>&1
RECIPE="$(python - "$WORK/recipe/metrics.jsonl" <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()] if Path(sys.argv[1]).exists() else []
if not rows:
    print("no epoch finished in 180 s")
else:
    images = 4096 * 0.9 // 128 * 128  # synthetic train split (10% held out for validation), full batches
    seconds = sum(row["epoch_time_s"] for row in rows) / len(rows)
    print(f"{len(rows)} epochs in 180 s; {images / seconds:,.0f} img/s; {seconds:.2f} s per epoch of {images:,.0f} images;"
          f" val acc {rows[-1]['val/acc']:.3f} (random labels: chance is 0.1)")
PY
)"

{
  echo "## ${GPU} — $(date +%Y-%m-%d), ${VERSIONS}"
  echo
  echo "Command: \`bash scripts/gpu-check.sh\`"
  echo
  echo "**CUDA suite** (\`pytest -m cuda\`, exit ${CUDA_RC}): $(tail -n 1 "$WORK/cuda.log")"
  echo
  grep -E "^(peak memory|ViT-S/16)" "$WORK/cuda.log" | sed 's/^/- /'
  echo
  if [ -s "$WORK/bench.md" ]; then cat "$WORK/bench.md"; else echo "benchmark failed (exit ${BENCH_RC})"; fi
  echo "**vit_cifar10 recipe** (synthetic 32 px data, AutoAugment workers): ${RECIPE}"
} | tee "$OUT"
[ "$CUDA_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
