#!/usr/bin/env bash
# The scale-out issue's GPU comparison, prepared for one run on a lent H100/H200 (device tool).
# Not yet run: no GPU was lent to the session that wrote it.
#
# Here, before the call:  mkdir -p .device-data && cp ../shared/data/cifar10-jpeg.tar.gz .device-data/
#                         echo /.device-data/ >> .git/info/exclude
# Device call:            carry [".device-data"], command "bash benchmarks/gpu_scale_out.sh", timeout_s 540
set -euo pipefail
export PYTHONUNBUFFERED=1 DTOKD_CACHE=/tmp/dtokd-cache
python3 -m pip install --quiet --no-deps -e . 2>/dev/null || export PYTHONPATH="$PWD/src"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
out="${OUT:-benchmarks/results}"
python3 benchmarks/step_time.py --device cuda --batch 256 --amp bf16 \
  --images .device-data/cifar10-jpeg.tar.gz --methods core --rounds 7 --steps 10 --warmup 10 \
  --output "$out/step_time_cuda_bf16" 2>&1 | tee "$out/step_time_cuda_bf16.log"
