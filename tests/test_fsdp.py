"""FSDP2 (``fully_shard``), two gloo processes on the CPU, each on half of the batch, against one
process on the whole batch: the balancers over sharded gradients (dtokd.balancing.sharded).

One spawn of two processes runs every case (a spawn costs most of the time); each test compares
one case with the one-process run. Float64 throughout; tolerance rel 1e-9 / abs 1e-12: the two
runs add the same numbers in a different order (FSDP's reduce-scatter averages the two half-batch
gradients, each rank's partial Gram is summed across ranks), so they differ by rounding only
(about 1e-15 relative), with room for it to grow over four steps, while a wrong convention (a
Gram off by a factor, a rank's shard missing) is off by order 1."""

import io
import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import GLOBAL_BATCH, batch, losses_of
from torch import nn
from torch.nn import functional as F

from dtokd import make_balancer
from dtokd.balancing import checks, sharded

from helpers import run_in_gloo_group

pytestmark = pytest.mark.slow

if not dist.is_available():  # FSDP2 needs torch.distributed, which some builds leave out
    pytest.skip("this PyTorch build has no torch.distributed (hence no FSDP2)", allow_module_level=True)
from torch.distributed.fsdp import fully_shard  # noqa: E402

STEPS = 4
SCALE_MD = Path(__file__).resolve().parents[1] / "docs" / "scale.md"

CASES = {
    "fixed": ("fixed", {"weights": [0.9, 0.1]}, False),
    "fixed-combine": ("fixed", {"weights": [0.9, 0.1]}, True),
    "dto-exact": ("dto", {}, False),
    "dto-exact-combine": ("dto", {}, True),
    "dto-exact-grads-zeroed": ("dto", {}, False),  # zero_grad(set_to_none=False): the update is added to .grad
    "dto-subset": ("dto", {"engine": "subset"}, False),
    "dto-representation": ("dto", {"engine": "representation"}, False),
    "dto-amortized": ("dto-amortized", {}, False),
    "dto-amortized-combine": ("dto-amortized", {}, True),
    "dto-amortized-next-step": ("dto-amortized", {"update": "next-step"}, False),
    "cross-batch": ("cross-batch", {}, False),
    "dto-amortized-gated": ("dto-amortized-gated", {"every": 2}, False),  # kept at steps 0, 2; compared at 1, 3
}
KEEPING = ["cross-batch", "dto-amortized-gated"]
"""The rules that keep each objective's gradient from one step to the next (checked on resume too)."""
RESUME_AT = 1
FREEZE_AT = 2
"""The step from which a parameter whose second shard is empty is frozen (Scaled)."""
"""The step at which a resumed run's new balancer takes over: both rules hold step 0's gradients then."""


def make_model() -> nn.Module:
    """7 hidden units: the first layer's shards are uneven (4 and 3 rows)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def model_numel() -> int:
    return sum(p.numel() for p in make_model().parameters())


def shard(model: nn.Module) -> nn.Module:
    layers = model.net if isinstance(model, Scaled) else model
    fully_shard(layers[0])
    fully_shard(layers[2])
    fully_shard(model)
    return model


class Scaled(nn.Module):
    """make_model's network with a learned (1, 4) scale on its logits: on two FSDP ranks the
    scale's second shard is empty (a rank that holds nothing of a parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64).reshape(1, 4))

    def forward(self, x):
        return self.net(x) * self.scale


def train(model, case, rank=0, world=1, *, resume=False, state=None, freeze_at=None):
    """STEPS balanced SGD steps of ``case`` on this rank's part of each batch; the weights and raw
    Grams seen, the parameters at the end and, for the cross-batch rules, the usefulness learned.
    ``resume``: at step RESUME_AT a new balancer takes over from the first rank's ``state_dict``
    (through ``torch.save``, as a checkpoint: every rank takes part, every rank reads the first
    rank's) or from ``state`` where given (another run's); the state it took over from and this
    rank's own are returned too. ``freeze_at``: the step from which Scaled's scale is frozen."""
    method, options, combine = CASES[case]
    if options.get("engine") == "subset":
        options = {**options, "gram_params": list(model[2].parameters())}
    params = list(model.parameters())
    scale = dict(model.named_parameters()).get("scale")  # Scaled's, as the balancer holds it
    balancer = make_balancer(method, params, **options)
    taken_over = own_state = None
    optimizer = torch.optim.SGD(params, lr=0.2)
    representation = options.get("engine") == "representation"
    set_to_none = not case.endswith("zeroed")
    weights, grams = [], []
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for step in range(STEPS):
        if resume and step == RESUME_AT:
            own_state = checkpointed(balancer.state_dict())
            taken_over = state if state is not None else first_ranks(own_state, world)
            balancer = make_balancer(method, params, **options)
            balancer.load_state_dict(taken_over)
        if step == freeze_at:  # the sharded parameter, with the root resharded (a no-grad forward leaves it unsharded)
            if hasattr(model, "reshard"):
                model.reshard()
            scale.requires_grad_(False)
        x, y, t = batch(step)
        optimizer.zero_grad(set_to_none=set_to_none)
        logits = model(x[part])
        losses = losses_of(logits, y[part], t[part])
        z = logits if representation else None
        if combine:
            balancer.combine(losses, representation=z).backward()
            info = balancer.last_info
        else:
            info = balancer.backward(losses, representation=z)
        optimizer.step()
        if method.startswith("dto-amortized") and options.get("update", "same-batch") == "same-batch":
            with torch.no_grad():
                balancer.update(losses_of(model(x[part]), y[part], t[part]))
        weights.append(list(info.weights.values()))
        grams.append(None if info.raw_gram is None else info.raw_gram.clone())
    full = [p.full_tensor() if isinstance(p, sharded.DTensor) else p for p in model.parameters()]
    usefulness = getattr(balancer, "usefulness", None)
    return {
        "weights": weights,
        "grams": grams,
        "params": [p.detach().clone() for p in full],
        "usefulness": None if usefulness is None else usefulness.clone(),
        "state": taken_over,
        "own_state": own_state,
    }


def first_ranks(state: dict, world: int) -> dict:
    """The first rank's ``state`` on every rank (as every rank reads the first rank's checkpoint)."""
    if world == 1:
        return state
    shared = [state]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def checkpointed(state: dict) -> dict:
    """``state`` written and read back as a checkpoint file is."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def reach_check_error(rank, world) -> str:
    """The library's first-step check that the losses reach the balancer's parameters, on a
    sharded model: its error message, or '' if it accepts them."""
    model = shard(make_model())
    x, y, t = batch(0)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    try:
        checks.check_reach(losses_of(model(x[part]), y[part], t[part]), list(model.parameters()), "test")
    except ValueError as error:
        return str(error)
    return ""


def refused(method, options, rank, world) -> str:
    """The error a wrong combination raises on its first step under FSDP2 ('' if none)."""
    model = shard(make_model())
    x, y, t = batch(0)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    balancer = make_balancer(method, model.parameters(), **options)
    try:
        balancer.backward(losses_of(model(x[part]), y[part], t[part]))
    except (ValueError, NotImplementedError) as error:
        return str(error)
    return ""


def docs_example(rank, world) -> bool:
    """docs/scale.md's FSDP2 loop (its ``py`` block) runs on this rank's half of the batch and trains."""
    (code,) = re.findall(r"```py\n(.*?)```", SCALE_MD.read_text(), re.S)
    code = textwrap.dedent(code)
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), nn.Linear(8, 4)
    g = torch.Generator().manual_seed(rank)
    loader = [(torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    before = [p.detach().clone() for p in student.parameters()]

    def kd_loss(logits, teacher_logits, temperature=2.0):
        return F.kl_div(
            F.log_softmax(logits / temperature, 1), F.softmax(teacher_logits / temperature, 1), reduction="batchmean"
        )

    names = {"torch": torch, "student": student, "teacher": teacher, "loader": loader, "kd_loss": kd_loss}
    exec(compile(code, "docs/scale.md", "exec"), {**names, "ce": F.cross_entropy})
    after = [p.full_tensor() for p in student.parameters()]
    return any(not torch.equal(a, b) for a, b in zip(after, before))


def recording_shard_sizes(sizes: list):
    """``sharded.objective_shards`` appending the number of elements it keeps per objective."""
    collect = sharded.objective_shards

    def objective_shards(losses, params, keep_graph):
        shards = collect(losses, params, keep_graph)
        sizes.extend(sum(t.numel() for t in row) for row in shards)
        return shards

    return objective_shards


def worker(rank, world, init_file, out):
    run_in_gloo_group(rank, world, init_file, run_cases, rank, world, out)


def run_cases(rank, world, out) -> bool:
    """Every case on this rank (a case's error is its result), saved."""
    results: dict = {"reach_error": reach_check_error(rank, world)}
    kept: list[int] = []
    sharded.objective_shards = recording_shard_sizes(kept)
    for name in CASES:
        try:
            results[name] = train(shard(make_model()), name, rank, world)
        except Exception as error:  # reported by the case's test
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    model = shard(make_model())
    results["kept"] = list(kept), sum(p.to_local().numel() for p in model.parameters()), model_numel()
    for name in KEEPING:
        results[f"resumed/{name}"] = train(shard(make_model()), name, rank, world, resume=True)
        one_process_state = train(make_model(), name, resume=True)["state"]  # the whole batch on each rank
        results[f"resumed-from-one-process/{name}"] = train(
            shard(make_model()), name, rank, world, resume=True, state=one_process_state
        )
        results[f"frozen/{name}"] = train(shard(Scaled()), name, rank, world, freeze_at=FREEZE_AT)
    results["refused-local"] = refused("dto", {"sync": "local"}, rank, world)
    results["refused-batched"] = refused("dto", {"batched": True}, rank, world)
    results["docs-example"] = docs_example(rank, world)
    torch.save(results, f"{out}.{rank}")
    return True


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every case's results on the two ranks (one spawn for the module)."""
    folder = tmp_path_factory.mktemp("fsdp")
    out = folder / "result"
    mp.spawn(worker, args=(2, str(folder / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def assert_same_run(got, want):
    """Two runs' weights, usefulness (where learned) and final parameters agree (see the module)."""
    assert "error" not in got, got.get("error")
    for a, b in zip(got["weights"], want["weights"], strict=True):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    if want["usefulness"] is not None:
        close(got["usefulness"], want["usefulness"])
    for a, b in zip(got["params"], want["params"], strict=True):
        close(a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_over_two_ranks_equals_one_process_on_the_whole_batch(ranks, case):
    want = train(make_model(), case)
    for got in (r[case] for r in ranks):
        assert_same_run(got, want)


@pytest.mark.parametrize("case", KEEPING)
def test_a_cross_batch_rule_learns_under_fsdp_as_in_one_process(ranks, case):
    """The usefulness is learned (not its initial zeros) and equals one process's: each rank's
    partial dot products with the kept shards are summed across the ranks."""
    want = train(make_model(), case)
    assert want["usefulness"] is not None and want["usefulness"].abs().min() > 1e-3
    for got in (r[case] for r in ranks):
        close(got["usefulness"], want["usefulness"])


@pytest.mark.parametrize("case", KEEPING)
def test_a_cross_batch_rule_resumes_under_fsdp_on_any_number_of_processes(ranks, case):
    """Resumed at a step where the kept gradients are in the state (gathered whole from the two
    ranks' shards), the run equals the straight one: on two ranks from their own state, on two
    ranks from one process's state, and on one process from the two ranks' state."""
    want = train(make_model(), case)
    own = [r[f"resumed/{case}"]["own_state"]["previous"] for r in ranks]
    assert "chunks" not in own[0]  # the whole gradients, on the first rank only
    assert [tuple(t.shape) for t in own[0]["full"][0]] == [tuple(p.shape) for p in make_model().parameters()]
    assert own[1]["full"] is None
    with pytest.raises(ValueError, match="gathered to the first rank only"):
        balancer = make_balancer(CASES[case][0], make_model().parameters())
        balancer.load_state_dict(ranks[1][f"resumed/{case}"]["own_state"])
    saved = [r[f"resumed/{case}"]["state"] for r in ranks]  # the first rank's, on both
    for r in ranks:
        assert_same_run(r[f"resumed/{case}"], want)
        assert_same_run(r[f"resumed-from-one-process/{case}"], want)
    assert_same_run(train(make_model(), case, resume=True, state=saved[0]), want)


@pytest.mark.parametrize("case", KEEPING)
def test_a_parameter_frozen_midway_starts_the_comparison_again_on_every_rank(ranks, case):
    """A parameter of which the second rank holds an empty shard is frozen at step FREEZE_AT: both
    ranks see the change (the parameters' global shapes, not their own shards), start the
    comparison again together (no rank waits alone in the sum of the dot products) and end as one
    process that froze it at the same step."""
    want = train(Scaled(), case, freeze_at=FREEZE_AT)
    for r in ranks:
        assert_same_run(r[f"frozen/{case}"], want)


@pytest.mark.parametrize("case", ["dto-exact", "dto-subset", "dto-representation"])
def test_sharded_gram_equals_the_unsharded_gram(ranks, case):
    """The Gram every rank's balancer saw (the rank sum of its shards' partial Grams for the
    exact and subset engines) is the one-process Gram of the whole batch, step by step."""
    want = train(make_model(), case)
    for got in (r[case] for r in ranks):
        assert "error" not in got, got.get("error")
        for a, b in zip(got["grams"], want["grams"]):
            close(a, b)


def test_only_shards_are_kept(ranks):
    """Memory: each objective's gradient is kept as this rank's shard, never in full."""
    for r in ranks:
        kept, local, full = r["kept"]
        assert kept and all(n == local for n in kept) and local < full


def test_a_partial_gram_is_refused(ranks):
    """sync='local' (each rank's own Gram) over shards would be a part of a Gram: an error."""
    assert all("needs sync='global'" in r["refused-local"] for r in ranks)
    assert all("batched=True is not available under FSDP2" in r["refused-batched"] for r in ranks)


def test_the_docs_example_trains_under_fsdp(ranks):
    assert all(r["docs-example"] for r in ranks)


def test_the_reach_check_accepts_a_sharded_model(ranks):
    assert [r["reach_error"] for r in ranks] == ["", ""]
