"""A matrix file and its cells: the file format (:class:`Matrix`, :class:`Pair`, read and checked
by :func:`load_matrix`), the cells it holds in the order they run (:func:`select_cells`) and each
cell's run configuration (:func:`cell_config`, checked for every cell by :func:`check_cells`).
Reads files and configurations; runs nothing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtokd.train import load_config
from dtokd.train.config import ConfigError, from_dict
from dtokd.train.offline_outputs import offline_temperature

Cell = tuple[str, str, int]
"""A cell of a matrix: (pair, method, seed)."""


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair of a matrix: the model names, the teacher's checkpoint when it
    is given rather than trained by the bench (relative to the project, like the configs), and
    the pair's own overrides."""

    teacher: str
    student: str
    checkpoint: str | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Matrix:
    """A matrix file (see :mod:`dtokd.bench`), read with the configuration machinery: unknown or
    missing keys and ill-typed values are errors naming the key."""

    name: str
    seeds: list[int]
    pairs: dict[str, Pair]
    methods: dict[str, list[str]]
    student_config: str
    teacher_config: str
    reference: str
    base: list[str] = field(default_factory=list)
    grid_prefix: str | None = None
    grid_all_seeds: bool = False
    teacher_topk: int | dict[str, int] | None = None
    """Language models: cells that distil read their pair's teacher as its top-``k`` offline
    outputs, written once per pair and ``k`` (:func:`dtokd.bench.folders.teacher_outputs_folder`):
    an integer for every such cell, or a mapping method -> ``k`` for the methods it names only (the
    others run the teacher live, so that offline cells pair with live ones on one teacher)."""

    def topk(self, method: str) -> int | None:
        """The ``k`` of the offline teacher outputs ``method``'s cells read (None: the live teacher)."""
        if isinstance(self.teacher_topk, dict):
            return self.teacher_topk.get(method)
        return self.teacher_topk


def load_matrix(path: str | Path) -> Matrix:
    """The matrix in ``path``, checked before anything runs; config paths and given teacher
    checkpoints resolved against the project (the folder above ``configs/``, else the
    working directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"matrix file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid YAML matrix ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        keys = [f.name for f in dataclasses.fields(Matrix)]
        raise ValueError(
            f"{path}: a matrix is a mapping with keys {keys}; the file holds "
            f"{'nothing' if raw is None else type(raw).__name__}"
        )
    _check_topk(path, raw)
    try:
        matrix = from_dict(Matrix, raw, "")
    except ConfigError as error:
        raise ValueError(f"{path}: {error}") from None
    if not matrix.seeds:
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, got {matrix.seeds!r}")
    if len(set(matrix.seeds)) != len(matrix.seeds):
        raise ValueError(f"{path}: seeds {matrix.seeds} repeat a seed")
    for key in ("pairs", "methods"):
        if not getattr(matrix, key):
            raise ValueError(f"{path}: {key} must be a non-empty mapping name -> ..., got {raw[key]!r}")
    if matrix.reference not in matrix.methods:
        raise ValueError(f"{path}: reference {matrix.reference!r} is not one of the methods {list(matrix.methods)}")
    root = path.parent.parent if path.parent.name == "configs" else Path.cwd()
    pairs = {
        name: dataclasses.replace(pair, checkpoint=None if pair.checkpoint is None else str(root / pair.checkpoint))
        for name, pair in matrix.pairs.items()
    }
    return dataclasses.replace(
        matrix,
        pairs=pairs,
        student_config=str(root / matrix.student_config),
        teacher_config=str(root / matrix.teacher_config),
    )


def _check_topk(path: Path, raw: dict[str, Any]) -> None:
    """The file's ``teacher_topk``: null, a positive integer, or a mapping of its methods to
    positive integers, checked before the typed reading (which would say of a bad mapping only
    that it is not an integer); other types are left to that reading's error."""
    given, methods = raw.get("teacher_topk"), raw.get("methods")
    if isinstance(given, dict):
        bad = {name: k for name, k in given.items() if isinstance(k, bool) or not isinstance(k, int) or k < 1}
        if bad:
            raise ValueError(f"{path}: teacher_topk {bad}: each k must be a positive integer")
        unknown = [name for name in given if name not in methods] if isinstance(methods, dict) else []
        if unknown:
            raise ValueError(f"{path}: teacher_topk names {unknown}, not among the methods {list(methods or {})}")
    elif isinstance(given, int) and not isinstance(given, bool) and given < 1:
        raise ValueError(
            f"{path}: teacher_topk={given!r} must be a positive integer, a mapping method -> positive integer, or null"
        )


def select_cells(
    matrix: Matrix, *, pairs: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None
) -> list[tuple[str, str, int]]:
    """The cells to run, pair by pair, seed by seed, in the matrix's order of methods (a partial
    matrix is a whole one over fewer seeds); ``pairs`` / ``methods`` / ``seeds`` keep only those
    (``None``: all), so that the cells a question needs first can run before the rest. A name
    that is not in the matrix is refused, naming what it holds."""
    chosen = {}
    for name, given, known in (
        ("pairs", pairs, list(matrix.pairs)),
        ("methods", methods, list(matrix.methods)),
        ("seeds", seeds, matrix.seeds),
    ):
        unknown = [v for v in given or [] if v not in known]
        if unknown:
            raise ValueError(f"--{name} {' '.join(map(str, unknown))}: not in the matrix, which has {known}")
        chosen[name] = set(given) if given else set(known)
    return [
        (pair, method, seed)
        for pair in matrix.pairs
        for seed in matrix.seeds
        for method in matrix.methods
        if pair in chosen["pairs"] and method in chosen["methods"] and seed in chosen["seeds"]
    ]


def cell_config(
    matrix: Matrix, pair: str, method: str, seed: int, teacher: Path | str, outputs: Path | str | None = None
):
    """The run configuration of one cell: the student config with the matrix's shared overrides,
    the pair's, the cell's name, seed, models and teacher, then the method's; a cell that distils
    reads its teacher from ``outputs`` (offline top-k outputs) where given."""
    given = matrix.pairs[pair]
    overrides = [
        *matrix.base,
        *given.overrides,
        f"name={method}",
        f"seed={seed}",
        f"student.name={given.student}",
        f"teacher.name={given.teacher}",
        f"teacher.checkpoint={teacher}",
        *matrix.methods[method],
    ]
    config = load_config(matrix.student_config, overrides)
    if outputs is None or config.teacher.name is None:
        return config
    return load_config(matrix.student_config, [*overrides, f"teacher.outputs={outputs}"])


def needs_teacher(matrix: Matrix, pair: str, method: str, seed: int) -> bool:
    """Whether the cell distils (its configuration names a teacher); a cell without one (the
    student alone) runs before, or without, its pair's teacher being trained."""
    return cell_config(matrix, pair, method, seed, "teacher.pt").teacher.name is not None


def check_cells(matrix: Matrix) -> None:
    """Every cell's configuration, checked before anything runs (a bad override fails now, not
    after hours of other cells); a cell must train (``epochs`` >= 1)."""
    temperatures: dict[tuple[str, int], dict[float, str]] = {}  # (pair, k) -> the outputs' temperatures -> a cell
    for pair in matrix.pairs:
        for method in matrix.methods:
            k = matrix.topk(method)
            for seed in matrix.seeds:
                try:
                    config = cell_config(matrix, pair, method, seed, "teacher.pt", "teacher-outputs" if k else None)
                except ValueError as error:
                    raise ValueError(f"cell {pair} {method} seed {seed}: {error}") from None
                if config.epochs < 1:
                    raise ValueError(
                        f"cell {pair} {method} seed {seed}: epochs={config.epochs}; a matrix cell must "
                        "train (epochs >= 1)"
                    )
                if config.teacher.outputs is not None and k is not None:
                    temperatures.setdefault((pair, k), {})[offline_temperature(config)] = f"{method} seed {seed}"
    for (pair, k), seen in temperatures.items():
        if len(seen) > 1:
            cells = ", ".join(f"{cell} at T={t}" for t, cell in seen.items())
            raise ValueError(
                f"pair {pair}: teacher_topk writes one set of top-{k} outputs per pair at one temperature, but "
                f"its token-kd losses differ ({cells})"
            )
