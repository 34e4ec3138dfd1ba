"""Every balancer under bf16 autocast and under fp16 with a GradScaler; torch.compile'd students."""

import pytest
import torch
from torch import nn

from dtokd import make_balancer
from dtokd.balancing import BALANCERS


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g), torch.randn(32, 4, generator=g)


def losses_of(logits, y, t):
    kd = nn.functional.kl_div(
        nn.functional.log_softmax(logits.float(), 1), nn.functional.softmax(t, 1), reduction="batchmean"
    )
    return {"distill": kd, "task": nn.functional.cross_entropy(logits.float(), y)}


def options(method):
    extra = {"weights": [0.9, 0.1]} if method == "fixed" else {}
    if method == "pcgrad":
        extra["generator"] = torch.Generator().manual_seed(0)
    if method == "dto-amortized":
        extra["update"] = "next-step"
    if method == "anchored":
        extra["anchor"] = "task"
    return extra


def grads(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("method", BALANCERS)
def test_bf16_autocast(method):
    net = model()
    x, y, t = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    assert logits.dtype == torch.bfloat16
    info = make_balancer(method, net.parameters(), **options(method)).backward(losses_of(logits, y, t))
    assert not info.skipped and torch.isfinite(grads(net)).all()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("method", BALANCERS)
def test_fp16_with_grad_scaler_equals_the_unscaled_update(method):
    x, y, t = data()
    results = []
    for scaled in (False, True):
        net = model()
        with torch.autocast("cpu", dtype=torch.float16):
            logits = net(x)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        info = make_balancer(method, net.parameters(), **options(method)).backward(
            losses_of(logits, y, t), scaler=scaler
        )
        assert not info.skipped  # readable on every path, with or without a Gram
        if scaled:
            scaler.unscale_(torch.optim.SGD(net.parameters(), lr=0.1))
        results.append(grads(net))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "engine, batched", [("exact", False), ("exact", True), ("subset", False), ("representation", False)]
)
def test_compiled_student_gives_the_eager_update(engine, batched):
    x, y, t = data()
    results = []
    for compiled in (False, True):
        net = model()
        forward = torch.compile(net, backend="aot_eager") if compiled else net
        extra = {"gram_params": list(net[2].parameters())} if engine == "subset" else {}
        balancer = make_balancer("dto", net.parameters(), engine=engine, batched=batched, **extra)
        logits = forward(x)
        balancer.backward(losses_of(logits, y, t), representation=logits if engine == "representation" else None)
        results.append(grads(net))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)
