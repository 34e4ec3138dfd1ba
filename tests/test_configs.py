"""Every shipped config builds and trains: a dry run (two steps on a generated image folder at
the config's image size, the teacher with random weights) through the command line."""

from pathlib import Path

import pytest

from dtokd import cli
from dtokd.train import load_config

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("bench_"))


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in RUN_CONFIGS])
def test_every_config_dry_runs(config, capsys, tmp_path, monkeypatch):
    if "timm:" in config.read_text():
        pytest.importorskip("timm", reason="timm is a test dependency (pip install 'dtokd[test]')")
    monkeypatch.chdir(tmp_path)  # nothing may be written where the command runs
    loaded = load_config(config)
    stand_ins = write_lm_stand_ins(loaded, tmp_path)
    command = "distill" if loaded.teacher.name else "train"
    assert cli.main([command, str(config), "--dry-run", "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 steps ran" in out and "evaluation ran" in out
    assert sorted(tmp_path.rglob("*")) == stand_ins


def write_lm_stand_ins(config, folder: Path) -> list[Path]:
    """For a causal-LM config naming local model folders and a local tokenizer that this
    machine lacks (a released 8B teacher), tiny ones at those paths under ``folder``: a
    byte-level BPE with the config's end token, and 1-layer models of that vocabulary in the
    Hugging Face folder format, so that the dry run loads folders as the real run would.
    Returns every path written (nothing for other configs)."""
    names = [m.name for m in (config.student, config.teacher) if m.name and m.name.startswith("hf-causal-lm:")]
    folders = [name.split(":", 1)[1] for name in names if "/" in name]
    if not folders:
        return []
    transformers = pytest.importorskip("transformers", reason="causal-LM configs need transformers")
    tokenizers = pytest.importorskip("tokenizers", reason="causal-LM configs need tokenizers")
    from dtokd.data.fake import write_fake_text

    options = config.data.text or {}
    path = folder / options["tokenizer"]
    path.parent.mkdir(parents=True, exist_ok=True)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=[options["eos"]], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = write_fake_text(folder / "corpus-for-the-stand-in-tokenizer")
    bpe.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    bpe.save(str(path))
    for p in sorted(corpus.iterdir()):
        p.unlink()
    corpus.rmdir()
    shape = dict(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    for name in folders:
        torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
        torch_model.save_pretrained(folder / name)
    return sorted(folder.rglob("*"))


def test_dry_run_needs_a_config(capsys):
    assert cli.main(["distill", "--dry-run"]) == 2
    assert "needs a CONFIG" in capsys.readouterr().err
