#!/usr/bin/env bash
# One prepared GPU session (about 8 minutes of device time on an H100), writing logs and JSON to
# $OUT (or --out DIR), a log and a JSON file per step:
#   0. tests.log: the GPU tests (tests/test_gpu_engine.py, tests/test_gpu_decode.py,
#      tests/test_device_preprocess.py): every backend equal to eager, nvImageCodec's pixels
#      equal to the CPU decoders', preprocessing on CUDA equal to OpenCV's;
#   1. inference.json: the 13-member DenseNet-121 ensemble at 1024 px (bench/inference.py):
#      one member bf16 by autocast vs cast, where one member pass spends its time (profile),
#      then a sweep of engines (backend, batch, streams, compile mode);
#   1b. preprocess.json: a decode process's CPU and wall seconds per 2500 px instance with
#      preprocessing (and JPEG 2000 decoding) on the device, against OpenCV (bench/preprocess.py);
#   2. e2e.json: the whole node on the device (SCP, queue, pipelined workers, dispatcher to a
#      loopback PACS) against the bare engine in the same run, 2500 px JPEG 2000 instances, with
#      the fastest uncompiled engine of step 1 (bench/e2e.py);
#   3. training.json: one DenseNet-121 member training at 1024 px (bench/training.py);
#   4. with --kermany, the Kermany real-data check (held-out protocol), when .kermany/ holds the
#      sample (the 720 PNGs of ../shared/data/kermany-sample downscaled to 256 px; README
#      "Real-data check"); it does not fit in the 8 minutes with steps 1-3.
# Runs with the machine's python3 and PyTorch; dependencies it lacks travel as wheels in .whl/.
#
# Dry run on a CPU (same steps, test-sized): bench/gpu_session.sh --cpu [--out DIR]
set -uo pipefail
cpu=0
kermany=0
steps=tests,inference,preprocess,e2e,training
out=${OUT:-/tmp/gpu-out}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cpu=1 ;;
    --kermany) kermany=1 ;;
    --steps) steps=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--cpu] [--kermany] [--steps a,b,...] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
python=python3
if [ $cpu = 1 ]; then
  [ -x .venv/bin/python ] && python=.venv/bin/python
  device=cpu
  inference=(--device cpu --profile --profile-compiled --arch densenet_small --size 256 --members 2
    --studies 2 --repeats 1)
  e2e=(--device cpu --small --studies 6 --latency-studies 2 --source-px 1500 --j2k)
  training=(--device cpu --arch densenet_small --size 128 --count 16 --batch 4 --epochs 1
    --workers 1)
  t_tests=270 t_inference=480 t_e2e=480 t_training=180 t_preprocess=300
else
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    # Two nvidia wheels ship nvidia/__init__.py; the one kept must extend the package's path to
    # the machine's own nvidia packages rather than hide them behind /tmp/site.
    [ -d /tmp/site/nvidia ] &&
      echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" \
        > /tmp/site/nvidia/__init__.py
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  # nvImageCodec finds nvJPEG / nvJPEG2000 from the wheels carried in .whl.
  export LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:/tmp/site/nvidia/nvjpeg2k/lib:${LD_LIBRARY_PATH:-}
  device=cuda:0
  # H100/H200 dense bf16 peak, 989 TFLOP/s.
  # The sweep: the winner of 2026-11-27 (CUDA graphs, 4 streams), then Inductor's kernels
  # (compile, mode default) replayed in the same graphs. SWEEP overrides it, e.g. with
  # compile:32:4:max-autotune-no-cudagraphs (minutes of autotuning).
  # PROFILE_COMPILED=1 adds where a compiled member's time goes, kernel by kernel (one more
  # compile, about a minute: give the step T_INFERENCE=330).
  inference=(--device cuda:0 --quick --profile --studies 64 --repeats 3 --engine-repeats 2
    --member-batch 16 --peak-gflops 989000
    --sweep "${SWEEP:-cuda_graph:32:4,compile:32:4}")
  [ "${PROFILE_COMPILED:-0}" = 1 ] && inference+=(--profile-compiled)
  # E2E_WORKERS: workers sharing the device (each one process, one GIL: about 18 studies/s of
  # its own CPU work at most, README "Speed"); each holds its engine's activations.
  e2e=(--device cuda:0 --untrained densenet121 --size 1024 --studies 128 --latency-studies 3
    --source-px 2500 --j2k --workers-per-device "${E2E_WORKERS:-3}" --studies-in-flight 32
    --decode-processes 4 --ingest-processes 4 --senders 4)
  training=(--device cuda --arch densenet121 --size 1024 --count 96 --batch 4 --epochs 2
    --workers 8)
  # Seconds per step: inference + e2e + tests fit one 10-minute device command.
  t_tests=${T_TESTS:-90} t_inference=${T_INFERENCE:-260} t_e2e=${T_E2E:-210} t_training=60
  t_preprocess=${T_PREPROCESS:-45}
fi
$python -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and \
torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
$python -c "import importlib.metadata as m, shutil
from pydicom.pixels.decoders import JPEG2000LosslessDecoder as j2k
print(*(f'{d} {m.version(d)}' for d in ('pydicom', 'pynetdicom', 'highdicom', 'sqlalchemy',
  'hl7apy', 'dicomweb-client', 'pylibjpeg-openjpeg')), sep=', ')
print('JPEG 2000 decoders:', *sorted(j2k.available_plugins), '- dcmtk storescp:',
  shutil.which('storescp') or 'none (bench/e2e.py uses pynetdicom)')" 2>&1 | tee -a "$out/gpu.txt"
status=0
step() {  # name, seconds, command...: log to $out/name.log, keep going after a failure
  local name=$1 seconds=$2
  shift 2
  [[ ",$steps," == *",$name,"* ]] || return 0
  echo "== $name (limit ${seconds} s)"
  local t0=$SECONDS
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "$name exit $code after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
  tail -8 "$out/$name.log"
  [ $code = 0 ] || status=1
}

# 0. The GPU tests (skipped on a CPU).
# TESTS_K picks some of them (pytest -k), where device time is short.
step tests $t_tests $python -m pytest -q -p no:cacheprovider -rs -k "${TESTS_K:-}" \
  tests/test_gpu_engine.py tests/test_gpu_decode.py tests/test_device_preprocess.py
# 1. Inference speed of the ensemble.
step inference $t_inference $python bench/inference.py "${inference[@]}" \
  --json-out "$out/inference.json"
# 1b. A decode process's work per instance with preprocessing on the device.
step preprocess $t_preprocess $python bench/preprocess.py --device $device --repeats 3 \
  --json-out "$out/preprocess.json"
# 2. The whole node on the device against the bare engine, with step 1's fastest engine.
if [ $cpu = 0 ]; then
  # Without step 1's figures: the winner of 2026-11-27 on an H200 (README, "Speed").
  backend=cuda_graph batch=32 streams=4
  [ -f "$out/inference.json" ] &&
  read -r backend batch streams < <($python -c "import json, sys
sweep = json.load(open(sys.argv[1]))['sweep']
# Compiled engines are left out: three workers compiling at once take minutes to start.
timed = {k: v for k, v in sweep.items() if 'studies_per_s' in v and v['backend'] != 'compile'}
best = max(timed.values(), key=lambda v: v['studies_per_s'],
           default={'backend': 'cuda_graph', 'batch': 32, 'member_streams': 4})
print(best['backend'], best['batch'], best['member_streams'])" "$out/inference.json")
  # E2E_BACKEND=compile measures the node with the CUDA default (workers compile one at a
  # time into a shared cache: about 80 s for the first, less for the others).
  backend=${E2E_BACKEND:-$backend}
  e2e+=(--backend "${backend:-eager}" --batch-size "${batch:-16}" --member-streams "${streams:-1}"
    --studies-in-flight "${batch:-32}")
fi
step e2e $t_e2e $python bench/e2e.py "${e2e[@]}" --json-out "$out/e2e.json"
# 3. Training speed of one member.
step training $t_training $python bench/training.py "${training[@]}" \
  --json-out "$out/training.json"

# 4. Kermany: fit/calibration split of validation patients, threshold on held-out studies.
if [ $kermany = 1 ] && [ -f .kermany/labels.csv ]; then
  k=/tmp/kermany
  rm -rf "$k"
  {
    python3 -m training.cli import-folders --root .kermany --labels .kermany/labels.csv \
      --mapping training/configs/kermany-mapping.yaml --out $k/manifest.csv &&
    time python3 -m training.cli --no-progress fit --config training/configs/kermany-gpu.yaml \
      --manifest $k/manifest.csv --out $k/run &&
    python3 -m training.cli export --run $k/run --out $k/bundle --version 0.2.0 &&
    time python3 -m training.cli --no-progress evaluate --bundle $k/bundle \
      --manifest $k/run/dataset/manifest.csv --out $k/eval --device $device --workers 8
  } > "$out/kermany.log" 2>&1
  echo "kermany exit $?" | tee -a "$out/kermany.log"
  tail -5 "$out/kermany.log"
  cp $k/eval/metrics.json "$out/kermany-metrics.json" 2>/dev/null
  cp $k/eval/report.md "$out/kermany-report.md" 2>/dev/null
  cp $k/run/operating_point.json "$out/kermany-operating-point.json" 2>/dev/null
  cut -d, -f3 $k/run/image_roles.csv 2>/dev/null | sort | uniq -c | tee "$out/kermany-roles.txt"
fi
ls -l "$out"
exit $status
