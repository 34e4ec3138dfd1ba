"""benchmarks/bench_record.py: a bench's finished cells kept as a record and brought back,
with nothing overwritten that differs and no checkpoint or weights copied."""

import pytest

from helpers import benchmark_script


@pytest.fixture(scope="module")
def bench_record():
    return benchmark_script("bench_record")


def _bench_output(out):
    done = out / "p" / "kd" / "seed0"
    done.mkdir(parents=True)
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "steps.jsonl", "teacher.json", "summary.json"):
        (done / name).write_text(f"{name} of kd seed 0\n")
    (done / "checkpoint.pt").write_bytes(b"weights")
    (done / "best.pt").write_bytes(b"weights")
    diverged = out / "p" / "dto" / "seed0"
    diverged.mkdir(parents=True)
    (diverged / "diverged.json").write_text("{}\n")
    (diverged / "config.yaml").write_text("dto\n")
    running = out / "p" / "kd" / "seed1"  # not finished: stays out of the record
    running.mkdir(parents=True)
    (running / "config.yaml").write_text("kd 1\n")
    teacher = out / "teachers" / "hf-causal-lm:llama"
    teacher.mkdir(parents=True)
    (teacher / "summary.json").write_text("{}\n")
    (teacher / "best.pt").write_bytes(b"weights")
    (out / "results.md").write_text("# table\n")
    (out / "results.csv").write_text("a\n")
    (out / "accuracy_p.png").write_bytes(b"png")
    (out / "timing.jsonl").write_text('{"cells": 1}\n')


def test_save_keeps_finished_cells_without_weights_and_restore_brings_them_back(tmp_path, bench_record):
    out, record, fresh = tmp_path / "out", tmp_path / "record", tmp_path / "fresh"
    _bench_output(out)
    assert bench_record.save(out, record) == 2
    kept = sorted(str(p.relative_to(record)) for p in record.rglob("*") if p.is_file())
    assert kept == sorted(
        [f"cells/p/kd/seed0/{n}" for n in bench_record.CELL_FILES]
        + ["cells/p/dto/seed0/config.yaml", "cells/p/dto/seed0/diverged.json"]
        + ["teachers/hf-causal-lm_llama/summary.json", "results.md", "results.csv", "accuracy_p.png", "timing.jsonl"]
    )
    assert bench_record.save(out, record) == 2  # again: identical files are no conflict
    assert bench_record.restore(record, fresh) == 2
    assert (fresh / "p" / "kd" / "seed0" / "summary.json").read_text() == "summary.json of kd seed 0\n"
    assert (fresh / "p" / "dto" / "seed0" / "diverged.json").is_file()
    assert (fresh / "timing.jsonl").read_text() == '{"cells": 1}\n'
    assert not list(fresh.rglob("*.pt"))


def test_nothing_that_differs_is_overwritten(tmp_path, bench_record):
    out, record = tmp_path / "out", tmp_path / "record"
    _bench_output(out)
    bench_record.save(out, record)
    (out / "p" / "kd" / "seed0" / "summary.json").write_text("another run\n")
    with pytest.raises(bench_record.Conflict, match="summary.json exists with other content"):
        bench_record.save(out, record)
    assert (record / "cells" / "p" / "kd" / "seed0" / "summary.json").read_text() == "summary.json of kd seed 0\n"
    with pytest.raises(bench_record.Conflict, match="summary.json exists with other content"):
        bench_record.restore(record, out)


def test_a_timing_log_that_does_not_continue_the_records_is_refused(tmp_path, bench_record):
    out, record = tmp_path / "out", tmp_path / "record"
    _bench_output(out)
    bench_record.save(out, record)
    (out / "timing.jsonl").write_text('{"cells": 1}\n{"cells": 2}\n')  # continues it: replaces it
    bench_record.save(out, record)
    assert (record / "timing.jsonl").read_text().count("\n") == 2
    (out / "timing.jsonl").write_text('{"cells": 3}\n')  # a fresh folder's log, the record not restored
    with pytest.raises(bench_record.Conflict, match="restore the record"):
        bench_record.save(out, record)


def test_the_command_line_names_a_folder_that_is_no_record(tmp_path, bench_record, capsys):
    assert bench_record.main(["restore", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "holds no cells/ folder" in capsys.readouterr().err


def test_a_teacher_trained_again_is_kept_beside_the_first_named_by_its_start(tmp_path, bench_record):
    out, record = tmp_path / "out", tmp_path / "record"
    _bench_output(out)
    teacher = out / "teachers" / "hf-causal-lm:llama"
    (teacher / "meta.json").write_text('{"started": "2026-12-01T17:30:04+00:00"}\n')
    bench_record.save(out, record)
    (teacher / "summary.json").write_text('{"test_ppl": 35.0}\n')  # a fresh checkout trained it again
    (teacher / "meta.json").write_text('{"started": "2026-12-03T07:47:12+00:00"}\n')
    bench_record.save(out, record)
    first, again = (
        record / "teachers" / "hf-causal-lm_llama",
        record / "teachers" / "hf-causal-lm_llama-2026-12-03T07-47",
    )
    assert (first / "summary.json").read_text() == "{}\n"  # the first teacher's record untouched
    assert (again / "summary.json").read_text() == '{"test_ppl": 35.0}\n'
    assert "07:47:12" in (again / "meta.json").read_text()
    bench_record.save(out, record)  # again: the same files, no conflict
    (teacher / "meta.json").unlink()
    (teacher / "summary.json").write_text('{"test_ppl": 36.0}\n')
    with pytest.raises(bench_record.Conflict, match="no meta.json to name this one by"):
        bench_record.save(out, record)
