#!/usr/bin/env bash
# The GPU-trainer issue's checks and measurements, for ONE run on a lent H100/H200 (device tool),
# sized to about 8 minutes:
#   1. the CUDA tests: balancers (tests/test_cuda.py) and the trainer end to end
#      (tests/test_cuda_trainer.py: train/distill for every engine and dto-amortized, resume,
#      eval, data on the device vs the host, bf16 + channels-last + CUDA graphs);
#   2. the teacher check of configs/cifar10_resnet56_resnet20.yaml on the GPU (epochs=0);
#   3. epoch time of the trainer against a hand-written KD loop, DTO rows against fixed KD,
#      CUDA graphs (benchmarks/trainer_throughput.py; CIFAR-10 JPEG, ResNet-56 -> ResNet-20,
#      bf16, batch 256, 3 epochs);
#   4. `dtokd bench --parallel 4` against `--parallel 1` on a small CIFAR-10 matrix (cells/min);
#   5. step time with TorchJD's autogram Gramian beside our exact engine (if torchjd travels as
#      a wheel in .whl/);
#   6. the ImageNet recipe's cost: one DeiT-Ti step at 224 px with three objectives (weighted sum,
#      three-backward floor, exact DTO, representation at the final norm, amortized) from a
#      RegNetY-160 teacher, and the streaming loader's images/s with 4/8/16 workers
#      (benchmarks/vit_step_time.py).
# Every part writes under $OUT (falls back to benchmarks/results/gpu_trainer) and has its own
# time limit, so one slow part does not lose the others.
#
# Here, before the call:
#   mkdir -p .device-data/teachers && cp ../shared/data/cifar10-jpeg.tar.gz .device-data/ \
#     && cp ../shared/data/teachers/cifar10_resnet56.pth .device-data/teachers/
#   grep -qx '/.device-data/' .git/info/exclude || echo /.device-data/ >> .git/info/exclude
#   git rev-parse --short HEAD > .device-data/COMMIT
#   (optional, for part 5) grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps -d .whl torchjd==0.18.0 timm==1.0.31
# Device call: carry [".device-data", ".whl"], command "bash benchmarks/gpu_trainer.sh", timeout_s 600
set -uo pipefail
export PYTHONUNBUFFERED=1 DTOKD_CACHE=/tmp/dtokd-cache TQDM_DISABLE=1 PYTHONPATH=src
export DTOKD_COMMIT="$(cat .device-data/COMMIT 2>/dev/null || echo unknown)"
out="${OUT:-benchmarks/results/gpu_trainer}"
mkdir -p "$out"
images=.device-data/cifar10-jpeg.tar.gz
teacher=.device-data/teachers/cifar10_resnet56.pth
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "commit $DTOKD_COMMIT";
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$out/machine.txt"

echo "== 1. CUDA tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_trainer.py 2>&1 \
  | tee "$out/test_cuda.log" | tail -25

echo "== 2. teacher check (decodes the archive once into the cache)"
timeout 60 python3 -m dtokd.cli distill configs/cifar10_resnet56_resnet20.yaml epochs=0 device=cuda \
  data.root=$images teacher.checkpoint=$teacher --out /tmp/teacher-check 2>&1 | tail -4
cp /tmp/teacher-check/teacher.json "$out/teacher_check.json" 2>/dev/null

echo "== 3. trainer epoch time"
timeout 220 python3 benchmarks/trainer_throughput.py --data $images --teacher-weights $teacher --device cuda \
  --amp bf16 --batch 256 --epochs 3 --repeats 1 --output "$out/trainer_throughput" 2>&1 | tail -14

echo "== 4. bench --parallel"
cat > /tmp/probe.yaml <<EOF
name: parallel probe, CIFAR-10 JPEG 10,000 images, 2 epochs
seeds: [0, 1]
student_config: $PWD/configs/cifar10_resnet56_resnet20.yaml
teacher_config: $PWD/configs/cifar10_resnet56_resnet20.yaml
base: [epochs=2, data.limit_train=10000, data.root=$PWD/$images, batch_size=256, log_every=20]
pairs:
  r56-r20: {teacher: resnet56, student: resnet20, checkpoint: $PWD/$teacher}
reference: kd-fixed
methods:
  kd-fixed: [balancer.method=fixed, "balancer.options={weights: {distill: 0.9, task: 0.1}}"]
  dto-representation: [balancer.method=dto, balancer.engine=representation]
  dto-amortized: [balancer.method=dto-amortized]
  dto: [balancer.method=dto]
EOF
for n in 1 4; do
  timeout 100 python3 -m dtokd.cli bench /tmp/probe.yaml --out /tmp/probe-$n --parallel $n 2>&1 | grep -E "cells per minute|failed|error"
  cp /tmp/probe-$n/timing.jsonl "$out/bench_parallel_$n.jsonl" 2>/dev/null
done

echo "== 5. step time with TorchJD autogram"
timeout 90 python3 benchmarks/step_time.py --device cuda --batch 256 --amp bf16 --images $images --rounds 10 \
  --steps 5 --warmup 5 --timing back-to-back --no-memory \
  --methods "plain KD (fixed 0.9/0.1);two-backward floor;DTO exact;DTO on TorchJD autogram's Gramian;TorchJD MGDA (autojac)" \
  --output "$out/step_time_autogram" 2>&1 | tail -9

echo "== 6. DeiT-Ti step with three objectives, streaming loader"
timeout 150 python3 benchmarks/vit_step_time.py --device cuda --amp bf16 --batch 128 --rounds 8 --steps 4 \
  --workers 4 8 16 --loader-images 2000 --output "$out/vit_step_time" 2>&1 | tail -14
exit 0
