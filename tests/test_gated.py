"""The gated amortized rule against its formula by hand (float64): the amortized rule's shares,
each distillation objective's cut by its cross-batch usefulness relative to the task's; the
schedule of its sampled steps, resume, faults and options."""

import math

import pytest
import torch
from torch import nn

from dtokd import make_balancer
from dtokd.balancing.checks import NonFiniteStepError

from tests.test_cross_batch import accumulated_and_stepwise, gradient, setup, written


def cosine(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


def lockstep(model, losses, steps, every, rho, **options):
    """SGD steps through the gated balancer, with the plain amortized rule fed the same losses at
    the same weights (its learner sees what the gated one's sees); per step: the gated update,
    the amortized shares, each objective's gradient, the gated StepInfo."""
    gated = make_balancer(
        "dto-amortized-gated", model.parameters(), every=every, rho=rho, update="next-step", **options
    )
    plain = make_balancer("dto-amortized", model.parameters(), update="next-step")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    records = []
    for step in steps:
        names = list(losses(step))
        grads = [gradient(losses(step)[n], model) for n in names]
        optimizer.zero_grad()
        shares = plain.backward(losses(step)).loss_weights
        optimizer.zero_grad()
        info = gated.backward(losses(step))
        records.append(
            (written(model).clone(), torch.tensor([shares[n] for n in names], dtype=torch.float64), grads, info)
        )
        optimizer.step()
    return gated, records


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("three", [False, True], ids=["task last of two", "task first of three"])
def test_each_step_is_the_amortized_shares_gated_by_hand(every, three):
    rho = 0.4
    model, losses = setup(three=three)
    names = list(losses(0))
    t = names.index("task")
    gated, records = lockstep(model, losses, range(7), every, rho)
    usefulness, kept, compared, cut = torch.zeros(len(names), dtype=torch.float64), None, 0, 0.0
    for step, (update, shares, grads, info) in enumerate(records):
        sampled = step % every in (0, 1)
        if sampled and kept is not None:
            usefulness = (1 - rho) * usefulness + rho * torch.stack([cosine(grads[t], g) for g in kept])
            compared += 1
        if sampled:
            kept = grads if step % every == 0 else None
        gate = (
            (usefulness / usefulness[t]).clamp(0, 1)
            if usefulness[t] > 0
            else torch.ones(len(names), dtype=torch.float64)
        )
        gate[t] = 1.0
        expected_shares = shares * gate
        expected_shares[t] += (shares * (1 - gate)).sum()
        assert expected_shares.sum().item() == pytest.approx(1.0, rel=1e-12)
        cut = max(cut, (shares - expected_shares).abs().max().item())
        assert info.loss_weights == pytest.approx(dict(zip(names, expected_shares.tolist())), rel=1e-10, abs=1e-14)
        expected = sum(expected_shares[i] * grads[i] for i in range(len(names)))
        torch.testing.assert_close(update, expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gated.usefulness, usefulness, rtol=1e-12, atol=1e-15)
    assert compared == (6 if every == 1 else 3 if every == 2 else 2)  # the schedule's comparisons
    assert gated.gradient_steps == 7
    assert cut > 0.01  # the gate moved the shares: the check can tell the gated rule from the plain one


def test_a_teacher_that_contradicts_the_labels_is_cut_to_the_task_and_one_that_agrees_keeps_its_share():
    def wrong(x, y):
        return 6.0 * nn.functional.one_hot((y + 1) % 3, 3).double()

    def right(x, y):
        return 6.0 * nn.functional.one_hot(y, 3).double()

    for name, teacher in (("wrong", wrong), ("right", right)):
        model, losses = setup(teacher)
        gated, records = lockstep(model, losses, range(30), 2, 0.3)
        update, shares, grads, info = records[-1]
        if name == "wrong":  # the KL's gradient works against the labels' on new batches: the task takes the step
            assert gated.usefulness[0] < 0 < gated.usefulness[1] and gated.gate()[0] == 0
            assert info.loss_weights == pytest.approx({"distill": 0.0, "task": 1.0}, abs=1e-12)
            torch.testing.assert_close(update, grads[1], rtol=1e-10, atol=1e-13)
        else:  # it carries as well as the labels' own: the amortized share is kept (nearly) whole
            assert gated.gate()[0] > 0.9
            assert info.loss_weights["distill"] == pytest.approx(shares[0].item(), rel=0.1)


def test_the_steps_between_samples_are_one_backward_and_keep_nothing(monkeypatch):
    model, losses = setup()
    gated = make_balancer("dto-amortized-gated", model.parameters(), every=4, update="next-step")
    calls = []
    original = type(gated.engine).gradients
    monkeypatch.setattr(
        type(gated.engine), "gradients", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    kept = []
    for step in range(9):
        optimizer.zero_grad()
        gated.backward(losses(step))
        kept.append(gated._usefulness.previous is not None)
        optimizer.step()
    assert len(calls) == 5  # steps 0, 1, 4, 5, 8: the kept step and the one that compares with it
    assert kept == [True, False, False, False, True, False, False, False, True]


def test_a_resumed_balancer_continues_as_the_straight_run():
    model, losses = setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, straight = lockstep(model, losses, range(8), 3, 0.3)
    model.load_state_dict(state)
    first, _ = lockstep(model, losses, range(4), 3, 0.3)  # ends after step 3: a kept step, awaiting its comparison
    saved = first.state_dict()
    assert set(saved) >= {"method", "names", "logits", "usefulness", "previous", "gradient_steps"}
    assert saved["gradient_steps"] == 4 and saved["previous"] is not None
    second = make_balancer("dto-amortized-gated", model.parameters(), every=3, rho=0.3, update="next-step")
    second.load_state_dict(saved)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(4, 8):
        optimizer.zero_grad()
        info = second.backward(losses(step))
        torch.testing.assert_close(written(model), straight[step][0], rtol=1e-12, atol=1e-14)
        assert info.loss_weights == pytest.approx(straight[step][3].loss_weights, rel=1e-12)
        optimizer.step()
    with pytest.raises(ValueError, match="'usefulness' holds 2 objectives, its names 3"):
        three = make_balancer("dto-amortized-gated", model.parameters())
        three.load_state_dict({**saved, "names": ["a", "b", "c"], "previous": None})


@pytest.mark.parametrize("before", [3, 4, 2], ids=["on a kept step", "on a comparing step", "between samples"])
def test_a_non_finite_step_is_not_counted_and_learns_nothing(before):
    model, losses = setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for on_nonfinite in ("skip", "raise"):
        gated = make_balancer(
            "dto-amortized-gated", model.parameters(), every=3, rho=0.5, on_nonfinite=on_nonfinite, update="next-step"
        )
        for step in range(before):  # every=3: step 3 is kept, 4 compares with it, 2 has no gradients
            optimizer.zero_grad()
            gated.backward(losses(step))
        learned, count, kept = gated.usefulness.clone(), gated.gradient_steps, gated._usefulness.previous
        assert (kept is not None) == (before == 4)
        bad = losses(9)
        bad["distill"] = bad["distill"] * math.nan
        optimizer.zero_grad()
        if on_nonfinite == "skip":
            assert gated.backward(bad).skipped
        else:
            with pytest.raises(NonFiniteStepError):
                gated.backward(bad)
        assert torch.equal(gated.usefulness, learned) and gated.gradient_steps == count
        assert gated._usefulness.previous is kept and gated.engine.last is None
        optimizer.zero_grad()
        gated.backward(losses(10))  # the step taken instead is the one the schedule awaited
        assert (gated.usefulness != learned).any() == (before == 4)


def test_a_step_the_amortized_rule_refuses_teaches_the_gate_nothing():
    model, losses = setup()
    gated = make_balancer("dto-amortized-gated", model.parameters(), every=2)  # same-batch: update() is due
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gated.backward(losses(0))
    optimizer.step()
    kept = gated._usefulness.previous
    with pytest.raises(RuntimeError, match=r"call balancer.update\(losses_after\)"):
        gated.backward(losses(1))  # the update() after step 0 was forgotten
    assert gated._usefulness.previous is kept and torch.equal(gated.usefulness, torch.zeros(2, dtype=torch.float64))
    assert gated.engine.last is None and gated.gradient_steps == 1


@pytest.mark.parametrize("name", ["task", "distill"])
def test_one_objective_is_the_plain_backward_pass(name):
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    gated = make_balancer("dto-amortized-gated", [w], update="next-step")
    for _ in range(3):
        w.grad = None
        info = gated.backward({name: (w**2).sum()})
        torch.testing.assert_close(w.grad, 2 * w.detach(), rtol=0, atol=1e-15)
        assert info.loss_weights == {name: 1.0}
        with torch.no_grad():
            w -= 0.1 * w.grad


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"engine": "representation"}, ValueError, "needs each objective's whole gradient at its sampled steps"),
        ({"every": 0}, ValueError, "every must be a whole number of steps >= 1, got 0"),
        ({"every": True}, ValueError, "every must be a whole number of steps >= 1, got True"),
        ({"every": 2.5}, ValueError, "every must be a whole number of steps >= 1, got 2.5"),
        ({"rho": 0.0}, ValueError, r"rho must be in \(0, 1\], got 0.0"),
        ({"task": 3}, TypeError, "task must be the task loss's name, got 3"),
        ({"beta": 1.0}, TypeError, r"does not accept option\(s\) \['beta'\]; allowed: \['task', 'every', 'rho', 'lr'"),
        ({"log_losses": False}, ValueError, "log_losses=False is not allowed"),
        ({"deferred_checks": True}, ValueError, "deferred_checks=True is not allowed: its sampled steps"),
    ],
)
def test_bad_options_are_named(options, error, message):
    model, _ = setup()
    with pytest.raises(error, match=message):
        make_balancer("dto-amortized-gated", model.parameters(), **options)


def test_a_task_that_is_not_among_the_losses_is_named():
    model, losses = setup()
    gated = make_balancer("dto-amortized-gated", model.parameters(), task="labels", update="next-step")
    with pytest.raises(
        ValueError, match=r"dto-amortized-gated: task='labels' is not one of the losses \['distill', 'task'\]"
    ):
        gated.backward(losses(0))


def test_the_step_record_names_what_the_gate_has_learned():
    model, losses = setup()
    gated, _ = lockstep(model, losses, range(5), 2, 0.3)
    assert gated.diagnostics() == {
        **{f"usefulness/{n}": float(v) for n, v in zip(gated.names, gated.usefulness)},
        **{f"gate/{n}": float(v) for n, v in zip(gated.names, gated.gate())},
    }
    assert gated.diagnostics()["gate/task"] == 1.0
    assert make_balancer("dto-amortized-gated", model.parameters()).diagnostics() == {}  # before any step


def test_a_state_that_does_not_name_its_method_is_refused():
    model, losses = setup()
    gated, _ = lockstep(model, losses, range(2), 2, 0.3)
    saved = gated.state_dict()
    for other in (
        {k: v for k, v in saved.items() if k != "method"},
        {"names": ["distill", "task"], "usefulness": None},
    ):
        with pytest.raises(ValueError, match="does not say which method saved it"):
            make_balancer("dto-amortized-gated", model.parameters()).load_state_dict(other)
    with pytest.raises(ValueError, match="saved by method 'cross-batch'"):
        make_balancer("dto-amortized-gated", model.parameters()).load_state_dict({**saved, "method": "cross-batch"})


def test_micro_batches_add_up_each_counts_on_the_schedule_and_the_same_batch_update_follows_the_step():
    model, losses = setup()
    # step 0 kept, step 1 compared with it, no optimizer step between (gradient accumulation)
    accumulating, stepwise, total, summed = accumulated_and_stepwise("dto-amortized-gated", model, losses, every=2)
    torch.testing.assert_close(total, summed, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(accumulating.usefulness, stepwise.usefulness, rtol=0, atol=0)
    assert accumulating.gradient_steps == 2 and (accumulating.usefulness != 0).all()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for p, g in zip(model.parameters(), total.split([p.numel() for p in model.parameters()])):
        p.grad = g.view_as(p).clone()
    optimizer.step()
    with torch.no_grad():
        accumulating.update(losses(1))  # the last micro-batch after the step: the learner moves once
    assert accumulating.logits.abs().sum() > 0
