"""The demo: on Fashion-MNIST, train a CNN teacher (cached for reruns), then the same MLP
student four ways (alone, fixed-weight KD with alpha 0.9 and T 4, DTO-KD as the paper states it
(the exact rule) and as the README recommends it (the amortized rule, one backward per step)),
print a table and write a report with plots."""

from __future__ import annotations

import time
from pathlib import Path

from dtokd.report import report, table
from dtokd.train import load_config, train
from dtokd.train.config import to_dict

VARIANTS = {
    "student-alone": [
        "teacher.name=null",
        "teacher.checkpoint=null",
        "losses={task: {type: ce}}",
        "balancer.method=fixed",
    ],
    "fixed-kd": ["balancer.method=fixed", "balancer.options={weights: {distill: 0.9, task: 0.1}}"],
    "dto-kd": ["balancer.method=dto"],
    "dto-amortized": ["balancer.method=dto-amortized"],  # the recommended rule (README)
}


def configs_folder() -> Path:
    """``configs/`` of the working directory, else of the source checkout this package runs from."""
    for candidate in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        if (candidate / "fmnist_teacher.yaml").is_file():
            return candidate
    raise FileNotFoundError("the demo's configs (configs/fmnist_*.yaml) were not found; run it from the dtokd checkout")


def run_demo(out: Path, *, quick: bool = False, data_root: str | None = None) -> None:
    configs = configs_folder()
    common = [f"data.root={data_root}"] if data_root else []
    if quick:
        common += ["epochs=1", "data.limit_train=2000"]
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / "teacher"
    teacher_cfg = load_config(configs / "fmnist_teacher.yaml", common)
    start = time.perf_counter()
    if _finished_with(teacher_dir, teacher_cfg):
        print(f"[demo] teacher: reusing the trained teacher in {teacher_dir}")
    else:
        print(
            f"[demo] training the teacher ({teacher_cfg.student.name}, {teacher_cfg.epochs} epochs) into {teacher_dir}"
        )
        resume = (teacher_dir / "checkpoint.pt").is_file() and _same_config(teacher_dir, teacher_cfg)
        train(teacher_cfg, teacher_dir, resume=resume, force=True)  # force: replaces only a previous run's files
    folders, times = [], {}
    for name, overrides in VARIANTS.items():
        folder = out / name
        cfg = load_config(
            configs / "fmnist_distill_mlp.yaml",
            common + [f"name={name}", f"teacher.checkpoint={teacher_dir / 'best.pt'}"] + overrides,
        )
        print(f"[demo] training the student: {name}")
        began = time.perf_counter()
        train(cfg, folder, force=True)
        times[name] = time.perf_counter() - began
        folders.append(folder)
    path = report(folders, out / "report")
    from dtokd.report import load_run

    print("\n[demo] results (Fashion-MNIST test set; best epoch chosen on the validation split)\n")
    print(table([load_run(f) for f in folders]))
    print("\n" + "\n".join(f"- {k}: {v:.0f} s" for k, v in times.items()))
    print(f"\n[demo] total {time.perf_counter() - start:.0f} s; report with plots: {path}")


def _same_config(folder: Path, config) -> bool:
    from dtokd.train.config import load_config as read

    saved = folder / "config.yaml"
    return saved.is_file() and to_dict(read(saved)) == to_dict(config)


def _finished_with(folder: Path, config) -> bool:
    return (folder / "summary.json").is_file() and (folder / "best.pt").is_file() and _same_config(folder, config)
