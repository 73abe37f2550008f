"""Loading, validating and saving database folders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service.data.cdnow import CDNOW_SCHEMA
from service.data.loader import DataError, load_database, save_database, validate_tables
from service.data.schema import ECOMMERCE_SCHEMA, Database
from service.data.synthetic import generate
from tests.data.tables import CSV, write_folder


def assert_same_database(a: Database, b: Database) -> None:
    assert a.name == b.name
    assert a.segment_rule == b.segment_rule
    assert a.schemas == b.schemas
    assert a.tables.keys() == b.tables.keys()
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name])
    if a.segments is None:
        assert b.segments is None
    else:
        pd.testing.assert_frame_equal(a.segments, b.segments)
    assert a.snapshot_id() == b.snapshot_id()


def test_load_csv_folder_coerces_every_kind(tmp_path: Path) -> None:
    db = load_database(write_folder(tmp_path / "shop"))

    assert db.name == "shop"
    assert db.segment_rule == "table"
    assert db.schemas == ECOMMERCE_SCHEMA
    c = db.customers
    assert c["customer_id"].dtype == np.int64
    assert c["signup_time"].dtype == "datetime64[ns]"
    assert c["age"].dtype == np.float64
    assert c["region"].dtype == "str"
    assert c["region"].tolist() == ["north", "NA", "south"]
    assert db.tables["products"]["price"].tolist() == [12.5, 30.0]
    assert db.segments is not None
    assert db.segments["segment"].tolist() == ["gold", "silver"]


def test_load_sorts_transactions_by_timestamp_with_fresh_index(tmp_path: Path) -> None:
    csv = CSV["transactions.csv"] + "2,10,2023-01-06T10:00:00,1,12.5\n"  # ties row 2: stays after it
    db = load_database(write_folder(tmp_path, {"transactions.csv": csv}))

    tx = db.transactions
    assert tx["timestamp"].is_monotonic_increasing
    assert tx.index.tolist() == [0, 1, 2, 3, 4]
    assert tx["amount"].tolist() == [12.5, 30.0, 60.0, 12.5, 37.5]


def test_load_converts_time_zones_to_naive_utc(tmp_path: Path) -> None:
    csv = CSV["customers.csv"].replace("2023-01-05T08:00:00", "2023-01-05T10:00:00+02:00")
    db = load_database(write_folder(tmp_path, {"customers.csv": csv}))

    assert db.customers["signup_time"].iloc[1] == pd.Timestamp("2023-01-05T08:00:00")


def test_load_without_products_drops_the_product_foreign_key(tmp_path: Path) -> None:
    csv = "customer_id,timestamp,amount,quantity\n1,2023-01-02,5,1\n"
    db = load_database(write_folder(tmp_path, {"transactions.csv": csv}, skip=("products.csv",)))

    assert "products" not in db.schemas
    assert [c.name for c in db.schemas["transactions"].columns] == ["customer_id", "timestamp", "quantity", "amount"]
    assert list(db.transactions.columns) == ["customer_id", "timestamp", "quantity", "amount"]


def test_load_reads_name_and_segment_rule_from_database_json(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "x", {"database.json": json.dumps({"name": "shop", "segment_rule": "rfm"})})

    db = load_database(folder)
    assert (db.name, db.segment_rule) == ("shop", "rfm")
    assert load_database(folder, name="other").name == "other"


def test_load_drops_columns_outside_the_schema(tmp_path: Path) -> None:
    csv = (
        CSV["products.csv"].replace("price\n", "price,secret\n").replace("12.5\n", "12.5,x\n").replace("30\n", "30,y\n")
    )
    db = load_database(write_folder(tmp_path, {"products.csv": csv}))

    assert list(db.tables["products"].columns) == ["product_id", "category", "brand", "price"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_save_then_load_round_trips_synthetic_data(tmp_path: Path, fmt: str) -> None:
    db = generate(300, seed=3)

    save_database(db, tmp_path, fmt)  # type: ignore[arg-type]

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{t}.{fmt}" for t in ("customers", "products", "transactions", "segments")] + ["database.json"]
    )
    assert_same_database(load_database(tmp_path), db)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_save_then_load_round_trips_a_custom_schema(tmp_path: Path, fmt: str) -> None:
    tables = validate_tables(
        CDNOW_SCHEMA,
        {
            "customers": pd.DataFrame(
                {"customer_id": [1, 2], "signup_time": ["1997-01-01", "1997-02-03"], "cohort": ["1997-01", "1997-02"]}
            ),
            "transactions": pd.DataFrame(
                {
                    "customer_id": [1, 2, 2],
                    "timestamp": ["1997-01-01", "1997-02-03", "1997-02-03"],
                    "quantity": [1, 2, 5],
                    "amount": [11.77, 12.0, 77.0],
                }
            ),
        },
    )
    db = Database("mini-cdnow", dict(CDNOW_SCHEMA), tables, segment_rule="rfm")

    save_database(db, tmp_path, fmt)  # type: ignore[arg-type]

    assert_same_database(load_database(tmp_path), db)


def test_save_replaces_tables_of_an_earlier_save(tmp_path: Path) -> None:
    save_database(generate(50, seed=0), tmp_path, "csv")
    full = generate(60, seed=1)
    tx = full.schemas["transactions"]
    db = Database(
        "no-products",
        {"customers": full.schemas["customers"], "transactions": replace(tx, columns=tx.columns[:1] + tx.columns[2:])},
        {"customers": full.customers, "transactions": full.transactions.drop(columns="product_id")},
    )

    save_database(db, tmp_path, "parquet")

    assert not list(tmp_path.glob("*.csv"))
    assert not (tmp_path / "products.parquet").exists()
    assert_same_database(load_database(tmp_path), db)


# ----------------------------------------------------------------------------------------- bad data

BAD = {
    # id: (file, old text, new text, column, rows, message)
    "bad number": (
        "transactions.csv", "1,11,2023-01-03,1,30", "1,11,2023-01-03,1,abc", "amount", (3,),
        "transactions.csv: column 'amount', row 3: expected a number, got 'abc'",
    ),
    "negative amount": (
        "transactions.csv", "1,11,2023-01-03,1,30", "1,11,2023-01-03,1,-30", "amount", (3,),
        "transactions.csv: column 'amount', row 3: expected a number >= 0, got -30.0",
    ),
    "missing number": (
        "transactions.csv", "1,11,2023-01-03,1,30", "1,11,2023-01-03,1,", "amount", (3,),
        "transactions.csv: column 'amount', row 3: missing value",
    ),
    "infinite number": (
        "products.csv", "11,toys,bolt,30", "11,toys,bolt,inf", "price", (2,),
        "products.csv: column 'price', row 2: expected a finite number, got inf",
    ),
    "bad time": (
        "transactions.csv", "1,11,2023-01-03,1,30", "1,11,2023-13-45,1,30", "timestamp", (3,),
        "transactions.csv: column 'timestamp', row 3: expected an ISO 8601 date/time, got '2023-13-45'",
    ),
    "bad id": (
        "customers.csv", "3,2023-02-01", "x3,2023-02-01", "customer_id", (3,),
        "customers.csv: column 'customer_id', row 3: expected an integer id, got 'x3'",
    ),
    "fractional id": (
        "products.csv", "11,toys", "11.5,toys", "product_id", (2,),
        "products.csv: column 'product_id', row 2: expected an integer id, got '11.5'",
    ),
    "missing category": (
        "customers.csv", "25,south,web", "25,,web", "region", (3,),
        "customers.csv: column 'region', row 3: missing value",
    ),
    "duplicate id": (
        "customers.csv", "3,2023-02-01", "1,2023-02-01", "customer_id", (3,),
        "customers.csv: column 'customer_id', row 3: duplicate id 1 (already at row 1)",
    ),
    "unknown customer": (
        "transactions.csv", "3,10,2023-02-02", "99,10,2023-02-02", "customer_id", (4,),
        "transactions.csv: column 'customer_id', row 4: 99 not found in column 'customer_id' of customers.csv",
    ),
    "unknown product": (
        "transactions.csv", "2,11,2023-01-06", "2,12,2023-01-06", "product_id", (2,),
        "transactions.csv: column 'product_id', row 2: 12 not found in column 'product_id' of products.csv",
    ),
    "purchase before signup": (
        "transactions.csv", "3,10,2023-02-02", "3,10,2023-01-15", "timestamp", (4,),
        "transactions.csv: column 'timestamp', row 4: timestamp 2023-01-15 00:00:00 is before the signup_time "
        "2023-02-01 00:00:00 of customer_id 3 in customers.csv",
    ),
    "missing column": (
        "customers.csv", "channel\n", "chan\n", "channel", (),
        "customers.csv: column 'channel': missing (the file has 'customer_id', 'signup_time', 'age', 'region', "
        "'chan')",
    ),
    "segment of unknown customer": (
        "segments.csv", "3,silver", "7,silver", "customer_id", (2,),
        "segments.csv: column 'customer_id', row 2: 7 not found in column 'customer_id' of customers.csv",
    ),
    "customer segmented twice": (
        "segments.csv", "3,silver", "1,silver", "customer_id", (2,),
        "segments.csv: column 'customer_id', row 2: duplicate customer 1 (already at row 1)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_load_bad_data_names_file_column_and_row(tmp_path: Path, case: tuple) -> None:  # type: ignore[type-arg]
    file, old, new, column, rows, message = case
    assert old in CSV[file]
    folder = write_folder(tmp_path, {file: CSV[file].replace(old, new)})

    with pytest.raises(DataError) as info:
        load_database(folder)

    assert (info.value.file, info.value.column, info.value.rows) == (file, column, rows)
    assert str(info.value).startswith(message)


def test_load_lists_the_first_offending_rows(tmp_path: Path) -> None:
    lines = ["customer_id,product_id,timestamp,quantity,amount"]
    lines += [f"1,10,2023-01-02,1,{'bad' if i % 2 else 1}" for i in range(20)]
    folder = write_folder(tmp_path, {"transactions.csv": "\n".join(lines) + "\n"})

    with pytest.raises(DataError) as info:
        load_database(folder)

    assert str(info.value) == (
        "transactions.csv: column 'amount', rows 2, 4, 6, 8, 10 and 5 more: "
        "expected a number, got 'bad', 'bad', 'bad', 'bad', 'bad'"
    )
    assert info.value.rows == (2, 4, 6, 8, 10, 12, 14, 16, 18, 20)
    assert info.value.num_rows == 10


def test_load_bad_parquet_value_names_its_row(tmp_path: Path) -> None:
    write_folder(tmp_path, skip=("transactions.csv",))
    pd.DataFrame(
        {
            "customer_id": [1, 2, 1],
            "product_id": [10, 11, 11],
            "timestamp": pd.to_datetime(["2023-01-02", "2023-01-06", "2023-01-07"]),
            "quantity": [1.0, 2.0, np.nan],
            "amount": [1.0, 2.0, 3.0],
        }
    ).to_parquet(tmp_path / "transactions.parquet")

    with pytest.raises(DataError, match=r"^transactions.parquet: column 'quantity', row 3: missing value$"):
        load_database(tmp_path)


def test_load_missing_file_names_file_and_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "shop", skip=("customers.csv",))

    with pytest.raises(DataError) as info:
        load_database(folder)

    assert info.value.file == "customers.csv"
    assert str(info.value) == f"customers.csv (or customers.parquet): not found in folder {folder}"


def test_load_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        load_database(tmp_path / "nowhere")


def test_load_refuses_a_table_in_two_formats(tmp_path: Path) -> None:
    folder = write_folder(tmp_path)
    load_database(folder).customers.to_parquet(folder / "customers.parquet")

    with pytest.raises(DataError, match="customers.parquet and customers.csv both exist"):
        load_database(folder)


def test_load_refuses_product_ids_without_products_table(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, skip=("products.csv",))

    with pytest.raises(DataError) as info:
        load_database(folder)

    assert (info.value.file, info.value.column) == ("transactions.csv", "product_id")


def test_load_refuses_unknown_segment_rule(tmp_path: Path) -> None:
    folder = write_folder(tmp_path, {"database.json": '{"segment_rule": "magic"}'})

    with pytest.raises(DataError, match=r"^database.json: 'segment_rule' must be one of table, rfm, got 'magic'$"):
        load_database(folder)


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_load_refuses_a_time_the_graph_cannot_store_naming_file_column_and_row(tmp_path: Path) -> None:
    save_database(generate(30, seed=0), tmp_path, fmt="csv")
    customers = pd.read_csv(tmp_path / "customers.csv")
    customers.loc[1, "signup_time"] = "1960-01-01 00:00:00"
    customers.to_csv(tmp_path / "customers.csv", index=False)
    with pytest.raises(DataError, match=r"customers.csv: column 'signup_time', row 2: time outside 1970-01-01"):
        load_database(tmp_path)
