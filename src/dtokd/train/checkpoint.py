"""Checkpoints written atomically (temporary file + ``os.replace``), read with checks.

A checkpoint holds the state of everything a run needs to continue exactly: student,
projectors, optimizer, scheduler, balancer, grad scaler, RNG states, the next epoch, the
history of metrics, and an identity (student name, number of classes, loss names) that a
resumed run must match.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "dtokd-checkpoint-v1"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, temporary)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_checked(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint and make sure it belongs to a run with this ``identity``."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(error).__name__}: {error}); "
                         "it was left untouched") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dtokd checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__})")
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
