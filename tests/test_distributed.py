"""Two processes (gloo, CPU) against one process on the concatenated batch."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dtokd import make_balancer

from helpers import run_in_gloo_group

pytestmark = pytest.mark.slow

STEPS = 4
GLOBAL_BATCH = 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    teacher = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64)
    return x, y, teacher


def losses_of(logits, y, teacher):
    kd = (
        nn.functional.kl_div(
            nn.functional.log_softmax(logits / 2, 1), nn.functional.softmax(teacher / 2, 1), reduction="batchmean"
        )
        * 4
    )
    return {"distill": kd, "task": nn.functional.cross_entropy(logits, y)}


def train_steps(model, forward, method, options, rank=0, world=1, combine=False):
    """STEPS balanced SGD steps on this rank's shard; ``forward`` is the (DDP-wrapped) model.
    ``combine``: the framework's way, ``balancer.combine(...)`` then the loss's own backward
    (DDP's all-reduce); else ``balancer.backward``."""
    forward = forward or model
    params = list(model.parameters())
    if options.get("engine") == "subset":
        options = {**options, "gram_params": list(model[2].parameters())}  # the last layer
    balancer = make_balancer(method, params, **options)
    optimizer = torch.optim.SGD(params, lr=0.2)
    weights = []
    representation = options.get("engine") == "representation"
    for step in range(STEPS):
        x, y, t = batch(step)
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        optimizer.zero_grad()
        logits = forward(x[shard])
        losses = losses_of(logits, y[shard], t[shard])
        if combine:
            balancer.combine(losses, representation=logits if representation else None).backward()
            info = balancer.last_info
        else:
            info = balancer.backward(losses, representation=logits if representation else None)
        optimizer.step()
        if method.startswith("dto-amortized") and options.get("update", "same-batch") == "same-batch":
            with torch.no_grad():
                balancer.update(losses_of(forward(x[shard]), y[shard], t[shard]))
        weights.append(list(info.weights.values()))
    return weights, [p.detach().clone() for p in params]


def worker(rank, world, init_file, method, options, out, desync, combine=False):
    run_in_gloo_group(rank, world, init_file, train_and_save, rank, world, method, options, out, desync, combine)


def train_and_save(rank, world, method, options, out, desync, combine) -> bool:
    """Train, save this rank's weights and parameters (or the error every rank raises alike)."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    if desync and rank == 1:
        with torch.no_grad():
            model[0].bias.add_(0.01)
    try:
        weights, params = train_steps(model, ddp, method, options, rank, world, combine)
        torch.save({"weights": weights, "params": params}, f"{out}.{rank}")
    except RuntimeError as error:
        torch.save({"error": str(error)}, f"{out}.{rank}")
    return True


def run_two_processes(tmp_path, method, options, desync=False, combine=False):
    out = tmp_path / "result"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), method, options, str(out), desync, combine), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def assert_each_rank_equals(results, ref_weights, ref_params):
    """Every rank's weights and parameters equal the one-process run's (float64 tolerances)."""
    for result in results:
        assert "error" not in result, result.get("error")
        for got, want in zip(result["weights"], ref_weights):
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
        for got, want in zip(result["params"], ref_params):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


CASES = [
    ("dto", {}),
    ("dto", {"engine": "representation"}),
    ("dto", {"engine": "subset"}),
    ("dto-amortized", {}),
    ("dto-amortized", {"update": "next-step"}),
    ("mgda", {}),
    ("cross-batch", {}),
    ("dto-amortized-gated", {"every": 3}),  # steps 0 and 1 sampled, 2 one backward, 3 kept
    ("fixed", {"weights": [0.9, 0.1]}),
]


@pytest.mark.parametrize(
    "method, options", CASES, ids=[f"{m}-{o.get('engine', o.get('update', ''))}" for m, o in CASES]
)
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, method, options):
    ref_weights, ref_params = train_steps(make_model(), None, method, options)
    results = run_two_processes(tmp_path, method, options)
    assert_each_rank_equals(results, ref_weights, ref_params)
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


COMBINE_CASES = [
    ("dto", {"engine": "representation"}),
    ("dto", {}),
    ("dto-amortized", {"update": "next-step"}),
    ("fixed", {"weights": [0.9, 0.1]}),
]


@pytest.mark.parametrize(
    "method, options", COMBINE_CASES, ids=[f"{m}-{o.get('engine', o.get('update', ''))}" for m, o in COMBINE_CASES]
)
def test_combine_under_ddp_equals_one_process(tmp_path, method, options):
    """``loss = balancer.combine(...); loss.backward()`` through DDP (what Lightning and the
    Hugging Face Trainer do) gives the one-process update on the concatenated batch."""
    ref_weights, ref_params = train_steps(make_model(), None, method, options)
    results = run_two_processes(tmp_path, method, options, combine=True)
    assert_each_rank_equals(results, ref_weights, ref_params)


def test_local_mode_averages_the_rank_weights(tmp_path):
    results = run_two_processes(tmp_path, "dto", {"sync": "local"})
    assert results[0]["weights"] == results[1]["weights"]
    ref_weights, _ = train_steps(make_model(), None, "dto", {})
    assert results[0]["weights"][0] != pytest.approx(ref_weights[0], rel=1e-9)  # not the global-batch weights


def test_desynchronised_rank_is_detected(tmp_path):
    results = run_two_processes(tmp_path, "dto", {"check_sync": True}, desync=True)
    assert all("ranks disagree on the parameters" in r.get("error", "") for r in results)


def wait_for_each_other(rank: int) -> bool:
    """Each rank waits to receive from the other, which never sends (a deadlock: both alive)."""
    dist.recv(torch.zeros(1), src=1 - rank)
    return True


def deadlock_worker(rank, world, init_file):
    run_in_gloo_group(rank, world, init_file, wait_for_each_other, rank, timeout=timedelta(seconds=2))


def test_a_wait_no_rank_answers_fails_instead_of_hanging(tmp_path):
    """The tests' process groups time out (helpers.COLLECTIVE_TIMEOUT, here 2 s): a deadlock
    introduced by a change fails its test instead of stalling the suite for gloo's 30 min."""
    with pytest.raises(mp.ProcessRaisedException, match="(?i)timed? ?out"):
        mp.spawn(deadlock_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
