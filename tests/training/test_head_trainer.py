"""`onepass train-head`: a new head on a stored model's frozen encoder, written as a head version."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.data.labels import database_at
from service.data.schema import Database
from service.data.sources import load_source
from service.graph.temporal import build_graph, to_seconds
from service.store.store import ModelStore
from service.training.head_trainer import DEMO_TASKS, embed, infer_kind, train_new_head
from tests.helpers import TINY_SOURCE


@pytest.fixture
def store_root(model_store: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny store: these tests write head versions."""
    root = tmp_path / "store"
    shutil.copytree(model_store, root)
    return root


@pytest.fixture(scope="module")
def db() -> Database:
    return load_source(TINY_SOURCE)


def _train(store_root: Path, task: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"labels": None, "demo_task": None, "kind": None, "epochs": 5, "seed": 0,
                               "data_dir": None, "device": "cpu"}  # fmt: skip
    args.update(kw)
    return train_new_head(store_root, "tiny", None, task, **args)


def _write_labels(path: Path, ids: list[int], labels: list[object]) -> Path:
    df = pd.DataFrame({"customer_id": ids, "label": labels})
    if path.suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
    return path


def _tx_counts(db: Database) -> pd.Series:
    return db.transactions.groupby("customer_id").size().reindex(db.customers["customer_id"], fill_value=0)


def test_active_30d_labels_follow_definition(db: Database) -> None:
    labels = DEMO_TASKS["active_30d"](db)
    cutoff = db.max_time - pd.Timedelta(days=30)
    assert labels.cutoff == int(to_seconds(cutoff)[0])
    tx, cust = db.transactions, db.customers.set_index("customer_id")
    expected = {}
    for cid, mine in tx.groupby("customer_id"):
        if cust.loc[cid, "signup_time"] > cutoff or not (mine["timestamp"] <= cutoff).any():
            continue
        future = (mine["timestamp"] > cutoff) & (mine["timestamp"] <= cutoff + pd.Timedelta(days=30))
        expected[int(cid)] = float(future.any())
    assert dict(zip(labels.customer_ids.tolist(), labels.targets.tolist(), strict=True)) == expected
    assert 0 < sum(expected.values()) < len(expected)  # both classes present


def test_demo_embeddings_see_nothing_after_the_cutoff(store_root: Path, db: Database) -> None:
    # Embeddings as of T on the full graph equal those on the database cut at T: no future row leaks.
    model = ModelStore(store_root).load("tiny")
    labels = DEMO_TASKS["active_30d"](db)
    cutoff = pd.Timestamp(labels.cutoff, unit="s")
    full = build_graph(db, spec=model.spec)
    past = build_graph(database_at(db, cutoff), spec=model.spec)
    ids = torch.as_tensor(labels.customer_ids[:64])
    cpu = torch.device("cpu")
    a = embed(model.encoder, full, full.lookup("customers", ids), labels.cutoff, cpu)
    b = embed(model.encoder, past, past.lookup("customers", ids), labels.cutoff, cpu)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_train_demo_head_writes_head_version(store_root: Path) -> None:
    hv, metrics = _train(store_root, "active_30d", demo_task="active_30d")
    store = ModelStore(store_root)
    model = store.load("tiny")
    assert hv == "v1"
    assert store.head_versions("tiny", "v1", "active_30d") == ["v1"]
    record = store.load_head("tiny", "v1", "active_30d", "v1")
    assert record.spec.kind == "binary" and record.spec.classes == ()
    assert record.trained_on == model.encoder_hash
    assert record.metrics == metrics
    assert set(metrics["val"]) == {"auroc", "ap"}
    assert metrics["train_size"] + metrics["val_size"] == len(
        DEMO_TASKS["active_30d"](load_source(TINY_SOURCE)).customer_ids
    )
    assert metrics["labels"] == "demo:active_30d"
    head = record.build(model.config.hidden)
    assert all(bool(torch.isfinite(p).all()) for p in head.parameters())


def test_label_file_binary_head_learns_a_signal_the_encoder_sees(
    store_root: Path, db: Database, tmp_path: Path
) -> None:
    counts = _tx_counts(db)
    label = (counts > counts.median()).astype(int)  # heavy buyers: visible in the transaction neighbourhood
    path = _write_labels(tmp_path / "labels.csv", counts.index.tolist(), label.tolist())
    hv, metrics = _train(store_root, "heavy_buyer", labels=path, epochs=40)
    assert hv == "v1" and metrics["kind"] == "binary"
    assert metrics["val"]["auroc"] > 0.6  # 0.5 = no signal; the encoder trained for 2 epochs


def test_label_file_parquet_strings_give_multiclass_with_sorted_classes(
    store_root: Path, db: Database, tmp_path: Path
) -> None:
    counts = _tx_counts(db)
    names = np.where(counts > counts.quantile(0.66), "many", np.where(counts > counts.quantile(0.33), "some", "few"))
    path = _write_labels(tmp_path / "labels.parquet", counts.index.tolist(), names.tolist())
    hv, metrics = _train(store_root, "buyer_tier", labels=path)
    record = ModelStore(store_root).load_head("tiny", "v1", "buyer_tier", hv)
    assert record.spec.kind == "multiclass"
    assert record.spec.classes == ("few", "many", "some")
    assert set(metrics["val"]) == {"accuracy", "macro_f1"}


def test_label_file_amounts_give_regression(store_root: Path, db: Database, tmp_path: Path) -> None:
    spend = db.transactions.groupby("customer_id")["amount"].sum()
    path = _write_labels(tmp_path / "spend.csv", spend.index.tolist(), spend.round(2).tolist())
    _, metrics = _train(store_root, "total_spend", labels=path)
    assert metrics["kind"] == "regression"
    assert set(metrics["val"]) == {"mae", "rmse"}


@pytest.mark.parametrize(
    ("values", "kind"),
    [([0, 1, 1, 0], "binary"), ([True, False, True, True], "binary"), ([0.5, 2.0, 0, 1], "regression"),
     ([3, 0, 1, 2], "regression"), (["a", "b", "a", "c"], "multiclass")],
)  # fmt: skip
def test_infer_kind(values: list[object], kind: str) -> None:
    assert infer_kind(pd.Series(values)) == kind


def test_unknown_customer_ids_are_named(store_root: Path, db: Database, tmp_path: Path) -> None:
    ids = db.customers["customer_id"].tolist()[:20] + [10_000_001, 10_000_002, 10_000_003, 10_000_004,
                                                         10_000_005, 10_000_006, 10_000_007]  # fmt: skip
    path = _write_labels(tmp_path / "labels.csv", ids, [i % 2 for i in range(len(ids))])
    with pytest.raises(ValueError) as e:
        _train(store_root, "x", labels=path)
    assert str(e.value) == (
        "labels.csv: unknown customer_id(s) 10000001, 10000002, 10000003, 10000004, 10000005 and 2 more "
        "(not in tiny's database)"
    )
    assert ModelStore(store_root).head_versions("tiny", "v1", "x") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,label\n1,0\n", "labels.csv: missing column(s) customer_id (expected customer_id,label)"),
        ("customer_id,label\n1,0\n1.5,1\n", "labels.csv: column 'customer_id', row 2: expected an integer, got 1.5"),
        ("customer_id,label\n1,0\n2,\n", "labels.csv: column 'label', row 2: missing label"),
        ("customer_id,label\n" + "".join(f"{i},{i % 2}\n" for i in range(1, 12)) + "3,1\n",
         "labels.csv: customer_id repeated: 3"),
        ("customer_id,label\n1,0\n2,1\n", "labels.csv: 2 labelled customers, at least 10 are needed"),
    ],
    ids=["no-id-column", "float-id", "missing-label", "duplicate-id", "too-few"],
)  # fmt: skip
def test_bad_label_file_raises_value_error(store_root: Path, tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        _train(store_root, "x", labels=path)
    assert str(e.value) == message


def test_existing_task_keeps_its_kind(store_root: Path, db: Database, tmp_path: Path) -> None:
    hv, _ = _train(store_root, "churn", demo_task="active_30d")
    assert hv == "v2"  # v1 is the head trained with the encoder
    with pytest.raises(ValueError, match="task 'ltv' is already a regression head in tiny/v1; these labels give "
                                         "a binary head: use a new task name"):  # fmt: skip
        _train(store_root, "ltv", demo_task="active_30d")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "give exactly one of --labels FILE or --demo-task NAME"),
        ({"demo_task": "active_30d", "labels": Path("x.csv")}, "give exactly one of --labels FILE or --demo-task NAME"),
        ({"demo_task": "nope"}, "--demo-task must be one of active_30d, spend_30d, got 'nope'"),
        ({"demo_task": "active_30d", "kind": "ordinal"}, "--kind must be one of binary, regression, multiclass"),
        ({"demo_task": "active_30d", "kind": "regression"}, "demo task 'active_30d' is a binary task, not regression"),
    ],
)
def test_bad_arguments_raise_value_error(store_root: Path, kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _train(store_root, "x", **kw)


def test_missing_label_file_raises_file_not_found(store_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        _train(store_root, "x", labels=tmp_path / "absent.csv")


def test_task_name_must_be_a_store_name(store_root: Path) -> None:
    with pytest.raises(Exception, match="is not a valid name"):
        _train(store_root, "../escape", demo_task="active_30d")


def test_same_seed_gives_same_weights(store_root: Path) -> None:
    a, _ = _train(store_root, "active_30d", demo_task="active_30d", seed=7)
    b, _ = _train(store_root, "active_30d", demo_task="active_30d", seed=7)
    store = ModelStore(store_root)
    ra, rb = (store.load_head("tiny", "v1", "active_30d", v) for v in (a, b))
    assert (a, b) == ("v1", "v2")
    for (k, va), (_, vb) in zip(ra.build(16).state_dict().items(), rb.build(16).state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


def test_cli_train_head(store_root: Path) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["train-head", "--model", "tiny/v1", "--task", "spend_30d", "--demo-task", "spend_30d", "--store",
         str(store_root), "--epochs", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "saved head spend_30d/v1 for tiny/v1" in result.output
    assert ModelStore(store_root).head_versions("tiny", "v1", "spend_30d") == ["v1"]


def test_cli_train_head_reports_errors(store_root: Path) -> None:
    result = CliRunner().invoke(cli_app, ["train-head", "--model", "tiny", "--task", "x", "--store", str(store_root)])
    assert result.exit_code == 2
    assert "give exactly one of --labels FILE or --demo-task NAME" in result.output
