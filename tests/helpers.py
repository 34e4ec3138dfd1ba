"""Helpers shared by the tests."""

import gc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dtokd.train import loop


def interrupt_after(monkeypatch, epochs: int) -> None:
    """Make the trainer raise KeyboardInterrupt (as Ctrl-C does) when it starts epoch ``epochs + 1``:
    the first ``epochs`` epochs run and are checkpointed."""
    real, calls = loop._train_epoch, {"n": 0}

    def interrupted(*args, **kwargs):
        if calls["n"] == epochs:
            raise KeyboardInterrupt("interrupted by the test")
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_epoch", interrupted)


def tiny_llamas(**changes):
    """A 1-layer Llama student (width 16) and teacher (width 32), vocabulary 40, seeded;
    ``changes``: other LlamaConfig fields for both (e.g. token ids)."""
    import transformers

    config = {
        **dict(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        ),
        **changes,
    }
    torch.manual_seed(0)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "hidden_size": 32}))
    return student, teacher


def bench_matrix(tmp_path, **changes):
    """A bench ``Matrix`` over a tiny student config written into ``tmp_path`` (synthetic data,
    an MLP student, a CNN teacher, KD and CE losses): pair ``p``, methods ``kd`` (the
    reference) and ``dto``, seeds 0 and 1; ``changes``: other Matrix fields."""
    from dtokd.bench import Matrix, Pair

    student = tmp_path / "student.yaml"
    student.write_text(
        "name: s\ndata: {name: synthetic}\nstudent: {name: mlp_small}\n"
        "teacher: {name: cnn_small, checkpoint: none}\nlosses: {distill: {type: kd}, task: {type: ce}}\n"
    )
    fields = dict(
        name="tiny",
        seeds=[0, 1],
        pairs={"p": Pair(teacher="cnn_small", student="mlp_small")},
        methods={"kd": ["balancer.method=fixed"], "dto": ["balancer.method=dto"]},
        student_config=str(student),
        teacher_config=str(student),
        reference="kd",
    )
    return Matrix(**{**fields, **changes})


def tiny_lm_overrides(corpus, llama: str, *, limit_train: int = 12) -> list[str]:
    """The settings of a tiny causal-LM run (two epochs of batches of 4 blocks of 12 tokens) on the
    generated text in ``corpus``, a Llama student of the shape ``llama`` (a YAML flow mapping)."""
    return [
        "name=lm",
        "task=causal-lm",
        "epochs=2",
        "batch_size=4",
        "eval_batch_size=8",
        "log_every=1",
        "amp=none",
        "data.name=text",
        f"data.root={corpus}",
        "data.val_fraction=0.2",
        f"data.limit_train={limit_train}",
        "data.text={block_size: 12, vocab_size: 300, test_fraction: 0.2}",
        "student.name=hf-causal-lm:llama",
        f"student.kwargs={llama}",
    ]


# How long a rank waits in one collective before it fails: far above any wait in these tests' tiny
# runs, far below gloo's default 30 min, so a collective some rank never joins (a deadlock) fails the
# test within minutes instead of stalling the suite.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def run_in_gloo_group(
    rank: int, world: int, init_file: str, body: Callable[..., bool], *args, timeout: timedelta = COLLECTIVE_TIMEOUT
) -> None:
    """``body(*args)`` as process ``rank`` of a ``world``-process gloo group (file store
    ``init_file``, collectives failing after ``timeout``), then the group torn down, after a
    barrier when ``body`` returned True (every rank finished alike, so no peer's collective is
    still in flight; after an error a peer may never arrive). ``body`` keeps its models in its
    own frame, so they are gone (a DDP reducer or an FSDP module holds the group) and the group's
    threads joined before the interpreter exits: threads that outlive it abort the process at exit ("terminate called
    without an active exception")."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        if body(*args):
            dist.barrier()
    finally:
        gc.collect()  # models caught in reference cycles, and what they hold, go now
        dist.destroy_process_group()


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_matrix(tmp_path, methods: str) -> str:
    """A matrix of one synthetic pair (a small CNN teacher trained by the bench -> an MLP), seeds
    0 and 1, 3 epochs, the grid `kd-grid`, the reference `kd-fixed`, and `methods` (YAML lines)."""
    student = tmp_path / "student.yaml"
    student.write_text(
        "\n".join(
            [
                "name: s",
                "batch_size: 32",
                "log_every: 2",
                "data: {name: synthetic}",
                "student: {name: mlp_small}",
                "teacher: {name: cnn_small, checkpoint: none}",
                "losses: {distill: {type: kd}, task: {type: ce}}",
            ]
        )
    )
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(
        "\n".join(["name: t", "epochs: 2", "batch_size: 32", "data: {name: synthetic}", "student: {name: cnn_small}"])
    )
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(
        "\n".join(
            [
                "name: tiny",
                "seeds: [0, 1]",
                f"student_config: {student}",
                f"teacher_config: {teacher}",
                "base: [epochs=3]",
                "pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}",
                "reference: kd-fixed",
                "grid_prefix: kd-grid",
                "methods:",
                methods,
            ]
        )
    )
    return str(matrix)


TINY_METHODS = "\n".join(
    [
        "  kd-fixed: [balancer.method=fixed, 'balancer.options={weights: {distill: 0.9, task: 0.1}}']",
        "  kd-grid-a0.5: [balancer.method=fixed, 'balancer.options={weights: {distill: 0.5, task: 0.5}}']",
        "  dto: [balancer.method=dto]",
        "  blowup: [balancer.method=fixed, 'balancer.options={weights: {distill: 0.9, task: 0.1}}', optim.lr=1.0e+12]",
    ]
)
