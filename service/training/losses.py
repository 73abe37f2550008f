"""Multi-task loss balancing: how the per-task losses become the one scalar the trainer backpropagates.

Four methods, chosen by name through :func:`make_balancer`:

- ``fixed``: a weighted sum with weights from the config.
- ``equal``: the plain sum.
- ``uncertainty``: homoscedastic-uncertainty weighting (Kendall, Gal, Cipolla 2018, "Multi-Task Learning Using
  Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR), one learned log-variance per task.
- ``gradnorm``: gradient normalisation (Chen, Badrinarayanan, Lee, Rabinovich 2018, "GradNorm: Gradient
  Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML), one learned weight per task
  that balances the tasks' gradient norms at the shared encoder's last layer.

The trainer's contract, the same for every method::

    balancer = make_balancer(cfg.loss_method, tasks, fixed_weights=cfg.loss_weights).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()])
    for batch in loader:
        losses = {"churn": ..., "ltv": ...}    # only the tasks labelled in this batch
        total = balancer.combine(losses, shared=list(model.encoder.last_layer.parameters()))
        optimizer.zero_grad()                  # before or after combine: all gradients come from backward
        total.backward()
        optimizer.step()
        balancer.after_step()

A task missing from ``losses`` (say no node in the batch has a segment label) is skipped for that step:
it adds nothing to the total, its learned parameters get no gradient from the batch, and GradNorm leaves it
out of that step's task averages (mean gradient norm and mean loss ratio, Chen et al. Sec. 3.1). A key in
``losses`` that is not one of the balancer's tasks is an error rather than silently dropped, since it is
almost always a misspelt task name.

Keep the balancer's parameters out of weight decay: decay pulls the uncertainty method's log-variances and
GradNorm's weights towards 0, which neither paper does.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "LOSS_METHODS",
    "FixedWeightBalancer",
    "GradNormBalancer",
    "LossBalancer",
    "UncertaintyBalancer",
    "make_balancer",
]

LOSS_METHODS: tuple[str, ...] = ("fixed", "equal", "uncertainty", "gradnorm")

# Lower bound on GradNorm's weights after each step. Chen et al. only require w_i > 0; a weight at exactly 0
# would zero its task's gradient norm G_i, and with it the gradient that could raise the weight again.
_MIN_WEIGHT = 1e-3
# Guards the division by L_i(0) when a task starts at (numerically) zero loss.
_EPS = 1e-12


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    names = tuple(tasks)
    if not names:
        raise ValueError("a loss balancer needs at least one task")
    if any(not isinstance(name, str) or not name for name in names):
        raise ValueError(f"task names must be non-empty strings, got {names!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate task names: {duplicates}")
    return names


class LossBalancer(nn.Module, abc.ABC):
    """Turns the per-task losses of one batch into the scalar the trainer calls ``.backward()`` on.

    Subclasses are ``nn.Module``s so that learned balancing parameters travel with ``.to(device)`` and
    ``state_dict()`` and are picked up by an optimizer built over ``balancer.parameters()``. Move the
    balancer to the same device as the losses.

    Attributes:
        tasks: The task names, in a fixed order; ``weights()`` reports them in this order.
    """

    tasks: tuple[str, ...]

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)

    @abc.abstractmethod
    def combine(self, losses: Mapping[str, Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        """Return the scalar the trainer calls ``.backward()`` on.

        Every gradient, including those of the balancer's own parameters, is delivered by ``.backward()`` on
        the result (GradNorm folds its weight update into it), so ``optimizer.zero_grad()`` may come before or
        after this call, and gradient accumulation over micro-batches works as for any loss.

        Args:
            losses: Scalar loss per task present in this batch; tasks absent from the mapping are skipped.
            shared: Parameters of the shared encoder's last layer (GradNorm's W). Ignored by methods that
                do not look at gradients.

        Returns:
            A 0-dim tensor.

        Raises:
            ValueError: If ``losses`` is empty, holds a task this balancer does not know, or a loss that
                is not a scalar.
        """

    def after_step(self) -> None:  # noqa: B027 - deliberately a no-op hook for the methods that need none
        """Hook the trainer calls after ``optimizer.step()``; GradNorm renormalises its weights here."""

    @abc.abstractmethod
    def weights(self) -> dict[str, float]:
        """Return the current effective weight multiplying each task's loss, for logs and the manifest."""

    def _present(self, losses: Mapping[str, Tensor]) -> list[tuple[int, Tensor]]:
        """Return ``(task index, loss)`` for the tasks present in ``losses``, in ``self.tasks`` order."""
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"losses for unknown tasks {unknown}; this balancer knows {list(self.tasks)}")
        present = [(i, losses[task]) for i, task in enumerate(self.tasks) if task in losses]
        if not present:
            raise ValueError(f"no task losses to combine; expected some of {list(self.tasks)}")
        for i, loss in present:
            if loss.dim() != 0:
                shape = tuple(loss.shape)
                raise ValueError(f"loss for task {self.tasks[i]!r} must be a scalar, got shape {shape}")
        return present


class FixedWeightBalancer(LossBalancer):
    """``total = sum_i w_i * L_i`` with constant weights (``fixed``; ``equal`` is all weights 1).

    Args:
        tasks: Task names.
        weights: Non-negative, finite weight for every task; extra names are rejected as likely typos.

    Raises:
        ValueError: Naming the task whose weight is missing, negative or not finite, or the unknown names.
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(tasks)
        missing = [task for task in self.tasks if task not in weights]
        if missing:
            raise ValueError(f"fixed loss weights missing for tasks {missing}")
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"fixed loss weights given for unknown tasks {unknown}; tasks are {list(self.tasks)}")
        for task in self.tasks:
            value = float(weights[task])
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"fixed loss weight for task {task!r} must be finite and >= 0, got {value}")
        self._weights = {task: float(weights[task]) for task in self.tasks}

    def combine(self, losses: Mapping[str, Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        """Return ``sum_i w_i * L_i`` over the tasks present; see :meth:`LossBalancer.combine`."""
        del shared  # constant weights need no gradients
        terms = [self._weights[self.tasks[i]] * loss for i, loss in self._present(losses)]
        return torch.stack(terms).sum()

    def weights(self) -> dict[str, float]:
        """Return the configured weights."""
        return dict(self._weights)


class UncertaintyBalancer(LossBalancer):
    """Homoscedastic-uncertainty weighting, Kendall, Gal & Cipolla (2018).

    Learns ``s_i = log sigma_i^2`` per task (initialised to 0, i.e. weight 1) and returns
    ``total = sum_i exp(-s_i) * L_i + s_i``.

    The paper weighs each task by its likelihood: a Gaussian gives a regression task
    ``1/(2 sigma^2) L + log sigma`` (Eq. 7, two regressions); a Boltzmann-scaled softmax gives a
    classification task ``1/sigma^2 L + log sigma`` (Eq. 10,
    ``1/(2 sigma_1^2) L_1 + 1/sigma_2^2 L_2 + log sigma_1 + log sigma_2``). Like most implementations,
    and with the paper's own choice of predicting ``s := log sigma^2`` for numerical stability (end of
    Sec. 3.2), we drop the distinction and use ``exp(-s_i) L_i + s_i`` for every task:

    - regression: exactly twice the paper's term ``(1/2) exp(-s) L + (1/2) s``, same optimum
      ``s* = log L``;
    - classification: the paper's term ``exp(-s) L + s/2`` has its optimum at ``log(2 L)``, so the
      paper's weight ``exp(-s*)`` is half ours.

    The regulariser ``+ s_i`` keeps the weights from collapsing to 0.

    ``s_i`` may go negative (weights above 1); ``exp(-s_i)`` grows without bound as ``L_i -> 0``, as in the
    paper.

    Attributes:
        log_vars: ``s_i`` per task, in ``tasks`` order; learned by the trainer's optimizer.
    """

    log_vars: nn.Parameter

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def combine(self, losses: Mapping[str, Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        """Return ``sum_i exp(-s_i) * L_i + s_i`` over the tasks present; see :meth:`LossBalancer.combine`."""
        del shared  # the weights are learned through .backward(), not from encoder gradients
        terms = [torch.exp(-self.log_vars[i]) * loss + self.log_vars[i] for i, loss in self._present(losses)]
        return torch.stack(terms).sum()

    def weights(self) -> dict[str, float]:
        """Return ``exp(-s_i)`` per task, the factor multiplying its loss (``1/sigma_i^2``)."""
        values = torch.exp(-self.log_vars.detach()).tolist()
        return dict(zip(self.tasks, values, strict=True))


class GradNormBalancer(LossBalancer):
    """GradNorm, Chen, Badrinarayanan, Lee & Rabinovich (2018), Algorithm 1.

    Learns weights ``w_i`` (initialised to 1). Each training call of :meth:`combine`:

    1. records ``L_i(0)`` the first time task ``i`` is seen while training;
    2. computes ``G_i = ||grad_W (w_i L_i)||_2`` at the shared last layer W (Sec. 3.1);
    3. the relative inverse training rate ``r_i = Ltilde_i / mean_j Ltilde_j``, ``Ltilde_i = L_i / L_i(0)``
       (Sec. 3.1);
    4. ``L_grad = sum_i |G_i - mean_j(G_j) * r_i^alpha|``, the target treated as a constant (Eq. 2, Sec. 3.2);
    5. returns ``sum_i w_i L_i`` with ``w`` detached, plus the zero-valued term ``w . c - (w . c).detach()``
       with the constant ``c = dL_grad/dw``: ``.backward()`` then writes exactly ``dL_grad/dw`` into
       ``w.grad``, and the network is trained by the weighted task losses only, never by ``L_grad``
       (Algorithm 1).

    :meth:`after_step` clamps ``w_i >= 1e-3`` and renormalises to ``sum_i w_i = T``, the number of tasks
    (Sec. 3.2).

    ``alpha`` sets the strength of the restoring force towards equal training rates: ``alpha = 0`` asks for
    equal gradient norms at W; larger values give tasks that train slowly larger gradients. 1.5 is the
    default used for most of the paper's experiments.

    A task whose loss does not reach W in a batch (zero or no gradient there) cannot be balanced through W:
    it is left out of that step's ``mean(G)`` and ``mean(Ltilde)`` and its weight gets no gradient.

    Under ``torch.no_grad()`` or ``.eval()`` (validation), :meth:`combine` only returns the weighted sum.

    Args:
        tasks: Task names.
        alpha: The asymmetry hyper-parameter; must be finite and >= 0.

    Raises:
        ValueError: If ``alpha`` is negative or not finite.

    Attributes:
        loss_weights: ``w_i`` per task, in ``tasks`` order.
        initial_losses: ``L_i(0)`` per task, NaN until the task is first seen; a buffer, so it is saved
            with ``state_dict()``.
    """

    loss_weights: nn.Parameter
    initial_losses: Tensor

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5) -> None:
        super().__init__(tasks)
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"GradNorm alpha must be finite and >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.loss_weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), float("nan")))
        self._grad_norms: dict[str, float] = {}

    def combine(self, losses: Mapping[str, Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        """Return ``sum_i w_i.detach() * L_i``, whose ``.backward()`` also sets ``w.grad = dL_grad/dw``.

        See :meth:`LossBalancer.combine`.

        Raises:
            ValueError: Also if ``shared`` is empty while training.
        """
        present = self._present(losses)
        weights = self.loss_weights.detach()
        total = torch.stack([weights[i] * loss for i, loss in present]).sum()
        if self.training and torch.is_grad_enabled():
            if not shared:
                raise ValueError("GradNorm needs the shared encoder's last-layer parameters (W) in `shared`")
            weight_grad = self._weight_grad(present, shared)
            if weight_grad is not None:
                # Adds exactly 0 to the value; its only gradient is d/dw = dL_grad/dw. Delivering the weight
                # update through .backward() instead of writing w.grad here keeps it from being wiped by an
                # optimizer.zero_grad() that runs between combine() and backward().
                surrogate = (self.loss_weights * weight_grad).sum()
                total = total + (surrogate - surrogate.detach())
        return total

    def _weight_grad(self, present: list[tuple[int, Tensor]], shared: Sequence[nn.Parameter]) -> Tensor | None:
        """Record L_i(0) and G_i, and return dL_grad/dw (detached), or None if no task reaches W."""
        index = [i for i, _ in present]
        loss_values = torch.stack([loss.detach() for _, loss in present])

        # L_i(0), Algorithm 1: "initialize L_i(0)" from the first step the task is seen in.
        idx = torch.tensor(index, device=self.initial_losses.device)
        unseen = torch.isnan(self.initial_losses[idx])
        if bool(unseen.any()):
            self.initial_losses[idx[unseen]] = loss_values[unseen].to(self.initial_losses.dtype)

        # ||grad_W L_i||. w_i is a scalar that W does not depend on, so grad_W(w_i L_i) = w_i grad_W L_i and
        # G_i = w_i ||grad_W L_i|| for w_i > 0 (kept by after_step). Building G_i that way keeps L_grad's
        # graph to the T-vector w: no create_graph=True (no second-order graph through the heads and W), and
        # by construction no path from L_grad into the network. retain_graph=True because the trainer still
        # backpropagates the returned total through the same graph.
        norms: list[Tensor] = []
        for _, loss in present:
            if not loss.requires_grad:
                norms.append(loss.new_zeros(()))
                continue
            grads: Sequence[Tensor | None] = torch.autograd.grad(
                loss, list(shared), retain_graph=True, allow_unused=True
            )
            squares = [g.detach().pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else loss.new_zeros(()))
        grad_norms = torch.stack(norms).to(self.loss_weights.dtype)

        # Tasks with no gradient at W cannot be steered through W; leave them out of both averages.
        active = grad_norms > 0
        self._grad_norms = {
            self.tasks[i]: float(self.loss_weights[i].detach() * grad_norms[k]) for k, i in enumerate(index)
        }
        if not bool(active.any()):
            return None

        active_index = [i for k, i in enumerate(index) if bool(active[k])]
        g = self.loss_weights[active_index] * grad_norms[active]  # G_i^(t), differentiable in w only
        with torch.no_grad():
            # Ltilde_i = L_i / L_i(0) and r_i = Ltilde_i / mean_j Ltilde_j (Sec. 3.1).
            initial = self.initial_losses[active_index].clamp_min(_EPS)
            ratio = loss_values[active].to(initial.dtype) / initial
            inverse_rate = ratio / ratio.mean()
            # Target mean_j(G_j) * r_i^alpha, held constant when differentiating L_grad (Sec. 3.2) so that
            # the weights do not simply drift towards zero.
            target = g.mean() * inverse_rate.pow(self.alpha)
        grad_loss = (g - target).abs().sum()  # Eq. 2, L_1 summed over the tasks
        (weight_grad,) = torch.autograd.grad(grad_loss, [self.loss_weights])
        return weight_grad.detach()

    def after_step(self) -> None:
        """Clamp ``w_i >= 1e-3`` and renormalise so ``sum_i w_i = T`` (Chen et al. 2018, Sec. 3.2)."""
        with torch.no_grad():
            self.loss_weights.clamp_(min=_MIN_WEIGHT)
            self.loss_weights.mul_(len(self.tasks) / self.loss_weights.sum())

    def weights(self) -> dict[str, float]:
        """Return ``w_i`` per task."""
        return dict(zip(self.tasks, self.loss_weights.detach().tolist(), strict=True))

    def grad_norms(self) -> dict[str, float]:
        """Return ``G_i = w_i ||grad_W L_i||`` per task present in the last training call, for logging."""
        return dict(self._grad_norms)


def make_balancer(
    method: str,
    tasks: Sequence[str],
    *,
    fixed_weights: Mapping[str, float] | None = None,
    alpha: float = 1.5,
) -> LossBalancer:
    """Build the loss balancer named by ``method``.

    Args:
        method: One of :data:`LOSS_METHODS`: ``"fixed"``, ``"equal"``, ``"uncertainty"`` or ``"gradnorm"``.
        tasks: Task names, e.g. ``("churn", "ltv", "segment")``.
        fixed_weights: Weight per task; required for ``"fixed"`` and ignored by the other methods, so one
            config can keep its weights while the method is switched.
        alpha: GradNorm's asymmetry (Chen et al. 2018, Eq. 2); ignored by the other methods.

    Returns:
        A fresh balancer; move it to the model's device and add its parameters to the optimizer.

    Raises:
        ValueError: Naming the unknown method, or the task whose fixed weight is missing or invalid.
    """
    if method == "fixed":
        if fixed_weights is None:
            raise ValueError("loss method 'fixed' needs fixed_weights, one weight per task")
        return FixedWeightBalancer(tasks, fixed_weights)
    if method == "equal":
        return FixedWeightBalancer(tasks, dict.fromkeys(tasks, 1.0))
    if method == "uncertainty":
        return UncertaintyBalancer(tasks)
    if method == "gradnorm":
        return GradNormBalancer(tasks, alpha=alpha)
    raise ValueError(f"unknown loss method {method!r}; expected one of {list(LOSS_METHODS)}")
