"""Specs for the multi-task loss balancers, each checked against its paper on tiny synthetic problems."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from service.training.losses import (
    LOSS_METHODS,
    GradNormBalancer,
    LossBalancer,
    UncertaintyBalancer,
    make_balancer,
)

TASKS = ("churn", "ltv", "segment")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


class TwoTaskNet(nn.Module):
    """A shared trunk whose last layer is GradNorm's W, and one linear regression head per task."""

    def __init__(self, in_dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.last = nn.Linear(hidden, hidden)
        self.head_a = nn.Linear(hidden, 1)
        self.head_b = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.tanh(self.last(self.trunk(x)))
        return self.head_a(z), self.head_b(z)

    def shared(self) -> list[nn.Parameter]:
        return list(self.last.parameters())


def _grad_norm(loss: Tensor, params: list[nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def _scaled_problem(seed: int, scale_b: float) -> tuple[TwoTaskNet, Callable[[], dict[str, Tensor]]]:
    """Two regression tasks on one trunk; task b's loss is multiplied by ``scale_b``."""
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    y_a = x @ torch.randn(8, 1)
    y_b = torch.sin(x @ torch.randn(8, 1))
    net = TwoTaskNet()

    def losses() -> dict[str, Tensor]:
        out_a, out_b = net(x)
        return {
            "a": nn.functional.mse_loss(out_a, y_a),
            "b": scale_b * nn.functional.mse_loss(out_b, y_b),
        }

    return net, losses


def _train(
    net: nn.Module,
    balancer: LossBalancer,
    losses: Callable[[], dict[str, Tensor]],
    shared: list[nn.Parameter],
    steps: int,
    lr: float = 0.01,
    balancer_lr: float = 0.01,
    on_step: Callable[[], None] | None = None,
) -> None:
    optimizer = torch.optim.Adam(
        [{"params": net.parameters(), "lr": lr}, {"params": balancer.parameters(), "lr": balancer_lr}]
    )
    for _ in range(steps):
        optimizer.zero_grad()
        balancer.combine(losses(), shared).backward()
        optimizer.step()
        balancer.after_step()
        if on_step is not None:
            on_step()


# --- make_balancer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_make_balancer_builds_every_listed_method(method: str) -> None:
    balancer = make_balancer(method, TASKS, fixed_weights=dict.fromkeys(TASKS, 1.0))

    assert isinstance(balancer, LossBalancer)
    assert balancer.tasks == TASKS
    assert set(balancer.weights()) == set(TASKS)


def test_make_balancer_rejects_unknown_method_naming_it() -> None:
    with pytest.raises(ValueError, match="'softmax_weighting'"):
        make_balancer("softmax_weighting", TASKS)


def test_make_balancer_fixed_rejects_missing_weight_naming_the_task() -> None:
    with pytest.raises(ValueError, match="segment"):
        make_balancer("fixed", TASKS, fixed_weights={"churn": 1.0, "ltv": 0.5})


def test_make_balancer_fixed_rejects_negative_weight_naming_the_task() -> None:
    with pytest.raises(ValueError, match="'ltv'.*-0.5"):
        make_balancer("fixed", TASKS, fixed_weights={"churn": 1.0, "ltv": -0.5, "segment": 1.0})


def test_make_balancer_fixed_rejects_weight_for_unknown_task() -> None:
    with pytest.raises(ValueError, match="segmnet"):
        make_balancer("fixed", TASKS, fixed_weights={**dict.fromkeys(TASKS, 1.0), "segmnet": 2.0})


def test_make_balancer_fixed_without_weights_raises() -> None:
    with pytest.raises(ValueError, match="fixed_weights"):
        make_balancer("fixed", TASKS)


def test_make_balancer_rejects_duplicate_tasks() -> None:
    with pytest.raises(ValueError, match="churn"):
        make_balancer("equal", ["churn", "ltv", "churn"])


def test_make_balancer_gradnorm_rejects_negative_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        make_balancer("gradnorm", TASKS, alpha=-1.0)


# --- combine: the contract shared by every method --------------------------------------------------------


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_combine_rejects_loss_for_unknown_task(method: str) -> None:
    balancer = make_balancer(method, TASKS, fixed_weights=dict.fromkeys(TASKS, 1.0))
    w = nn.Parameter(torch.ones(()))

    with pytest.raises(ValueError, match="chrun"):
        balancer.combine({"chrun": w * 2.0}, [w])


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_combine_rejects_empty_losses(method: str) -> None:
    balancer = make_balancer(method, TASKS, fixed_weights=dict.fromkeys(TASKS, 1.0))

    with pytest.raises(ValueError, match="no task losses"):
        balancer.combine({}, [nn.Parameter(torch.ones(()))])


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_combine_rejects_non_scalar_loss(method: str) -> None:
    balancer = make_balancer(method, TASKS, fixed_weights=dict.fromkeys(TASKS, 1.0))
    w = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="'ltv'.*scalar"):
        balancer.combine({"ltv": w * 2.0}, [w])


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_combine_skips_tasks_absent_from_batch(method: str) -> None:
    fixed = {"churn": 2.0, "ltv": 0.5, "segment": 3.0}
    balancer = make_balancer(method, TASKS, fixed_weights=fixed)
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    losses = {"churn": (w[0] - 3.0) ** 2, "ltv": (w[1] + 1.0) ** 2}  # no "segment" in this batch
    weights = balancer.weights()

    total = balancer.combine(losses, [w])
    total.backward()

    values = {task: loss.item() for task, loss in losses.items()}
    if method == "uncertainty":  # s = 0 at start: exp(-0) L + 0
        expected = values["churn"] + values["ltv"]
    else:
        expected = weights["churn"] * values["churn"] + weights["ltv"] * values["ltv"]
    assert total.item() == pytest.approx(expected)
    assert w.grad is not None and torch.all(w.grad != 0)
    if isinstance(balancer, UncertaintyBalancer):
        grad = balancer.log_vars.grad
        assert grad is not None and float(grad[TASKS.index("segment")]) == 0.0
    if isinstance(balancer, GradNormBalancer):
        assert math.isnan(float(balancer.initial_losses[TASKS.index("segment")]))
        grad = balancer.loss_weights.grad
        assert grad is not None and float(grad[TASKS.index("segment")]) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_combine_returns_scalar_on_the_losses_device(method: str, device: str) -> None:
    balancer = make_balancer(method, TASKS, fixed_weights=dict.fromkeys(TASKS, 1.0)).to(device)
    w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], device=device))
    losses = {task: w[i] ** 2 for i, task in enumerate(TASKS)}

    total = balancer.combine(losses, [w])
    total.backward()
    balancer.after_step()

    assert total.dim() == 0
    assert total.device.type == torch.device(device).type
    assert w.grad is not None and torch.isfinite(w.grad).all()


# --- equal and fixed -------------------------------------------------------------------------------------


def test_combine_equal_returns_plain_sum() -> None:
    balancer = make_balancer("equal", TASKS)
    losses = {"churn": torch.tensor(0.7), "ltv": torch.tensor(12.5), "segment": torch.tensor(1.9)}

    total = balancer.combine(losses, [])

    assert total.item() == pytest.approx(0.7 + 12.5 + 1.9)
    assert balancer.weights() == {"churn": 1.0, "ltv": 1.0, "segment": 1.0}


def test_combine_fixed_returns_weighted_sum_and_gradients() -> None:
    fixed = {"churn": 2.0, "ltv": 0.01, "segment": 0.0}
    balancer = make_balancer("fixed", TASKS, fixed_weights=fixed)
    p = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    losses = {task: p[i] ** 2 for i, task in enumerate(TASKS)}

    total = balancer.combine(losses, [])
    total.backward()

    assert total.item() == pytest.approx(2.0 * 1.0 + 0.01 * 4.0 + 0.0 * 9.0)
    # d/dp_i (w_i p_i^2) = 2 w_i p_i
    assert p.grad is not None
    torch.testing.assert_close(p.grad, torch.tensor([4.0, 0.04, 0.0]))
    assert balancer.weights() == fixed
    assert list(balancer.parameters()) == []


# --- uncertainty (Kendall, Gal & Cipolla 2018) -----------------------------------------------------------


def test_uncertainty_optimum_for_fixed_loss_is_log_loss() -> None:
    # d/ds [exp(-s) L + s] = 1 - exp(-s) L = 0  =>  s* = log L, weight exp(-s*) = 1/L.
    balancer = make_balancer("uncertainty", ["a", "b"])
    assert isinstance(balancer, UncertaintyBalancer)
    losses = {"a": torch.tensor(4.0), "b": torch.tensor(0.25)}
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.05)

    for _ in range(600):
        optimizer.zero_grad()
        balancer.combine(losses, []).backward()
        optimizer.step()

    torch.testing.assert_close(
        balancer.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.25)]), atol=1e-3, rtol=0
    )
    assert balancer.weights()["a"] == pytest.approx(0.25, rel=1e-2)
    assert balancer.weights()["b"] == pytest.approx(4.0, rel=1e-2)


def test_uncertainty_learns_lower_weight_for_noisier_task() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y_clean = x @ torch.randn(8, 1) + 0.1 * torch.randn(512, 1)
    y_noisy = x @ torch.randn(8, 1) + 2.0 * torch.randn(512, 1)
    net = TwoTaskNet()
    balancer = make_balancer("uncertainty", ["clean", "noisy"])
    assert isinstance(balancer, UncertaintyBalancer)

    def losses() -> dict[str, Tensor]:
        out_clean, out_noisy = net(x)
        return {
            "clean": nn.functional.mse_loss(out_clean, y_clean),
            "noisy": nn.functional.mse_loss(out_noisy, y_noisy),
        }

    _train(net, balancer, losses, [], steps=800, lr=0.01, balancer_lr=0.02)

    weights = balancer.weights()
    assert weights["noisy"] < weights["clean"] / 10
    # The learned sigma^2 = exp(s) tracks the task's remaining loss (s* = log L); once the noisy task has
    # plateaued at its noise floor its weight is about 1 / noise variance = 1/4.
    final_noisy = losses()["noisy"].item()
    assert balancer.log_vars[1].item() == pytest.approx(math.log(final_noisy), abs=0.05)
    assert weights["noisy"] == pytest.approx(0.25, rel=0.3)


# --- gradnorm (Chen, Badrinarayanan, Lee & Rabinovich 2018) ----------------------------------------------


def _reference_weight_grad(
    w: Tensor, losses: list[Tensor], shared: list[nn.Parameter], initial: Tensor, alpha: float
) -> Tensor:
    """The paper's L_grad taken literally: G_i = ||grad_W (w_i L_i)|| built with create_graph=True."""
    w = w.detach().clone().requires_grad_(True)
    norms = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(w[i] * loss, shared, retain_graph=True, create_graph=True)
        norms.append(torch.cat([g.flatten() for g in grads]).norm())
    g = torch.stack(norms)
    ratio = torch.stack([loss.detach() for loss in losses]) / initial
    target = (g.mean() * (ratio / ratio.mean()) ** alpha).detach()
    (grad,) = torch.autograd.grad((g - target).abs().sum(), [w])
    return grad


def test_gradnorm_weight_grad_matches_paper_formula() -> None:
    net, losses_fn = _scaled_problem(seed=1, scale_b=10.0)
    balancer = make_balancer("gradnorm", ["a", "b"], alpha=1.5)
    assert isinstance(balancer, GradNormBalancer)
    initial = torch.stack([loss.detach() for loss in losses_fn().values()])
    balancer.combine(losses_fn(), net.shared())  # records L_i(0)
    with torch.no_grad():
        net.head_a.weight.mul_(0.5)  # task a's loss moves, so r_a != r_b
        balancer.loss_weights.copy_(torch.tensor([0.7, 1.3]))

    balancer.combine(losses_fn(), net.shared()).backward()

    expected = _reference_weight_grad(
        balancer.loss_weights, list(losses_fn().values()), net.shared(), initial, alpha=1.5
    )
    assert balancer.loss_weights.grad is not None
    torch.testing.assert_close(balancer.loss_weights.grad, expected)


def test_gradnorm_network_gradient_is_that_of_weighted_sum_only() -> None:
    net, losses_fn = _scaled_problem(seed=2, scale_b=100.0)
    balancer = make_balancer("gradnorm", ["a", "b"])
    assert isinstance(balancer, GradNormBalancer)
    balancer.combine(losses_fn(), net.shared())  # first call: records L_i(0)
    with torch.no_grad():
        balancer.loss_weights.copy_(torch.tensor([1.6, 0.4]))
    net.zero_grad()

    total = balancer.combine(losses_fn(), net.shared())

    # combine computes G_i without touching the network's .grad ...
    assert all(p.grad is None for p in net.parameters())
    total.backward()
    got = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    # ... and .backward() on its result gives exactly the gradient of sum_i w_i L_i.
    net.zero_grad()
    losses = losses_fn()
    (1.6 * losses["a"] + 0.4 * losses["b"]).backward()
    expected = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(got) == len(expected) == len(list(net.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert total.item() == pytest.approx((1.6 * losses["a"] + 0.4 * losses["b"]).item())
    assert balancer.loss_weights.grad is not None and torch.all(balancer.loss_weights.grad != 0)


def test_gradnorm_balances_gradient_norms_when_one_loss_is_scaled_100x() -> None:
    net, losses_fn = _scaled_problem(seed=0, scale_b=100.0)
    balancer = make_balancer("gradnorm", ["a", "b"], alpha=1.5)
    start = losses_fn()
    start_ratio = _grad_norm(start["b"], net.shared()) / _grad_norm(start["a"], net.shared())

    _train(net, balancer, losses_fn, net.shared(), steps=300)

    weights = balancer.weights()
    end = losses_fn()
    end_ratio = (weights["b"] * _grad_norm(end["b"], net.shared())) / (
        weights["a"] * _grad_norm(end["a"], net.shared())
    )
    assert start_ratio > 5
    assert abs(math.log(end_ratio)) < 0.5 * abs(math.log(start_ratio))
    assert weights["b"] < weights["a"]


def test_gradnorm_alpha_zero_drives_gradient_norms_equal() -> None:
    net, losses_fn = _scaled_problem(seed=0, scale_b=100.0)
    balancer = make_balancer("gradnorm", ["a", "b"], alpha=0.0)
    assert isinstance(balancer, GradNormBalancer)
    ratios: list[float] = []

    def record() -> None:
        norms = balancer.grad_norms()
        ratios.append(norms["b"] / norms["a"])

    _train(net, balancer, losses_fn, net.shared(), steps=300, on_step=record)

    assert ratios[0] > 5
    late = ratios[-20:]
    assert sum(late) / len(late) == pytest.approx(1.0, abs=0.1)


def test_gradnorm_gives_larger_weight_to_task_that_trains_slower() -> None:
    # L_a = 2 W_0^2 and L_b = W_1^2: at W = (0.5, 1) task a has dropped to L/L(0) = 1/4 while task b is still
    # at 1, and both gradient norms at W are 2. Then r_a = 0.4, r_b = 1.6 (Sec. 3.1), so Eq. 2 lowers w_a
    # and raises w_b.
    shared = nn.Parameter(torch.tensor([1.0, 1.0]))
    balancer = make_balancer("gradnorm", ["a", "b"], alpha=1.5)
    assert isinstance(balancer, GradNormBalancer)

    def losses() -> dict[str, Tensor]:
        return {"a": 2.0 * shared[0] ** 2, "b": shared[1] ** 2}

    balancer.combine(losses(), [shared])  # L(0) = (2, 1)
    with torch.no_grad():
        shared.copy_(torch.tensor([0.5, 1.0]))
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.05)

    balancer.combine(losses(), [shared]).backward()
    assert balancer.grad_norms() == pytest.approx({"a": 2.0, "b": 2.0})
    optimizer.step()
    balancer.after_step()

    weights = balancer.weights()
    assert weights["b"] > 1.0 > weights["a"]
    assert weights["a"] + weights["b"] == pytest.approx(2.0)


def test_gradnorm_weights_always_sum_to_number_of_tasks() -> None:
    torch.manual_seed(3)
    x = torch.randn(128, 8)
    targets = [x @ torch.randn(8, 1), 30.0 * torch.randn(128, 1), torch.randn(128, 1)]
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in TASKS)
    net = nn.ModuleList([trunk, heads])
    balancer = make_balancer("gradnorm", TASKS)
    sums: list[float] = []
    minima: list[float] = []

    def losses() -> dict[str, Tensor]:
        z = trunk(x)
        return {task: nn.functional.mse_loss(heads[i](z), targets[i]) for i, task in enumerate(TASKS)}

    def record() -> None:
        weights = balancer.weights()
        sums.append(sum(weights.values()))
        minima.append(min(weights.values()))

    _train(net, balancer, losses, list(trunk[2].parameters()), steps=100, balancer_lr=0.05, on_step=record)

    assert sums == pytest.approx([3.0] * 100)
    assert min(minima) > 0


def test_gradnorm_weight_grad_survives_zero_grad_between_combine_and_backward() -> None:
    net, losses_fn = _scaled_problem(seed=4, scale_b=100.0)
    balancer = make_balancer("gradnorm", ["a", "b"])
    assert isinstance(balancer, GradNormBalancer)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.01)
    balancer.combine(losses_fn(), net.shared())  # records L_i(0)
    total = balancer.combine(losses_fn(), net.shared())
    expected_value = total.item()

    optimizer.zero_grad(set_to_none=False)  # the order a trainer may well use
    total.backward()

    grad = balancer.loss_weights.grad
    assert grad is not None and torch.all(grad != 0)
    # The weight-update term adds exactly nothing to the reported loss.
    assert total.item() == expected_value
    losses = losses_fn()
    assert expected_value == pytest.approx((losses["a"] + losses["b"]).item())


def test_gradnorm_tolerates_task_whose_loss_does_not_reach_shared_layer() -> None:
    shared = nn.Parameter(torch.tensor([1.0, -2.0]))
    head_only = nn.Parameter(torch.tensor(3.0))
    balancer = make_balancer("gradnorm", ["a", "b", "c"])
    assert isinstance(balancer, GradNormBalancer)
    optimizer = torch.optim.SGD([shared, head_only, *balancer.parameters()], lr=0.01)

    for _ in range(3):
        optimizer.zero_grad()
        losses = {
            "a": (shared**2).sum(),
            "b": head_only**2,  # no path to W
            "c": torch.tensor(0.5),  # no gradient at all
        }
        total = balancer.combine(losses, [shared])
        total.backward()
        optimizer.step()
        balancer.after_step()
        grad = balancer.loss_weights.grad
        assert grad is not None and float(grad[1]) == 0.0 and float(grad[2]) == 0.0

    assert torch.isfinite(balancer.loss_weights).all()
    assert head_only.grad is not None and float(head_only.grad) != 0.0
    assert balancer.grad_norms()["b"] == 0.0


def test_gradnorm_records_initial_loss_when_task_first_appears() -> None:
    shared = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = make_balancer("gradnorm", ["a", "b"])
    assert isinstance(balancer, GradNormBalancer)

    balancer.combine({"a": (shared[0] - 4.0) ** 2}, [shared])
    balancer.combine({"a": (shared[0] - 2.0) ** 2, "b": shared[1] ** 2}, [shared])

    torch.testing.assert_close(balancer.initial_losses, torch.tensor([9.0, 4.0]))


def test_gradnorm_combine_under_no_grad_only_weighs_losses() -> None:
    shared = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = make_balancer("gradnorm", ["a", "b"])
    assert isinstance(balancer, GradNormBalancer)

    with torch.no_grad():
        total = balancer.combine({"a": shared[0] ** 2, "b": shared[1] ** 2}, [shared])

    assert total.item() == pytest.approx(5.0)
    assert torch.isnan(balancer.initial_losses).all()
    assert balancer.loss_weights.grad is None


def test_gradnorm_combine_without_shared_parameters_raises() -> None:
    balancer = make_balancer("gradnorm", ["a"])
    p = nn.Parameter(torch.ones(()))

    with pytest.raises(ValueError, match="shared"):
        balancer.combine({"a": p * 2.0}, [])


def test_gradnorm_state_dict_round_trips_weights_and_initial_losses() -> None:
    shared = nn.Parameter(torch.tensor([1.0, 2.0]))
    balancer = make_balancer("gradnorm", ["a", "b"])
    balancer.combine({"a": shared[0] ** 2, "b": shared[1] ** 2}, [shared])
    restored = make_balancer("gradnorm", ["a", "b"])

    restored.load_state_dict(balancer.state_dict())

    assert isinstance(restored, GradNormBalancer)
    torch.testing.assert_close(restored.initial_losses, torch.tensor([1.0, 4.0]))
