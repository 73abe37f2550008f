"""Temporal labels and splits: exact on a hand-made database, and blind to the future."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from service.data.errors import DataError
from service.data.labels import (
    RFM_CLASSES,
    TaskWindow,
    database_at,
    eligible_customers,
    make_labels,
    make_splits,
    segment_classes,
)
from service.data.schema import Database
from service.data.synthetic import generate
from tests.data.tables import database

T = pd.Timestamp("2023-03-01")
W = pd.Timedelta(days=10)


def tiny(segment_rule: str = "table") -> Database:
    """Customers 1-5 around cutoff T = 2023-03-01 with a 10-day window (ends 2023-03-11)."""
    return database(
        customers=[
            (1, "2023-01-01"),  # bought before T and in the window
            (2, "2023-01-01"),  # bought before T only: churns
            (3, "2023-02-01"),  # bought exactly at T (counts as the past) and exactly at T + W (the window)
            (4, "2023-02-15"),  # signed up before T, first purchase after T: not eligible
            (5, "2023-03-05"),  # signed up after T: not eligible
        ],
        transactions=[
            (1, "2023-01-10", 5.0),
            (1, "2023-03-02", 20.0),
            (1, "2023-03-09", 15.0),
            (2, "2023-02-01", 99.0),
            (2, "2023-03-11 00:00:01", 50.0),  # just after the window
            (3, "2023-03-01", 7.0),
            (3, "2023-03-11", 100.0),
            (4, "2023-03-03", 8.0),
            (5, "2023-03-06", 9.0),
        ],
        segments={1: "gold", 4: "silver"},
        segment_rule=segment_rule,
    )


def brute_force_labels(db: Database, cutoff: pd.Timestamp, window: pd.Timedelta) -> list[tuple[int, float, float]]:
    """The definition, row by row."""
    out = []
    for _, c in db.customers.sort_values("customer_id").iterrows():
        mine = [r for _, r in db.transactions.iterrows() if r["customer_id"] == c["customer_id"]]
        if c["signup_time"] > cutoff or not any(r["timestamp"] <= cutoff for r in mine):
            continue
        future = [r["amount"] for r in mine if cutoff < r["timestamp"] <= cutoff + window]
        out.append((int(c["customer_id"]), float(not future), float(sum(future))))
    return out


def test_make_labels_matches_hand_computed_values() -> None:
    labels = make_labels(tiny(), T, W)

    assert labels["customer_id"].tolist() == [1, 2, 3]
    assert labels["churn"].tolist() == [0.0, 1.0, 0.0]
    assert labels["ltv"].tolist() == [35.0, 0.0, 100.0]
    assert labels["segment"].tolist() == ["gold", None, None]
    assert labels.dtypes.to_dict() == {
        "customer_id": np.dtype("int64"),
        "churn": np.dtype("float32"),
        "ltv": np.dtype("float32"),
        "segment": np.dtype("object"),
    }


@pytest.mark.parametrize("days", [1, 10, 30, 90])
@pytest.mark.parametrize("cutoff", ["2023-02-01", "2023-03-01", "2023-03-05 12:00"])
def test_make_labels_matches_brute_force(cutoff: str, days: int) -> None:
    db = tiny()

    labels = make_labels(db, pd.Timestamp(cutoff), pd.Timedelta(days=days))

    got = list(zip(labels["customer_id"], labels["churn"], labels["ltv"], strict=True))
    assert got == brute_force_labels(db, pd.Timestamp(cutoff), pd.Timedelta(days=days))


def test_make_labels_rfm_segments_are_spend_tiers_of_the_window() -> None:
    db = database(
        customers=[(i, "2023-01-01") for i in range(1, 7)],
        transactions=[(i, "2023-02-01", 1.0) for i in range(1, 7)]
        + [(2, "2023-03-02", 29.99), (3, "2023-03-02", 30.0), (4, "2023-03-02", 99.99), (5, "2023-03-02", 100.0)]
        + [(6, "2023-03-02", 0.0)],  # a purchase of $0 is still a purchase
        segment_rule="rfm",
    )

    labels = make_labels(db, T, W)

    assert labels["segment"].tolist() == ["none", "low", "mid", "mid", "high", "low"]
    assert segment_classes(db) == ["none", "low", "mid", "high"] == list(RFM_CLASSES)


def test_segment_classes_of_a_label_table_are_sorted_names() -> None:
    assert segment_classes(tiny()) == ["gold", "silver"]
    assert segment_classes(database([(1, "2023-01-01")], [(1, "2023-01-02", 1.0)])) == []


def test_make_labels_accepts_time_zone_aware_cutoffs() -> None:
    aware = pd.Timestamp("2023-03-01 02:00", tz="Europe/Berlin")  # 01:00 UTC

    pd.testing.assert_frame_equal(make_labels(tiny(), aware, W), make_labels(tiny(), T + pd.Timedelta(hours=1), W))


def test_nothing_after_the_window_changes_labels() -> None:
    db = generate(600, seed=5)
    cutoff = make_splits(db, pd.Timedelta(days=60))["val"][0]
    window = pd.Timedelta(days=60)

    full = make_labels(db, cutoff, window)
    cut = make_labels(database_at(db, cutoff + window), cutoff, window)

    pd.testing.assert_frame_equal(full, cut)


def test_nothing_after_the_cutoff_changes_who_is_eligible() -> None:
    db = generate(600, seed=5)
    cutoff = make_splits(db)["val"][0]
    # Rewrite the future: every customer buys right after the cutoff, for a fortune.
    future = pd.DataFrame(
        {
            "customer_id": db.customers["customer_id"],
            "product_id": np.int64(1),
            "timestamp": cutoff + pd.Timedelta(seconds=1),
            "quantity": 1.0,
            "amount": 1e6,
        }
    )
    tables = dict(db.tables)
    tables["transactions"] = pd.concat([db.transactions, future], ignore_index=True)
    changed = Database(db.name, db.schemas, tables, db.segments, db.segment_rule)

    eligible = eligible_customers(db, cutoff)
    np.testing.assert_array_equal(eligible, eligible_customers(database_at(db, cutoff), cutoff))
    np.testing.assert_array_equal(eligible, eligible_customers(changed, cutoff))
    assert make_labels(changed, cutoff)["customer_id"].tolist() == eligible.tolist()
    assert (make_labels(changed, cutoff)["churn"] == 0).all()


def test_database_at_keeps_only_the_past_and_stays_consistent() -> None:
    db = generate(600, seed=5)
    cutoff = pd.Timestamp("2023-09-01")

    past = database_at(db, cutoff)

    assert (past.customers["signup_time"] <= cutoff).all()
    assert (past.transactions["timestamp"] <= cutoff).all()
    assert len(past.transactions) == (db.transactions["timestamp"] <= cutoff).sum()
    assert past.transactions["customer_id"].isin(past.customers["customer_id"]).all()
    assert past.tables["products"] is db.tables["products"]  # static table, shared
    assert past.segments is not None
    assert past.segments["customer_id"].isin(past.customers["customer_id"]).all()
    assert 0 < len(past.segments) < len(db.segments)  # type: ignore[arg-type]
    assert past.transactions.index.tolist() == list(range(len(past.transactions)))


def test_make_splits_gives_successive_cutoffs_one_window_apart() -> None:
    db = generate(300, seed=0)
    w = pd.Timedelta(days=90)

    splits = make_splits(db, w, num_train_cutoffs=3)

    assert splits["test"] == [db.max_time - w]
    assert splits["val"] == [db.max_time - 2 * w]
    assert splits["train"] == [db.max_time - 5 * w, db.max_time - 4 * w, db.max_time - 3 * w]
    assert all(isinstance(t, pd.Timestamp) for ts in splits.values() for t in ts)


def test_make_splits_refuses_a_short_history() -> None:
    db = generate(300, seed=0, days=200)

    with pytest.raises(DataError, match="too short"):
        make_splits(db, pd.Timedelta(days=90), num_train_cutoffs=1)


@pytest.mark.parametrize("window", [pd.Timedelta(0), pd.Timedelta(days=-1)])
def test_windows_must_be_positive(window: pd.Timedelta) -> None:
    with pytest.raises(ValueError, match="window must be positive"):
        make_labels(tiny(), T, window)
    with pytest.raises(ValueError, match="window must be positive"):
        TaskWindow(T, window)


def test_task_window_ends_one_window_after_the_cutoff() -> None:
    assert TaskWindow(T, W).end == pd.Timestamp("2023-03-11")
