#!/usr/bin/env bash
# The scale-out issue's GPU check and comparison, for one run on a lent H100/H200 (device tool):
#   1. the CUDA tests (tests/test_cuda.py: CUDA update = CPU update, where a step waits for the
#      device, bf16/fp16);
#   2. step time, CIFAR-10 JPEG, ResNet-56 -> ResNet-20, bf16 autocast, for each batch size in
#      $BATCHES (default 256), each timing in $TIMINGS (default "per-step back-to-back", see
#      step_time.py) and the methods in $METHODS (default all), with peak memory (unless
#      NO_MEMORY=1), host syncs, device waits and GPU kernels per step;
#   3. if .device-data/before/src exists (another commit's src/, e.g. `git archive COMMIT src`),
#      the core methods again with that code, in the same run on the same card: before/after.
#
# Here, before the call:  mkdir -p .device-data && cp ../shared/data/cifar10-jpeg.tar.gz .device-data/
#                         echo /.device-data/ >> .git/info/exclude
#                         git rev-parse --short HEAD > .device-data/COMMIT   (the copy there has no git history)
#                         (optional) mkdir -p .device-data/before && git archive COMMIT src | tar -x -C .device-data/before
# Device call:            carry [".device-data"], command "bash benchmarks/gpu_scale_out.sh", timeout_s 360
#                         (e.g. "TESTS=0 NO_MEMORY=1 BATCHES='256 1024' METHODS=core bash benchmarks/gpu_scale_out.sh")
# The image there has torch, numpy, scipy, pyyaml, tqdm, pytest: src/ is used through PYTHONPATH.
set -euo pipefail
export PYTHONUNBUFFERED=1 DTOKD_CACHE=/tmp/dtokd-cache TQDM_DISABLE=1
export DTOKD_COMMIT="$(cat .device-data/COMMIT 2>/dev/null || echo unknown)"
out="${OUT:-benchmarks/results}"
images=.device-data/cifar10-jpeg.tar.gz
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

if [ "${TESTS:-1}" = 1 ]; then
  PYTHONPATH=src python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
fi

# decode the archive once into the tensor cache, so that the timed runs and their memory subprocesses do not
PYTHONPATH=src python3 -c "from dtokd.data import build_data; build_data('image-folder', '$images', val_fraction=0.0, augment=True)"

for batch in ${BATCHES:-256}; do
  memory=()
  [ "${NO_MEMORY:-0}" = 1 ] && memory=(--no-memory)
  for timing in ${TIMINGS:-per-step back-to-back}; do
    common=(--device cuda --batch "$batch" --amp bf16 --images "$images" --rounds 20 --steps 5 --warmup 10 --timing "$timing")
    name="step_time_cuda_bf16_b${batch}_${timing}"
    if [ -d .device-data/before/src ]; then
      PYTHONPATH=.device-data/before/src DTOKD_COMMIT="$(cat .device-data/before/COMMIT 2>/dev/null || echo before)" \
        python3 benchmarks/step_time.py "${common[@]}" --methods core --no-memory \
        --output "$out/${name}_before" 2>&1 | tee "$out/${name}_before.log"
    fi
    PYTHONPATH=src python3 benchmarks/step_time.py "${common[@]}" --methods "${METHODS:-all}" "${memory[@]}" \
      --output "$out/$name" 2>&1 | tee "$out/$name.log"
    memory=(--no-memory)  # memory does not depend on the timing: measured once per batch size
  done
done
