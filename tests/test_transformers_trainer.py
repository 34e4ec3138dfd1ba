"""The Hugging Face Trainer integration with the real transformers Trainer on the CPU: its update
equals the plain PyTorch loop's, a checkpoint resumes with the balancer's state."""

import copy
import os

import pytest
import torch
from torch import nn

from helpers import tiny_llamas

transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers and accelerate")
pytest.importorskip("accelerate", reason="the Trainer integration needs accelerate")

from dtokd import make_balancer  # noqa: E402
from dtokd.integrations.common import causal_lm_losses, default_losses  # noqa: E402
from dtokd.integrations.transformers import BALANCER_FILE, DistillationTrainer  # noqa: E402


class Classifier(nn.Module):
    config = None  # the Trainer reads model.config with label smoothing (a transformers model has one)

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 4))

    def forward(self, x, labels=None):
        return {"logits": self.body(x)}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class InOrder(DistillationTrainer):
    """Batches in the dataset's order, so that the plain loop sees the same sequence."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def models():
    torch.manual_seed(0)
    return Classifier(16), Classifier(32)


def arguments(tmp_path, steps, **extra):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        save_strategy="no",
    )
    return transformers.TrainingArguments(**{**settings, **extra})


def plain_loop(student, teacher, steps, method, engine, options, losses_of=None):
    balancer = make_balancer(method, student.parameters(), engine=engine, **options)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    data, losses_of = Pairs(), losses_of or default_losses()
    for step in range(steps):
        k = (step % 4) * 16
        x, y = data.x[k : k + 16], data.y[k : k + 16]
        logits = student(x)["logits"]
        with torch.no_grad():
            t = teacher(x)["logits"]
        balancer.backward(losses_of(logits, t, y), representation=logits if engine == "representation" else None)
        optimizer.step()
        optimizer.zero_grad()
    return student, balancer


CASES = [
    ("dto", "representation", {}),
    ("dto", "exact", {}),
    ("dto-amortized", "exact", {"update": "next-step"}),
    ("anchored", "representation", {"anchor": "task"}),
    ("cross-batch", "exact", {}),
    ("dto-amortized-gated", "exact", {"update": "next-step", "every": 3}),
]


@pytest.mark.parametrize("method, engine, options", CASES)
def test_the_trainer_update_equals_the_plain_pytorch_loop(method, engine, options, tmp_path):
    student, teacher = models()
    reference, _ = plain_loop(copy.deepcopy(student), teacher, 6, method, engine, options)
    trainer = InOrder(
        model=student,
        teacher=teacher,
        method=method,
        engine=engine,
        balancer_options=options,
        args=arguments(tmp_path, 6),
        train_dataset=Pairs(),
    )
    trainer.train()
    for a, b in zip(trainer.model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    logged = [row for row in trainer.state.log_history if "dtokd/weight/distill" in row]
    assert len(logged) == 6 and all(row["dtokd/loss/task"] > 0 for row in logged)
    if trainer.balancer.needs_gram:
        assert all(-1 <= row["dtokd/conflict"] <= 1 for row in logged)


def test_a_trainer_checkpoint_resumes_with_the_balancer_state(tmp_path):
    student, teacher = models()
    options = {"update": "next-step"}
    straight = InOrder(
        model=copy.deepcopy(student),
        teacher=teacher,
        method="dto-amortized",
        engine="exact",
        balancer_options=options,
        args=arguments(tmp_path / "a", 8),
        train_dataset=Pairs(),
    )
    straight.train()
    first = InOrder(
        model=copy.deepcopy(student),
        teacher=teacher,
        method="dto-amortized",
        engine="exact",
        balancer_options=options,
        train_dataset=Pairs(),
        args=arguments(tmp_path / "b", 8, save_strategy="steps", save_steps=4),
    )
    first.train()
    half = tmp_path / "b" / "checkpoint-4"
    assert (half / BALANCER_FILE).is_file()
    resumed = InOrder(
        model=models()[0],
        teacher=teacher,
        method="dto-amortized",
        engine="exact",
        balancer_options=options,
        train_dataset=Pairs(),
        args=arguments(tmp_path / "c", 8),
    )
    resumed.train(resume_from_checkpoint=str(half))
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.balancer.logits, straight.balancer.logits, rtol=1e-6, atol=1e-7)


def test_same_batch_amortized_is_refused_with_the_alternative(tmp_path):
    student, teacher = models()
    with pytest.raises(ValueError, match="needs update='next-step', not 'same-batch'"):
        DistillationTrainer(
            model=student,
            teacher=teacher,
            method="dto-amortized",
            balancer_options={"update": "same-batch"},
            args=arguments(tmp_path, 1),
            train_dataset=Pairs(),
        )


class Blocks(torch.utils.data.Dataset):
    """Token blocks for a causal LM, the last two positions of every other block padded (-100)."""

    def __init__(self, n=16, length=10, vocabulary=40):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, vocabulary, (n, length), generator=g)
        self.labels = self.ids.clone()
        self.labels[::2, -2:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_causal_lm_losses_score_as_the_models_own_loss():
    from dtokd.losses import token_kd_loss

    student, teacher = tiny_llamas()
    data = Blocks()
    ids, labels = data.ids[:4], data.labels[:4]
    out = student(input_ids=ids, labels=labels)
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    losses = causal_lm_losses(divergence="jsd", temperature=2.0)(out.logits, t, labels)
    torch.testing.assert_close(losses["task"], out.loss, rtol=1e-5, atol=1e-6)
    expected = token_kd_loss(out.logits[:, :-1], t[:, :-1], labels[:, 1:], divergence="jsd", temperature=2.0)
    torch.testing.assert_close(losses["distill"], expected)


@pytest.mark.parametrize("engine", ["representation", "exact"])
def test_a_causal_lm_distils_in_the_trainer_as_in_the_plain_loop(tmp_path, engine):
    student, teacher = tiny_llamas()
    reference = copy.deepcopy(student)
    losses = causal_lm_losses("forward_kl")
    args = arguments(tmp_path, 3, per_device_train_batch_size=4, learning_rate=0.05)
    trainer = InOrder(
        model=student, teacher=teacher, method="dto", engine=engine, losses=losses, args=args, train_dataset=Blocks()
    )
    trainer.train()
    balancer = make_balancer("dto", reference.parameters(), engine=engine)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    data = Blocks()
    for step in range(3):
        ids, labels = data.ids[4 * step : 4 * step + 4], data.labels[4 * step : 4 * step + 4]
        logits = reference(input_ids=ids).logits
        with torch.no_grad():
            t = teacher(input_ids=ids).logits
        balancer.backward(losses(logits, t, labels), representation=logits if engine == "representation" else None)
        optimizer.step()
        optimizer.zero_grad()
    for (name, a), b in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def accumulated_plain_loop(model, teacher, micro_batches, losses, accumulate, lr):
    """SGD on the mean of each ``accumulate`` micro-batches' own balanced updates (DTO,
    representation engine): what the Trainer's gradient accumulation must apply."""
    balancer = make_balancer("dto", model.parameters(), engine="representation")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for k, (inputs, labels) in enumerate(micro_batches, start=1):
        before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        logits = model(**inputs)["logits"]
        with torch.no_grad():
            t = teacher(**inputs)["logits"]
        balancer.backward(losses(logits, t, labels), representation=logits)
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.grad.div_(accumulate)
                if b is not None:
                    p.grad.add_(b)
        if k % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("kind", ["classifier", "causal-lm"])
def test_gradient_accumulation_averages_the_micro_batches_balanced_updates(tmp_path, kind):
    """``gradient_accumulation_steps=2``: each micro-batch is balanced on its own gradients and
    the update is the mean of the two balanced updates, for a model whose ``forward`` takes no
    loss keywords (the classifier) and for one that does (a Llama: the Trainer would leave such
    a model's loss unscaled, expecting it to be normalised by the batch's token count)."""
    if kind == "classifier":
        student, teacher = models()
        data, losses, batch = Pairs(), default_losses(), 8
        micro = [({"x": data.x[k : k + batch]}, data.y[k : k + batch]) for k in range(0, 32, batch)]
    else:
        student, teacher = tiny_llamas()
        data, losses, batch = Blocks(), causal_lm_losses("forward_kl"), 2
        micro = [({"input_ids": data.ids[k : k + batch]}, data.labels[k : k + batch]) for k in range(0, 8, batch)]
    reference = accumulated_plain_loop(copy.deepcopy(student), teacher, micro, losses, accumulate=2, lr=0.05)
    args = arguments(tmp_path, 2, per_device_train_batch_size=batch, gradient_accumulation_steps=2, learning_rate=0.05)
    trainer = InOrder(
        model=student,
        teacher=teacher,
        method="dto",
        engine="representation",
        losses=losses,
        args=args,
        train_dataset=data,
    )
    trainer.train()
    for (name, a), b in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dto", "dto-amortized"])
def test_torchrun_with_two_processes_equals_one_process(tmp_path, method):
    """``torchrun --nproc_per_node 2`` (gloo, CPU), 16 per device: accelerate gives the ranks
    consecutive batches of the in-order sampler, so each step's two shards are one process's
    batch of 32; the balancer all-reduces the Gram and the losses, so every rank ends with the
    one-process parameters (and the amortized rule's logits)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("trainer_run.py")
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), method, "32", "4"],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path / "two"),
            method,
            "16",
            "4",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    for rank in range(2):
        two = torch.load(tmp_path / "two" / f"rank{rank}.pt", weights_only=False)
        for name, value in one["model"].items():
            torch.testing.assert_close(two["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        if method == "dto-amortized":
            torch.testing.assert_close(two["balancer"]["logits"], one["balancer"]["logits"], rtol=1e-5, atol=1e-6)


class LogitsOnly(nn.Module):
    """A model whose forward takes no ``labels`` (the Trainer would drop them from the batch)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 4)

    def forward(self, x):
        return self.body(x)


def test_labels_reach_the_losses_when_the_model_takes_none(tmp_path):
    student, teacher = LogitsOnly(), LogitsOnly()
    before = student.body.weight.detach().clone()
    trainer = InOrder(model=student, teacher=teacher, method="dto", args=arguments(tmp_path, 2), train_dataset=Pairs())
    trainer.train()
    assert not torch.equal(student.body.weight, before)
    assert [row for row in trainer.state.log_history if "dtokd/loss/task" in row]


# -- ordinary settings: evaluation, label smoothing, accumulation, the teacher, checkpoints ------


def trainer_of(tmp_path, steps, student=None, teacher=None, method="dto", options=None, **extra):
    default_student, default_teacher = models()
    return InOrder(
        model=student if student is not None else default_student,
        teacher=teacher if teacher is not None else default_teacher,
        method=method,
        engine="representation",
        balancer_options=options or {},
        args=arguments(tmp_path, steps, **extra),
        train_dataset=Pairs(),
        **({"eval_dataset": Pairs(32)} if "eval_strategy" in extra else {}),
    )


def test_evaluation_reports_the_task_loss_and_each_named_loss_and_moves_no_balancer_state(tmp_path):
    trainer = trainer_of(
        tmp_path, 4, method="dto-amortized", options={"update": "next-step"}, eval_strategy="steps", eval_steps=2
    )
    trainer.train()
    assert sum("eval_loss" in row for row in trainer.state.log_history) == 2  # evaluated during training
    logits_before = trainer.balancer.logits.clone()
    metrics = trainer.evaluate()
    assert torch.equal(trainer.balancer.logits, logits_before)
    data = Pairs(32)
    with torch.no_grad():
        student = trainer.model.eval()(data.x)["logits"]
        expected = default_losses()(student, trainer.teacher.model(data.x)["logits"], data.y)
    assert metrics["eval_loss"] == pytest.approx(expected["task"].item(), rel=1e-5)
    for name, value in expected.items():  # one evaluation batch of 32: its mean is the set's
        assert metrics[f"eval_dtokd/loss/{name}"] == pytest.approx(value.item(), rel=1e-5)


def test_label_smoothing_factor_smooths_the_task_loss(tmp_path):
    student, teacher = models()
    smoothed = trainer_of(tmp_path / "a", 4, copy.deepcopy(student), teacher, label_smoothing_factor=0.3)
    smoothed.train()
    plain = trainer_of(tmp_path / "b", 4, copy.deepcopy(student), teacher)
    plain.train()
    reference, _ = plain_loop(
        copy.deepcopy(student), teacher, 4, "dto", "representation", {}, default_losses(label_smoothing=0.3)
    )
    for a, b, c in zip(smoothed.model.parameters(), reference.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, c)


def test_label_smoothing_cannot_be_applied_to_the_users_own_losses(tmp_path):
    student, teacher = models()

    def own(student_logits, teacher_logits, labels):
        return default_losses()(student_logits, teacher_logits, labels)

    with pytest.raises(ValueError, match="label_smoothing_factor=0.3 cannot be applied to the losses function"):
        DistillationTrainer(
            model=student, teacher=teacher, losses=own, args=arguments(tmp_path, 1, label_smoothing_factor=0.3)
        )


def test_the_amortized_rule_learns_under_the_trainers_default_fused_optimizer(tmp_path):
    """transformers' default optimizer is fused AdamW, whose steps leave the parameters' version
    counters unchanged: the next-step learner must still learn between optimizer steps."""
    trainer = trainer_of(
        tmp_path, 3, method="dto-amortized", options={"update": "next-step"}, optim="adamw_torch_fused"
    )
    trainer.train()
    assert trainer.balancer.state_dict()["adam"]["steps"] == 2


def test_the_amortized_rule_learns_once_per_optimizer_step_under_accumulation(tmp_path):
    trainer = trainer_of(
        tmp_path,
        3,
        method="dto-amortized",
        options={"update": "next-step"},
        gradient_accumulation_steps=2,
        per_device_train_batch_size=8,
    )
    trainer.train()
    assert trainer.balancer.state_dict()["adam"]["steps"] == 2  # learnt between the 3 optimizer steps only


def test_a_teacher_of_other_classes_is_refused_by_name(tmp_path):
    student, _ = models()
    wrong = Classifier(8)
    wrong.body[-1] = nn.Linear(8, 5)
    with pytest.raises(ValueError, match=r"teacher Classifier does not fit its student: .* \(16, 5\)"):
        trainer_of(tmp_path, 1, student, wrong).train()


def test_parameters_replaced_after_the_trainer_was_built_are_refused(tmp_path):
    """What FSDP's fully_shard does to a model that accelerate shards on GPUs (on the CPU
    accelerate runs no FSDP: it falls back to its multi-CPU data parallelism)."""
    student, teacher = models()
    trainer = trainer_of(tmp_path, 1, student, teacher)
    student.body[0].weight = nn.Parameter(student.body[0].weight.detach().clone())
    with pytest.raises(ValueError, match="the model's parameters were replaced after the balancer was built"):
        trainer.train()


def test_the_callers_teacher_is_left_as_it_was_and_may_have_another_dtype(tmp_path):
    student, teacher = models()
    teacher = teacher.double().train()
    trainer_of(tmp_path, 2, student, teacher).train()
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training
    assert next(teacher.parameters()).dtype == torch.float64


def test_resuming_with_another_methods_balancer_state_is_refused(tmp_path):
    student, teacher = models()
    trainer_of(tmp_path / "a", 2, copy.deepcopy(student), teacher, save_strategy="steps", save_steps=2).train()
    other = trainer_of(tmp_path / "b", 4, copy.deepcopy(student), teacher, "dto-amortized", {"update": "next-step"})
    with pytest.raises(ValueError, match="saved by method 'dto', but it is loaded into 'dto-amortized'"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_a_balancer_state_carrying_a_pickled_payload_is_refused_without_running_it(tmp_path):
    import pickle

    from test_faults import Payload

    student, teacher = models()
    trainer_of(tmp_path / "a", 2, copy.deepcopy(student), teacher, save_strategy="steps", save_steps=2).train()
    marker = tmp_path / "ran"
    torch.save({"names": None, "payload": Payload(str(marker))}, tmp_path / "a" / "checkpoint-2" / BALANCER_FILE)
    with pytest.raises(pickle.UnpicklingError):
        trainer_of(tmp_path / "b", 4, student, teacher).train(
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")
        )
    assert not marker.exists()


@pytest.mark.parametrize("method, form", [("dto-amortized", "forward_ce"), ("dto", "forward_kl")])
def test_the_token_kd_form_left_to_the_library_is_the_methods(tmp_path, method, form):
    student, teacher = tiny_llamas()
    options = {"update": "next-step"} if method == "dto-amortized" else {}
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        method=method,
        balancer_options=options,
        losses=causal_lm_losses(),
        args=arguments(tmp_path, 1),
    )
    assert trainer.losses.divergence == form
    with pytest.raises(ValueError, match="with_distillation_form"):
        causal_lm_losses()(torch.randn(1, 3, 5), torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))
