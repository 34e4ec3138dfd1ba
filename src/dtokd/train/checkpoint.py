"""Checkpoints written atomically (temporary file + ``os.replace``), read with checks.

A checkpoint holds the state of everything a run needs to continue exactly: student,
projectors, optimizer, scheduler, balancer, grad scaler, RNG states, the next epoch, the
history of metrics, and an identity (student name, number of classes, loss names) that a
resumed run must match. Its file format (the SHA-256 checksum of its content verified on load,
read with ``weights_only=True``) is :mod:`dtokd.models.weight_file`'s, which the model registry
reads a run's ``best.pt`` with.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtokd.models.weight_file import FORMAT, checksum, load_weights_only, verify_checksum

__all__ = [
    "FORMAT",
    "checksum",
    "load_checked",
    "load_weights_only",
    "rng_state",
    "save_atomic",
    "seed_everything",
    "set_rng_state",
    "verify_checksum",
    "write_text_atomic",
]


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (with its checksum) to ``path`` through a temporary file and an atomic
    rename: ``path`` holds the old or the new checkpoint, never a part of one; an interruption
    (Ctrl-C) or an error while writing removes the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    content = {"format": FORMAT, **state}
    try:
        torch.save({**content, "checksum": checksum(content)}, temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        temporary.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        raise CheckpointWriteError(
            f"could not write {path} ({free / 2**20:.0f} MiB free on its disk; {str(error).splitlines()[0]}); {kept}"
        ) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the old one is kept."""


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds the old text or ``text``, never a part (a temporary file of this process's
    own, then an atomic rename: concurrent writers of one cache entry leave one whole copy)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checked(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint and make sure it belongs to a run with this ``identity``."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    try:
        state = load_weights_only(path)
    except pickle.UnpicklingError as error:  # what weights_only refuses: a pickled object to construct
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors, numbers, strings and containers "
            f"({str(error).splitlines()[0]}): refused without running them; a dtokd checkpoint holds none, "
            "so this file was not written by dtokd or was altered. It was left untouched"
        ) from None
    except Exception as error:  # noqa: BLE001 - any other failure to read means a corrupt file
        raise ValueError(
            f"checkpoint {path} is corrupt or unreadable ({type(error).__name__}: {error}); it was left untouched"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a dtokd checkpoint "
            f"(format {state.get('format') if isinstance(state, dict) else type(state).__name__})"
        )
    verify_checksum(state, path)
    saved = state.get("identity", {})
    mismatched = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"checkpoint {path} belongs to a different run ({details}); it was left untouched")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
