"""What a run folder keeps: resolved config, metadata (seed, versions, commit, machine),
metrics as JSON lines, and TensorBoard events when tensorboard is installed."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from dtokd.interrupts import uninterrupted


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the code this process runs: read once, the first time it is asked for (the
    command line asks before it dispatches, so that a long command, a bench matrix, does not
    record commits made while it ran; nothing asks at import). ``DTOKD_COMMIT`` where it is set:
    a copy of the tree without its git history, as on a lent GPU (``benchmarks/gpu_*.sh``)."""
    if os.environ.get("DTOKD_COMMIT"):
        return os.environ["DTOKD_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads{gpu}"


def metadata(seed: int) -> dict[str, Any]:
    import torchvision

    from dtokd import __version__

    return {
        "seed": seed,
        "commit": git_commit(),
        "machine": machine(),
        "command": " ".join(sys.argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "dtokd": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
    }


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


class MetricLog:
    """Append-only JSON lines (``metrics.jsonl`` per epoch, ``steps.jsonl`` per logged step),
    mirrored to TensorBoard when available; a no-op when not ``enabled`` (ranks other than 0)."""

    def __init__(self, folder: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                pass

    def write(self, file: str, row: dict[str, Any], step: int) -> None:
        """Append ``row`` to ``file`` and to TensorBoard, whole: a stop signal during the write is
        delivered after it (:func:`dtokd.interrupts.uninterrupted`)."""
        if not self.enabled:
            return
        with uninterrupted():
            with open(self.folder / file, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                        self.writer.add_scalar(f"{file.split('.')[0]}/{key}", value, step)

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop lines written after the checkpoint's epoch (a killed epoch's partial log)."""
        if not self.enabled:
            return
        for file in ("metrics.jsonl", "steps.jsonl"):
            path = self.folder / file
            if path.is_file():
                kept = [r for r in read_jsonl(path) if r.get("epoch", 0) < epoch]
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Flush and close the TensorBoard writer (not cut by a stop signal, which comes after)."""
        if self.writer is not None:
            with uninterrupted():
                self.writer.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (none if it is missing); a line that is not one is
    an error naming the file and the line."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON object ({error.msg}): {line[:60]!r}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object: {line[:60]!r}")
        rows.append(row)
    return rows
