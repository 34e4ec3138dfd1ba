"""The balancers on a CUDA device: the same update as on the CPU, the documented host
synchronisation, mixed precision. Skipped where no CUDA device is present (CI has none; run
them on a GPU machine: ``pytest tests/test_cuda.py``)."""

import pytest
import torch
from torch import nn

from dtokd import make_balancer
from dtokd.profiling import host_syncs, waits_for_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device is present")
def test_host_syncs_needs_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        host_syncs(lambda: None)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        waits_for_device(lambda: None)


def net(device, dtype=torch.float64):
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ]
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def data(device, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=g)
    t = torch.randn(16, 5, generator=g, dtype=torch.float64)
    return x.to(device, dtype), y.to(device), t.to(device, dtype)


def losses_of(logits, y, t):
    kd = (
        nn.functional.kl_div(
            nn.functional.log_softmax(logits / 4, 1), nn.functional.softmax(t / 4, 1), reduction="batchmean"
        )
        * 16
    )
    return {"distill": kd, "task": nn.functional.cross_entropy(logits, y)}


def balanced_step(device, method, **options):
    model = net(device)
    x, y, t = data(device)
    logits = model(x)
    if options.get("engine") == "subset":
        options["gram_params"] = list(model[-1].parameters())
    representation = logits if options.get("engine") == "representation" else None
    info = make_balancer(method, model.parameters(), **options).backward(
        losses_of(logits, y, t), representation=representation
    )
    return info, [p.grad.detach().cpu() for p in model.parameters()]


@needs_cuda
@pytest.mark.parametrize(
    "method, options",
    [
        ("dto", {}),
        ("dto", {"engine": "representation"}),
        ("dto", {"engine": "subset"}),
        ("dto", {"batched": True}),
        ("mgda", {}),
        ("dto-amortized", {"update": "next-step"}),
        ("dto-amortized-gated", {"update": "next-step"}),
        ("fixed", {"weights": [0.9, 0.1]}),
    ],
)
def test_cuda_update_equals_cpu_update(method, options):
    (cpu_info, cpu_grads), (cuda_info, cuda_grads) = (balanced_step(d, method, **options) for d in ("cpu", "cuda"))
    torch.testing.assert_close(cuda_info.weight_values, cpu_info.weight_values, rtol=1e-9, atol=1e-12)
    for a, b in zip(cuda_grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize(
    "method, options, waits, syncs",
    [
        ("dto", {}, True, 1),  # the exact engine reads the Gram with .cpu() before its update
        ("dto", {"engine": "representation"}, True, 0),  # device path: waits on the copy's event
        ("dto-amortized", {"update": "next-step"}, True, 0),
        ("dto-amortized-gated", {"update": "next-step", "every": 10}, True, 0),  # between its sampled steps
        ("fixed", {"weights": [0.9, 0.1]}, True, 0),
        ("dto", {"engine": "representation", "deferred_checks": True}, False, 0),
        ("dto-amortized", {"update": "next-step", "deferred_checks": True}, False, 0),
        ("fixed", {"weights": [0.9, 0.1], "deferred_checks": True}, False, 0),
    ],
)
def test_where_a_step_waits_for_the_device(method, options, waits, syncs):
    """A step reads the host once, after its update is queued (it returns once the device is
    done); with deferred_checks it does not wait at all. ``syncs``: the blocking calls CUDA's
    sync debug mode reports (event waits are not among them)."""
    model = net("cuda", torch.float32)
    x, y, t = data("cuda", torch.float32)
    balancer = make_balancer(method, model.parameters(), **options)
    infos = []

    def step():
        logits = model(x)
        representation = logits if options.get("engine") == "representation" else None
        infos.append(balancer.backward(losses_of(logits, y, t), representation=representation))

    for _ in range(2 if method == "dto-amortized-gated" else 1):  # one-off set-up, and the gated rule's sampled steps
        step()
    assert waits_for_device(step) is waits
    assert host_syncs(step) == syncs
    assert all(torch.isfinite(torch.tensor(list(info.losses.values()))).all() for info in infos)  # read after the fact


@needs_cuda
@pytest.mark.parametrize("engine", ["exact", "representation"])
def test_bf16_autocast_and_fp16_grad_scaler_on_cuda(engine):
    model = net("cuda", torch.float32)
    x, y, t = data("cuda", torch.float32)
    reference = net("cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        losses = losses_of(logits.float(), y, t)
    info = make_balancer("dto", model.parameters(), engine=engine).backward(
        losses, representation=logits if engine == "representation" else None
    )
    assert not info.skipped and all(torch.isfinite(p.grad).all() for p in model.parameters())

    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    with torch.autocast("cuda", dtype=torch.float16):
        logits = reference(x)
        losses = losses_of(logits.float(), y, t)
    info = make_balancer("dto", reference.parameters(), engine=engine).backward(
        losses, representation=logits if engine == "representation" else None, scaler=scaler
    )
    assert not info.skipped
    grads = [p.grad.clone() for p in reference.parameters()]
    scaler.unscale_(torch.optim.SGD(reference.parameters(), lr=0.1))
    for scaled, unscaled in zip(grads, reference.parameters()):
        torch.testing.assert_close(unscaled.grad, scaled / 2.0**10)
