"""The cross-batch rule against its formula by hand (float64), its invariances, resume, faults."""

import math

import pytest
import torch
from torch import nn

from dtokd import make_balancer
from dtokd.balancing.checks import NonFiniteStepError


def setup(teacher_logits=None, seed=0):
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
        return {"distill": factor * kl + shift, "task": nn.functional.cross_entropy(logits, y)}

    return model, losses


def gradient(loss, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def written(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


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


def test_each_step_follows_the_formula_by_hand():
    beta, rho = 7.0, 0.3
    model, losses = setup()
    balancer = make_balancer("cross-batch", model.parameters(), beta=beta, rho=rho)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    usefulness, previous = torch.zeros(2, dtype=torch.float64), None
    for step in range(4):
        g = [gradient(losses(step)[n], model) for n in ("distill", "task")]
        if previous is not None:
            cosines = torch.stack([torch.dot(g[1], p) / (g[1].norm() * p.norm()) for p in previous])
            usefulness = (1 - rho) * usefulness + rho * cosines
        previous = g
        pi = torch.softmax(beta * usefulness, 0)
        expected = g[1].norm() * (pi[0] * g[0] / g[0].norm() + pi[1] * g[1] / g[1].norm())
        optimizer.zero_grad()
        info = balancer.backward(losses(step))
        torch.testing.assert_close(written(model), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(balancer.usefulness, usefulness, rtol=1e-12, atol=1e-15)
        assert info.weights == pytest.approx(dict(zip(("distill", "task"), pi.tolist())), rel=1e-12)
        assert info.loss_weights["distill"] == pytest.approx((pi[0] * g[1].norm() / g[0].norm()).item(), rel=1e-12)
        optimizer.step()
    assert usefulness.abs().min() > 0  # the learner moved: the check above is not of zeros


def test_a_constant_added_to_a_loss_or_a_factor_on_it_changes_nothing():
    model, losses = setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run(make_balancer("cross-batch", model.parameters()), model, losses, range(6))
    model.load_state_dict(state)
    shifted = run(make_balancer("cross-batch", model.parameters()), model, losses, range(6), shift=3.0, factor=0.01)
    for a, b in zip(plain, shifted):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # the rule it replaces moves with the constant: the check can tell
    model.load_state_dict(state)
    amortized = make_balancer("dto-amortized", model.parameters(), update="next-step")
    first = run(amortized, model, losses, range(2))[-1]
    model.load_state_dict(state)
    amortized = make_balancer("dto-amortized", model.parameters(), update="next-step")
    second = run(amortized, model, losses, range(2), shift=3.0)[-1]
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
    state = {k: v.clone() for k, v in model.state_dict().items()}
    straight = run(make_balancer("cross-batch", model.parameters()), model, losses, range(6))
    model.load_state_dict(state)
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
    state = {k: v.clone() for k, v in model.state_dict().items()}
    straight = run(make_balancer("cross-batch", model.parameters()), model, losses, range(4))
    model.load_state_dict(state)
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
