"""``parallel=fsdp`` in the pipeline: a tiny causal LM distilled by two gloo processes with the
student and the teacher sharded by FSDP2, against one process on the whole batch; a sharded
teacher's logits against the whole teacher's; a run interrupted after its first checkpoint and
resumed against the straight run; ``best.pt`` readable as any run's.

One spawn of two processes runs every case (a spawn costs most of the time). Float32, SGD (the
weights move linearly with the gradients): the two-process runs add the same numbers in another
order (FSDP's reduce-scatter averages two half-batch gradients), so they differ from the
one-process run by rounding, and the tolerance (rel 1e-4, abs 1e-5 after four steps) is far
below what a wrong convention (a gradient halved, a shard missing) moves."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

pytest.importorskip("transformers", reason="language models need the optional dependency transformers")
pytest.importorskip("tokenizers", reason="language-model data need the optional dependency tokenizers")
if not dist.is_available():
    pytest.skip("this PyTorch build has no torch.distributed (hence no FSDP2)", allow_module_level=True)

from dtokd.data.fake import write_fake_text  # noqa: E402
from dtokd.models import create_model  # noqa: E402
from dtokd.train import load_config, loop, train  # noqa: E402
from dtokd.train.build import data_of  # noqa: E402
from dtokd.train.config import ConfigError  # noqa: E402

from helpers import run_in_gloo_group, tiny_lm_overrides  # noqa: E402

pytestmark = pytest.mark.slow

LLAMA = "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2, " + (
    "intermediate_size: 64, max_position_embeddings: 32}"
)
KD = "losses={distill: {type: token-kd, divergence: forward_kl}, task: {type: ce}}"
RESUME_WORLD = 4
"""The processes the interrupted two-process run resumes on (the global batch of 4: one block each)."""
CASES = {
    "fixed": ["balancer.method=fixed", "balancer.options={weights: {distill: 0.5, task: 0.5}}"],
    "dto-representation": ["balancer.method=dto", "balancer.engine=representation"],
    "dto-exact": ["balancer.method=dto", "balancer.engine=exact"],
    "dto-amortized": ["balancer.method=dto-amortized", "balancer.engine=exact"],
    "dto-amortized-next-step": [
        "balancer.method=dto-amortized",
        "balancer.engine=exact",
        "balancer.options={update: next-step}",
    ],
    # every step kept and compared: the cosines summed across ranks, the kept shards gathered
    # whole into each checkpoint and cut again on resume (on two processes and on RESUME_WORLD)
    "dto-amortized-gated": [
        "balancer.method=dto-amortized-gated",
        "balancer.engine=exact",
        "balancer.options={every: 1}",
    ],
}
RESUMED = "dto-amortized-gated"
"""The case interrupted after its first checkpoint and resumed (the balancer with the most state)."""


def overrides(folder: Path) -> list[str]:
    return [
        *tiny_lm_overrides(folder / "text", LLAMA, limit_train=8),
        "device=cpu",
        "teacher.name=hf-causal-lm:llama",
        f"teacher.kwargs={LLAMA}",
        f"teacher.checkpoint={folder / 'teacher.pt'}",
        "optim.name=sgd",
        "optim.lr=0.5",
        "optim.weight_decay=0",
        "eval.test=end",  # the test split on best.pt at the end: a sharded student takes those weights
        KD,
    ]


def prepare(folder: Path) -> None:
    """The corpus and a teacher with seeded random weights."""
    write_fake_text(folder / "text", documents=10, words=200)
    config = load_config(None, overrides(folder))
    data = data_of(config)
    torch.manual_seed(3)
    teacher = create_model("hf-causal-lm:llama", data.num_classes, 1, data.image_size, config.teacher.kwargs)
    torch.save(teacher.state_dict(), folder / "teacher.pt")


def interrupted_after_first_epoch():
    """``loop._train_epoch`` raising KeyboardInterrupt when the second epoch starts; returns the real one."""
    real, calls = loop._train_epoch, {"n": 0}

    def interrupted(*args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt("interrupted by the test")
        calls["n"] += 1
        return real(*args, **kwargs)

    loop._train_epoch = interrupted
    return real


def teacher_logits_sharded(folder: Path, rank: int) -> dict:
    """A teacher sharded by the pipeline's rule and the whole one, on the same blocks."""
    from dtokd.train.sharding import shard_model

    config = load_config(None, overrides(folder))
    data = data_of(config)
    make = lambda: create_model("hf-causal-lm:llama", data.num_classes, 1, data.image_size, config.teacher.kwargs)  # noqa: E731
    whole, sharded = make(), make()
    state = torch.load(folder / "teacher.pt", weights_only=True)
    whole.load_state_dict(state)
    sharded.load_state_dict(state)
    sharded.requires_grad_(False)
    shard_model(sharded, "none", forward_only=True)
    x = data.train.__getitems__([0, 1, 2])[0]
    with torch.no_grad():
        return {
            "whole": whole(x),
            "sharded": sharded(x),
            "local": sum(p.to_local().numel() for p in sharded.parameters()),
        }


def worker(rank: int, world: int, folder: str, init_file: str, resume_only: bool = False) -> None:
    """``run_cases``, or (``resume_only``) the resume of a copy of the interrupted run alone."""
    folder = Path(folder)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    os.environ["DTOKD_CACHE"] = str(folder / "cache")  # the teacher is measured, not read from a cache
    torch.set_num_threads(1)
    run_in_gloo_group(rank, world, init_file, resume_copy if resume_only else run_cases, rank, folder)


def resume_copy(rank: int, folder: Path) -> bool:
    """The copy of the interrupted two-process run (``resumed-copy``) resumed here; False after an error."""
    try:
        train(None, folder / "resumed-copy", resume=True, progress=False, verbose=False)
        error = None
    except Exception as caught:  # reported by the test
        error = f"{type(caught).__name__}: {caught}"
    torch.save({"error": error}, folder / f"resumed-copy-rank{rank}.pt")
    return error is None


def run_cases(rank: int, folder: Path) -> bool:
    """Every pipeline case on this rank, its results saved; False after an error (reported by the tests)."""
    results: dict = {"sharded": []}
    real_build = loop.build_parts

    def build_and_record(config, verbose):  # every parameter the optimizer and balancer see is a shard
        parts = real_build(config, verbose)
        results["sharded"].append(all(isinstance(p, DTensor) for p in parts.task.parameters()))
        return parts

    loop.build_parts = build_and_record
    try:
        results["teacher"] = teacher_logits_sharded(folder, rank)
        for case, extra in CASES.items():
            config = load_config(None, [*overrides(folder), "parallel=fsdp", *extra])
            train(config, folder / f"fsdp-{case}", progress=False, verbose=False)
        config = load_config(None, [*overrides(folder), "parallel=fsdp", *CASES[RESUMED]])
        real = interrupted_after_first_epoch()
        try:
            train(config, folder / "resumed", progress=False, verbose=False)
        except KeyboardInterrupt:
            results["interrupted"] = True
        finally:
            loop._train_epoch = real
        if rank == 0:  # resumed on another number of processes by the fixture (rank 0 writes the run alone)
            shutil.copytree(folder / "resumed", folder / "resumed-copy")
        train(None, folder / "resumed", resume=True, progress=False, verbose=False)
    except Exception as error:  # reported by the tests
        import traceback

        results["error"] = f"{type(error).__name__}: {error} {traceback.format_exc()[-1500:]}"
    finally:
        torch.save(results, folder / f"rank{rank}.pt")
    return "error" not in results


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp-pipeline")
    prepare(folder)
    mp.spawn(worker, args=(2, str(folder), str(folder / "init")), nprocs=2, join=True)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    errors = [f"rank {r}: {result['error']}" for r, result in enumerate(results) if "error" in result]
    assert not errors, "; ".join(errors)
    mp.spawn(worker, args=(RESUME_WORLD, str(folder), str(folder / "init-resume"), True), nprocs=RESUME_WORLD)
    return folder, results


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=False)["student"]


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_over_two_processes_equals_one_process_on_the_whole_batch(runs, case):
    folder, results = runs
    assert all(r["sharded"] == [True] * (len(CASES) + 2) for r in results)  # each run, the resumed one twice
    one = folder / f"one-{case}"
    train(load_config(None, [*overrides(folder), *CASES[case]]), one, progress=False, verbose=False)
    two = folder / f"fsdp-{case}"
    a, b = weights(two), weights(one)
    assert sorted(a) == sorted(b)  # the full state dict, as one process writes it
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (two, one)]
    assert summaries[0]["last_test_ppl"] == pytest.approx(summaries[1]["last_test_ppl"], rel=1e-4)
    best = torch.load(two / "best.pt", weights_only=False)
    assert sorted(best["model"]) == sorted(b)


def test_a_sharded_teachers_logits_equal_the_whole_teachers(runs):
    folder, results = runs
    total = sum(p.numel() for p in torch.load(folder / "teacher.pt", weights_only=True).values())
    for result in results:
        torch.testing.assert_close(result["teacher"]["sharded"], result["teacher"]["whole"], rtol=0, atol=0)
    assert sum(r["teacher"]["local"] for r in results) == total  # each rank holds its shard only


def test_an_interrupted_fsdp_run_resumes_to_the_straight_runs_weights(runs):
    folder, results = runs
    assert all(r.get("interrupted") for r in results)
    a, b = weights(folder / "resumed"), weights(folder / f"fsdp-{RESUMED}")
    for key in b:
        assert torch.equal(a[key], b[key]), key


def test_an_fsdp_run_resumes_on_another_number_of_processes(runs):
    """Checkpoints hold full state dicts: the run interrupted on two processes resumes on
    RESUME_WORLD to the straight two-process run's weights (to float32 rounding: the reductions
    differ)."""
    folder, _ = runs
    errors = [torch.load(folder / f"resumed-copy-rank{r}.pt")["error"] for r in range(RESUME_WORLD)]
    assert errors == [None] * RESUME_WORLD, errors
    a, b = weights(folder / "resumed-copy"), weights(folder / f"fsdp-{RESUMED}")
    assert sorted(a) == sorted(b)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["amp=fp16"], "parallel=fsdp does not support amp=fp16"),
        (["compile=default"], "does not support compile='default'"),
        (["optim.ema_decay=0.99"], "does not support optim.ema_decay"),
        (["teacher.cache_outputs=true"], "does not support teacher.cache_outputs=true"),
        (["parallel=zero"], "parallel='zero' is not allowed"),
    ],
)
def test_settings_fsdp_does_not_support_are_refused_when_read(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*overrides(tmp_path), "parallel=fsdp", *extra])


def test_fsdp_in_one_process_is_refused(runs, tmp_path):
    folder, _ = runs
    with pytest.raises(ValueError, match="parallel=fsdp shards the models across torchrun's processes"):
        train(load_config(None, [*overrides(folder), "parallel=fsdp"]), tmp_path / "one", progress=False)


def test_the_blocks_sharded_one_by_one_are_the_decoder_layers_and_timms_vit_blocks():
    from dtokd.train.sharding import blocks

    config = load_config(None, overrides(Path("unused")))
    llama = create_model("hf-causal-lm:llama", 50, 1, 12, config.student.kwargs)
    assert [type(b).__name__ for b in blocks(llama)] == ["LlamaDecoderLayer"] * 2
    timm = pytest.importorskip("timm", reason="timm is a test dependency")
    vit = timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2
    )
    assert blocks(vit) == list(vit.blocks)  # an nn.Sequential of like blocks
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    assert blocks(mlp) == []  # unlike modules: the root alone
