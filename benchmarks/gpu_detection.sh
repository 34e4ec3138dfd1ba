#!/usr/bin/env bash
# The detection issue's GPU checks, for ONE run on a lent H100/H200 (device tool), about 9 minutes:
#   1. tests/test_detection.py on the GPU (its CUDA tests: DTO over 5 detection objectives on
#      cuda, CPU-vs-CUDA first step, bf16), 3 minutes at most;
#   2. the synthetic teacher (configs/coco/synthetic_teacher.yaml) on cuda, 2 minutes at most;
#   3. the synthetic matrix (configs/bench_synthetic_coco.yaml, 4 cells at once) on cuda,
#      resumable: what finishes in 4 minutes is aggregated; a later call finishes the rest if
#      $OUT's runs/ come back in .device-data/bench_synthetic_coco.tar.gz.
# Here, before the call:
#   grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl pycocotools==2.0.11 timm==1.0.31 torchjd==0.18.0
#   mkdir -p .device-data && git rev-parse --short HEAD > .device-data/COMMIT
#   grep -qx '/.device-data/' .git/info/exclude || echo /.device-data/ >> .git/info/exclude
# Device call: carry [".device-data", ".whl"], command "bash benchmarks/gpu_detection.sh", timeout_s 600
set -uo pipefail
export PYTHONUNBUFFERED=1 DTOKD_CACHE=/tmp/dtokd-cache TQDM_DISABLE=1 PYTHONPATH=src
export DTOKD_COMMIT="$(cat .device-data/COMMIT 2>/dev/null || echo unknown)"
out="${OUT:-benchmarks/results/gpu_detection}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "commit $DTOKD_COMMIT"; } > "$out/machine.txt" 2>&1
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_detection.py -k "cuda or two_processes" \
  > "$out/1_tests.txt" 2>&1; echo "tests rc=$?" >> "$out/1_tests.txt"
if [ -f .device-data/bench_synthetic_coco.tar.gz ]; then tar -xzf .device-data/bench_synthetic_coco.tar.gz; fi
if [ ! -f runs/synthetic_coco_teacher/summary.json ]; then
  timeout 120 python3 -m dtokd.cli train configs/coco/synthetic_teacher.yaml device=cuda data.workers=4 \
    --out runs/synthetic_coco_teacher --quiet $( [ -f runs/synthetic_coco_teacher/checkpoint.pt ] && echo --resume ) \
    > "$out/2_teacher.txt" 2>&1; echo "teacher rc=$?" >> "$out/2_teacher.txt"
fi
timeout 240 python3 -m dtokd.cli bench configs/bench_synthetic_coco.yaml --out runs/bench_synthetic_coco --parallel 4 \
  > "$out/3_bench.txt" 2>&1; echo "bench rc=$?" >> "$out/3_bench.txt"
python3 -m dtokd.cli bench configs/bench_synthetic_coco.yaml --out runs/bench_synthetic_coco --aggregate-only \
  >> "$out/3_bench.txt" 2>&1
cp runs/bench_synthetic_coco/results.* runs/bench_synthetic_coco/*.png "$out/" 2>/dev/null
tar -czf "$out/bench_synthetic_coco.tar.gz" runs/synthetic_coco_teacher runs/bench_synthetic_coco 2>/dev/null
echo done
