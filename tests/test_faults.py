"""Faults and bad input through the Python API (round four): no sequence of calls makes a step
write a wrong update without an error, and each refusal names what is wrong."""

import math
import os
import pickle

import pytest
import torch
from torch import nn

from dtokd import make_balancer
from dtokd.balancing import NonFiniteStepError
from dtokd.losses import kd_loss, token_kd_loss
from dtokd.losses.kd import deit_token_loss


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (16,), generator=g), torch.randn(16, 3, generator=g, dtype=torch.float64)


def losses_of(model, x, y, t):
    logits = model(x)
    return {"distill": kd_loss(logits, t, 2.0), "task": nn.functional.cross_entropy(logits, y)}


def poisoned(model, x, y, t):
    losses = losses_of(model, x, y, t)
    return {"distill": losses["distill"] * math.nan, "task": losses["task"]}


# -- 1. a caught non-finite step leaves the amortized learner as it was -----------------------------


def amortized_run(mode, deferred, bad_at=None):
    """Four steps of the amortized rule with SGD; at step ``bad_at`` a NaN loss is caught as a user
    would (no optimizer step, no update), then the same batch is taken again."""
    model = net()
    balancer = make_balancer("dto-amortized", model.parameters(), update=mode, deferred_checks=deferred)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = []
    for step in range(4):
        x, y, t = batch(step)
        if step == bad_at:
            optimizer.zero_grad()
            try:
                balancer.backward(poisoned(model, x, y, t))
                if deferred:
                    balancer.check_deferred()
            except NonFiniteStepError:
                pass
            else:
                raise AssertionError("the NaN step was not refused")
        optimizer.zero_grad()
        info = balancer.backward(losses_of(model, x, y, t))
        optimizer.step()
        if mode == "same-batch":
            with torch.no_grad():
                balancer.update(losses_of(model, x, y, t))
        weights.append(list(info.weights.values()))
    balancer.check_deferred()
    return weights, [p.detach().clone() for p in model.parameters()], balancer.logits.clone()


@pytest.mark.parametrize("mode", ["same-batch", "next-step"])
@pytest.mark.parametrize("deferred", [False, True])
def test_a_caught_nonfinite_step_does_not_poison_the_amortized_learner(mode, deferred):
    clean_weights, clean_params, clean_logits = amortized_run(mode, deferred)
    weights, params, logits = amortized_run(mode, deferred, bad_at=2)
    assert all(math.isfinite(w) for row in weights for w in row)
    assert weights == clean_weights  # as if the refused step had not been taken
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=0)
    for p, q in zip(params, clean_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not torch.equal(logits, torch.zeros_like(logits))  # it did learn


def test_a_nonfinite_same_batch_update_is_refused_and_the_run_goes_on():
    model = net()
    balancer = make_balancer("dto-amortized", model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, t = batch()
    balancer.backward(losses_of(model, x, y, t))
    optimizer.step()
    logits = balancer.logits.clone()
    with pytest.raises(NonFiniteStepError, match="after the step"), torch.no_grad():
        balancer.update(poisoned(model, x, y, t))
    assert torch.equal(balancer.logits, logits)
    optimizer.zero_grad()
    info = balancer.backward(losses_of(model, x, y, t))  # not "call balancer.update"
    assert all(math.isfinite(w) for w in info.weights.values())


# -- 2. a non-finite teacher never gives a finite loss -----------------------------------------------


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("divergence", ["forward_kl", "forward_ce", "reverse_kl", "jsd"])
def test_token_kd_with_a_broken_teacher_logit_is_nan(bad, divergence):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 7, generator=g)
    teacher[1, 3, 4] = bad
    assert torch.isnan(token_kd_loss(student, teacher, divergence=divergence))
    teacher[1, 3, 4] = -math.inf  # a token the teacher rules out is allowed (reverse KL is then +inf, truly)
    value = token_kd_loss(student, teacher, divergence=divergence)
    assert torch.isfinite(value) if divergence != "reverse_kl" else value == math.inf


@pytest.mark.parametrize("method", ["dto-amortized", "fixed", "mean", "dto"])
def test_a_step_with_an_overflowed_teacher_is_refused_and_the_parameters_stay_finite(method):
    torch.manual_seed(0)
    student = nn.Linear(4, 7)
    teacher_logits = torch.randn(3, 6, 7)
    teacher_logits[0, 2, 5] = math.inf  # a half-precision teacher that overflowed
    options = {"weights": {"distill": 0.5, "task": 0.5}} if method == "fixed" else {}
    balancer = make_balancer(method, student.parameters(), **options)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    logits = student(torch.randn(3, 6, 4))
    labels = torch.randint(0, 7, (3, 6))
    losses = {
        "distill": token_kd_loss(logits, teacher_logits, labels),
        "task": nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)),
    }
    with pytest.raises(NonFiniteStepError, match="distill"):
        balancer.backward(losses)
    optimizer.zero_grad()  # a caller that catches the error drops the step's gradient
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_deit_hard_distillation_with_a_nan_teacher_logit_is_nan():
    teacher = torch.randn(4, 5)
    teacher[2, 1] = math.nan
    assert torch.isnan(deit_token_loss(torch.randn(4, 5), teacher, "hard"))
    assert torch.isfinite(deit_token_loss(torch.randn(4, 5), torch.randn(4, 5), "hard"))


# -- 4. a balancer whose parameters no loss reaches ------------------------------------------------


@pytest.mark.parametrize(
    "method, engine", [("mean", "exact"), ("mean", "representation"), ("dto-amortized", "exact"), ("dto", "subset")]
)
def test_a_balancer_over_parameters_no_loss_reaches_is_refused(method, engine):
    model, other = net(0), net(1)
    extra = {"gram_params": list(other[2].parameters())} if engine == "subset" else {}
    balancer = make_balancer(method, other.parameters(), engine=engine, **extra)
    x, y, t = batch()
    logits = model(x)
    losses = {"distill": kd_loss(logits, t, 2.0), "task": nn.functional.cross_entropy(logits, y)}
    with pytest.raises(ValueError, match="reaches any of the .* parameters given to the balancer"):
        balancer.backward(losses, representation=logits)
    assert all(p.grad is None for p in other.parameters())


def test_a_loss_that_reaches_none_of_the_parameters_is_warned_about():
    model = net()
    x, y, t = batch()
    logits = model(x)
    unrelated = (torch.randn(3, requires_grad=True) ** 2).sum()
    balancer = make_balancer("mean", model.parameters())
    with pytest.warns(RuntimeWarning, match=r"\['extra'\] reach none"):
        balancer.backward({"task": nn.functional.cross_entropy(logits, y), "extra": unrelated})


# -- 5. a balancer state saved by another method ----------------------------------------------------


def stepped_state(method, **options):
    model = net()
    balancer = make_balancer(method, model.parameters(), **options)
    x, y, t = batch()
    balancer.backward(losses_of(model, x, y, t))
    return balancer.state_dict()


@pytest.mark.parametrize(
    "saved, loaded",
    [("dto-amortized", "mean"), ("mean", "dto-amortized"), ("gradnorm", "dto-amortized"), ("dto", "anchored")],
)
def test_a_state_saved_by_another_method_is_refused(saved, loaded):
    options = {"update": "next-step"} if saved == "dto-amortized" else {}
    state = stepped_state(saved, **options)
    balancer = make_balancer(loaded, net().parameters(), **({"anchor": "task"} if loaded == "anchored" else {}))
    with pytest.raises(ValueError, match=f"saved by method '{saved}', but it is loaded into '{loaded}'"):
        balancer.load_state_dict(state)


def test_a_state_from_before_methods_were_recorded_is_recognised_by_its_learned_entries():
    state = stepped_state("dto-amortized", update="next-step")
    del state["method"]
    make_balancer("dto-amortized", net().parameters(), update="next-step").load_state_dict(state)  # its own: fine
    with pytest.raises(ValueError, match="a method whose state holds"):
        make_balancer("mean", net().parameters()).load_state_dict(state)
    stateless = {"names": ("distill", "task")}
    with pytest.raises(ValueError, match="no learned weights"):
        make_balancer("dto-amortized", net().parameters()).load_state_dict(stateless)
    with pytest.raises(ValueError, match="not a balancer state"):
        make_balancer("mean", net().parameters()).load_state_dict({"model": 1})


# -- 7. a KD loss a rounding error below 0 -----------------------------------------------------------


def test_kd_losses_at_the_teacher_are_never_negative_and_keep_their_gradient():
    negative_before = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        teacher = torch.randn(32, 10, generator=g) * 3
        student = (teacher + 1e-7 * torch.randn(32, 10, generator=g)).requires_grad_(True)
        raw = nn.functional.kl_div(
            nn.functional.log_softmax(student / 4, 1),
            nn.functional.log_softmax(teacher / 4, 1),
            reduction="batchmean",
            log_target=True,
        )
        negative_before += bool(raw < 0)
        for value in (kd_loss(student, teacher, 4.0), token_kd_loss(student, teacher)):
            assert value >= 0
    assert negative_before > 0  # the case exists
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(8, 5, generator=g, dtype=torch.float64)
    student = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    (clamped,) = torch.autograd.grad(kd_loss(student, teacher, 2.0), student)
    reference = nn.functional.kl_div(
        nn.functional.log_softmax(student / 2, 1),
        nn.functional.log_softmax(teacher / 2, 1),
        reduction="batchmean",
        log_target=True,
    )
    (expected,) = torch.autograd.grad(reference * 4, student)
    torch.testing.assert_close(clamped, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dto", "dto-amortized", "anchored"])
def test_log_loss_rules_take_a_student_at_its_teacher(method):
    model = net()
    x, y, _ = batch()
    with torch.no_grad():
        teacher = model(x).float().double()  # the student's own logits: KL 0 up to rounding
    options = {"anchor": "task"} if method == "anchored" else {}
    balancer = make_balancer(method, model.parameters(), **options)
    info = balancer.backward(losses_of(model, x, y, teacher))
    assert all(math.isfinite(w) for w in info.weights.values())


def test_a_negative_loss_is_refused_with_advice_that_holds_for_dto():
    model = net()
    x, y, t = batch()
    losses = losses_of(model, x, y, t)
    with pytest.raises(ValueError, match="balances log L .* give the non-negative form") as error:
        make_balancer("dto-amortized", model.parameters()).backward({**losses, "distill": losses["distill"] - 10})
    assert "log_losses=False" not in str(error.value)


# -- 9. gradient accumulation in a plain loop --------------------------------------------------------


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=0.01, foreach=True),
    # a fused step leaves the parameters' version counters as they were: the step hook sees it
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.01, fused=True),
}


@pytest.mark.parametrize("optimizer_kind", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["same-batch", "next-step"])
def test_the_amortized_rule_learns_once_per_optimizer_step_under_accumulation(mode, optimizer_kind):
    """Two micro-batches per optimizer step: both weighted alike, the learner stepped once per
    optimizer step (same-batch: from the last micro-batch re-evaluated), whatever the optimizer."""
    model = net()
    balancer = make_balancer("dto-amortized", model.parameters(), update=mode)
    optimizer = OPTIMIZERS[optimizer_kind](model.parameters())
    steps = 3
    for step in range(steps):
        optimizer.zero_grad()
        micro = [batch(10 * step + k) for k in range(2)]
        weights = [balancer.backward(losses_of(model, *b)).weights for b in micro]
        assert weights[0] == weights[1]
        optimizer.step()
        if mode == "same-batch":
            with torch.no_grad():
                balancer.after_step(lambda: losses_of(model, *micro[-1]))
    assert int(balancer.state_dict()["adam"]["steps"]) == (steps if mode == "same-batch" else steps - 1)


def test_after_step_is_a_no_op_for_stateless_methods_and_update_is_named():
    model = net()
    balancer = make_balancer("mean", model.parameters())
    x, y, t = batch()
    balancer.backward(losses_of(model, x, y, t))
    balancer.after_step(lambda: pytest.fail("a stateless method must not re-evaluate the losses"))
    with pytest.raises(TypeError, match="update\\(\\) is the same-batch learning step of method 'dto-amortized'"):
        balancer.update(losses_of(model, x, y, t))


# -- 11. messages that mislead ------------------------------------------------------------------------


def test_combine_says_nothing_was_written_when_it_refuses_a_nonfinite_loss():
    model = net()
    x, y, t = batch()
    with pytest.raises(NonFiniteStepError) as error:
        make_balancer("mean", model.parameters()).combine(poisoned(model, x, y, t))
    assert "nothing was written to .grad" in str(error.value)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("temperature", [math.inf, -1.0, 0.0, math.nan, "4", True])
def test_kd_loss_refuses_a_temperature_that_is_not_a_positive_finite_number(temperature):
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature)
    with pytest.raises(ValueError, match="temperature"):
        deit_token_loss(torch.randn(2, 3), torch.randn(2, 3), "soft", temperature)


# -- 12. files that would run code on load ------------------------------------------------------------


class Payload:
    """An object whose unpickling creates a file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (self.marker,))


def test_a_run_checkpoint_carrying_a_pickled_payload_is_refused_without_running_it(tmp_path):
    from dtokd.train.checkpoint import FORMAT, load_checked

    marker = tmp_path / "ran"
    path = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "identity": {}, "payload": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="refused without running them"):
        load_checked(path, {})
    assert not marker.exists()


def test_the_data_cache_carrying_a_pickled_payload_is_refused_without_running_it(tmp_path, monkeypatch):
    from dtokd.data import sources

    folder = tmp_path / "images"
    for split in ("train", "test"):
        (folder / split / "a").mkdir(parents=True)
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "ran"
    cached = sources.cache_dir() / "tensors" / f"images-{sources.content_key(folder)}-8px.pt"
    cached.parent.mkdir(parents=True)
    torch.save({"train_images": Payload(str(marker))}, cached)
    with pytest.raises(pickle.UnpicklingError):
        sources.load_image_folder(folder, 8)
    assert not marker.exists()


# -- the balancer's weights and options never turn a run into something else ----------------------


@pytest.mark.parametrize(
    "method, options, error, match",
    [
        ("fixed", {"weights": {"distill": -1.0, "task": 0.0}}, ValueError, "finite numbers >= 0"),
        ("fixed", {"weights": {"distill": 0, "task": 0}}, ValueError, "not all zero"),
        ("fixed", {"weights": {"distill": True, "task": False}}, ValueError, "must be numbers"),
        ("fixed", {"weights": {"distill": "0.9", "task": 0.1}}, ValueError, "must be numbers"),
        ("upgrad", {"pref_vector": [0, 0]}, ValueError, "not all zero"),
        ("dto", {"reference": {"distill": -1, "task": 1}, "rescale": "norm"}, ValueError, ">= 0"),
        ("dto-amortized", {"lr": math.nan}, ValueError, "dto-amortized: lr must be a finite number >= 0"),
        ("dto-amortized", {"weight_decay": math.inf}, ValueError, "weight_decay must be a finite number"),
        ("dto-amortized", {"lr": True}, ValueError, "lr must be a finite number >= 0, got True"),
        ("gradnorm", {"alpha": math.nan}, ValueError, "gradnorm: alpha must be a finite number"),
        ("dto", {"log_losses": "false"}, TypeError, "log_losses must be True or False, got 'false'"),
        ("dto", {"batched": "no"}, TypeError, "batched must be True or False"),
        ("dto-amortized", {"constraint": "simplex"}, TypeError, r"does not accept option\(s\) \['constraint'\]"),
    ],
)
def test_balancer_options_that_would_train_something_else_are_refused_when_built(method, options, error, match):
    with pytest.raises(error, match=match):
        make_balancer(method, net().parameters(), **options)


def test_the_pipeline_names_an_engine_given_among_the_methods_options():
    from types import SimpleNamespace

    from dtokd.train import load_config, loop

    config = load_config(None, ["balancer.method=dto", "balancer.options={engine: subset}"])
    task = SimpleNamespace(student=net(), loss_names=("distill", "task"))
    with pytest.raises(ValueError, match=r"balancer.options names \['engine'\]: set them as balancer.engine"):
        loop._make_balancer(config, task, list(task.student.parameters()))


@pytest.mark.parametrize("optimizer_kind", list(OPTIMIZERS))
def test_next_step_learning_sees_every_optimizer_step(optimizer_kind):
    """Without accumulation the next-step learner learns between every two optimizer steps, for
    fused optimizers too; a backward not followed by a step (a micro-batch) does not learn."""
    model = net()
    balancer = make_balancer("dto-amortized", model.parameters(), update="next-step")
    optimizer = OPTIMIZERS[optimizer_kind](model.parameters())
    for step in range(5):
        optimizer.zero_grad()
        balancer.backward(losses_of(model, *batch(step)))
        optimizer.step()
    assert balancer.state_dict()["adam"]["steps"] == 4
    balancer.backward(losses_of(model, *batch(9)))  # learns from the last step
    balancer.backward(losses_of(model, *batch(10)))  # no step since: a micro-batch
    assert balancer.state_dict()["adam"]["steps"] == 5


def test_the_step_watch_survives_pickling_and_counts_only_its_parameters():
    import pickle

    model, other = net(0), net(1)
    balancer = pickle.loads(pickle.dumps(make_balancer("dto-amortized", model.parameters(), update="next-step")))
    watched = balancer.engine.params
    mark = balancer._steps.mark()
    torch.optim.SGD(other.parameters(), lr=0.1, foreach=False).step()  # another model's optimizer
    assert balancer._steps.mark() == mark
    torch.optim.AdamW(watched, lr=0.1, fused=True).step()
    assert balancer._steps.mark() != mark


def test_a_cifar_batch_file_carrying_a_pickled_payload_is_refused_without_running_it(tmp_path):
    from dtokd.data import sources

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(str(marker)), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="posix.mknod is not allowed in a data file"):
        sources.load_cifar(tmp_path, 10)
    assert not marker.exists()
