"""What a balancer reports about one step, for logging.

The numbers of a step are packed into one float64 vector where they were computed (the
losses' device) and copied to the host asynchronously as the step is built; the first access
to any of them waits for that copy only (not for later work queued on the device). The
tensors the properties return are float64 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

OVERFLOW = "non-finite gradients (GradScaler overflow: .grad set to NaN so scaler.step skips)"


class PerLoss(NamedTuple):
    """A step's per-loss numbers by what they are (``m`` each, in the order of the losses'
    names), as read by :meth:`StepInfo.read_per_loss` from :attr:`StepInfo.per_loss_on_device`
    or from a sum of it over steps."""

    losses: Tensor
    weights: Tensor
    loss_weights: Tensor


class StepInfo:
    """One balancer step.

    ``weights``: the rule's weights ``pi_i`` on the objective gradients it balanced (for
    DTO these are the gradients of ``log L_i``). ``loss_weights``: the coefficient that was
    actually applied to each raw loss gradient, ``sum_i loss_weights[i] * grad L_i`` being the
    update written to ``.grad`` (for DTO ``pi_i / L_i``): directly comparable with the
    ``alpha`` of fixed-weight KD. ``gram``: the Gram matrix the rule saw; ``raw_gram``: the
    Gram of the raw loss gradients, from which ``norms``, ``cosines``, ``conflict`` and
    ``dominance`` are computed (None when the balancer did not need it and was not asked to
    diagnose). ``conflict`` and ``dominance`` compare the first two losses in the order they
    were given: pass ``{"distill": ..., "task": ...}`` to get ``cos(g_distill, g_task)`` and
    ``||g_distill|| / ||g_task||``.
    """

    def __init__(
        self,
        names: Sequence[str],
        loss_values: Tensor,
        weight_values: Tensor,
        coefficient_values: Tensor,
        gram: Tensor | None = None,
        raw_gram: Tensor | None = None,
        *,
        skipped_reason: str | None = None,
        overflow_skips: bool = False,
        device: torch.device | None = None,
        reference: Tensor | None = None,
    ) -> None:
        """``overflow_skips``: the step ran under a GradScaler, so a non-finite ``raw_gram``
        means that it was skipped (reported in ``skipped_reason`` once read). ``device``: the
        losses' device, where :attr:`packed` is kept whatever device the numbers were computed
        on (a step that ran its rule on the host gives host tensors; a training loop that sums
        ``packed`` over steps must find every step's numbers on one device)."""
        self.names = tuple(names)
        self.has_gram = raw_gram is not None
        parts = [loss_values, weight_values, coefficient_values]
        if raw_gram is not None:
            parts += [raw_gram.reshape(-1), gram.reshape(-1)]  # type: ignore[union-attr]
        packed = torch.cat(parts).detach().to(torch.float64)
        self._copy = HostCopy(packed)
        self.packed = packed if device is None else packed.to(device, non_blocking=True)
        """The step's numbers, on the losses' device: losses, weights, coefficients, then the
        raw Gram and the Gram row-major when computed."""
        self._reason = skipped_reason
        self._overflow_skips = overflow_skips
        self._reference = None if reference is None else reference.detach().to("cpu", torch.float64)

    @property
    def _host(self) -> Tensor:
        return self._copy.tensor

    def _part(self, k: int) -> Tensor:
        m = len(self.names)
        return self._host[k * m : (k + 1) * m]

    def _matrix(self, k: int) -> Tensor | None:
        if not self.has_gram:
            return None
        m = len(self.names)
        return self._host[3 * m + k * m * m : 3 * m + (k + 1) * m * m].view(m, m)

    @property
    def per_loss_on_device(self) -> Tensor:
        """The step's losses, weights and coefficients (``3 m`` numbers, in that order) on the
        losses' device with no host read: what a training loop sums over an epoch."""
        return self.packed[: 3 * len(self.names)]

    @staticmethod
    def read_per_loss(values: Tensor) -> PerLoss:
        """``values`` laid out as :attr:`per_loss_on_device` (one step's, or their sum or mean
        over steps) read by name: the losses, the weights and the loss weights, as views of
        ``values`` where it lies (no copy, no host read)."""
        if values.dim() != 1 or values.numel() % 3 or not values.numel():
            raise ValueError(
                "values must be laid out as StepInfo.per_loss_on_device (3 m numbers: losses, weights, loss "
                f"weights), got shape {tuple(values.shape)}"
            )
        losses, weights, loss_weights = values.chunk(3)
        return PerLoss(losses, weights, loss_weights)

    @property
    def loss_values(self) -> Tensor:
        return self._part(0)

    @property
    def weight_values(self) -> Tensor:
        return self._part(1)

    @property
    def coefficient_values(self) -> Tensor:
        return self._part(2)

    @property
    def raw_gram(self) -> Tensor | None:
        return self._matrix(0)

    @property
    def gram(self) -> Tensor | None:
        return self._matrix(1)

    @property
    def skipped_reason(self) -> str | None:
        """Why no gradient was written this step, or None. Under a GradScaler a step with no Gram
        (fixed, mean, amortized) is not judged here: ``scaler.step`` finds its overflow itself."""
        raw_gram = self.raw_gram
        if (
            self._reason is None
            and self._overflow_skips
            and raw_gram is not None
            and not bool(torch.isfinite(raw_gram).all())
        ):
            return OVERFLOW
        return self._reason

    @property
    def skipped(self) -> bool:
        """True when no gradient was written this step (see ``skipped_reason``)."""
        return self.skipped_reason is not None

    @property
    def losses(self) -> dict[str, float]:
        return self._by_name(self.loss_values)

    @property
    def weights(self) -> dict[str, float]:
        return self._by_name(self.weight_values)

    @property
    def loss_weights(self) -> dict[str, float]:
        return self._by_name(self.coefficient_values)

    @property
    def norms(self) -> dict[str, float] | None:
        """``||grad L_i||`` of the raw losses, by name."""
        if self.raw_gram is None:
            return None
        return self._by_name(self.raw_gram.diagonal().clamp_min(0).sqrt())

    @property
    def cosines(self) -> Tensor | None:
        """m x m matrix of ``cos(grad L_i, grad L_j)`` (0 where a gradient is zero)."""
        if self.raw_gram is None:
            return None
        norms = self.raw_gram.diagonal().clamp_min(0).sqrt()
        outer = torch.outer(norms, norms)
        return torch.where(outer > 0, self.raw_gram / outer.clamp_min(torch.finfo(outer.dtype).tiny), 0.0)

    @property
    def conflict(self) -> float | None:
        """``cos(grad L_1, grad L_2)`` of the first two losses; negative means they conflict."""
        cosines = self.cosines
        if cosines is None or len(self.names) < 2:
            return None
        return float(cosines[0, 1])

    @property
    def dominance(self) -> float | None:
        """``||grad L_1|| / ||grad L_2||`` of the first two losses (inf if the second is 0)."""
        norms = self.norms
        if norms is None or len(self.names) < 2:
            return None
        first, second = norms[self.names[0]], norms[self.names[1]]
        return first / second if second > 0 else math.inf

    @property
    def update_norm(self) -> float | None:
        """``||sum_i c_i grad L_i||``, the length of the update written to ``.grad``."""
        if self.raw_gram is None:
            return None
        c = self.coefficient_values
        return math.sqrt(max(float(c @ self.raw_gram @ c), 0.0))

    @property
    def update_ratio(self) -> float | None:
        """:attr:`update_norm` over ``||sum_i r_i grad L_i||`` for the balancer's reference
        weights ``r`` (None without a reference or a Gram; inf if the reference length is 0)."""
        if self.raw_gram is None or self._reference is None:
            return None
        r = self._reference
        length = math.sqrt(max(float(r @ self.raw_gram @ r), 0.0))
        return self.update_norm / length if length > 0 else math.inf  # type: ignore[operator]

    def as_dict(self) -> dict[str, float]:
        """A flat ``{key: float}`` view for a logger: ``weight/NAME``, ``loss_weight/NAME``,
        ``loss/NAME``, ``grad_norm/NAME``, ``cos/A|B``, ``conflict``, ``dominance``, ``update_norm``,
        ``update_ratio`` (with a reference), ``skipped``."""
        row: dict[str, float] = {"skipped": float(self.skipped)}
        for prefix, values in (("loss", self.losses), ("weight", self.weights), ("loss_weight", self.loss_weights)):
            row.update({f"{prefix}/{k}": v for k, v in values.items()})
        norms, cosines = self.norms, self.cosines
        if norms is not None and cosines is not None:
            row.update({f"grad_norm/{k}": v for k, v in norms.items()})
            for i, a in enumerate(self.names):
                for j in range(i + 1, len(self.names)):
                    row[f"cos/{a}|{self.names[j]}"] = float(cosines[i, j])
            if len(self.names) >= 2:
                row["conflict"] = float(self.conflict)  # type: ignore[arg-type]
                row["dominance"] = float(self.dominance)  # type: ignore[arg-type]
            row["update_norm"] = self.update_norm  # type: ignore[assignment]
            if self._reference is not None:
                row["update_ratio"] = self.update_ratio  # type: ignore[assignment]
        return row

    def _by_name(self, values: Tensor) -> dict[str, float]:
        return dict(zip(self.names, values.tolist()))

    def __repr__(self) -> str:
        return f"StepInfo(losses={self.losses}, weights={self.weights}, skipped_reason={self.skipped_reason!r})"


class HostCopy:
    """A CPU copy of a tensor, started now and waited for on first use: from a CUDA device
    the copy goes into pinned memory without blocking, ordered after the work that computes
    the tensor, and :attr:`tensor` waits for that copy only (an event), not for later work."""

    def __init__(self, source: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if source.device.type != "cuda":
            self._copy = source.detach().cpu()
            return
        self._copy = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
        self._copy.copy_(source.detach(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(source.device))

    @property
    def tensor(self) -> Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._copy
