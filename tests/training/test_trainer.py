"""Training end to end on a tiny synthetic database."""

from __future__ import annotations

import pytest
import torch

from service.data.sources import load_source
from service.training.trainer import train
from tests.helpers import TINY_SOURCE, tiny_train_config


@pytest.fixture(scope="module")
def db():
    return load_source(TINY_SOURCE)


def test_train_reports_every_metric_on_successive_cutoffs(db):
    result = train(db, tiny_train_config())
    assert set(result.test_metrics) == {"churn", "ltv", "segment", "combined"}
    assert {"auroc", "ap"} == set(result.test_metrics["churn"])
    assert {"mae", "rmse"} == set(result.test_metrics["ltv"])
    assert {"accuracy", "macro_f1"} == set(result.test_metrics["segment"])
    s = result.splits
    assert s["train"] == sorted(s["train"]) and s["train"][-1] < s["val"][0] < s["test"][0]
    assert len(result.history) >= 1 and result.best_epoch >= 1


def test_train_is_deterministic_under_a_seed_on_cpu(db):
    a = train(db, tiny_train_config(seed=3))
    b = train(db, tiny_train_config(seed=3))
    for (k, va), (_, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    assert a.test_metrics == b.test_metrics


def test_single_task_mode_trains_one_head(db):
    result = train(db, tiny_train_config(tasks=("churn",), loss="equal"))
    assert list(result.model.heads) == ["churn"]
    assert set(result.test_metrics) == {"churn", "combined"}


@pytest.mark.parametrize("loss", ["fixed", "equal", "uncertainty", "gradnorm"])
def test_every_loss_balancer_trains(db, loss):
    weights = {"churn": 1.0, "ltv": 0.5, "segment": 1.0} if loss == "fixed" else None
    result = train(db, tiny_train_config(loss=loss, fixed_weights=weights, epochs=1))
    assert set(result.balancer_weights) == {"churn", "ltv", "segment"}
    assert all(v > 0 for v in result.balancer_weights.values())


def test_unknown_task_is_refused_with_its_name():
    with pytest.raises(ValueError, match="upsell"):
        tiny_train_config(tasks=("churn", "upsell"))
