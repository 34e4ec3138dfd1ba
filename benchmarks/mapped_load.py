"""Private memory a process gains by reading a checkpoint, with and without the memory map that
``dtokd.models.weight_file.mapped_load`` uses: the ranks of a run that resumes (or loads its
teacher) each read the whole file, so without the map a node holds one private copy per rank.

Each reading runs in a fresh process, which loads a file of ``--megabytes`` of float32 through
``mapped_load`` (or plain ``torch.load``), touches every value, and reports its ``RssAnon`` (private)
and ``RssFile`` (file pages, shared between processes through the page cache) from
``/proc/self/status``, less the same figures taken just before the load; the median of
``--repeats`` processes per way::

    python benchmarks/mapped_load.py --megabytes 400 --repeats 3 --out benchmarks/results/lm_memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dtokd.train.records import git_commit, machine

READ = """
import json, sys, torch
from pathlib import Path
from dtokd.models.weight_file import mapped_load
def status():
    rows = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
    return {k: int(v.split()[0]) / 1024 for k, v in rows.items()}
before = status()
path = Path(sys.argv[1])
state = mapped_load(path) if sys.argv[2] == "mapped" else torch.load(path, map_location="cpu", weights_only=True)
float(state["w"].sum())
after = status()
print(json.dumps({k: after[k] - before[k] for k in ("RssAnon", "RssFile")}))
"""


def measure(path: Path, way: str) -> dict[str, float]:
    """One fresh process's growth in private and file-backed memory (MiB) from reading ``path``."""
    out = subprocess.run([sys.executable, "-c", READ, str(path), way], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pt"
        torch.save({"w": torch.randn(args.megabytes * 2**20 // 4)}, path)
        runs = {way: [measure(path, way) for _ in range(args.repeats)] for way in ("plain", "mapped")}
    result = {
        way: {key: statistics.median(r[key] for r in rows) for key in ("RssAnon", "RssFile")}
        for way, rows in runs.items()
    }
    record = {
        "command": "python " + " ".join(sys.argv),
        "file_mib": args.megabytes,
        "repeats": args.repeats,
        "commit": git_commit(),
        "machine": machine(),
        "median_growth_mib": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mapped_load.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
