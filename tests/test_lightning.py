"""The Lightning integration with the real Lightning on the CPU: its update equals the plain
PyTorch loop's, a resumed Lightning checkpoint continues identically, gradient accumulation
means what the module says."""

import copy

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning", reason="the Lightning integration needs lightning (extra 'lightning')")

from dtokd import make_balancer  # noqa: E402
from dtokd.integrations.common import default_losses  # noqa: E402
from dtokd.integrations.lightning import DistillationModule  # noqa: E402
from dtokd.models.norms import frozen_batchnorm_statistics  # noqa: E402


def nets():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4)).double()
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    return student, teacher


def loader(batches=4, size=16):
    """Batches in a fixed order (no shuffling): both loops see the same sequence."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * size, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (batches * size,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=size, shuffle=False)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def fit(module, data, steps, accumulate=1, ckpt_path=None, root=None):
    trainer = lightning.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="64-true", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=accumulate, default_root_dir=root, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
    return trainer


def plain_loop(student, teacher, data, steps, method, engine, options, accumulate=1):
    """What a user writes by hand: balancer.backward (each micro-batch's update / accumulate), SGD."""
    balancer = make_balancer(method, student.parameters(), engine=engine, **options)
    optimizer = sgd(student.parameters())
    losses_of = default_losses()
    same_batch = method == "dto-amortized" and options.get("update", "same-batch") == "same-batch"
    done, k = 0, 0
    while done < steps:
        for x, y in data:
            with torch.no_grad():
                t = teacher(x)
            logits = student(x)
            losses = losses_of(logits, t, y)
            scaled = {n: v / accumulate for n, v in losses.items()}  # the balanced combination is linear
            balancer.backward(scaled if method in ("fixed", "mean") else losses,
                              representation=logits if engine == "representation" else None)
            if method not in ("fixed", "mean") and accumulate > 1:
                raise NotImplementedError
            k += 1
            if k % accumulate:
                continue
            optimizer.step()
            optimizer.zero_grad()
            if same_batch:
                with torch.no_grad(), frozen_batchnorm_statistics(student):
                    balancer.update(losses_of(student(x), t, y))
            done += 1
            if done == steps:
                return student


CASES = [("dto", "representation", {}), ("dto", "exact", {}), ("dto-amortized", "exact", {}),
         ("anchored", "exact", {"anchor": "task"}), ("fixed", "exact", {"weights": {"distill": 0.9, "task": 0.1}})]


@pytest.mark.parametrize("method, engine, options", CASES)
def test_the_lightning_update_equals_the_plain_pytorch_loop(method, engine, options, tmp_path):
    student, teacher = nets()
    reference = plain_loop(copy.deepcopy(student), teacher, loader(), 6, method, engine, options)
    module = DistillationModule(student, teacher, method=method, engine=engine, balancer_options=options, optimizer=sgd)
    fit(module, loader(), 6, root=tmp_path)
    for a, b in zip(module.student.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_lightning_checkpoint_resumes_identically_with_the_balancer_state(tmp_path):
    """A checkpoint that Lightning's ModelCheckpoint wrote mid-run (step 4 of 8) holds the
    balancer's state; resuming from it ends where the uninterrupted run ends."""
    student, teacher = nets()
    kwargs = {"method": "dto-amortized", "engine": "exact", "balancer_options": {"update": "same-batch"},
              "optimizer": sgd}
    straight = DistillationModule(copy.deepcopy(student), teacher, **kwargs)
    every = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    trainer = lightning.Trainer(max_steps=8, accelerator="cpu", precision="64-true", logger=False, callbacks=[every],
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(straight, train_dataloaders=loader())
    half = tmp_path / "ck" / "epoch=0-step=4.ckpt"
    saved = torch.load(half, weights_only=False)["dtokd_balancer"]
    assert saved["names"] == ("distill", "task") and saved["logits"] is not None
    resumed = DistillationModule(nets()[0], teacher, **kwargs)
    fit(resumed, loader(), 8, ckpt_path=half, root=tmp_path / "c")
    for a, b in zip(resumed.student.state_dict().values(), straight.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(resumed.balancer.logits, straight.balancer.logits, rtol=1e-12, atol=1e-14)
    assert not torch.equal(straight.balancer.logits, torch.zeros(2, dtype=torch.float64))  # it learned


def test_accumulated_batches_average_the_micro_batches_balanced_updates(tmp_path):
    """With fixed weights the balanced update is linear, so accumulation must equal the plain
    loop's sum of micro-batch updates / N; for DTO each micro-batch has its own weights."""
    student, teacher = nets()
    options = {"weights": {"distill": 0.9, "task": 0.1}}
    reference = plain_loop(copy.deepcopy(student), teacher, loader(), 2, "fixed", "exact", options, accumulate=2)
    module = DistillationModule(student, teacher, method="fixed", engine="exact", balancer_options=options,
                                optimizer=sgd)
    fit(module, loader(), 2, accumulate=2, root=tmp_path)
    for a, b in zip(module.student.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_checkpoint_without_balancer_state_is_refused(tmp_path):
    student, teacher = nets()
    module = DistillationModule(student, teacher, optimizer=sgd)
    with pytest.raises(ValueError, match="holds no dtokd balancer state"):
        module.on_load_checkpoint({"state_dict": {}})
