"""Temporal task labels, as in RelBench: what happens in the window after a cutoff.

For a cutoff T and a window W (90 days by default), a customer is *eligible* when they signed up at
or before T and bought at least once at or before T: the model sees the database as of T (rows with
time <= T) and predicts, for every eligible customer,

- ``churn``: 1.0 if the customer buys nothing in (T, T + W], else 0.0;
- ``ltv``: dollars spent in (T, T + W] (0.0 for churners);
- ``segment``: a class name, from the database's segments table (``segment_rule="table"``) or from
  the spend tiers of :data:`RFM_TIERS` over (T, T + W] (``segment_rule="rfm"``).

Nothing after T decides who is eligible, and nothing after T + W touches a label, so labels at one
cutoff cannot leak into the inputs at that cutoff. Splits are successive cutoffs W apart, so the
label windows of train, validation and test never overlap and the test window is the latest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from service.data.errors import DataError
from service.data.schema import Database

__all__ = [
    "DEFAULT_WINDOW",
    "RFM_CLASSES",
    "RFM_TIERS",
    "TaskWindow",
    "database_at",
    "eligible_customers",
    "make_labels",
    "make_splits",
    "segment_classes",
]

#: The default label window.
DEFAULT_WINDOW = pd.Timedelta(days=90)
#: Spend tiers of the ``"rfm"`` rule: (name, lower bound in dollars, inclusive) of the spend in the
#: label window, for customers who bought in it. The bounds are fixed (chosen from CDNOW's scale, where
#: an order is about $35) rather than quantiles of any window, so a class means the same at every cutoff
#: and no statistic of the test window leaks into the labels.
RFM_TIERS: tuple[tuple[str, float], ...] = (("low", 0.0), ("mid", 30.0), ("high", 100.0))
#: Class names of the ``"rfm"`` rule in order: no purchase in the window, then the spend tiers.
RFM_CLASSES: tuple[str, ...] = ("none", *(name for name, _ in RFM_TIERS))


@dataclass(frozen=True)
class TaskWindow:
    """A cutoff T and a label window W: inputs are rows with time <= T, labels come from (T, T + W].

    Attributes:
        cutoff: T, naive UTC.
        window: W, positive.
    """

    cutoff: pd.Timestamp
    window: pd.Timedelta

    def __post_init__(self) -> None:
        _check_window(self.window)

    @property
    def end(self) -> pd.Timestamp:
        """T + W, the last instant whose rows count towards the labels."""
        return self.cutoff + self.window


def segment_classes(db: Database) -> list[str]:
    """The segment task's class names, in label-index order.

    Returns:
        ``"table"``: the sorted distinct names in ``db.segments`` (empty without one);
        ``"rfm"``: :data:`RFM_CLASSES` (``none``, ``low``, ``mid``, ``high``).
    """
    if db.segment_rule == "table":
        if db.segments is None:
            return []
        return sorted(str(s) for s in db.segments["segment"].unique())
    if db.segment_rule == "rfm":
        return list(RFM_CLASSES)
    raise ValueError(f"unknown segment_rule {db.segment_rule!r} (expected 'table' or 'rfm')")


def eligible_customers(db: Database, cutoff: pd.Timestamp) -> npt.NDArray[np.int64]:
    """Customers with a label at ``cutoff``: signed up at or before it and bought at least once by then.

    Args:
        db: the database.
        cutoff: T (a time zone is converted to UTC).

    Returns:
        Their customer ids, ascending (int64). Only rows with time <= T are read.
    """
    t = _as_time(cutoff)
    tx = db.transactions
    buyers = np.unique(tx["customer_id"].to_numpy()[(tx["timestamp"] <= t).to_numpy()])
    customers = db.customers
    signed = customers["customer_id"].to_numpy()[(customers["signup_time"] <= t).to_numpy()]
    ids: npt.NDArray[np.int64] = np.intersect1d(buyers, signed).astype(np.int64)
    return ids


def make_labels(db: Database, cutoff: pd.Timestamp, window: pd.Timedelta = DEFAULT_WINDOW) -> pd.DataFrame:
    """Labels of every eligible customer at ``cutoff`` (see the module docstring).

    Args:
        db: the database.
        cutoff: T (a time zone is converted to UTC).
        window: W; labels come from transactions with T < timestamp <= T + W.

    Returns:
        One row per eligible customer, by ascending ``customer_id`` (int64): ``churn`` (float32, 1.0 =
        no purchase in the window), ``ltv`` (float32, dollars spent in the window) and ``segment``
        (object: a class name of :func:`segment_classes`, or None for a customer without a label in
        the segments table).

        The ``"rfm"`` segment is ``none`` without a purchase in the window, else by the window's
        spend: ``low`` below $30, ``mid`` from $30 to below $100, ``high`` from $100 (:data:`RFM_TIERS`).
    """
    t = _as_time(cutoff)
    w = _check_window(window)
    ids = eligible_customers(db, t)
    tx = db.transactions
    ts = tx["timestamp"]
    in_window = ((ts > t) & (ts <= t + w)).to_numpy()
    row = pd.Index(ids).get_indexer(tx["customer_id"].to_numpy()[in_window])
    known = row >= 0
    row = row[known]
    purchases = np.bincount(row, minlength=len(ids))
    spend = np.bincount(row, weights=tx["amount"].to_numpy()[in_window][known], minlength=len(ids)).astype(np.float64)

    if db.segment_rule == "rfm":
        segment = _rfm_segments(purchases, spend)
    elif db.segment_rule == "table":
        segment = np.full(len(ids), None, dtype=object)
        if db.segments is not None:
            where = pd.Index(db.segments["customer_id"]).get_indexer(ids)
            has = where >= 0
            names = db.segments["segment"].to_numpy(dtype=object)
            segment[has] = [str(s) for s in names[where[has]]]
    else:
        raise ValueError(f"unknown segment_rule {db.segment_rule!r} (expected 'table' or 'rfm')")
    return pd.DataFrame(
        {
            "customer_id": ids,
            "churn": (purchases == 0).astype(np.float32),
            "ltv": spend.astype(np.float32),
            # object, not pandas' str dtype: unlabelled customers are None, not NaN.
            "segment": pd.Series(segment, dtype=object),
        }
    )


def make_splits(
    db: Database, window: pd.Timedelta = DEFAULT_WINDOW, num_train_cutoffs: int = 2
) -> dict[str, list[pd.Timestamp]]:
    """Successive cutoffs W apart, counting back from the last transaction.

    ``test`` = last - W (its window ends at the last transaction), ``val`` = test - W, and the train
    cutoffs val - W, val - 2W, ... Each split's label window ends where the next split's cutoff is,
    so the model trains on older windows and is tested on the latest.

    Args:
        db: the database.
        window: W.
        num_train_cutoffs: how many train cutoffs, >= 1.

    Returns:
        ``{"train": [...oldest first], "val": [T_val], "test": [T_test]}``.

    Raises:
        DataError: the history is too short: the oldest train cutoff would not come after the first
            transaction, so it would have no eligible customer.
    """
    if num_train_cutoffs < 1:
        raise ValueError(f"num_train_cutoffs must be >= 1, got {num_train_cutoffs}")
    w = _check_window(window)
    if len(db.transactions) == 0:
        raise DataError("transactions: no rows, so no cutoff can be placed", file="transactions")
    first = pd.Timestamp(db.transactions["timestamp"].min())
    last = db.max_time
    test = last - w
    val = test - w
    train = [val - k * w for k in range(num_train_cutoffs, 0, -1)]
    if train[0] <= first:
        span_days = (last - first) / pd.Timedelta(days=1)
        need_days = (num_train_cutoffs + 2) * w / pd.Timedelta(days=1)
        raise DataError(
            f"transactions: the history ({first} to {last}, {span_days:.1f} days) is too short for "
            f"{num_train_cutoffs} train cutoff(s) plus validation and test with a {w} window: it must "
            f"span more than {need_days:g} days",
            file="transactions",
            column="timestamp",
        )
    return {"train": train, "val": [val], "test": [test]}


def database_at(db: Database, cutoff: pd.Timestamp) -> Database:
    """The database as it was at ``cutoff``: only rows whose time is <= T.

    Tables with a time column are filtered by it (customers by signup_time, transactions by
    timestamp); tables without one (products) are static and kept whole (shared, not copied: pandas'
    copy-on-write keeps the original safe). Segment labels are kept for the customers that remain.

    Args:
        db: the database.
        cutoff: T (a time zone is converted to UTC).

    Returns:
        A new Database with the same name, schemas and segment rule.
    """
    t = _as_time(cutoff)
    tables = {}
    for name, df in db.tables.items():
        schema = db.schemas.get(name)
        time = schema.time_column if schema is not None else None
        tables[name] = df if time is None else df[(df[time] <= t).to_numpy()].reset_index(drop=True)
    segments = db.segments
    if segments is not None:
        keep = segments["customer_id"].isin(tables["customers"]["customer_id"]).to_numpy()
        segments = segments[keep].reset_index(drop=True)
    return Database(
        name=db.name, schemas=dict(db.schemas), tables=tables, segments=segments, segment_rule=db.segment_rule
    )


def _rfm_segments(purchases: npt.NDArray[np.int64], spend: npt.NDArray[np.float64]) -> npt.NDArray[np.object_]:
    bounds = np.array([low for _, low in RFM_TIERS])
    # side="right": a spend equal to a bound belongs to the tier that bound opens.
    tier = np.searchsorted(bounds, spend, side="right") - 1
    names = np.array([name for name, _ in RFM_TIERS], dtype=object)
    out: npt.NDArray[np.object_] = np.where(purchases > 0, names[np.maximum(tier, 0)], RFM_CLASSES[0])
    return out.astype(object)


def _as_time(cutoff: pd.Timestamp) -> pd.Timestamp:
    t = pd.Timestamp(cutoff)
    if pd.isna(t):
        raise ValueError("cutoff must be a time, got NaT")
    if t.tzinfo is not None:
        t = t.tz_convert("UTC").tz_localize(None)
    return t


def _check_window(window: pd.Timedelta) -> pd.Timedelta:
    w = pd.Timedelta(window)
    if pd.isna(w) or w <= pd.Timedelta(0):
        raise ValueError(f"window must be positive, got {window}")
    return w
