"""The bench's grid: chosen on the first seed's validation, and only the choice (with the
reference) runs on the other seeds; decided from the cells' summaries, without training."""

import json

import pytest

from dtokd.bench import Matrix, Pair, grid_choice, grid_gate, grid_members


def _matrix(**changes):
    fields = dict(
        name="grid",
        seeds=[0, 1, 2],
        pairs={"p": Pair(teacher="cnn_small", student="mlp_small")},
        methods={"kd-fixed": [], "kd-a": [], "kd-b": [], "dto": []},
        student_config="s.yaml",
        teacher_config="t.yaml",
        reference="kd-fixed",
        grid_prefix="kd-",
    )
    return Matrix(**{**fields, **changes})


def _finish(out, method, seed, val, metric="top1"):
    folder = out / "p" / method / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"metric": metric, f"best_val_{metric}": val}))


def test_the_grid_is_its_prefixed_methods_and_the_reference():
    assert grid_members(_matrix()) == ["kd-fixed", "kd-a", "kd-b"]
    assert grid_members(_matrix(reference="dto")) == ["kd-fixed", "kd-a", "kd-b", "dto"]
    assert grid_members(_matrix(grid_prefix=None)) == []


def test_the_first_seed_chooses_once_every_member_has_finished_it(tmp_path):
    matrix = _matrix()
    _finish(tmp_path, "kd-fixed", 0, 70.0)
    _finish(tmp_path, "kd-a", 0, 72.5)
    assert grid_choice(matrix, tmp_path / "p") is None  # kd-b's first seed is still open
    _finish(tmp_path, "kd-b", 1, 99.0)  # another seed's score does not count
    assert grid_choice(matrix, tmp_path / "p") is None
    _finish(tmp_path, "kd-b", 0, 71.0)
    assert grid_choice(matrix, tmp_path / "p") == "kd-a"
    _finish(tmp_path, "kd-fixed", 0, 72.5)  # a tie goes to the member listed first
    assert grid_choice(matrix, tmp_path / "p") == "kd-fixed"


def test_a_diverged_member_is_never_chosen(tmp_path):
    matrix = _matrix()
    _finish(tmp_path, "kd-fixed", 0, 70.0)
    _finish(tmp_path, "kd-b", 0, 60.0)
    (tmp_path / "p" / "kd-a" / "seed0").mkdir(parents=True)
    (tmp_path / "p" / "kd-a" / "seed0" / "diverged.json").write_text("{}")
    assert grid_choice(matrix, tmp_path / "p") == "kd-fixed"


def test_a_grid_of_one_chooses_nothing(tmp_path):
    matrix = _matrix(methods={"kd-fixed": [], "dto": []})
    _finish(tmp_path, "kd-fixed", 0, 70.0)
    assert grid_choice(matrix, tmp_path / "p") is None
    assert grid_gate(matrix, tmp_path, ("p", "kd-fixed", 1), ()) == ("run", None)


@pytest.mark.parametrize("all_seeds", [False, True])
def test_the_gate(tmp_path, all_seeds):
    matrix = _matrix(grid_all_seeds=all_seeds)
    queued = {("p", m, 0) for m in ("kd-fixed", "kd-a", "kd-b")}
    later = ("p", "kd-b", 1)
    # the choice is open: wait while this invocation still runs first-seed grid cells, else run
    assert grid_gate(matrix, tmp_path, later, queued) == (("run", None) if all_seeds else ("wait", None))
    assert grid_gate(matrix, tmp_path, later, set()) == ("run", None)
    for method, val in (("kd-fixed", 70.0), ("kd-a", 72.5), ("kd-b", 71.0)):
        _finish(tmp_path, method, 0, val)
    expected = {
        "kd-fixed": ("run", None),  # the reference runs every seed
        "kd-a": ("run", None),  # the choice
        "kd-b": ("run", None) if all_seeds else ("skip", "kd-a"),
        "dto": ("run", None),  # not in the grid
    }
    for method, gate in expected.items():
        assert grid_gate(matrix, tmp_path, ("p", method, 2), set()) == gate
        assert grid_gate(matrix, tmp_path, ("p", method, 0), set()) == ("run", None)  # the first seed: all
