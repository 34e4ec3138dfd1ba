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
from dtokd.bench.matrix import Matrix, load_matrix
from dtokd.bench.stats import mean_std, paired_values, same_teacher
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
    metric they were chosen by)."""
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
        """Mean and sample standard deviation of the values."""
        return mean_std(self.values)


@dataclass(frozen=True)
class SettingSummary:
    """A setting's comparisons, its metric, how KD was chosen, the cells still missing, the
    diverged ones (finished, without figures) and the seeds that could not be paired."""

    setting: Setting
    recommended: str
    metric: str | None
    kd_choice: str
    versus_kd: Comparison
    versus_student: Comparison
    missing: list[tuple[str, int]]
    diverged: list[tuple[str, int]]
    unpaired: list[tuple[str, int]]
    """Seeds of ``(other, seed)`` where both the rule's and the other's cells finished with
    different teachers (not compared)."""
    resume: str | None
    retrained_teacher: bool
    """Whether the bench trains the pair's teacher (so a fresh checkout's cells have another one)."""

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
    _check_setting(setting, matrix, method)
    chosen = grid_choice(matrix, cells / setting.pair) if matrix.grid_prefix else None
    kd = chosen or matrix.reference
    how = f"tuned on seed {matrix.seeds[0]}" if chosen else ("grid unfinished" if matrix.grid_prefix else "set by hand")
    shared = shared_runs(matrix)

    def folder(name: str, seed: int) -> Path:
        return cell_folder(cells, (setting.pair, name, seed), shared)

    needed = [(name, seed) for name in dict.fromkeys((method, kd, setting.student_alone)) for seed in matrix.seeds]
    if matrix.grid_prefix and chosen is None:
        needed += [(name, matrix.seeds[0]) for name in grid_members(matrix) if name != kd]
    missing = [c for c in needed if not cell_finished(folder(*c))]
    diverged = [c for c in needed if (folder(*c) / "diverged.json").is_file()]
    metric = setting.metric or _metric([folder(n, s) for n, s in needed])
    comparisons = {}
    unpaired = []
    for other in (kd, setting.student_alone):
        pairs = [(folder(method, seed), folder(other, seed)) for seed in matrix.seeds]
        comparisons[other] = Comparison(other, paired_values(pairs, metric or "top1"))
        unpaired += [(other, seed) for seed, (a, b) in zip(matrix.seeds, pairs) if _unpairable(a, b, metric)]
    return SettingSummary(
        setting=setting,
        recommended=method,
        metric=metric,
        kd_choice=f"{kd} ({how})",
        versus_kd=comparisons[kd],
        versus_student=comparisons[setting.student_alone],
        missing=missing,
        diverged=diverged,
        unpaired=sorted(set(unpaired)),
        resume=_resume_command(setting, missing, cells.is_dir()) if missing else None,
        retrained_teacher=matrix.pairs[setting.pair].checkpoint is None
        and matrix.pairs[setting.pair].teacher is not None,
    )


def _check_setting(setting: Setting, matrix: Matrix, method: str) -> None:
    """The setting's pair and methods must be the matrix's."""
    if setting.pair not in matrix.pairs:
        raise ValueError(f"{setting.name}: pair {setting.pair!r} is not one of {setting.matrix}'s {list(matrix.pairs)}")
    for name in (method, setting.student_alone):
        if name not in matrix.methods:
            raise ValueError(f"{setting.name}: method {name!r} is not one of {setting.matrix}'s {list(matrix.methods)}")


def _unpairable(first: Path, second: Path, metric: str | None) -> bool:
    """Whether two cells both finished but cannot be paired (another teacher); a finished cell
    without ``metric`` at its validation-chosen epoch is an error naming what it has."""
    summaries = [
        json.loads((f / "summary.json").read_text()) for f in (first, second) if (f / "summary.json").is_file()
    ]
    for summary in summaries:
        if metric is not None and f"test_{metric}_at_best_val" not in summary:
            have = sorted(k[5:-12] for k in summary if k.startswith("test_") and k.endswith("_at_best_val"))
            raise ValueError(f"metric {metric!r} is not recorded by the cells; they have {have}")
    return len(summaries) == 2 and not same_teacher(first, second)


def _metric(folders: list[Path]) -> str | None:
    """The metric the finished cells among ``folders`` were chosen by (None: none finished)."""
    for folder in folders:
        if (folder / "summary.json").is_file():
            return str(json.loads((folder / "summary.json").read_text())["metric"])
    return None


def _resume_command(setting: Setting, missing: list[tuple[str, int]], has_cells: bool) -> str:
    """The command that runs ``missing`` into ``runs/<matrix file's stem>`` (first seeded with the
    record's cells where it has any: the bench skips cells that have finished) and saves the
    finished cells back into the record."""
    out = f"runs/{Path(setting.matrix).stem}"
    methods = " ".join(dict.fromkeys(name for name, _ in missing))
    seeds = " ".join(str(s) for s in sorted({seed for _, seed in missing}))
    restore = f"python benchmarks/bench_record.py restore {setting.record} {out} && " if has_cells else ""
    return (
        f"{restore}OMP_NUM_THREADS=1 dtokd bench {setting.matrix} --out {out} "
        f"--pairs {setting.pair} --methods {methods} --seeds {seeds} && "
        f"python benchmarks/bench_record.py save {out} {setting.record}"
    )


def _difference(summary: SettingSummary, comparison: Comparison) -> list[str]:
    """A comparison's table cells: ``mean ± std (n=N)`` (the mean alone for one seed), and seeds ahead."""
    if not comparison.values:
        return ["-", "-"]
    mean, std = comparison.mean_std
    n = len(comparison.values)
    return [f"{fmt(mean, std if n > 1 else None)} (n={n})", f"{summary.ahead(comparison)}/{n}"]


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
        notes += _cell_notes(s)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _cell_notes(s: SettingSummary) -> list[str]:
    """What a setting's table row leaves out: diverged cells, seeds not paired, missing cells and the command."""
    notes = []
    if s.diverged:
        notes.append(f"- {s.setting.name}, diverged (no figures, not compared): {_cells(s.diverged)}")
    if s.unpaired:
        notes.append(f"- {s.setting.name}, not paired (the rule's cell had another teacher): {_cells(s.unpaired)}")
    if s.missing:
        notes.append(f"- {s.setting.name}, missing: {_cells(s.missing)}. Runs them: `{s.resume}`")
        if s.retrained_teacher:
            notes.append(
                "  The bench trains this pair's teacher again in a fresh checkout, and a cell pairs only "
                "with cells of its own teacher: run new cells as a block of seeds with their reference "
                "(the record's README)."
            )
    return notes


def _cells(cells: list[tuple[str, int]]) -> str:
    """``method seed N, ...``."""
    return ", ".join(f"{name} seed {seed}" for name, seed in cells)


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
    start, end = _markers(page, text)
    updated = text[: start + len(BEGIN)] + "\n" + table + text[end:]
    if updated != text:
        page.write_text(updated)
    return updated != text


def read_block(page: Path) -> str | None:
    """The text between ``page``'s summary markers (None where it has none)."""
    text = page.read_text()
    start = text.find(BEGIN)
    end = text.find(END, start + len(BEGIN)) if start >= 0 else -1
    return text[start + len(BEGIN) :].split(END, 1)[0].removeprefix("\n") if end >= 0 else None


def _markers(page: Path, text: str) -> tuple[int, int]:
    """Where ``page``'s first summary block starts and its end marker (a ``ValueError`` where it has none)."""
    start = text.find(BEGIN)
    end = text.find(END, start + len(BEGIN)) if start >= 0 else -1
    if end < 0:
        raise ValueError(f"{page} has no {BEGIN} ... {END} block to write the summary into")
    return start, end


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
    for page in pages:  # every page checked before any is written
        _markers(Path(page), Path(page).read_text())
    if figure is not None:
        summary_plot(found, Path(figure))
    for page in pages:
        write_block(Path(page), table)
    return table
