"""The file format of dtokd's checkpoints and weight files, read by the model registry (a run's
``best.pt`` as a teacher's or student's weights) and written by the trainer
(:mod:`dtokd.train.checkpoint`): a ``torch.save`` of a dict with ``"format": FORMAT`` and a
SHA-256 :func:`checksum` of its content (every tensor's bytes, dtype and shape, every other
value's representation, in order), verified on load, so that a file whose bytes changed on disk
is refused rather than silently loaded. Files are read with ``weights_only=True``
(:func:`load_weights_only`): a file that would construct any object beyond tensors, numbers,
strings, containers and NumPy's random state is refused without running it.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "dtokd-checkpoint-v1"


def checksum(state: Any) -> str:
    """SHA-256 over the content of a nested state (dicts, lists, tuples, tensors, arrays, values)."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(value, np.ndarray):
            digest.update(f"A{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                digest.update(repr(key).encode())
                feed(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    feed(state)
    return digest.hexdigest()


NUMPY_RNG_GLOBALS = (np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct)  # type: ignore[attr-defined]
"""What NumPy's random state (a uint32 array) needs to be read back: array construction only."""


def load_weights_only(path: Path) -> Any:
    """``torch.load`` of a checkpoint with ``weights_only=True``: tensors, numbers, strings,
    containers and the NumPy random state's array; a file that would construct any other object
    (run code on load) raises ``pickle.UnpicklingError`` instead. Not memory-mapped: an optimizer
    keeps the loaded state tensors as they are, which would hold the file (and its disk space,
    after the next checkpoint replaces it) for the rest of the run."""
    with torch.serialization.safe_globals(list(NUMPY_RNG_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True)


def mapped_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, memory-mapped where the file is in
    torch's zip format (any file ``torch.save`` wrote since 1.6): the processes of a run that read
    one weights file (each rank loading the teacher) share its pages in the page cache instead of
    each holding a private copy (measured: a 400 MB file adds 400 MB of private memory to a process
    without the map, none with it; benchmarks/results/lm_memory/README.md). For weights copied
    into a model (``load_state_dict``), after which the map is released with the returned dict."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def verify_checksum(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose content no longer matches the checksum written with it (one
    from before the checksums is loaded with a warning)."""
    content = {k: v for k, v in state.items() if k != "checksum"}
    if "checksum" not in state:  # written before checkpoints carried one: usable, but not verifiable
        warnings.warn(
            f"checkpoint {path} has no checksum (written by an older dtokd): loaded without verification",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if checksum(content) != state["checksum"]:
        raise ValueError(
            f"checkpoint {path} is corrupt: its content does not match the checksum written with it "
            "(bytes changed on disk); it was left untouched"
        )


def read_weights(path: str | Path) -> tuple[dict, dict]:
    """A local weights file as ``(state_dict, identity)``: a plain state dict, or the model of a
    dtokd run's ``best.pt`` with its ``identity`` (model name, classes; empty for plain files)
    and its checksum verified. Read with ``weights_only=True``: no code in the file runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        state = mapped_load(path)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is not plain weights
        hint = (
            "; a run's checkpoint.pt holds the whole training state: give its best.pt"
            if path.name == "checkpoint.pt"
            else ""
        )
        raise ValueError(
            f"weights file {str(path)!r} is not a readable state dict "
            f"({type(error).__name__}: {' '.join(str(error).split())[:160]}){hint}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    if state.get("format") == FORMAT:
        verify_checksum(state, path)
        return state["model"], dict(state.get("identity") or {})
    if "model" in state and isinstance(state["model"], dict):  # a dtokd best.pt from before the format mark
        return state["model"], dict(state.get("identity") or {})
    return state, {}
