"""The runnable examples in examples/ run to the end (few epochs) and print their result."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "name, needs", [("lightning_digits.py", "lightning"), ("hf_trainer_digits.py", "transformers")]
)
def test_a_classifier_example_distils_and_reports_its_accuracy(name, needs):
    pytest.importorskip(needs, reason=f"{name} needs {needs}")
    pytest.importorskip("sklearn", reason="the digits examples need scikit-learn")
    out = run_example(name, "--epochs", "6", "--teacher-epochs", "3")
    found = re.search(
        r"teacher test accuracy ([\d.]+); student .* ([\d.]+); last step's weights: distill ([\d.-]+)", out
    )
    assert found, out
    teacher, student, _ = map(float, found.groups())
    assert teacher > 0.5 and student > 0.5  # trained: chance is 0.1
