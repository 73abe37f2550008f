"""The CDNOW purchase log as a database: a small real data set with no products.

CDNOW (Fader & Hardie) holds every purchase of the 23,570 customers who first bought at the CD
retailer CDNOW in the first quarter of 1997, until 1998-06-30: 69,659 rows of customer, day, number
of CDs and dollars. The ``lifetimes`` package ships it in its wheel; only the file is read, because
importing ``lifetimes.datasets`` fails on current setuptools (it imports ``pkg_resources``).

The database: ``customers`` (id, first purchase day as signup time, first purchase month as a
cohort) and ``transactions`` (one per log row; several rows of one customer on one day are kept, as
they are separate orders in the log). There is no segment label table: ``segment_rule`` is ``"rfm"``
(tiers of spend in the label window, see :mod:`service.data.labels`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from service.data.errors import DataError
from service.data.loader import coerce_table, validate_tables
from service.data.schema import Column, ColumnKind, Database, TableSchema

__all__ = ["CDNOW_FILE", "CDNOW_SCHEMA", "cdnow_file", "load_cdnow"]

#: The log's file name inside the ``lifetimes`` package (``lifetimes/datasets/``).
CDNOW_FILE = "CDNOW_master.txt"

CDNOW_CUSTOMERS = TableSchema(
    "customers",
    (
        Column("customer_id", ColumnKind.ID),
        Column("signup_time", ColumnKind.TIME, description="day of the first purchase, UTC midnight"),
        Column("cohort", ColumnKind.CATEGORICAL, description="month of the first purchase, YYYY-MM"),
    ),
    "one row per customer of the log",
)
CDNOW_TRANSACTIONS = TableSchema(
    "transactions",
    (
        Column("customer_id", ColumnKind.FOREIGN_KEY, references="customers"),
        Column("timestamp", ColumnKind.TIME, description="day of the purchase, UTC midnight"),
        Column("quantity", ColumnKind.NUMERIC, description="CDs bought"),
        Column("amount", ColumnKind.NUMERIC, description="dollars paid"),
    ),
    "one row per line of the log",
)
#: The schema of the CDNOW database (no products table).
CDNOW_SCHEMA: dict[str, TableSchema] = {t.name: t for t in (CDNOW_CUSTOMERS, CDNOW_TRANSACTIONS)}

# The raw file's columns as the loader should coerce them; the date (YYYYMMDD) is parsed here.
_RAW = TableSchema(
    "CDNOW_master",
    (
        Column("customer_id", ColumnKind.FOREIGN_KEY, references="customers"),
        Column("number_of_cds", ColumnKind.NUMERIC),
        Column("dollar_value", ColumnKind.NUMERIC),
    ),
)


def cdnow_file() -> Path:
    """The path of ``CDNOW_master.txt`` in the installed ``lifetimes`` package.

    Found through the package's import spec, which locates the package without executing it.

    Raises:
        DataError: ``lifetimes`` is not installed, or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("lifetimes")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{CDNOW_FILE}: the CDNOW log ships with the 'lifetimes' package, which is not installed; "
            "install it with `pip install lifetimes==0.11.3` (onepass's dev extra) or pass the file's path",
            file=CDNOW_FILE,
        )
    places = [Path(p) / "datasets" / CDNOW_FILE for p in spec.submodule_search_locations]
    for place in places:
        if place.is_file():
            return place
    raise DataError(f"{CDNOW_FILE}: not found in the lifetimes package (looked at {places[0]})", file=CDNOW_FILE)


def load_cdnow(path: Path | None = None) -> Database:
    """Loads the CDNOW purchase log as a database named ``cdnow``.

    Args:
        path: the log file (whitespace-separated: customer_id, date YYYYMMDD, number_of_cds,
            dollar_value, with a header line); default: the copy in the ``lifetimes`` package.

    Returns:
        The database: 23,570 customers and 69,659 transactions from 1997-01-01 to 1998-06-30 for the
        full log; schemas :data:`CDNOW_SCHEMA`; ``segment_rule="rfm"``; no segments table.

    Raises:
        DataError: the file is missing or a row is malformed (names the file, column and row).
    """
    file = Path(path) if path is not None else cdnow_file()
    source = file.name
    if not file.is_file():
        raise DataError(f"{source}: not found in folder {file.parent}", file=source)
    try:
        raw = pd.read_csv(file, sep=r"\s+", dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as e:  # pandas' ParserError is a ValueError
        raise DataError(f"{source}: cannot read the file ({e})", file=source) from e
    if "date" not in raw.columns:
        raise DataError(f"{source}: column 'date': missing", file=source, column="date")
    parsed = coerce_table(raw, _RAW, source)
    day = pd.to_datetime(raw["date"], format="%Y%m%d", errors="coerce")
    bad = day.isna().to_numpy()
    if bad.any():
        rows = np.flatnonzero(bad) + 1
        raise DataError.at(
            source, "date", rows.tolist(), f"expected a date YYYYMMDD, got {raw['date'].iat[rows[0] - 1]!r}"
        )
    transactions = pd.DataFrame(
        {
            "customer_id": parsed["customer_id"],
            "timestamp": day.astype("datetime64[ns]"),
            "quantity": parsed["number_of_cds"],
            "amount": parsed["dollar_value"],
        }
    )
    first = transactions.groupby("customer_id", sort=True)["timestamp"].min()
    customers = pd.DataFrame(
        {
            "customer_id": first.index.to_numpy(dtype=np.int64),
            "signup_time": first.to_numpy(),
            "cohort": pd.array(first.dt.strftime("%Y-%m").to_numpy(), dtype="str"),
        }
    )
    tables = validate_tables(
        CDNOW_SCHEMA,
        {"customers": customers, "transactions": transactions},
        sources={"customers": f"{source} (customers)", "transactions": source},
    )
    return Database(name="cdnow", schemas=dict(CDNOW_SCHEMA), tables=tables, segments=None, segment_rule="rfm")
