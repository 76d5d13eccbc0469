#!/usr/bin/env bash
# One prepared GPU session (about 8 minutes of device time), writing logs and JSON to $OUT:
#   1. the Kermany real-data check under the held-out protocol (import, fit, export, evaluate
#      per image and per study at the bundle's serving precision), when .kermany/ holds the
#      sample (the 720 PNGs of ../shared/data/kermany-sample, downscaled to 256 px so that they
#      travel; see README "Real-data check");
#   2. the inference benchmark of the 13-member DenseNet-121 ensemble at 1024 px.
# Runs with the machine's python3 and PyTorch; dependencies it lacks travel as wheels in .whl/.
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

# 1. Kermany: fit/calibration split of validation patients, threshold on held-out studies.
if [ -f .kermany/labels.csv ]; then
  k=/tmp/kermany
  rm -rf "$k"
  {
    python3 -m training.cli import-folders --root .kermany --labels .kermany/labels.csv \
      --mapping training/configs/kermany-mapping.yaml --out $k/manifest.csv &&
    time python3 -m training.cli --no-progress fit --config training/configs/kermany-gpu.yaml \
      --manifest $k/manifest.csv --out $k/run &&
    python3 -m training.cli export --run $k/run --out $k/bundle --version 0.2.0 &&
    time python3 -m training.cli --no-progress evaluate --bundle $k/bundle \
      --manifest $k/run/dataset/manifest.csv --out $k/eval --device cuda --workers 8
  } > "$out/kermany.log" 2>&1
  echo "kermany exit $?" | tee -a "$out/kermany.log"
  tail -5 "$out/kermany.log"
  cp $k/eval/metrics.json "$out/kermany-metrics.json" 2>/dev/null
  cp $k/eval/report.md "$out/kermany-report.md" 2>/dev/null
  cp $k/run/operating_point.json "$out/kermany-operating-point.json" 2>/dev/null
  cut -d, -f3 $k/run/image_roles.csv 2>/dev/null | sort | uniq -c | tee "$out/kermany-roles.txt"
fi

# 2. Inference speed of the 13-member ensemble at 1024 px.
timeout 240 python3 bench/inference.py --device cuda --studies 64 \
  --json-out "$out/inference.json" 2>&1 | tail -25
