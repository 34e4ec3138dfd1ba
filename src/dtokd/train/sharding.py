"""``parallel=fsdp``: the student and the teacher sharded by FSDP2
(``torch.distributed.fsdp.fully_shard``) across the ``torchrun`` processes, instead of each
process holding both whole (DDP).

**Sharding** (:func:`shard_models`): each block of a model (:func:`blocks`: the layer classes a
Hugging Face model names in ``_no_split_modules``, else the items of a list of like modules),
then the model's root (what is left: embeddings, final norm, head), for the student and the
teacher; then the task's own parameters (projectors). The teacher's parameters are frozen (no
gradient, no optimizer state) and each of its blocks is freed again after its forward pass, so a
process holds 1/R of it plus one block at a time. ``amp=bf16`` is FSDP2's mixed-precision policy:
parameters all-gathered in bfloat16 for the computation, gradients reduced in float32, the
sharded parameters and the optimizer state kept in float32.

**Balancing**: the balancer is built over the sharded parameters (DTensors). Fixed weights, the
amortized rule and the representation engine run as under DDP; the exact and subset engines take
one backward pass per objective and form the Gram from the shards
(:mod:`dtokd.balancing.sharded`).

**Checkpoints** hold full state dicts (``torch.distributed.checkpoint.state_dict`` with
``full_state_dict``): every process takes part in gathering them to rank 0's host memory, which
writes them (:class:`FullState`). ``best.pt`` is the same file as any other run's (``dtokd eval``
and ``student.weights`` read it); ``checkpoint.pt`` holds whole tensors, each process reads it and
keeps its shard, so a run resumes on another number of processes too (tested: two to four, to
float32 rounding); its optimizer state is keyed by parameter name, so it does not resume a DDP run
(the config's ``parallel`` cannot change on resume). Rank 0 needs host memory for a full copy of the
student and its optimizer state at a checkpoint, and every process holds the whole checkpoint while
it resumes (not memory-mapped: the optimizer would keep the map).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Full state dicts gathered to rank 0's host memory (the other ranks get empty ones)."""
LOADED = StateDictOptions(full_state_dict=True)
"""A full state dict that every rank reads and keeps its shard of."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that are sharded one by one: those whose class a Hugging Face
    model lists in ``_no_split_modules`` (its decoder layers), else the items of every
    ``nn.ModuleList`` or ``nn.Sequential`` of two or more modules of one class (timm's ViT
    ``blocks``); none inside another."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if names:
            chosen = type(module).__name__ in names
        else:
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            chosen = (
                path != ""
                and isinstance(parent, (nn.ModuleList, nn.Sequential))
                and len(parent) > 1
                and len({type(c) for c in parent}) == 1
            )
        if chosen and not any(path.startswith(f"{outer}.") for outer in found):
            found[path] = module
    return list(found.values())


def shard_models(task: nn.Module, student: nn.Module, teacher: nn.Module | None, amp: str) -> None:
    """Shard ``student`` and ``teacher`` (:func:`shard_model`), then ``task`` (the parameters of
    its own, e.g. projectors), in place (see the module notes). Call after the models are placed
    on this rank's device and before the optimizer and balancer are built."""
    shard_model(student, amp)
    if teacher is not None and any(True for _ in teacher.parameters()):  # not an offline teacher
        shard_model(teacher, amp, forward_only=True)
    fully_shard(task, mp_policy=_policy(amp))


def shard_model(model: nn.Module, amp: str, *, forward_only: bool = False) -> None:
    """``model`` sharded block by block (:func:`blocks`), then at its root, in place.
    ``forward_only`` (a teacher): its root is freed after the forward pass too (FSDP2 keeps a
    root gathered for the backward pass that a teacher never has)."""
    for block in blocks(model):
        fully_shard(block, mp_policy=_policy(amp))
    fully_shard(model, mp_policy=_policy(amp), reshard_after_forward=True if forward_only else None)


def _policy(amp: str) -> MixedPrecisionPolicy:
    """``amp=bf16``: bfloat16 parameters for the computation, float32 gradient reduction."""
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if amp == "bf16" else None, reduce_dtype=torch.float32)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by FSDP2)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module``'s state dict with whole tensors on every rank (a collective when sharded)."""
    if not is_sharded(module):
        return module.state_dict()
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


class FullState:
    """A sharded module's part of a checkpoint: ``state_dict()`` gathers the full state to rank 0
    (a collective: every rank calls it; the others get ``{}``), ``load_state_dict`` takes a full
    state dict on every rank and keeps this rank's shard."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        if not is_sharded(self.module):  # nothing to gather (a task without projectors)
            return self.module.state_dict()
        return get_model_state_dict(self.module, options=GATHERED)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not is_sharded(self.module):
            self.module.load_state_dict(state)
            return
        set_model_state_dict(self.module, state, options=LOADED)


class FullOptimizerState:
    """The optimizer of a sharded ``model``'s parameters as a full state dict keyed by parameter
    name (gathered and loaded as :class:`FullState`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=GATHERED)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=LOADED)
