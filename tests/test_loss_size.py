"""The loss-size baseline against its formula, by hand in float64."""

import pytest
import torch
from torch import nn

from dtokd import make_balancer


def setup(m_distill=1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    teachers = [torch.randn(16, 3, generator=g, dtype=torch.float64) for _ in range(m_distill)]

    def losses():
        logits = model(x)
        named = {
            f"distill{k}": nn.functional.kl_div(
                nn.functional.log_softmax(logits, 1),
                nn.functional.log_softmax(t, 1),
                reduction="batchmean",
                log_target=True,
            )
            for k, t in enumerate(teachers)
        }
        return {**named, "ce": nn.functional.cross_entropy(logits, y)}

    return model, losses


def flat_grad(loss, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("m_distill, scale", [(1, 1.0), (2, 0.3)])
def test_each_distillation_loss_is_rescaled_to_the_task_loss(m_distill, scale):
    model, losses = setup(m_distill)
    reference = losses()
    task = reference["ce"].item()
    expected = flat_grad(reference["ce"], model)
    for name, value in reference.items():
        if name != "ce":
            expected = expected + scale * task / value.item() * flat_grad(losses()[name], model)
    balancer = make_balancer("loss-size", model.parameters(), task="ce", scale=scale)
    info = balancer.backward(losses())
    written = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(written, expected, rtol=1e-12, atol=1e-14)
    assert info.loss_weights["ce"] == pytest.approx(1.0)
    assert info.loss_weights["distill0"] == pytest.approx(scale * task / reference["distill0"].item())


def test_combine_gives_the_same_update_and_bad_options_are_named():
    model, losses = setup()
    make_balancer("loss-size", model.parameters(), task="ce").backward(losses())
    written = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    make_balancer("loss-size", model.parameters(), task="ce").combine(losses()).backward()
    for a, b in zip(model.parameters(), written):
        torch.testing.assert_close(a.grad, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="task='task' is not one of the losses"):
        make_balancer("loss-size", model.parameters()).backward(losses())
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            make_balancer("loss-size", model.parameters(), scale=bad)
    with pytest.raises(ValueError, match="takes no rescale"):
        make_balancer("loss-size", model.parameters(), rescale="norm")
