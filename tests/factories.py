"""Tiny inline databases for graph and model tests (hand-sized, built in microseconds)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from service.data.schema import ECOMMERCE_SCHEMA, Database

T0 = pd.Timestamp("2024-01-01")


def tiny_db(customers: int = 30, products: int = 8, transactions: int = 300, seed: int = 0) -> Database:
    """Random customers/products/transactions over ~300 days, with many equal timestamps (ties)."""
    rng = np.random.default_rng(seed)
    cust = pd.DataFrame(
        {
            "customer_id": (np.arange(customers) * 7 + 3).astype(np.int64),  # ids != rows on purpose
            "signup_time": T0 + pd.to_timedelta(rng.integers(0, 60, customers), unit="D"),
            "age": rng.integers(18, 80, customers).astype(float),
            "region": rng.choice(["north", "south", "east"], customers),
            "channel": rng.choice(["web", "store"], customers),
        }
    )
    prod = pd.DataFrame(
        {
            "product_id": np.arange(products, dtype=np.int64) + 100,
            "category": rng.choice(["a", "b", "c"], products),
            "brand": rng.choice(["x", "y"], products),
            "price": rng.uniform(1, 100, products),
        }
    )
    ci = rng.integers(0, customers, transactions)
    # Whole days only: many transactions share a timestamp, exercising deterministic tie-breaking.
    days = rng.integers(0, 240, transactions)
    tx = pd.DataFrame(
        {
            "customer_id": cust["customer_id"].to_numpy()[ci],
            "product_id": prod["product_id"].to_numpy()[rng.integers(0, products, transactions)],
            "timestamp": cust["signup_time"].to_numpy()[ci] + pd.to_timedelta(days, unit="D"),
            "quantity": rng.integers(1, 4, transactions).astype(float),
            "amount": rng.uniform(1, 60, transactions),
        }
    )
    tx = tx.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return Database("tiny", dict(ECOMMERCE_SCHEMA), {"customers": cust, "products": prod, "transactions": tx})
