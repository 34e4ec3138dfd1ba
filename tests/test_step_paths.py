"""The two ways a balancer step runs: weights on the device with the host read after the update
(DTO with <= 2 objectives, mean and fixed, outside the exact engine, on_nonfinite="raise") and
weights on the host before it (everything else, and on_nonfinite="skip"). Same update, same
StepInfo; the checks differ only in when they happen."""

import math

import pytest
import torch
from torch import nn

from dtokd import make_balancer


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def step(on_nonfinite, method, *, engine="representation", scale=None, corrupt=None, **options):
    net = model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    t = torch.randn(16, 3, generator=g, dtype=torch.float64)
    logits = net(x)
    kd = nn.functional.kl_div(nn.functional.log_softmax(logits / 2, 1), nn.functional.softmax(t / 2, 1),
                              reduction="batchmean") * 4
    losses = {"distill": kd, "task": nn.functional.cross_entropy(logits, y)}
    if corrupt:
        losses[corrupt[0]] = losses[corrupt[0]] * corrupt[1]
    if engine == "subset":
        options["gram_params"] = list(net[2].parameters())
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    balancer = make_balancer(method, net.parameters(), engine=engine, on_nonfinite=on_nonfinite, **options)
    info = balancer.backward(losses, representation=logits if engine == "representation" else None, scaler=scaler)
    return info, [None if p.grad is None else p.grad.clone() for p in net.parameters()]


CASES = [
    ("dto", {"engine": "representation"}),
    ("dto", {"engine": "subset"}),
    ("dto", {"engine": "representation", "log_losses": False, "rescale": "unit-sum"}),
    ("dto", {"engine": "representation", "scale": 2.0**10}),
    ("mean", {}),
    ("fixed", {"weights": {"task": 0.1, "distill": 0.9}}),
]


@pytest.mark.parametrize("method, options", CASES)
def test_device_step_equals_host_step(method, options):
    device_info, device_grads = step("raise", method, **options)
    host_info, host_grads = step("skip", method, **options)
    for a, b in zip(device_grads, host_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for name in ("loss_values", "weight_values", "coefficient_values", "gram", "raw_gram"):
        a, b = getattr(device_info, name), getattr(host_info, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.device.type == "cpu"
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["dto", "fixed"])
def test_device_step_raises_for_a_nonfinite_loss_after_writing(method):
    options = {"weights": [0.9, 0.1]} if method == "fixed" else {}
    with pytest.raises(ValueError, match=r"non-finite loss\(es\) \['task'\].*\.grad holds"):
        step("raise", method, corrupt=("task", math.nan), **options)


def test_device_step_raises_for_a_negative_loss_under_log():
    with pytest.raises(ValueError, match=r"\['distill'\] are negative"):
        step("raise", "dto", corrupt=("distill", -1.0))


def test_device_step_under_grad_scaler_overflow_is_skipped_with_nan_grads():
    info, grads = step("raise", "dto", scale=2.0**100, corrupt=("distill", 1e300))  # scaled gradients overflow float64
    assert info.skipped and "GradScaler" in info.skipped_reason
    assert all(torch.isnan(g).all() for g in grads)


@pytest.mark.parametrize("mode", ["next-step", "same-batch"])
def test_amortized_learner_is_the_same_on_both_paths(mode):
    """dto-amortized learns on the losses' device inside the deferred step; over several steps
    its weights and updates equal the host path's (on_nonfinite='skip')."""

    def run(on_nonfinite):
        net = model()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        balancer = make_balancer("dto-amortized", net.parameters(), update=mode, on_nonfinite=on_nonfinite)
        weights = []
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(16, 5, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (16,), generator=g)

            def losses():
                logits = net(x)
                return {"distill": logits.pow(2).mean(), "task": nn.functional.cross_entropy(logits, y)}

            optimizer.zero_grad()
            weights.append(balancer.backward(losses()).weight_values)
            optimizer.step()
            if mode == "same-batch":
                with torch.no_grad():
                    balancer.update(losses())
        return torch.stack(weights), [p.detach().clone() for p in net.parameters()]

    (device_weights, device_params), (host_weights, host_params) = run("raise"), run("skip")
    assert not torch.allclose(device_weights[-1], device_weights[0])  # it learned
    torch.testing.assert_close(device_weights, host_weights, rtol=0, atol=0)
    for a, b in zip(device_params, host_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
