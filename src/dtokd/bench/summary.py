"""One summary over every accuracy matrix: per setting, the recommended rule's paired difference
against tuned KD and against the student alone, read from the records' own cells.

A summary file (``benchmarks/summary.yaml``) names the recommended rule and lists the settings:
each a matrix file, its record (``benchmarks/results/<name>``, cells under ``cells/``), the pair,
and the methods that are the student alone and (where the matrix names it otherwise) the
recommended rule. KD is the matrix's grid choice on the first seed (:func:`~dtokd.bench.grid.grid_choice`)
where the matrix has a grid, else its reference (set by hand). Each comparison is the paired
difference ``recommended - other`` in test metric at the validation-chosen epoch, seed by seed over
the seeds both finished with the same teacher (:func:`~dtokd.bench.stats.paired_values`): mean,
sample standard deviation, n, and on how many seeds the recommended rule was ahead (higher, or
lower for a perplexity). A cell the comparison needs that has not finished is listed as missing,
with the command that runs it.

:func:`summary_markdown` gives the table, :func:`summary_plot` the figure, :func:`write_block`
puts the table between the markers of a page (``<!-- summary -->`` ... ``<!-- /summary -->``).
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dtokd.bench.folders import cell_finished, cell_folder, shared_runs
from dtokd.bench.grid import grid_choice, grid_members
from dtokd.bench.matrix import load_matrix
from dtokd.bench.stats import mean_std, paired_values
from dtokd.report import fmt, markdown_table, pyplot, save_plot
from dtokd.tasks.names import LOWER_IS_BETTER
from dtokd.train.config import ConfigError, from_dict

BEGIN, END = "<!-- summary -->", "<!-- /summary -->"


@dataclass(frozen=True)
class Setting:
    """One row of the summary: a matrix's pair, the record holding its cells, the student alone's
    method, the recommended rule's method where it is not the file's, and a note for the reader."""

    name: str
    matrix: str
    record: str
    pair: str
    student_alone: str
    recommended: str | None = None
    metric: str | None = None
    """The figure compared, one the cells record at the validation-chosen epoch (default: the
    metric they were chosen by; ``ppl`` for a language model chosen by token accuracy)."""
    note: str = ""


@dataclass(frozen=True)
class SummaryFile:
    """A summary file: the recommended rule's method name and the settings."""

    recommended: str
    settings: list[Setting] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    """``recommended - against``, seed by seed: mean, standard deviation, the values."""

    against: str
    values: list[float]

    @property
    def mean_std(self) -> tuple[float, float]:
        return mean_std(self.values)


@dataclass(frozen=True)
class SettingSummary:
    """A setting's comparisons, its metric, how KD was chosen, and the cells still missing."""

    setting: Setting
    recommended: str
    metric: str | None
    kd_choice: str
    versus_kd: Comparison
    versus_student: Comparison
    missing: list[tuple[str, int]]
    resume: str | None

    def ahead(self, comparison: Comparison) -> int:
        """On how many seeds the recommended rule was ahead (lower is ahead for a perplexity or loss)."""
        lower = self.metric in LOWER_IS_BETTER
        return sum((v < 0) if lower else (v > 0) for v in comparison.values)


def load_summary_file(path: str | Path) -> SummaryFile:
    """The summary file at ``path``; unknown or missing keys are errors naming the key."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    try:
        summary = from_dict(SummaryFile, raw if isinstance(raw, dict) else {}, "")
        settings = [from_dict(Setting, s, f"settings[{i}].") for i, s in enumerate(raw.get("settings") or [])]
    except ConfigError as error:
        raise ValueError(f"{path}: {error}") from None
    if not settings:
        raise ValueError(f"{path}: settings must be a non-empty list of settings")
    return dataclasses.replace(summary, settings=settings)


def summarize(setting: Setting, recommended: str, root: Path) -> SettingSummary:
    """The comparisons of ``setting`` from its record's cells (paths relative to ``root``)."""
    matrix = load_matrix(root / setting.matrix)
    method = setting.recommended or recommended
    cells = root / setting.record / "cells"
    for name in (method, setting.student_alone):
        if name not in matrix.methods:
            raise ValueError(f"{setting.name}: method {name!r} is not one of {setting.matrix}'s {list(matrix.methods)}")
    chosen = grid_choice(matrix, cells / setting.pair) if matrix.grid_prefix else None
    kd = chosen or matrix.reference
    if chosen is not None:
        kd_choice = f"{kd} (tuned on seed {matrix.seeds[0]})"
    elif matrix.grid_prefix:
        kd_choice = f"{kd} (grid unfinished)"
    else:
        kd_choice = f"{kd} (set by hand)"
    shared = shared_runs(matrix)

    def folders(name: str) -> list[Path]:
        return [cell_folder(cells, (setting.pair, name, seed), shared) for seed in matrix.seeds]

    needed = [(name, seed) for name in dict.fromkeys((method, kd, setting.student_alone)) for seed in matrix.seeds]
    if matrix.grid_prefix and chosen is None:
        needed += [(name, matrix.seeds[0]) for name in grid_members(matrix) if name != kd]
    missing = [c for c in needed if not cell_finished(cell_folder(cells, (setting.pair, *c), shared))]
    metric = setting.metric or _metric(folders(method) + folders(kd))
    measure = metric or "top1"  # no finished cell: nothing to compare
    return SettingSummary(
        setting=setting,
        recommended=method,
        metric=metric,
        kd_choice=kd_choice,
        versus_kd=Comparison(kd, paired_values(list(zip(folders(method), folders(kd))), measure)),
        versus_student=Comparison(
            setting.student_alone,
            paired_values(list(zip(folders(method), folders(setting.student_alone))), measure),
        ),
        missing=missing,
        resume=_resume_command(setting, missing, cells.is_dir()) if missing else None,
    )


def _metric(folders: list[Path]) -> str | None:
    """The metric the finished cells among ``folders`` were chosen by (None: none finished)."""
    for folder in folders:
        if (folder / "summary.json").is_file():
            return str(json.loads((folder / "summary.json").read_text())["metric"])
    return None


def _resume_command(setting: Setting, missing: list[tuple[str, int]], has_cells: bool) -> str:
    """The command that runs ``missing`` into ``runs/bench_<record's name>``, first seeded with
    the record's cells where it has any (the bench skips cells that have finished)."""
    out = f"runs/bench_{Path(setting.record).name}"
    methods = " ".join(dict.fromkeys(name for name, _ in missing))
    seeds = " ".join(str(s) for s in sorted({seed for _, seed in missing}))
    restore = f"python benchmarks/bench_record.py restore {setting.record} {out} && " if has_cells else ""
    return (
        f"{restore}OMP_NUM_THREADS=1 dtokd bench {setting.matrix} --out {out} "
        f"--pairs {setting.pair} --methods {methods} --seeds {seeds}"
    )


def _difference(summary: SettingSummary, comparison: Comparison) -> list[str]:
    if not comparison.values:
        return ["-", "-"]
    mean, std = comparison.mean_std
    n = len(comparison.values)
    return [f"{fmt(mean, std)} (n={n})", f"{summary.ahead(comparison)}/{n}"]


def summary_markdown(summaries: list[SettingSummary]) -> str:
    """The summary table, its notes and each setting's missing cells with the command that runs them."""
    rows = []
    for s in summaries:
        metric = s.metric or "-"
        if s.metric in LOWER_IS_BETTER:
            metric += " (lower is better)"
        rows.append(
            [
                s.setting.name,
                s.recommended,
                metric,
                s.kd_choice,
                *_difference(s, s.versus_kd),
                *_difference(s, s.versus_student),
                str(len(s.missing)) if s.missing else "none",
            ]
        )
    header = ["setting", "rule", "metric", "KD", "vs KD", "ahead", "vs student alone", "ahead", "missing cells"]
    lines = markdown_table(header, rows)
    lines += [
        "",
        "Paired difference `rule - other` in test metric at the validation-chosen epoch, mean ± sample "
        "std over the seeds both finished with the same teacher; *ahead*: seeds on which the rule was "
        "better. Made by `dtokd summary benchmarks/summary.yaml` from the records' cells.",
    ]
    notes = [f"- {s.setting.name}: {s.setting.note}" for s in summaries if s.setting.note]
    for s in summaries:
        if s.missing:
            listed = ", ".join(f"{name} seed {seed}" for name, seed in s.missing)
            notes.append(f"- {s.setting.name}, missing: {listed}. Runs them: `{s.resume}`")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def summary_plot(summaries: list[SettingSummary], path: Path) -> Path:
    """Each setting's paired difference (mean, one std) against KD and against the student alone,
    signed so that right is better for the rule, in the setting's own metric units."""
    plt = pyplot()
    shown = [s for s in summaries if s.versus_kd.values or s.versus_student.values]
    fig, ax = plt.subplots(figsize=(10, 0.8 * len(shown) + 1.5))
    for offset, attribute, label in ((-0.15, "versus_kd", "vs KD"), (0.15, "versus_student", "vs student alone")):
        points = []
        for row, s in enumerate(shown):
            comparison: Comparison = getattr(s, attribute)
            if comparison.values:
                mean, std = comparison.mean_std
                sign = -1.0 if s.metric in LOWER_IS_BETTER else 1.0
                points.append((sign * mean, std, row + offset))
        if points:
            x, err, y = zip(*points)
            ax.errorbar(x, y, xerr=err, fmt="o", capsize=3, label=label)
    ax.axvline(0.0, color="black", linewidth=0.8)
    labels = [textwrap.fill(f"{s.setting.name} ({s.metric})", 36) for s in shown]
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    xlabel = "the rule's paired advantage, mean ± std over seeds (each setting's metric; right = better)"
    return save_plot(
        fig,
        ax,
        path,
        xlabel,
        "",
        title=f"{shown[0].recommended if shown else ''} paired by seed",
        legend={"fontsize": 8},
    )


def write_block(page: Path, table: str) -> bool:
    """Put ``table`` between ``page``'s summary markers; whether the page changed. A page without
    both markers, in order, is refused (nothing of the user's is overwritten outside them)."""
    text = page.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{page} has no {BEGIN} ... {END} block to write the summary into")
    updated = text[: start + len(BEGIN)] + "\n" + table + text[end:]
    if updated != text:
        page.write_text(updated)
    return updated != text


def read_block(page: Path) -> str | None:
    """The text between ``page``'s summary markers (None where it has none)."""
    text = page.read_text()
    start, end = text.find(BEGIN), text.find(END)
    return text[start + len(BEGIN) + 1 : end] if 0 <= start < end else None


def summaries(path: str | Path, root: Path | None = None) -> list[SettingSummary]:
    """Every setting of the summary file at ``path``, its paths taken relative to ``root`` (default:
    the folder above the file's ``benchmarks/``, else the working directory)."""
    path = Path(path)
    summary_file = load_summary_file(path)
    if root is None:
        root = path.resolve().parent.parent if path.resolve().parent.name == "benchmarks" else Path.cwd()
    return [summarize(s, summary_file.recommended, root) for s in summary_file.settings]


def write_summary(path: str | Path, figure: str | Path | None = None, pages: Sequence[str | Path] = ()) -> str:
    """The summary table of the file at ``path``; the figure written to ``figure`` and the table
    into each of ``pages`` (:func:`write_block`) where given."""
    found = summaries(path)
    table = summary_markdown(found)
    if figure is not None:
        summary_plot(found, Path(figure))
    for page in pages:
        write_block(Path(page), table)
    return table
