"""The documentation site builds in strict mode (a broken link or API reference fails it), and
the README's links into it resolve."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs build needs mkdocs (extra 'docs')")
    pytest.importorskip("mkdocstrings", reason="the API reference needs mkdocstrings (extra 'docs')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "make_balancer" in api and "DistillationTrainer" in api  # the reference was rendered from the docstrings
    configuration = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "optim.schedule" in configuration and "causal-lm" in configuration  # the generated reference


def test_the_configuration_reference_names_every_key():
    import dataclasses

    from dtokd.train.config import CHOICES, Config, reference_markdown

    text = reference_markdown()
    for section in dataclasses.fields(Config):
        kind = section.default_factory if dataclasses.is_dataclass(section.default_factory) else None
        keys = [f"{section.name}.{f.name}" for f in dataclasses.fields(kind)] if kind else [section.name]
        assert all(f"| `{key}` |" in text for key in keys), section.name
    assert all(", ".join(f"`{c}`" for c in choices) in text for choices in CHOICES.values())


def test_the_readmes_relative_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = [link for link in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in link]
    assert links, "the README links into the docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


def test_yaml_examples_quote_the_shipped_configs():
    """A YAML example that names a shipped config in its first line is that file (from its first
    key on: the file's header comments left out)."""
    blocks = [
        block
        for page in (ROOT / "docs").glob("*.md")
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)
    ]
    quoted = [block for block in blocks if block.startswith("# configs/")]
    assert quoted, "the docs quote a shipped config"
    for block in quoted:
        first, body = block.split("\n", 1)
        lines = (ROOT / first[2:].strip()).read_text().splitlines()
        start = next(k for k, line in enumerate(lines) if not line.startswith("#"))
        assert body.rstrip("\n").splitlines() == lines[start:], first
