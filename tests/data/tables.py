"""Tiny inline tables for data-layer tests: a valid database folder and in-memory databases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from service.data.schema import ECOMMERCE_SCHEMA, Database

# Row numbers in the tests below count data rows from 1 (the header is not a row).
CSV = {
    "customers.csv": (
        "customer_id,signup_time,age,region,channel\n"
        "1,2023-01-01,30,north,web\n"
        "2,2023-01-05T08:00:00,41,NA,ads\n"  # region "NA" is a value, not a null
        "3,2023-02-01,25,south,web\n"
    ),
    "products.csv": ("product_id,category,brand,price\n10,books,acme,12.5\n11,toys,bolt,30\n"),
    "transactions.csv": (
        "customer_id,product_id,timestamp,quantity,amount\n"
        "1,10,2023-01-02,1,12.5\n"
        "2,11,2023-01-06T10:00:00,2,60\n"
        "1,11,2023-01-03,1,30\n"
        "3,10,2023-02-02,3,37.5\n"
    ),
    "segments.csv": "customer_id,segment\n1,gold\n3,silver\n",
}


def write_folder(folder: Path, files: dict[str, str] | None = None, *, skip: tuple[str, ...] = ()) -> Path:
    """Writes :data:`CSV` (with ``files`` replacing or adding entries) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {**CSV, **(files or {})}.items():
        if name not in skip:
            (folder / name).write_text(text)
    return folder


def database(
    customers: list[tuple[int, str]],
    transactions: list[tuple[int, str, float]],
    *,
    segments: dict[int, str] | None = None,
    segment_rule: str = "table",
) -> Database:
    """An in-memory database without products: customers (id, signup), transactions (id, time, dollars)."""
    schemas = dict(ECOMMERCE_SCHEMA)
    del schemas["products"]
    tx_schema = schemas["transactions"]
    schemas["transactions"] = replace(tx_schema, columns=tuple(c for c in tx_schema.columns if c.name != "product_id"))
    cust = pd.DataFrame(
        {
            "customer_id": pd.array([c for c, _ in customers], dtype="int64"),
            "signup_time": pd.to_datetime([s for _, s in customers], format="ISO8601").astype("datetime64[ns]"),
            "age": 30.0,
            "region": pd.array(["north"] * len(customers), dtype="str"),
            "channel": pd.array(["web"] * len(customers), dtype="str"),
        }
    )
    tx = pd.DataFrame(
        {
            "customer_id": pd.array([c for c, _, _ in transactions], dtype="int64"),
            "timestamp": pd.to_datetime([t for _, t, _ in transactions], format="ISO8601").astype("datetime64[ns]"),
            "quantity": 1.0,
            "amount": pd.array([a for _, _, a in transactions], dtype="float64"),
        }
    ).sort_values("timestamp", kind="stable", ignore_index=True)
    seg = None
    if segments is not None:
        seg = pd.DataFrame(
            {
                "customer_id": pd.array(list(segments), dtype="int64"),
                "segment": pd.array(list(segments.values()), dtype="str"),
            }
        )
    return Database(
        name="tiny",
        schemas=schemas,
        tables={"customers": cust, "transactions": tx},
        segments=seg,
        segment_rule=segment_rule,
    )
