"""What may be written into a run folder, and what a resumed run must agree with.

- A fresh run writes into a missing or empty folder. ``force=True`` also accepts a folder that
  holds only a previous dtokd run's files, which are removed first. A file counts as a run's
  only if both its name (:data:`RUN_FILES`) and its content are what a dtokd run writes under
  that name (:func:`written_by_a_run`: a checkpoint in dtokd's format, JSON records with the
  run's keys, ...); any other file (a user's own, such as a ``config.yaml`` or ``best.pt`` that
  no run wrote) makes the run refuse, with or without ``force``, and nothing is removed.
- A resumed run continues the run **as saved** in the folder's ``config.yaml``: a configuration
  that differs from it is refused with the differences named, except the settings that do not
  change what is computed (:data:`RESUMABLE_CHANGES`) and a longer schedule asked for with
  ``extend_epochs`` (the learning-rate schedule of the longer run applies from the resumed
  epoch on; the extension is recorded in ``meta.json``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dtokd.interrupts import LOCK_FILE
from dtokd.train.checkpoint import FORMAT
from dtokd.train.config import Config, ConfigError, load_config, to_dict

RUN_FILES = frozenset(
    {
        "config.yaml",
        "meta.json",
        "metrics.jsonl",
        "steps.jsonl",
        "summary.json",
        "teacher.json",
        "best.pt",
        "checkpoint.pt",
        "best.pt.tmp",
        "checkpoint.pt.tmp",
        "tensorboard",
        "diverged.json",
        "bench.log",
        LOCK_FILE,
    }
)  # RECOGNISERS (below) has every one of them but KEPT_ON_FORCE
"""Every entry a dtokd run (or a bench cell) writes into its folder."""

KEPT_ON_FORCE = frozenset({"bench.log", LOCK_FILE})  # the bench's own log of a cell; the lock the run holds

RESUMABLE_CHANGES = frozenset({"device", "data.placement", "teacher.cache_outputs"})
"""Settings a resumed run may change: where it runs or what it reuses, not what it computes."""


def prepare_fresh(folder: Path, *, force: bool, config_file: Path | None = None, remove: bool = True) -> None:
    """Make sure a fresh run may write into ``folder`` (see the module notes); with ``force``,
    remove the previous run's files (where ``remove``: not on a first check before the build).
    ``config_file``: the user's config, never to be replaced."""
    if config_file is not None and config_file.resolve().parent == folder.resolve() and config_file.name in RUN_FILES:
        raise FileExistsError(
            f"the run would write {folder / config_file.name}, which is the config file given; "
            "choose another --out folder"
        )
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"--out {str(folder)!r} exists and is not a folder")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries or set(entries) <= KEPT_ON_FORCE:
        return
    foreign = [name for name in entries if not written_by_a_run(folder / name)]
    if foreign:
        raise FileExistsError(
            f"{folder} holds files that are not a dtokd run's ({_listing(foreign)}); nothing was "
            "written: choose another --out folder"
        )
    if not force:
        what = (
            "a run (checkpoint.pt); pass --resume to continue it"
            if "checkpoint.pt" in entries
            else f"a previous run's files ({_listing(entries)})"
        )
        raise FileExistsError(
            f"{folder} already holds {what}, or pass --force to replace it, or choose another "
            "--out folder; nothing was written"
        )
    if remove:
        _remove_run_files(folder)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _json_lines(path: Path, key: str) -> bool:
    """Every line a JSON object with ``key`` (a line cut off by a kill at the end is allowed)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for k, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if k == len(lines) - 1:
                continue
            return False
        if not isinstance(row, dict) or key not in row:
            return False
    return True


def _dtokd_checkpoint(path: Path) -> bool:
    """A ``torch.save`` archive whose pickle names dtokd's checkpoint format (read without
    unpickling it: a file of unknown origin is never executed)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            return len(pickles) == 1 and FORMAT.encode() in archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return False


def _partial_checkpoint(path: Path) -> bool:
    """What an interrupted ``torch.save`` leaves: nothing yet, or the start of a zip archive."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"", b"PK\x03\x04")


def _mapping_with(keys: set[str]):
    return lambda path: isinstance(content := _json(path), dict) and keys <= set(content)


def _run_config(path: Path) -> bool:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and {"name", "student", "teacher", "losses", "balancer", "optim"} <= set(content)


def _event_files(path: Path) -> bool:
    return path.is_dir() and all(p.is_dir() or p.name.startswith("events.out.tfevents.") for p in path.rglob("*"))


RECOGNISERS = {
    "config.yaml": _run_config,
    "meta.json": _mapping_with({"seed", "commit", "versions", "started"}),
    "summary.json": _mapping_with({"name", "metric", "epochs_run"}),
    "teacher.json": _mapping_with({"name", "checkpoint"}),
    "diverged.json": _mapping_with({"error", "epochs_completed"}),
    "metrics.jsonl": lambda path: _json_lines(path, "epoch"),
    "steps.jsonl": lambda path: _json_lines(path, "step"),
    "checkpoint.pt": _dtokd_checkpoint,
    "best.pt": _dtokd_checkpoint,
    "checkpoint.pt.tmp": _partial_checkpoint,
    "best.pt.tmp": _partial_checkpoint,
    "tensorboard": _event_files,
}
"""How each entry of :data:`RUN_FILES` that ``--force`` may remove is recognised by its content."""


def written_by_a_run(path: Path) -> bool:
    """Whether ``path`` is what a dtokd run writes under its name: :data:`KEPT_ON_FORCE`
    entries (never removed) by name; the others by name and content (:data:`RECOGNISERS`); a
    file or folder of that name holding anything else is not a run's."""
    if path.name in KEPT_ON_FORCE:
        return True
    recognise = RECOGNISERS.get(path.name)
    if recognise is None or path.is_symlink():
        return False
    return (path.is_dir() if path.name == "tensorboard" else path.is_file()) and recognise(path)


def remove_partial_run(folder: Path, created: bool) -> None:
    """Remove what a fresh run wrote before its first checkpoint, its lock included (and the
    folder if it made it)."""
    if not folder.is_dir():
        return
    _remove_run_files(folder)
    (folder / LOCK_FILE).unlink(missing_ok=True)
    if created and not any(folder.iterdir()):
        folder.rmdir()


def _remove_run_files(folder: Path) -> None:
    for path in folder.iterdir():
        if path.name not in KEPT_ON_FORCE and written_by_a_run(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def config_for_resume(folder: Path, config: Config | None, *, extend_epochs: int | None = None) -> Config:
    """The configuration a resumed run continues with: the saved one, checked against ``config``
    (None: take the saved one as it is), with ``epochs`` raised to ``extend_epochs`` if given."""
    saved_path = folder / "config.yaml"
    if not (folder / "checkpoint.pt").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {folder / 'checkpoint.pt'} to resume from"
            + ("; start afresh with --force" if folder.is_dir() and any(folder.iterdir()) else "")
        )
    if not saved_path.is_file():
        raise FileNotFoundError(f"{saved_path} is missing: the run's saved configuration is what a resume continues")
    saved = load_config(saved_path)
    if config is not None:
        differences = [
            (key, a, b)
            for key, (a, b) in _differences(to_dict(saved), to_dict(config)).items()
            if key not in RESUMABLE_CHANGES
        ]
        if differences:
            listing = "; ".join(f"{key}: saved {a!r}, given {b!r}" for key, a, b in differences)
            hint = (
                " (to lengthen the run, pass --extend-epochs N)"
                if any(k == "epochs" for k, _, _ in differences)
                else ""
            )
            raise ConfigError(
                f"--resume continues the run as saved in {saved_path}, but the configuration given differs: "
                f"{listing}{hint}. Give the same config and overrides, or none to use the saved one"
            )
        saved = config  # equal to the saved one but for RESUMABLE_CHANGES
    if extend_epochs is not None:
        if not isinstance(extend_epochs, int) or extend_epochs <= saved.epochs:
            raise ConfigError(
                f"--extend-epochs {extend_epochs!r} must be an integer above the run's {saved.epochs} epochs"
            )
        saved = dataclasses.replace(saved, epochs=extend_epochs)
    return saved


def record_extension(folder: Path, config: Config, previous_epochs: int, done: int) -> None:
    """Write the lengthened schedule into ``config.yaml`` and note the extension in ``meta.json``."""
    from dtokd.train.records import write_yaml

    write_yaml(folder / "config.yaml", to_dict(config))
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("extensions", []).append(
        {
            "from_epochs": previous_epochs,
            "to_epochs": config.epochs,
            "at_epoch": done,
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested dicts (sub-dicts compared key by key,
    except free-form mappings such as ``losses`` and ``balancer.options``, compared whole)."""
    result = {}
    for key in sorted(set(a) | set(b)):
        dotted = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and dotted not in ("losses", "balancer.options"):
            result.update(_differences(va, vb, dotted + "."))
        elif va != vb:
            result[dotted] = (va, vb)
    return result


def _listing(names: list[str], count: int = 6) -> str:
    return ", ".join(names[:count]) + (f", ... ({len(names)} in all)" if len(names) > count else "")
