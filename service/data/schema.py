"""Table schema of the relational customer database.

A database is a set of tables; each column has a *kind* that tells the graph builder what to do with
it: primary keys become node ids, foreign keys become edges, numeric / categorical / time columns
become node features. The synthetic demo database and CDNOW both use this one description, so the
graph builder, the model and the serving path never special-case a data set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum

import pandas as pd


class ColumnKind(str, Enum):
    """What a column means to the graph builder."""

    ID = "id"  # primary key (int64, unique)
    FOREIGN_KEY = "foreign_key"  # int64 referencing another table's primary key
    NUMERIC = "numeric"  # float feature, standardised with training statistics
    CATEGORICAL = "categorical"  # string label, embedded
    TIME = "time"  # the row's timestamp (datetime64[ns], UTC-naive)


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind
    references: str | None = None  # table name, for FOREIGN_KEY
    description: str = ""


@dataclass(frozen=True)
class TableSchema:
    """One table: its columns, primary key (if any) and time column (if any).

    A row with a time column exists from that time on: the graph at cutoff T only holds rows whose
    time is <= T.
    """

    name: str
    columns: tuple[Column, ...]
    description: str = ""

    @property
    def primary_key(self) -> str | None:
        return next((c.name for c in self.columns if c.kind is ColumnKind.ID), None)

    @property
    def time_column(self) -> str | None:
        return next((c.name for c in self.columns if c.kind is ColumnKind.TIME), None)

    def of_kind(self, kind: ColumnKind) -> list[Column]:
        return [c for c in self.columns if c.kind is kind]


CUSTOMERS = TableSchema(
    "customers",
    (
        Column("customer_id", ColumnKind.ID),
        Column("signup_time", ColumnKind.TIME, description="when the account was created"),
        Column("age", ColumnKind.NUMERIC, description="years"),
        Column("region", ColumnKind.CATEGORICAL),
        Column("channel", ColumnKind.CATEGORICAL, description="acquisition channel"),
    ),
    "one row per customer",
)
PRODUCTS = TableSchema(
    "products",
    (
        Column("product_id", ColumnKind.ID),
        Column("category", ColumnKind.CATEGORICAL),
        Column("brand", ColumnKind.CATEGORICAL),
        Column("price", ColumnKind.NUMERIC, description="list price, dollars"),
    ),
    "one row per product; products are static (no time column)",
)
TRANSACTIONS = TableSchema(
    "transactions",
    (
        Column("customer_id", ColumnKind.FOREIGN_KEY, references="customers"),
        Column("product_id", ColumnKind.FOREIGN_KEY, references="products"),
        Column("timestamp", ColumnKind.TIME),
        Column("quantity", ColumnKind.NUMERIC, description="units"),
        Column("amount", ColumnKind.NUMERIC, description="dollars paid"),
    ),
    "one row per purchase line",
)
#: The e-commerce schema of `onepass demo-data` and of user databases.
ECOMMERCE_SCHEMA: dict[str, TableSchema] = {t.name: t for t in (CUSTOMERS, PRODUCTS, TRANSACTIONS)}


@dataclass
class Database:
    """A loaded database: schemas plus one DataFrame per table.

    Required tables: ``customers`` (the entity every task predicts for) and ``transactions`` (with
    ``customer_id``, ``timestamp`` and ``amount``). Other tables are optional (CDNOW has no products).

    ``segments`` is an optional label table (customer_id, segment) for the segment task: static labels
    known only for some customers (the synthetic persona).
    """

    name: str
    schemas: dict[str, TableSchema]
    tables: dict[str, pd.DataFrame]
    segments: pd.DataFrame | None = None
    segment_rule: str = "table"  # "table" (segments above) or "rfm" (derived from the label window)
    _snapshot: str | None = field(default=None, repr=False)

    @property
    def customers(self) -> pd.DataFrame:
        return self.tables["customers"]

    @property
    def transactions(self) -> pd.DataFrame:
        return self.tables["transactions"]

    @property
    def max_time(self) -> pd.Timestamp:
        return pd.Timestamp(self.transactions["timestamp"].max())

    def snapshot_id(self) -> str:
        """Content hash of every table (16 hex chars); names the graph in cache keys and manifests."""
        if self._snapshot is None:
            h = hashlib.sha256(self.name.encode())
            for name in sorted(self.tables):
                df = self.tables[name]
                h.update(name.encode())
                h.update(",".join(map(str, df.columns)).encode())
                h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
            if self.segments is not None:
                h.update(pd.util.hash_pandas_object(self.segments, index=False).to_numpy().tobytes())
            self._snapshot = h.hexdigest()[:16]
        return self._snapshot
