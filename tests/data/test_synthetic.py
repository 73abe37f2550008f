"""The synthetic database: deterministic, well-formed, and learnable from the graph."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from service.data.labels import make_labels, make_splits
from service.data.loader import validate_tables
from service.data.schema import ECOMMERCE_SCHEMA, Database
from service.data.synthetic import PERSONAS, SyntheticTruth, generate, generate_with_truth

N = 3000


@pytest.fixture(scope="module")
def synthetic() -> tuple[Database, SyntheticTruth]:
    return generate_with_truth(N, seed=7)


def per_customer_counts(db: Database, column: npt.NDArray[np.int64], k: int) -> npt.NDArray[np.int64]:
    """Purchases of each customer (rows by customer_id - 1) in each of ``k`` groups of ``column``."""
    counts = np.zeros((len(db.customers), k), dtype=np.int64)
    np.add.at(counts, (db.transactions["customer_id"].to_numpy() - 1, column), 1)
    return counts


def test_generate_same_seed_gives_the_same_database() -> None:
    a, b = generate(500, seed=1), generate(500, seed=1)

    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name])
    assert a.segments is not None and b.segments is not None
    pd.testing.assert_frame_equal(a.segments, b.segments)
    assert a.snapshot_id() == b.snapshot_id()


def test_generate_different_seeds_differ() -> None:
    a, b = generate(500, seed=1), generate(500, seed=2)

    assert a.snapshot_id() != b.snapshot_id()
    assert not a.transactions["amount"].equals(b.transactions["amount"])


def test_generate_shapes_and_ranges(synthetic: tuple[Database, SyntheticTruth]) -> None:
    db, _ = synthetic
    c, p, tx = db.customers, db.tables["products"], db.transactions

    assert db.schemas == ECOMMERCE_SCHEMA
    assert len(c) == N and c["customer_id"].tolist() == list(range(1, N + 1))
    assert len(p) == 200  # max(200, N // 50)
    assert 7 * N < len(tx) < 14 * N
    assert p["category"].nunique() == 12
    assert tx["quantity"].between(1, 5).all() and (tx["amount"] > 0).all()
    start, end = pd.Timestamp("2023-01-01"), pd.Timestamp("2023-01-01") + pd.Timedelta(days=730)
    assert c["signup_time"].between(start, start + 0.8 * (end - start)).all()
    assert tx["timestamp"].between(start, end).all() and tx["timestamp"].is_monotonic_increasing
    signup = c["signup_time"].to_numpy()[tx["customer_id"].to_numpy() - 1]
    assert (tx["timestamp"].to_numpy() >= signup).all()
    assert db.segment_rule == "table" and db.segments is not None
    assert len(db.segments) == round(0.2 * N)


def test_generate_output_is_already_valid_loader_output(synthetic: tuple[Database, SyntheticTruth]) -> None:
    db, _ = synthetic

    checked = validate_tables(db.schemas, db.tables)

    for name in db.tables:
        pd.testing.assert_frame_equal(checked[name], db.tables[name])


def test_generate_keeps_hidden_truth_out_of_tables(synthetic: tuple[Database, SyntheticTruth]) -> None:
    db, _ = synthetic

    for name, df in db.tables.items():
        assert list(df.columns) == [c.name for c in db.schemas[name].columns]


def test_generate_segments_are_the_hidden_personas(synthetic: tuple[Database, SyntheticTruth]) -> None:
    db, truth = synthetic
    assert db.segments is not None

    persona = np.asarray(PERSONAS)[truth.persona[db.segments["customer_id"].to_numpy() - 1]]

    assert (db.segments["segment"].to_numpy() == persona).all()
    assert set(db.segments["segment"]) == set(PERSONAS)


def test_persona_shows_in_which_products_customers_buy(synthetic: tuple[Database, SyntheticTruth]) -> None:
    db, truth = synthetic
    product_rows = db.transactions["product_id"].to_numpy() - 1
    counts = per_customer_counts(db, truth.product_cluster[product_rows], len(PERSONAS))
    buyers = counts.sum(axis=1) >= 3

    # Each persona buys mostly from its own product cluster ...
    shares = counts[buyers] / counts[buyers].sum(axis=1, keepdims=True)
    for k in range(len(PERSONAS)):
        mean_share = shares[truth.persona[buyers] == k].mean(axis=0)
        assert mean_share[k] > 0.55
        assert np.delete(mean_share, k).max() < 0.2
    # ... so the most-bought cluster names the persona, unsupervised ...
    from_products = (counts[buyers].argmax(axis=1) == truth.persona[buyers]).mean()
    assert from_products > 0.9
    # ... while the best per-cell guess from the customer's own attributes (fitted in-sample, so an
    # upper bound) stays far below. The most common persona alone scores 0.25.
    c = db.customers[buyers]
    cells = pd.DataFrame(
        {"persona": truth.persona[buyers], "region": c["region"], "channel": c["channel"], "age": c["age"] // 10}
    )
    guess = cells.groupby(["region", "channel", "age"])["persona"].transform(lambda s: s.mode().iloc[0])
    from_attributes = (guess == cells["persona"]).mean()
    assert from_attributes < 0.5
    assert from_products - from_attributes > 0.4


def test_product_clusters_are_not_categories(synthetic: tuple[Database, SyntheticTruth]) -> None:
    db, truth = synthetic
    products = pd.DataFrame({"cluster": truth.product_cluster, "category": db.tables["products"]["category"]})

    per_cluster = products.groupby("cluster")["category"]

    assert (per_cluster.nunique() >= 8).all()
    assert (per_cluster.agg(lambda s: s.value_counts(normalize=True).iloc[0]) < 0.5).all()


def test_churn_and_ltv_depend_on_persona_and_activity(synthetic: tuple[Database, SyntheticTruth]) -> None:
    db, truth = synthetic
    labels = make_labels(db, make_splits(db)["test"][0])
    rows = labels["customer_id"].to_numpy() - 1
    frame = pd.DataFrame(
        {
            "persona": np.asarray(PERSONAS)[truth.persona[rows]],
            "active": truth.activity[rows] > np.median(truth.activity[rows]),
            "churn": labels["churn"],
            "ltv": labels["ltv"],
        }
    )

    by_persona = frame.groupby("persona")[["churn", "ltv"]].mean()
    assert by_persona.loc["occasional", "churn"] - by_persona.loc["home_maker", "churn"] > 0.25
    assert by_persona["ltv"].idxmin() == "occasional"
    assert by_persona["ltv"].max() > 3 * by_persona.loc["occasional", "ltv"]
    by_activity = frame.groupby("active")[["churn", "ltv"]].mean()
    assert by_activity.loc[True, "churn"] < by_activity.loc[False, "churn"] - 0.15
    assert by_activity.loc[True, "ltv"] > 2 * by_activity.loc[False, "ltv"]
    assert 0.3 < frame["churn"].mean() < 0.7  # some churn, not all


def test_generate_honours_products_dates_and_fraction() -> None:
    db = generate(400, seed=0, products=20, start="2020-06-01", days=100, segment_fraction=0.5)

    assert len(db.tables["products"]) == 20
    assert db.transactions["timestamp"].min() >= pd.Timestamp("2020-06-01")
    assert db.transactions["timestamp"].max() < pd.Timestamp("2020-06-01") + pd.Timedelta(days=100)
    assert db.segments is not None and len(db.segments) == 200


@pytest.mark.parametrize("kwargs", [{"customers": 0}, {"segment_fraction": 1.5}, {"products": 3}, {"days": 0}], ids=str)
def test_generate_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    args = {"customers": 10, "seed": 0, **kwargs}

    with pytest.raises(ValueError):
        generate(**args)  # type: ignore[arg-type]
