"""The cross-batch rule against its formula by hand (float64), its invariances, resume, faults."""

import math

import pytest
import torch
from torch import nn

from dtokd import make_balancer
from dtokd.balancing.checks import NonFiniteStepError


def setup(teacher_logits=None, seed=0, three=False):
    """A float64 MLP, batches drawn by step, a distillation loss to ``teacher_logits(x)`` and the CE."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    teacher = teacher_logits or (lambda x, y: torch.stack([x[:, 0], x[:, 1] - x[:, 2], x[:, 3]], 1))

    def batch(step):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def losses(step, *, shift=0.0, factor=1.0):
        x, y = batch(step)
        logits = model(x)
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(logits, 1),
            nn.functional.log_softmax(teacher(x, y), 1),
            reduction="batchmean",
            log_target=True,
        )
        named = {"distill": factor * kl + shift, "task": nn.functional.cross_entropy(logits, y)}
        if three:  # a third objective, the task first
            feature = (model[0](x) - x.sum(1, keepdim=True)).pow(2).mean()
            return {"task": named["task"], "feature": feature, "distill": named["distill"]}
        return named

    return model, losses


def gradient(loss, model):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def written(model):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])


def run(balancer, model, losses, steps, **loss_options):
    """SGD steps through the balancer; the update written at each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    updates = []
    for step in steps:
        optimizer.zero_grad()
        balancer.backward(losses(step, **loss_options))
        updates.append(written(model).clone())
        optimizer.step()
    return updates


def straight_run(model, losses, steps, method="cross-batch", options=None, **loss_options):
    """The updates of a fresh balancer's run from the model's weights, which are put back after."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    balancer = make_balancer(method, model.parameters(), **(options or {}))
    updates = run(balancer, model, losses, steps, **loss_options)
    model.load_state_dict(state)
    return updates


@pytest.mark.parametrize("three", [False, True], ids=["task last of two", "task first of three"])
def test_each_step_follows_the_formula_by_hand(three):
    beta, rho = 7.0, 0.3
    model, losses = setup(three=three)
    names = list(losses(0))
    t = names.index("task")
    balancer = make_balancer("cross-batch", model.parameters(), beta=beta, rho=rho)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    usefulness, previous = torch.zeros(len(names), dtype=torch.float64), None
    for step in range(4):
        g = [gradient(losses(step)[n], model) for n in names]
        if previous is not None:
            cosines = torch.stack([torch.dot(g[t], p) / (g[t].norm() * p.norm()) for p in previous])
            usefulness = (1 - rho) * usefulness + rho * cosines
        previous = g
        pi = torch.softmax(beta * usefulness, 0)
        expected = g[t].norm() * sum(pi[i] * g[i] / g[i].norm() for i in range(len(names)))
        optimizer.zero_grad()
        info = balancer.backward(losses(step))
        torch.testing.assert_close(written(model), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(balancer.usefulness, usefulness, rtol=1e-12, atol=1e-15)
        assert info.weights == pytest.approx(dict(zip(names, pi.tolist())), rel=1e-12)
        coefficients = {n: (pi[i] * g[t].norm() / g[i].norm()).item() for i, n in enumerate(names)}
        assert info.loss_weights == pytest.approx(coefficients, rel=1e-12)
        optimizer.step()
    assert len(set(usefulness.tolist())) == len(names)  # the learner moved and told the objectives apart


def test_a_constant_added_to_a_loss_or_a_factor_on_it_changes_nothing():
    model, losses = setup()
    plain = straight_run(model, losses, range(6))
    shifted = straight_run(model, losses, range(6), shift=3.0, factor=0.01)
    for a, b in zip(plain, shifted):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # the rule it replaces moves with the constant: the check can tell
    amortized = {"method": "dto-amortized", "options": {"update": "next-step"}}
    first = straight_run(model, losses, range(2), **amortized)[-1]
    second = straight_run(model, losses, range(2), shift=3.0, **amortized)[-1]
    assert not torch.allclose(first, second, rtol=1e-3)


def test_a_teacher_that_contradicts_the_labels_loses_its_weight_and_one_that_agrees_keeps_it():
    def wrong(x, y):
        return 6.0 * nn.functional.one_hot((y + 1) % 3, 3).double()

    def right(x, y):
        return 6.0 * nn.functional.one_hot(y, 3).double()

    final = {}
    for name, teacher in (("wrong", wrong), ("right", right)):
        model, losses = setup(teacher)
        balancer = make_balancer("cross-batch", model.parameters(), rho=0.2)
        run(balancer, model, losses, range(30))
        final[name] = torch.softmax(balancer.beta * balancer.usefulness, 0)[0].item()
    assert final["wrong"] < 0.2 and final["right"] > 0.45


def test_a_resumed_balancer_continues_as_the_straight_run():
    model, losses = setup()
    straight = straight_run(model, losses, range(6))
    first = make_balancer("cross-batch", model.parameters())
    run(first, model, losses, range(3))
    saved = first.state_dict()
    assert set(saved) >= {"method", "names", "usefulness", "previous"}
    second = make_balancer("cross-batch", model.parameters())
    second.load_state_dict(saved)
    resumed = run(second, model, losses, range(3, 6))
    for a, b in zip(straight[3:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cross-batch"):
        make_balancer("dto-amortized", model.parameters()).load_state_dict(saved)


def test_a_refused_non_finite_step_changes_nothing():
    model, losses = setup()
    straight = straight_run(model, losses, range(4))
    balancer = make_balancer("cross-batch", model.parameters())
    run(balancer, model, losses, range(2))
    learned = balancer.usefulness.clone()
    bad = losses(2)
    with pytest.raises(NonFiniteStepError):
        balancer.backward({"distill": bad["distill"] * math.nan, "task": bad["task"]})
    assert torch.equal(balancer.usefulness, learned)
    model.zero_grad()
    for a, b in zip(straight[2:], run(balancer, model, losses, range(2, 4))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_objective_is_the_plain_backward_and_a_zero_gradient_gets_no_weight():
    model, losses = setup()
    task = losses(0)["task"]
    make_balancer("cross-batch", model.parameters()).backward({"task": task})
    torch.testing.assert_close(written(model), gradient(losses(0)["task"], model), rtol=1e-12, atol=1e-14)
    model.zero_grad()
    flat_loss = sum(p.sum() for p in model.parameters()) * 0.0
    with pytest.warns(RuntimeWarning, match="gradient of loss 'zero' was zero"):
        info = make_balancer("cross-batch", model.parameters()).backward({"zero": flat_loss, "task": losses(0)["task"]})
    assert info.loss_weights["zero"] == 0.0
    assert torch.isfinite(written(model)).all()


def test_bad_settings_are_named():
    model, losses = setup()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="engine='exact', not 'representation'"):
        make_balancer("cross-batch", params, engine="representation")
    with pytest.raises(ValueError, match="log_losses=True is not allowed"):
        make_balancer("cross-batch", params, log_losses=True)
    with pytest.raises(ValueError, match="rescale='unit-sum' is not allowed"):
        make_balancer("cross-batch", params, rescale="unit-sum")
    for bad in (-1.0, math.inf, True):
        with pytest.raises(ValueError, match="beta must be"):
            make_balancer("cross-batch", params, beta=bad)
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="rho must be"):
            make_balancer("cross-batch", params, rho=bad)
    with pytest.raises(ValueError, match="task='ce' is not one of the losses"):
        make_balancer("cross-batch", params, task="ce").backward(losses(0))
    with pytest.raises(ValueError, match="sync='global'"):
        make_balancer("cross-batch", params, sync="local")


def test_rescale_norm_takes_the_reference_length_and_keeps_the_direction():
    model, losses = setup()
    reference = {"distill": 0.9, "task": 0.1}
    plain = make_balancer("cross-batch", model.parameters())
    rescaled = make_balancer("cross-batch", model.parameters(), rescale="norm", reference=reference)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):  # the two balancers see the same gradients: they learn the same
        g = {n: gradient(losses(step)[n], model) for n in reference}
        wanted = sum(reference[n] * g[n] for n in reference).norm()
        optimizer.zero_grad()
        plain.backward(losses(step))
        direction = written(model).clone()
        optimizer.zero_grad()
        rescaled.backward(losses(step))
        update = written(model)
        torch.testing.assert_close(update.norm(), wanted, rtol=1e-12, atol=0)
        torch.testing.assert_close(update / update.norm(), direction / direction.norm(), rtol=1e-10, atol=1e-13)
        optimizer.step()


def accumulated_and_stepwise(method, model, losses, **options):
    """Two micro-batches (steps 0 and 1) through one balancer with no optimizer step between
    (gradient accumulation), and through another whose ``.grad`` is cleared between them: both
    balancers, what the first wrote in all and the sum of what the second wrote at each."""
    accumulating = make_balancer(method, model.parameters(), **options)
    accumulating.backward(losses(0))
    accumulating.backward(losses(1))
    total = written(model).clone()
    model.zero_grad()
    stepwise = make_balancer(method, model.parameters(), **options)
    stepwise.backward(losses(0))
    first = written(model).clone()
    model.zero_grad()
    stepwise.backward(losses(1))
    return accumulating, stepwise, total, first + written(model)


def test_micro_batches_add_up_and_each_is_a_batch_of_its_own():
    model, losses = setup()
    accumulating, stepwise, total, summed = accumulated_and_stepwise("cross-batch", model, losses)
    torch.testing.assert_close(total, summed, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(accumulating.usefulness, stepwise.usefulness, rtol=0, atol=0)


def test_combine_gives_the_backward_update_and_a_skipped_step_changes_nothing():
    model, losses = setup()
    make_balancer("cross-batch", model.parameters()).backward(losses(0))
    by_backward = written(model).clone()
    model.zero_grad()
    make_balancer("cross-batch", model.parameters()).combine(losses(0)).backward()
    torch.testing.assert_close(written(model), by_backward, rtol=1e-12, atol=1e-14)

    straight = straight_run(model, losses, range(3))
    skipping = make_balancer("cross-batch", model.parameters(), on_nonfinite="skip")
    run(skipping, model, losses, range(2))
    learned = skipping.usefulness.clone()
    bad = losses(2)
    info = skipping.backward({"distill": bad["distill"] * math.inf, "task": bad["task"]})
    assert info.skipped and torch.equal(skipping.usefulness, learned) and skipping.engine.last is None
    model.zero_grad()
    torch.testing.assert_close(run(skipping, model, losses, [2])[0], straight[2], rtol=0, atol=0)


def test_a_frozen_layer_starts_the_comparison_again_and_states_are_checked(tmp_path):
    model, losses = setup()
    balancer = make_balancer("cross-batch", model.parameters(), rho=0.5)
    run(balancer, model, losses, range(2))
    learned = balancer.usefulness.clone()
    model[0].requires_grad_(False)  # fewer gradients than the previous step's
    run(balancer, model, losses, [2])
    assert torch.equal(balancer.usefulness, learned)  # nothing to compare with: no learning
    run(balancer, model, losses, [3])
    assert not torch.equal(balancer.usefulness, learned)  # the new layout's steps compare again

    fresh = make_balancer("cross-batch", model.parameters())
    torch.save(fresh.state_dict(), tmp_path / "before_any_step.pt")
    fresh.load_state_dict(torch.load(tmp_path / "before_any_step.pt", weights_only=True))
    torch.save(balancer.state_dict(), tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    make_balancer("cross-batch", model.parameters()).load_state_dict(saved)
    saved["names"] = ["distill", "task", "feature"]
    with pytest.raises(ValueError, match="'usefulness' holds 2 objectives, its names 3"):
        make_balancer("cross-batch", model.parameters()).load_state_dict(saved)


def test_fsdps_whole_gradient_state_resumes_on_one_process_and_is_dropped_where_it_no_longer_fits():
    """The state an FSDP2 run writes (each parameter's whole gradient, ``"full"``) resumes on one
    process as the straight run; loaded after a layer was frozen, its kept gradients no longer fit
    the trainable parameters and are dropped (the comparison starts again), as the unsharded
    chunks are at the next step."""
    model, losses = setup()
    straight = straight_run(model, losses, range(6))
    first = make_balancer("cross-batch", model.parameters())
    run(first, model, losses, range(3))
    saved = first.state_dict()
    chunks = saved["previous"].pop("chunks")
    assert len(chunks[0]) == 1  # the small model's gradient is one flat chunk
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    saved["previous"]["full"] = [[t.view(p.shape) for t, p in zip(row[0].split(sizes), params)] for row in chunks]
    second = make_balancer("cross-batch", model.parameters())
    second.load_state_dict(saved)
    for a, b in zip(straight[3:], run(second, model, losses, range(3, 6))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    model[0].requires_grad_(False)
    third = make_balancer("cross-batch", model.parameters())
    third.load_state_dict(saved)
    assert third._usefulness.previous is None and torch.equal(third.usefulness, saved["usefulness"])
    saved["previous"]["full"] = None  # another rank's state: nothing gathered there
    with pytest.raises(ValueError, match="gathered to the first rank only"):
        make_balancer("cross-batch", model.parameters()).load_state_dict(saved)
