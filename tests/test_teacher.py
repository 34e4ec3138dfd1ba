"""The one teacher object (dtokd.tasks.teacher.Teacher) every task and both integrations hold."""

import pytest
import torch
from torch import nn

from dtokd.tasks import ClassificationTask
from dtokd.tasks.teacher import Teacher


def noisy_teacher() -> nn.Module:
    """Dropout and BatchNorm in training mode: its eval-mode forward differs from its training one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).double().train()


def test_a_live_teacher_runs_in_eval_mode_without_gradients_and_leaves_the_module_as_set():
    model = noisy_teacher()
    teacher = Teacher(model)
    x = torch.randn(5, 4)  # float32: cast to the teacher's float64
    out = teacher(x)
    with torch.no_grad():
        expected = model.eval()(x.double())
    model.train()
    assert out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(teacher(x), out, rtol=0, atol=0)  # deterministic: dropout was off
    assert model.training and all(p.requires_grad for p in model.parameters())  # as the caller set them
    assert int(model[1].num_batches_tracked) == 0  # the running statistics were not updated


def test_run_gives_a_part_of_the_model_the_same_treatment():
    model = noisy_teacher()
    teacher = Teacher(model)
    hidden = teacher.run(model[:2], torch.randn(3, 4))
    assert hidden.dtype == torch.float64 and not hidden.requires_grad and model.training


def test_a_replaced_source_answers_while_the_model_stays_for_its_internals():
    model = noisy_teacher()
    teacher = Teacher(model)
    calls = []

    def cached(x):
        calls.append(torch.is_grad_enabled())
        return torch.zeros(len(x), 3)

    teacher.replace(cached)
    assert torch.equal(teacher(torch.randn(2, 4)), torch.zeros(2, 3)) and calls == [False]
    assert teacher.model is model and teacher.run(model[:1], torch.randn(2, 4)).shape == (2, 6)


def test_a_teacher_given_as_its_outputs_alone_has_no_model_to_run():
    teacher = Teacher(lambda x: x * 2)
    assert teacher.model is None and torch.equal(teacher(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="given as its outputs .* no model to run"):
        teacher.run(nn.Identity(), torch.ones(2))
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module or a callable, got int"):
        Teacher(3)


def test_a_task_holds_its_teacher_outside_its_parameters_and_state():
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    task = ClassificationTask(student, model, {"kd": {"type": "kd"}, "task": {"type": "ce"}}, torch.randn(2, 1, 2, 2))
    assert isinstance(task.teacher, Teacher) and task.teacher.model is model
    assert {id(p) for p in task.parameters()} == {id(p) for p in student.parameters()}
    assert all(key.startswith("student.") for key in task.state_dict())
