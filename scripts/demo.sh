#!/usr/bin/env bash
# Set up, then train the SSIM autoencoder on the bundled PIPED example (about 5 minutes on 2 CPU
# cores), segment its test images and evaluate them. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=examples/paper_bdp01
OUT=runs/demo
rm -rf "$OUT"
.venv/bin/ssimae train "$DATA" --method ssim-ae --output "$OUT/model" --max-steps 150
.venv/bin/ssimae predict "$OUT/model/checkpoint.pt" "$DATA/test" --output "$OUT/predictions" --quiet
.venv/bin/ssimae evaluate "$OUT/model/checkpoint.pt" "$DATA" --output "$OUT/evaluation" --quiet
echo
echo "model:       $OUT/model/checkpoint.pt (config.yaml, train.log beside it)"
echo "predictions: $OUT/predictions/{maps,masks,overlays}/, scores.csv"
echo "metrics:     $OUT/evaluation/metrics.json"
