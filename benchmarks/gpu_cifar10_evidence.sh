#!/usr/bin/env bash
# The evidence issue's CIFAR-10 matrix (configs/bench_cifar10.yaml) on a lent GPU, ONE device call
# of at most 9 minutes that resumes where the last one stopped: the matrix's state travels in
# .device-data/cifar10_evidence_state.tar.gz (bring back the one this call writes under $OUT).
#   1. restore the state (if any);
#   2. fine-tune the released teacher on the JPEG training split once (resumable);
#   3. run `dtokd bench --parallel $PARALLEL` for $BUDGET seconds, then SIGINT: every cell stops
#      at its last checkpoint;
#   4. aggregate what is finished and write the state back (summaries, logs, the checkpoints of
#      unfinished cells; no best.pt).
#
# Here, before the call (the first time):
#   mkdir -p .device-data/teachers && cp ../shared/data/cifar10-jpeg.tar.gz .device-data/ \
#     && cp ../shared/data/teachers/cifar10_resnet56.pth .device-data/teachers/
#   grep -qx '/.device-data/' .git/info/exclude || echo /.device-data/ >> .git/info/exclude
#   git rev-parse --short HEAD > .device-data/COMMIT
# Later calls: copy the returned cifar10_evidence_state.tar.gz into .device-data/ first.
# Device call: carry [".device-data"], command "bash benchmarks/gpu_cifar10_evidence.sh", timeout_s 560
# Afterwards: results.md / results.csv come back beside the state; the plots are inside it.
set -uo pipefail
export PYTHONUNBUFFERED=1 DTOKD_CACHE=/tmp/dtokd-cache TQDM_DISABLE=1 PYTHONPATH=src
out="${OUT:-benchmarks/results/cifar10_evidence}"
mkdir -p "$out" runs
state=.device-data/cifar10_evidence_state.tar.gz
[ -f "$state" ] && tar -xzf "$state" -C runs
nvidia-smi --query-gpu=name --format=csv,noheader || true

# the matrix and the fine-tuning config with this machine's paths
sed -e 's#../shared/data/cifar10-jpeg.tar.gz#.device-data/cifar10-jpeg.tar.gz#g' \
    -e 's#../shared/data/teachers/#.device-data/teachers/#g' configs/bench_cifar10.yaml > /tmp/bench_cifar10.yaml
sed -e 's#../shared/data/cifar10-jpeg.tar.gz#.device-data/cifar10-jpeg.tar.gz#g' \
    -e 's#../shared/data/teachers/#.device-data/teachers/#g' configs/cifar10_teacher_finetune.yaml > /tmp/finetune.yaml
sed -i "s#student_config: configs/#student_config: $PWD/configs/#; s#teacher_config: configs/cifar10_teacher_finetune.yaml#teacher_config: /tmp/finetune.yaml#; s#checkpoint: runs/#checkpoint: $PWD/runs/#; s#checkpoint: .device-data/#checkpoint: $PWD/.device-data/#; s#data.root=.device-data/#data.root=$PWD/.device-data/#" /tmp/bench_cifar10.yaml

if [ ! -f runs/cifar10_teacher_ft/summary.json ]; then
  resume=(); [ -f runs/cifar10_teacher_ft/checkpoint.pt ] && resume=(--resume)
  timeout -s INT 120 python3 -m dtokd.cli train /tmp/finetune.yaml --out runs/cifar10_teacher_ft --quiet "${resume[@]}" \
    | tail -3
fi

if [ -f runs/cifar10_teacher_ft/summary.json ]; then
  timeout -s INT "${BUDGET:-380}" python3 -m dtokd.cli bench /tmp/bench_cifar10.yaml --out runs/bench_cifar10 \
    --parallel "${PARALLEL:-6}" 2>&1 | grep -E "finished|failed|cells per minute|interrupted|results" | tail -30
  python3 -m dtokd.cli bench /tmp/bench_cifar10.yaml --out runs/bench_cifar10 --aggregate-only | tail -1
  cp runs/bench_cifar10/results.md runs/bench_cifar10/results.csv "$out/" 2>/dev/null
  echo "finished cells: $(find runs/bench_cifar10 -name summary.json | wc -l) of 102"
fi
# the state for the next call: no finished run's checkpoint, no cell's best.pt (the teacher's stays)
find runs -name checkpoint.pt -execdir test -f summary.json \; -delete 2>/dev/null
tar -cf /tmp/state.tar -C runs --exclude=tensorboard cifar10_teacher_ft 2>/dev/null
[ -d runs/bench_cifar10 ] && tar -rf /tmp/state.tar -C runs --exclude=best.pt --exclude=tensorboard bench_cifar10
gzip -c /tmp/state.tar > "$out/cifar10_evidence_state.tar.gz"
ls -la "$out"
exit 0
