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
    trainer = lightning.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
    return trainer


def plain_loop(student, teacher, data, steps, method, engine, options, accumulate=1):
    """What a user writes by hand: balancer.backward (each micro-batch's update / accumulate), SGD."""
    balancer = make_balancer(method, student.parameters(), engine=engine, **options)
    optimizer = sgd(student.parameters())
    losses_of = default_losses()
    same_batch = method.startswith("dto-amortized") and options.get("update", "same-batch") == "same-batch"
    done, k = 0, 0
    while done < steps:
        for x, y in data:
            with torch.no_grad():
                t = teacher(x)
            logits = student(x)
            losses = losses_of(logits, t, y)
            before = [None if p.grad is None else p.grad.clone() for p in student.parameters()]
            student.zero_grad(set_to_none=True)
            balancer.backward(losses, representation=logits if engine == "representation" else None)
            with torch.no_grad():  # this micro-batch's balanced update / accumulate, added to the others
                for p, b in zip(student.parameters(), before):
                    p.grad.div_(accumulate)
                    if b is not None:
                        p.grad.add_(b)
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


CASES = [
    ("dto", "representation", {}),
    ("dto", "exact", {}),
    ("dto-amortized", "exact", {}),
    ("anchored", "exact", {"anchor": "task"}),
    ("cross-batch", "exact", {}),
    ("dto-amortized-gated", "exact", {"every": 3}),
    ("fixed", "exact", {"weights": {"distill": 0.9, "task": 0.1}}),
]


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
    kwargs = {
        "method": "dto-amortized",
        "engine": "exact",
        "balancer_options": {"update": "same-batch"},
        "optimizer": sgd,
    }
    straight = DistillationModule(copy.deepcopy(student), teacher, **kwargs)
    every = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    trainer = lightning.Trainer(
        max_steps=8,
        accelerator="cpu",
        precision="64-true",
        logger=False,
        callbacks=[every],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
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


@pytest.mark.parametrize(
    "method, options", [("fixed", {"weights": {"distill": 0.9, "task": 0.1}}), ("dto", {}), ("dto-amortized", {})]
)
def test_accumulated_batches_average_the_micro_batches_balanced_updates(method, options, tmp_path):
    """``accumulate_grad_batches=2``: each micro-batch is balanced on its own gradients and the
    update is the mean of the two balanced updates (for DTO not the balanced update of their
    union: the reference computes each micro-batch's update separately); the amortized rule
    learns once per optimizer step, from the last micro-batch re-evaluated."""
    student, teacher = nets()
    reference = plain_loop(
        copy.deepcopy(student), teacher, loader(), 2, method, "representation", options, accumulate=2
    )
    module = DistillationModule(
        student, teacher, method=method, engine="representation", balancer_options=options, optimizer=sgd
    )
    fit(module, loader(), 2, accumulate=2, root=tmp_path)
    for a, b in zip(module.student.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if method == "dto-amortized":
        assert module.balancer.state_dict()["adam"]["steps"] == 2


def test_a_checkpoint_without_balancer_state_is_refused(tmp_path):
    student, teacher = nets()
    module = DistillationModule(student, teacher, optimizer=sgd)
    with pytest.raises(ValueError, match="holds no dtokd balancer state"):
        module.on_load_checkpoint({"state_dict": {}})


def nets_without_batchnorm():
    """Under DDP each rank's BatchNorm sees its own half of the batch (Lightning's
    ``sync_batchnorm`` changes that); a student without it makes one process comparable."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    return student, teacher


class SaveEachRank(lightning.Callback):
    """Each rank writes its student's weights and balancer state at the end of the fit."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, module):
        torch.save(
            {"student": module.student.state_dict(), "balancer": module.balancer.state_dict()},
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )


DDP_CASES = [("dto", "representation", {}), ("dto-amortized", "exact", {"update": "same-batch"})]


@pytest.mark.slow
@pytest.mark.parametrize("method, engine, options", DDP_CASES, ids=[f"{m}-{e}" for m, e, _ in DDP_CASES])
def test_two_process_ddp_equals_one_process_on_the_whole_batch(method, engine, options, tmp_path):
    """Lightning's DDP (two CPU processes, gloo), per-rank batch 16, one epoch of 4 steps.
    Lightning shards the training set with a shuffled DistributedSampler (seed 0): rank r takes
    ``perm[r::2]`` of ``randperm(128)``, so each step's two halves are one process's batch of 32
    in the order ``perm``. The balancer all-reduces the Gram and the losses, so both ranks take
    the one-process weights and end with its parameters (and the amortized rule's state)."""
    student, teacher = nets_without_batchnorm()
    data = loader(batches=8, size=16)
    perm = torch.randperm(len(data.dataset), generator=torch.Generator().manual_seed(0)).tolist()
    one = DistillationModule(
        copy.deepcopy(student), teacher, method=method, engine=engine, balancer_options=options, optimizer=sgd
    )
    fit(one, torch.utils.data.DataLoader(data.dataset, batch_size=32, sampler=perm), 4, root=tmp_path / "one")
    two = DistillationModule(student, teacher, method=method, engine=engine, balancer_options=options, optimizer=sgd)
    trainer = lightning.Trainer(
        max_steps=4,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path / "two",
        callbacks=[SaveEachRank(tmp_path)],
    )
    trainer.fit(two, train_dataloaders=data)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for a, b in zip(saved["student"].values(), one.student.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        if method == "dto-amortized":
            torch.testing.assert_close(saved["balancer"]["logits"], one.balancer.logits, rtol=1e-9, atol=1e-12)


# -- ordinary settings: an evaluation set, a teacher that does not fit, the caller's teacher -----


def test_validation_and_test_sets_log_the_students_accuracy_and_losses(tmp_path):
    student, teacher = nets()
    module = DistillationModule(student, teacher, method="dto-amortized", optimizer=sgd)
    trainer = fit(module, loader(), 2, root=tmp_path)
    (validated,) = trainer.validate(module, loader(batches=2), verbose=False)
    (tested,) = trainer.test(module, loader(batches=2), verbose=False)
    x, y = (torch.cat(parts) for parts in zip(*loader(batches=2)))
    module.student.eval()
    with torch.no_grad():
        logits = module.student(x)
        expected = default_losses()(logits, teacher.eval()(x), y)
    for metrics, stage in ((validated, "val"), (tested, "test")):
        assert metrics[f"{stage}/accuracy"] == pytest.approx((logits.argmax(-1) == y).double().mean().item())
        for name, value in expected.items():
            assert metrics[f"{stage}/loss/{name}"] == pytest.approx(value.item(), rel=1e-9)
    assert module.balancer.state_dict()["adam"]["steps"] == 2  # evaluation moved no balancer state


def test_a_batch_without_labels_is_named(tmp_path):
    student, teacher = nets()
    inputs = torch.utils.data.DataLoader(torch.randn(32, 6, dtype=torch.float64), batch_size=16)
    with pytest.raises(ValueError, match=r"takes batches \(inputs, labels\), got a Tensor"):
        fit(DistillationModule(student, teacher, optimizer=sgd), inputs, 1, root=tmp_path)


def test_a_teacher_of_other_classes_is_refused_by_name_before_any_update(tmp_path):
    student, _ = nets()
    before = [p.detach().clone() for p in student.parameters()]
    wrong = nn.Sequential(nn.Linear(6, 5)).double()
    with pytest.raises(ValueError, match=r"teacher Sequential does not fit its student: .* \(16, 5\), .* \(16, 4\)"):
        fit(DistillationModule(student, wrong, optimizer=sgd), loader(), 1, root=tmp_path)
    for a, b in zip(student.parameters(), before):
        assert torch.equal(a, b)


def test_the_callers_teacher_is_left_as_it_was_and_may_have_another_dtype(tmp_path):
    student, _ = nets()
    teacher = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.1), nn.Linear(32, 4))  # float32, in training mode
    module = DistillationModule(student, teacher, method="dto", optimizer=sgd)
    fit(module, loader(), 2, root=tmp_path)
    assert all(p.requires_grad for p in teacher.parameters())  # not frozen in place
    assert all(m.training for m in teacher.modules())  # its mode restored after each forward
    assert next(teacher.parameters()).dtype == torch.float32
    with torch.no_grad():  # the teacher ran in eval mode: its outputs are deterministic
        first = module._teacher_logits(loader().dataset.tensors[0][:8])
        second = module._teacher_logits(loader().dataset.tensors[0][:8])
    assert torch.equal(first, second)


def test_a_student_whose_parameters_were_replaced_is_refused(tmp_path):
    """What FSDP2's fully_shard in a configure_model does (Lightning's FSDP strategy needs a GPU;
    its ModelParallelStrategy runs on the CPU but shards only in configure_model)."""
    student, teacher = nets()
    module = DistillationModule(student, teacher, method="dto", engine="exact", optimizer=sgd)
    student[0].weight = nn.Parameter(student[0].weight.detach().clone())
    with pytest.raises(ValueError, match="parameters were replaced after the balancer was built over them"):
        fit(module, loader(), 1)


def test_a_checkpoint_of_another_method_is_refused():
    student, teacher = nets()
    saved = DistillationModule(copy.deepcopy(student), teacher, method="dto-amortized", optimizer=sgd)
    x, y = next(iter(loader()))
    saved.balancer.backward(saved.losses(saved.student(x), teacher(x), y))
    checkpoint = {}
    saved.on_save_checkpoint(checkpoint)
    module = DistillationModule(student, teacher, method="fixed", balancer_options={"weights": [0.9, 0.1]})
    with pytest.raises(ValueError, match="saved by method 'dto-amortized', but it is loaded into 'fixed'"):
        module.on_load_checkpoint(checkpoint)
