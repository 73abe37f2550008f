"""The CDNOW purchase log as a database."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from service.data.cdnow import CDNOW_SCHEMA, load_cdnow
from service.data.errors import DataError
from service.data.labels import make_labels, make_splits, segment_classes

needs_lifetimes = pytest.mark.skipif(
    importlib.util.find_spec("lifetimes") is None, reason="the CDNOW log ships with the lifetimes package"
)


@needs_lifetimes
def test_load_cdnow_reads_the_whole_log() -> None:
    db = load_cdnow()

    assert db.name == "cdnow" and db.segment_rule == "rfm" and db.segments is None
    assert db.schemas == CDNOW_SCHEMA and set(db.tables) == {"customers", "transactions"}
    assert len(db.customers) == 23_570
    assert len(db.transactions) == 69_659
    assert db.transactions["timestamp"].min() == pd.Timestamp("1997-01-01")
    assert db.max_time == pd.Timestamp("1998-06-30")
    assert set(db.customers["cohort"]) == {"1997-01", "1997-02", "1997-03"}
    first = db.transactions.groupby("customer_id")["timestamp"].min()
    assert (db.customers.set_index("customer_id")["signup_time"] == first).all()


@needs_lifetimes
def test_load_cdnow_keeps_several_orders_of_one_day() -> None:
    tx = load_cdnow().transactions

    two = tx[tx["customer_id"] == 2]  # the log's rows 2 and 3: 1 CD for $12, 5 CDs for $77 on 1997-01-12
    assert two["timestamp"].tolist() == [pd.Timestamp("1997-01-12")] * 2
    assert sorted(two["amount"]) == [12.0, 77.0]
    assert sorted(two["quantity"]) == [1.0, 5.0]


@needs_lifetimes
def test_cdnow_labels_have_rfm_segments() -> None:
    db = load_cdnow()

    labels = make_labels(db, make_splits(db)["test"][0])

    assert len(labels) == 23_570  # everyone bought in the first quarter of 1997
    assert set(labels["segment"]) == set(segment_classes(db))
    assert ((labels["segment"] == "none") == (labels["churn"] == 1.0)).all()


def test_load_cdnow_from_a_path(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text(
        " customer_id  date number_of_cds  dollar_value\r\n"
        " 00007 19970102  1   11.77\r\n 00002 19970112  5   77.00\r\n 00007 19970301  2   20.00\r\n"
    )

    db = load_cdnow(log)

    assert db.customers["customer_id"].tolist() == [2, 7]
    assert db.customers["signup_time"].tolist() == [pd.Timestamp("1997-01-12"), pd.Timestamp("1997-01-02")]
    assert db.customers["cohort"].tolist() == ["1997-01", "1997-01"]
    assert db.transactions["customer_id"].tolist() == [7, 2, 7]  # sorted by time


def test_load_cdnow_bad_row_names_file_column_and_row(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("customer_id date number_of_cds dollar_value\n1 19970102 1 11.77\n2 19971341 1 5\n")

    with pytest.raises(DataError, match=r"^log.txt: column 'date', row 2: expected a date YYYYMMDD, got '19971341'$"):
        load_cdnow(log)


def test_load_cdnow_without_lifetimes_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    with pytest.raises(DataError, match=r"pip install lifetimes==0\.11\.3"):
        load_cdnow()
