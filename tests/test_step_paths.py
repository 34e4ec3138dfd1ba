"""The two ways a balancer step runs: weights on the device with the host read after the update
(DTO with <= 2 objectives, mean and fixed, outside the exact engine, on_nonfinite="raise") and
weights on the host before it (everything else, and on_nonfinite="skip"). Same update, same
StepInfo; the checks differ only in when they happen."""

import math

import pytest
import torch
from torch import nn

from dtokd import make_balancer, weights
from dtokd.balancing import BALANCERS
from dtokd.balancing.balancers import options_for_one_objective, options_without_losses_after
from dtokd.balancing.rules import RULE_RECORDS, RULES


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
    kd = (
        nn.functional.kl_div(
            nn.functional.log_softmax(logits / 2, 1), nn.functional.softmax(t / 2, 1), reduction="batchmean"
        )
        * 4
    )
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


# -- deferred checks: no host read in the step, the checks at the next backward ---------------

DEFERRED_CASES = CASES + [
    ("dto-amortized", {"update": "next-step"}),
    ("fixed", {"engine": "exact", "weights": [0.9, 0.1]}),
]


@pytest.mark.parametrize("method, options", DEFERRED_CASES)
def test_deferred_step_equals_checked_step(method, options):
    deferred_info, deferred_grads = step("raise", method, deferred_checks=True, **options)
    checked_info, checked_grads = step("raise", method, **options)
    for a, b in zip(deferred_grads, checked_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in ("loss_values", "weight_values", "coefficient_values", "gram", "raw_gram"):
        a, b = getattr(deferred_info, name), getattr(checked_info, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def training(deferred_checks, corrupt_step=None, corruption=math.nan, steps=4, method="dto", **options):
    """A few SGD steps of the representation engine; ``corrupt_step`` multiplies the task loss
    of that step by ``corruption``. Returns the balancer, the parameters and the step infos."""
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    balancer = make_balancer(
        method, net.parameters(), engine="representation", deferred_checks=deferred_checks, **options
    )
    infos = []
    for k in range(steps):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
        logits = net(x)
        losses = {"distill": logits.pow(2).mean(), "task": nn.functional.cross_entropy(logits, y)}
        if k == corrupt_step:
            losses["task"] = losses["task"] * corruption
        optimizer.zero_grad()
        infos.append(balancer.backward(losses, representation=logits))
        optimizer.step()
    return balancer, list(net.parameters()), infos


def test_deferred_training_equals_checked_training():
    _, deferred, deferred_infos = training(True)
    _, checked, checked_infos = training(False)
    for a, b in zip(deferred, checked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [i.weights for i in deferred_infos] == [i.weights for i in checked_infos]


@pytest.mark.parametrize(
    "corruption, message", [(math.nan, r"non-finite loss\(es\) \['task'\]"), (-1.0, r"\['task'\] are negative")]
)
def test_deferred_check_raises_at_the_next_backward_naming_the_previous_step(corruption, message):
    with pytest.raises(ValueError, match=r"^the previous step \(deferred_checks=True.*" + message):
        training(True, corrupt_step=1, corruption=corruption)
    with pytest.raises(ValueError, match=message):  # checked at once: the same error, in the step itself
        training(False, corrupt_step=1, corruption=corruption)


def test_deferred_check_of_the_last_step_by_check_deferred():
    balancer, params, infos = training(True, corrupt_step=3, steps=4)  # the last step is bad: nothing raised yet
    assert all(torch.isnan(p).any() for p in params)  # the price of deferring: the bad update was applied
    assert math.isnan(infos[-1].losses["task"])
    with pytest.raises(ValueError, match=r"the previous step .*non-finite loss\(es\) \['task'\]"):
        balancer.check_deferred()
    balancer.check_deferred()  # reported once; nothing left to check


def test_deferred_check_of_nonfinite_gradients_with_finite_losses():
    net = model()
    x = torch.randn(16, 5, dtype=torch.float64)
    logits = net(x)
    losses = {"distill": logits.pow(2).mean(), "task": (logits * 0).abs().sqrt().sum() + 1.0}  # grad 0 * inf = NaN
    balancer = make_balancer("dto", net.parameters(), engine="representation", deferred_checks=True)
    balancer.backward(losses, representation=logits)
    with pytest.raises(ValueError, match=r"the previous step .*non-finite gradients for loss\(es\)"):
        balancer.check_deferred()


def test_deferred_step_under_grad_scaler_overflow_is_reported_as_skipped():
    info, grads = step("raise", "dto", scale=2.0**100, corrupt=("distill", 1e300), deferred_checks=True)
    assert info.skipped and "GradScaler" in info.skipped_reason
    assert all(torch.isnan(g).all() for g in grads)


def test_deferred_checks_refuse_steps_that_need_a_host_read():
    with pytest.raises(ValueError, match="deferred_checks=True cannot be combined with on_nonfinite='skip'"):
        make_balancer("dto", model().parameters(), deferred_checks=True, on_nonfinite="skip")
    with pytest.raises(TypeError, match="deferred_checks must be True, False or 'auto', got 'yes'"):
        make_balancer("dto", model().parameters(), deferred_checks="yes")
    for method, engine in (("dto", "exact"), ("mgda", "representation"), ("dto-simplex", "representation")):
        options = {"constraint": "simplex"} if method == "dto-simplex" else {}
        with pytest.raises(ValueError, match=r"deferred_checks=True, but this step .*needs a host read"):
            step("raise", method.split("-")[0], engine=engine, deferred_checks=True, **options)
    with pytest.raises(ValueError, match=r"\(engine 'representation', 3 losses\) needs a host read"):
        net = model()
        logits = net(torch.randn(4, 5, dtype=torch.float64))
        losses = {k: logits[:, i].pow(2).mean() for i, k in enumerate("abc")}
        make_balancer("dto", net.parameters(), engine="representation", deferred_checks=True).backward(
            losses, representation=logits
        )


def test_deferred_checks_allow_a_diagnose_step_on_the_host_and_check_it_at_once():
    net = model()
    logits = net(torch.randn(4, 5, dtype=torch.float64))
    balancer = make_balancer("fixed", net.parameters(), weights=[0.5, 0.5], deferred_checks=True)
    info = balancer.backward({"a": logits.pow(2).mean(), "b": logits.abs().mean()}, diagnose=True)
    assert info.raw_gram is not None
    logits = net(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^non-finite loss\(es\) \['b'\]"):
        balancer.backward({"a": logits.pow(2).mean(), "b": logits.abs().mean() * math.nan}, diagnose=True)


def amortized_same_batch(deferred_checks, bad_after_step=None, steps=3):
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    balancer = make_balancer("dto-amortized", net.parameters(), deferred_checks=deferred_checks)
    for k in range(steps):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)

        def losses():
            logits = net(x)
            return {"distill": logits.pow(2).mean(), "task": nn.functional.cross_entropy(logits, y)}

        optimizer.zero_grad()
        balancer.backward(losses())
        optimizer.step()
        with torch.no_grad():
            after = losses()
        if k == bad_after_step:
            after["task"] = after["task"] * math.nan
        balancer.update(after)
    return balancer, [p.detach().clone() for p in net.parameters()]


def test_deferred_checks_with_same_batch_amortized_updates():
    (_, deferred), (_, checked) = amortized_same_batch(True), amortized_same_batch(False)
    for a, b in zip(deferred, checked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^update\(\): non-finite losses after the step"):
        amortized_same_batch(False, bad_after_step=0)
    with pytest.raises(ValueError, match=r"^the previous step \(deferred_checks=True.*update\(\): non-finite losses"):
        amortized_same_batch(True, bad_after_step=0)  # raised by the next backward
    balancer, _ = amortized_same_batch(True, bad_after_step=2, steps=3)  # the last update: nothing raised yet
    with pytest.raises(ValueError, match=r"update\(\): non-finite losses"):
        balancer.check_deferred()


# -- one decision, one check: the rule records say which path a step takes ------------------

RECORD_CASES = [
    (name, {"weights": [0.9, 0.1]} if name == "fixed" else {"anchor": "task"} if name == "anchored" else {})
    for name in RULES
]


@pytest.mark.parametrize("method, options", RECORD_CASES)
def test_rule_records_decide_the_balancer(method, options):
    """What a balancer does with a rule is what the rule's record says: whether it needs the Gram,
    whether it balances log losses by default, and which steps run on the device."""
    record = RULE_RECORDS[method]
    for engine, m in (("representation", 2), ("representation", 3), ("exact", 2)):
        balancer = make_balancer(method, model().parameters(), engine=engine, **options)
        assert balancer.needs_gram == record.needs_gram
        assert balancer.log_losses == record.log_losses
        device_form = record.runs_on_device(m, options)
        assert balancer.can_defer_checks(m) == (device_form and not (engine == "exact" and record.needs_gram))


@pytest.mark.parametrize(
    "method, options, sizes",
    [
        ("dto", {}, (1, 2)),
        ("anchored", {"anchor": 1}, (1, 2, 4)),
        ("mean", {}, (1, 3)),
        ("fixed", {"weights": None}, (1, 3)),
    ],
)
def test_device_forms_equal_the_validated_host_rule(method, options, sizes):
    """A rule's device form (called without the host's Gram validation) gives the host rule's weights."""
    g = torch.Generator().manual_seed(3)
    for m in sizes:
        a = torch.randn(m, 6, generator=g, dtype=torch.float64)
        gram = a @ a.T
        given = {**options, "weights": [0.5 + k for k in range(m)]} if method == "fixed" else options
        if method == "anchored":
            given = {"anchor": min(1, m - 1)}
        assert RULE_RECORDS[method].runs_on_device(m, given)
        torch.testing.assert_close(
            RULE_RECORDS[method].function(gram, **given), weights(method, gram, **given), rtol=0, atol=0
        )


def test_dto_has_no_device_form_beyond_two_objectives_or_on_the_simplex():
    assert not RULE_RECORDS["dto"].runs_on_device(3, {})
    assert not RULE_RECORDS["dto"].runs_on_device(2, {"constraint": "simplex"})
    assert all(not RULE_RECORDS[n].runs_on_device(2, {}) for n in ("mgda", "upgrad", "cagrad", "nash-mtl", "pcgrad"))


@pytest.mark.parametrize(
    "engine, m, expected", [("representation", 2, True), ("representation", 3, False), ("exact", 2, False)]
)
def test_deferred_checks_auto_defers_wherever_every_step_allows_it(engine, m, expected):
    net = model()
    logits = net(torch.randn(4, 5, dtype=torch.float64))
    losses = {k: logits[:, i].pow(2).mean() + 0.1 for i, k in enumerate("abc"[:m])}
    balancer = make_balancer("dto", net.parameters(), engine=engine, deferred_checks="auto")
    assert balancer.deferred_checks == "auto"
    balancer.backward(losses, representation=logits if engine == "representation" else None)
    assert balancer.deferred_checks is expected
    assert (
        make_balancer("dto", net.parameters(), engine=engine, deferred_checks="auto").decide_deferred_checks(m)
        is expected
    )


@pytest.mark.parametrize(
    "on_nonfinite, engine, deferred",
    [
        ("raise", "representation", False),
        ("raise", "exact", False),
        ("skip", "representation", False),
        ("raise", "representation", True),
    ],
)
def test_a_negative_loss_under_the_log_is_refused_on_every_path(on_nonfinite, engine, deferred):
    """On the host (exact engine, on_nonfinite='skip': not skippable), on the device and deferred."""
    net = model()
    logits = net(torch.randn(4, 5, dtype=torch.float64))
    losses = {"distill": logits.pow(2).mean() - 10.0, "task": logits.abs().mean()}
    balancer = make_balancer(
        "dto", net.parameters(), engine=engine, on_nonfinite=on_nonfinite, deferred_checks=deferred
    )
    with pytest.raises(ValueError, match=r"\['distill'\] are negative"):
        balancer.backward(losses, representation=logits if engine == "representation" else None)
        balancer.check_deferred()
    on_host = on_nonfinite == "skip" or engine == "exact"
    assert all(p.grad is None for p in net.parameters()) == on_host  # the host path writes nothing


@pytest.mark.parametrize("method", BALANCERS)
def test_every_method_takes_one_objective_with_what_one_objective_settles(method):
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    options = options_for_one_objective(method, {})
    make_balancer(method, [w], **options).backward({"task": (w**2).sum()})
    assert w.grad is not None and torch.isfinite(w.grad).all()
    if method == "fixed":  # weights=[1.0]: the plain backward pass
        assert options == {"weights": [1.0]}
        torch.testing.assert_close(w.grad, 2 * w.detach(), rtol=0, atol=0)


def test_one_objective_keeps_what_the_user_gave_and_fixed_needs_weights_without_it():
    assert options_for_one_objective("fixed", {"weights": [2.0]}) == {"weights": [2.0]}
    assert options_for_one_objective("anchored", {}) == {"anchor": 0}
    assert options_for_one_objective("dto", {"constraint": "simplex"}) == {"constraint": "simplex"}
    with pytest.raises(TypeError, match="needs weights="):
        make_balancer("fixed", [nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="unknown balancing method 'nope'"):
        options_for_one_objective("nope", {})


def test_a_driver_without_losses_after_gets_the_next_step_update_and_refuses_the_same_batch_one():
    amortized = ("dto-amortized", "dto-amortized-gated")  # the rules that learn from the losses after a step
    for method in amortized:
        assert options_without_losses_after(method, {}, "a loop") == {"update": "next-step"}
        assert options_without_losses_after(method, {"lr": 0.1}, "a loop") == {"lr": 0.1, "update": "next-step"}
    for method in BALANCERS:
        if method not in amortized:
            assert options_without_losses_after(method, {"x": 1}, "a loop") == {"x": 1}
    with pytest.raises(ValueError, match="dto-amortized in a loop needs update='next-step', not 'same-batch'"):
        options_without_losses_after("dto-amortized", {"update": "same-batch"}, "a loop")
