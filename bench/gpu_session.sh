#!/usr/bin/env bash
# One prepared GPU session: the tiny training pipeline on CUDA end to end, then the training and
# inference benchmarks at the thesis's 1024 px. Writes logs and JSON figures to $OUT. Runs with
# the machine's python3 and PyTorch; dependencies it lacks can be put in .whl/ as wheels.
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

work=/tmp/scxnn-gpu
rm -rf "$work"
# 1. The whole training path on CUDA (device auto -> cuda, bf16 autocast, channels_last).
sed -e 's/device: cpu/device: auto/' training/configs/tiny-cpu.yaml > /tmp/tiny-gpu.yaml
{
  time python3 -m training.cli --no-progress synth --out $work/syn --count 160 --size 128 &&
  time python3 -m training.cli --no-progress fit --config /tmp/tiny-gpu.yaml \
    --manifest $work/syn/manifest.csv --out $work/run &&
  python3 -m training.cli export --run $work/run --out $work/bundle --version 0.0.1 &&
  time python3 -m training.cli --no-progress evaluate --bundle $work/bundle \
    --manifest $work/run/dataset/manifest.csv --out $work/eval --device cuda
} > "$out/pipeline.log" 2>&1
echo "pipeline exit $?" | tee -a "$out/pipeline.log"
grep -E "rank|on cuda|member pneumothorax hard|second stage|sensitivity|real" "$out/pipeline.log" | head -20
cp $work/eval/metrics.json "$out/tiny-eval-metrics.json" 2>/dev/null

# 2. Training speed, DenseNet-121 at 1024 px: batch 4 (the thesis's) bf16 + channels_last,
#    the same in fp32 NCHW, and batch 16.
for variant in "bf16-cl:--batch 4" "fp32:--batch 4 --amp off --channels-last off" \
               "bf16-cl-b16:--batch 16"; do
  name=${variant%%:*}
  python3 bench/training.py --arch densenet121 --size 1024 --count 500 --epochs 2 \
    --device cuda --workers 12 ${variant#*:} --json-out "$out/train-$name.json" 2>&1 | tail -15
done

# 3. Inference speed of the 13-member ensemble at 1024 px.
python3 bench/inference.py --device cuda --studies 64 --json-out "$out/inference.json" 2>&1 | tail -25
