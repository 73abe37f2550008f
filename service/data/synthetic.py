"""A synthetic e-commerce database whose tasks are learnable from the graph (the demo data).

Every customer has hidden traits drawn once:

- a **persona** (one of :data:`PERSONAS`), which sets the means of the traits below;
- an **activity rate** (purchases per day while active, lognormal around the persona's mean);
- a **spend level** (lognormal; more units per purchase);
- a **lifetime**: exponential, longer for more active customers and for loyal personas; after it ends
  the customer buys nothing more, so some customers churn during the history.

Products belong to hidden **clusters**, one per persona. A purchase comes, with the persona's
*loyalty* probability, from the persona's own cluster (popularity-weighted), otherwise from all
products. Clusters lean towards a few categories each but hold products of every category, so
*which products* a customer buys says far more about the persona than the category column, and
much more than the customer's own attributes (age, region and channel depend on the persona only
weakly). Churn, spend over the next weeks (LTV) and segment (the persona) all derive from the same
hidden traits, which is the premise of multi-task learning over one shared encoder.

Everything is vectorised over customers and transactions (one numpy Generator, draws in a fixed
order), so a seed fixes the database and no Python loop runs over customers or transactions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from service.data.schema import ECOMMERCE_SCHEMA, Database

__all__ = [
    "CATEGORIES",
    "CHANNELS",
    "PERSONAS",
    "PERSONA_TRAITS",
    "REGIONS",
    "Persona",
    "SyntheticTruth",
    "default_num_products",
    "generate",
    "generate_with_truth",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Persona:
    """The hidden type of a customer and the means of its traits.

    Attributes:
        name: the segment label.
        share: fraction of customers.
        rate: mean purchases per day while active.
        lifetime_days: mean days from signup to the end of buying, for an average activity rate.
        loyalty: probability that a purchase comes from the persona's own product cluster.
        price_factor: list-price multiplier of the products in the persona's cluster.
        extra_units: probability of each of up to 4 extra units in a purchase (before spend level).
        paid_fraction: mean price paid over list price (discount hunting).
        focus: categories over-represented in the persona's product cluster.
        age_mean: mean age, years (close across personas: attributes are weak signals).
        channel: the acquisition channel this persona leans to, slightly.
    """

    name: str
    share: float
    rate: float
    lifetime_days: float
    loyalty: float
    price_factor: float
    extra_units: float
    paid_fraction: float
    focus: tuple[str, ...]
    age_mean: float
    channel: str


CATEGORIES = (
    "electronics", "computers", "phones", "home", "kitchen", "garden",
    "clothing", "shoes", "beauty", "books", "toys", "sports",
)  # fmt: skip
#: Median list price per category, dollars.
CATEGORY_PRICE = (100.0, 250.0, 200.0, 40.0, 30.0, 35.0, 35.0, 60.0, 20.0, 15.0, 25.0, 45.0)
REGIONS = ("north", "south", "east", "west", "central", "overseas")
CHANNELS = ("organic", "search_ads", "social", "referral")
BRANDS_PER_CATEGORY = 8

PERSONA_TRAITS: tuple[Persona, ...] = (
    Persona(
        "bargain_hunter", share=0.25, rate=0.050, lifetime_days=500.0, loyalty=0.70, price_factor=0.55,
        extra_units=0.35, paid_fraction=0.80, focus=("kitchen", "toys", "beauty"), age_mean=38.0,
        channel="search_ads",
    ),
    Persona(
        "tech_enthusiast", share=0.15, rate=0.030, lifetime_days=700.0, loyalty=0.75, price_factor=1.40,
        extra_units=0.08, paid_fraction=1.00, focus=("electronics", "computers", "phones"), age_mean=35.0,
        channel="search_ads",
    ),
    Persona(
        "home_maker", share=0.20, rate=0.040, lifetime_days=1000.0, loyalty=0.75, price_factor=1.00,
        extra_units=0.25, paid_fraction=0.95, focus=("home", "kitchen", "garden"), age_mean=41.0,
        channel="referral",
    ),
    Persona(
        "fashionista", share=0.15, rate=0.045, lifetime_days=450.0, loyalty=0.70, price_factor=1.30,
        extra_units=0.15, paid_fraction=0.95, focus=("clothing", "shoes", "beauty"), age_mean=34.0,
        channel="social",
    ),
    Persona(
        "occasional", share=0.25, rate=0.012, lifetime_days=250.0, loyalty=0.55, price_factor=1.00,
        extra_units=0.10, paid_fraction=1.00, focus=("books", "toys", "sports"), age_mean=39.0,
        channel="organic",
    ),
)  # fmt: skip
#: Persona names, in the order of :data:`PERSONA_TRAITS` (the index stored in :class:`SyntheticTruth`).
PERSONAS = tuple(p.name for p in PERSONA_TRAITS)

# Spread of the per-customer traits around their persona means (log scale).
_ACTIVITY_SIGMA = 0.7
_SPEND_SIGMA = 0.4
_PRICE_SIGMA = 0.4
# Lifetime grows with activity**0.7: heavy buyers stay longer, so churn and LTV share the trait.
_LIFETIME_ACTIVITY_EXPONENT = 0.7
# Weight of a cluster's focus categories in its category mix; the rest is spread over all categories,
# so a cluster is never one category.
_FOCUS_WEIGHT = 0.45
# How far the channel leans to the persona's channel (0: independent of persona).
_CHANNEL_LEAN = 0.15
_AGE_SD = 13.0  # years
_POPULARITY_EXPONENT = 0.9  # Zipf-like product popularity
_SIGNUP_SPAN = 0.8  # signups spread over the first 80% of the history
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class SyntheticTruth:
    """The hidden traits behind a synthetic database (for tests and analysis, never for features).

    Arrays are aligned with the rows of the customers and products tables.

    Attributes:
        persona: per customer, the index into :data:`PERSONAS`.
        activity: per customer, purchases per day while active.
        spend: per customer, the spend level (lognormal multiplier, mean 1).
        lifetime_end: per customer, when buying stops (``datetime64[ns]``; may lie after the history).
        product_cluster: per product, the index of the persona whose cluster holds it.
    """

    persona: IntArray
    activity: FloatArray
    spend: FloatArray
    lifetime_end: npt.NDArray[np.datetime64]
    product_cluster: IntArray


def default_num_products(customers: int) -> int:
    """The default product count: one per 50 customers, at least 200 and at most 20,000."""
    return min(20_000, max(200, customers // 50))


def generate(
    customers: int,
    seed: int,
    *,
    segment_fraction: float = 0.2,
    products: int | None = None,
    start: str | pd.Timestamp = "2023-01-01",
    days: int = 730,
) -> Database:
    """Generates the synthetic e-commerce database (see the module docstring for its design).

    Args:
        customers: number of customers; about 10.5 transactions each on average over 730 days.
        seed: the seed; the same arguments give the same database, bit for bit.
        segment_fraction: fraction of customers whose persona is in the ``segments`` label table.
        products: number of products; default :func:`default_num_products`.
        start: the first day of the history (UTC).
        days: length of the history, days; signups happen in its first 80%.

    Returns:
        The database (customers, products, transactions; ``segments`` with ``segment_rule="table"``),
        with the dtypes :func:`~service.data.loader.load_database` produces and transactions sorted
        by timestamp.
    """
    return generate_with_truth(
        customers, seed, segment_fraction=segment_fraction, products=products, start=start, days=days
    )[0]


def generate_with_truth(
    customers: int,
    seed: int,
    *,
    segment_fraction: float = 0.2,
    products: int | None = None,
    start: str | pd.Timestamp = "2023-01-01",
    days: int = 730,
) -> tuple[Database, SyntheticTruth]:
    """:func:`generate`, plus the hidden traits it drew (same arguments, same database)."""
    if customers < 1:
        raise ValueError(f"customers must be >= 1, got {customers}")
    if not 0.0 <= segment_fraction <= 1.0:
        raise ValueError(f"segment_fraction must be in [0, 1], got {segment_fraction}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    num_products = default_num_products(customers) if products is None else products
    if num_products < len(PERSONAS):
        raise ValueError(f"products must be >= {len(PERSONAS)} (one per persona cluster), got {num_products}")
    rng = np.random.default_rng(seed)
    start_s = int(pd.Timestamp(start).value // 1_000_000_000)
    end_s = start_s + days * _SECONDS_PER_DAY

    prod, cluster = _products(rng, num_products)
    cust, truth_c = _customers(rng, customers, start_s, days)
    tx = _transactions(rng, truth_c, prod, cluster, end_s)

    labelled = rng.choice(customers, size=round(segment_fraction * customers), replace=False)
    labelled.sort()
    segments = pd.DataFrame(
        {
            "customer_id": cust["customer_id"].to_numpy()[labelled],
            "segment": pd.array(np.asarray(PERSONAS)[truth_c.persona[labelled]], dtype="str"),
        }
    )
    db = Database(
        name=f"synthetic-{customers}-seed{seed}",
        schemas=dict(ECOMMERCE_SCHEMA),
        tables={"customers": cust, "products": prod, "transactions": tx},
        segments=segments,
        segment_rule="table",
    )
    truth = SyntheticTruth(
        persona=truth_c.persona,
        activity=truth_c.activity,
        spend=truth_c.spend,
        lifetime_end=(truth_c.lifetime_end_s * 1_000_000_000).astype("datetime64[ns]"),
        product_cluster=cluster,
    )
    return db, truth


@dataclass(frozen=True)
class _CustomerTraits:
    persona: IntArray
    activity: FloatArray
    spend: FloatArray
    signup_s: IntArray  # seconds since the epoch
    lifetime_end_s: IntArray


def _strings(values: npt.NDArray[np.str_]) -> pd.api.extensions.ExtensionArray:
    return pd.array(values, dtype="str")


def _products(rng: np.random.Generator, n: int) -> tuple[pd.DataFrame, IntArray]:
    k = len(PERSONA_TRAITS)
    # Balanced clusters in random order: every persona has products to prefer even when n is small.
    cluster = rng.permutation(np.arange(n) % k).astype(np.int64)
    mix = np.full((k, len(CATEGORIES)), (1.0 - _FOCUS_WEIGHT) / len(CATEGORIES))
    for i, p in enumerate(PERSONA_TRAITS):
        mix[i, [CATEGORIES.index(c) for c in p.focus]] += _FOCUS_WEIGHT / len(p.focus)
    category = _sample_rows(rng, np.cumsum(mix, axis=1), cluster)
    brand = category * BRANDS_PER_CATEGORY + rng.integers(0, BRANDS_PER_CATEGORY, size=n)
    price_factor = np.array([p.price_factor for p in PERSONA_TRAITS])
    price = np.asarray(CATEGORY_PRICE)[category] * price_factor[cluster] * rng.lognormal(0.0, _PRICE_SIGMA, n)
    brand_names = np.array([f"{c}_brand_{j}" for c in CATEGORIES for j in range(BRANDS_PER_CATEGORY)])
    df = pd.DataFrame(
        {
            "product_id": np.arange(1, n + 1, dtype=np.int64),
            "category": _strings(np.asarray(CATEGORIES)[category]),
            "brand": _strings(brand_names[brand]),
            "price": np.maximum(np.round(price, 2), 0.01),
        }
    )
    return df, cluster


def _customers(rng: np.random.Generator, n: int, start_s: int, days: int) -> tuple[pd.DataFrame, _CustomerTraits]:
    traits = PERSONA_TRAITS
    persona = rng.choice(len(traits), size=n, p=np.array([p.share for p in traits])).astype(np.int64)
    # Mean-one lognormal multipliers, so the persona means stay the population means.
    act_mult = rng.lognormal(-(_ACTIVITY_SIGMA**2) / 2, _ACTIVITY_SIGMA, n)
    activity = np.array([p.rate for p in traits])[persona] * act_mult
    spend = rng.lognormal(-(_SPEND_SIGMA**2) / 2, _SPEND_SIGMA, n)
    # Sorted, so ids follow signup order like an auto-increment key.
    signup_s = np.sort(rng.integers(start_s, start_s + int(_SIGNUP_SPAN * days * _SECONDS_PER_DAY), size=n))
    mean_life = np.array([p.lifetime_days for p in traits])[persona] * act_mult**_LIFETIME_ACTIVITY_EXPONENT
    lifetime_end_s = signup_s + (rng.exponential(1.0, n) * mean_life * _SECONDS_PER_DAY).astype(np.int64)

    age = np.clip(rng.normal(np.array([p.age_mean for p in traits])[persona], _AGE_SD), 18, 90).round()
    region = rng.integers(0, len(REGIONS), size=n)
    lean = np.array([CHANNELS.index(p.channel) for p in traits])[persona]
    channel = np.where(rng.random(n) < _CHANNEL_LEAN, lean, rng.integers(0, len(CHANNELS), size=n))
    df = pd.DataFrame(
        {
            "customer_id": np.arange(1, n + 1, dtype=np.int64),
            "signup_time": (signup_s * 1_000_000_000).astype("datetime64[ns]"),
            "age": age.astype(np.float64),
            "region": _strings(np.asarray(REGIONS)[region]),
            "channel": _strings(np.asarray(CHANNELS)[channel]),
        }
    )
    return df, _CustomerTraits(persona, activity, spend, signup_s, lifetime_end_s)


def _transactions(
    rng: np.random.Generator, c: _CustomerTraits, products: pd.DataFrame, cluster: IntArray, end_s: int
) -> pd.DataFrame:
    traits = PERSONA_TRAITS
    k = len(traits)
    # A Poisson process of rate `activity` on [signup, min(lifetime end, end of history)): its count is
    # Poisson and, given the count, its times are uniform on the interval.
    active_s = np.maximum(np.minimum(c.lifetime_end_s, end_s) - c.signup_s, 0)
    counts = rng.poisson(c.activity * active_s / _SECONDS_PER_DAY)
    who = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    m = len(who)
    times_s = c.signup_s[who] + (rng.random(m) * active_s[who]).astype(np.int64)

    persona = c.persona[who]
    loyal = rng.random(m) < np.array([p.loyalty for p in traits])[persona]
    # Group g < k: the products of cluster g; group k: every product (the non-loyal purchases).
    group = np.where(loyal, persona, k)
    del loyal
    popularity = 1.0 / rng.permutation(np.arange(1, len(cluster) + 1)) ** _POPULARITY_EXPONENT
    order = np.concatenate([np.flatnonzero(cluster == g) for g in range(k)] + [np.arange(len(cluster))])
    group_of = np.concatenate(
        [np.full(np.count_nonzero(cluster == g), g) for g in range(k)] + [np.full(len(cluster), k)]
    )
    w = popularity[order]
    cum = np.cumsum(w)
    group_end = np.flatnonzero(np.diff(group_of, append=k + 1))  # last index of each group
    group_start_cum = np.concatenate([[0.0], cum[group_end[:-1]]])
    # Cumulative weight normalised within each group and offset by the group id: group g spans
    # (g, g + 1], so one searchsorted draws every transaction's product from its own group.
    cdf = group_of + (cum - group_start_cum[group_of]) / (cum[group_end] - group_start_cum)[group_of]
    cdf[group_end] = np.arange(k + 1) + 1.0  # exact ends, so a draw never spills into the next group
    pick = np.searchsorted(cdf, group + rng.random(m), side="right")
    product_row = order[np.minimum(pick, len(order) - 1)]
    del pick, group

    extra_p = np.minimum(np.array([p.extra_units for p in traits])[persona] * c.spend[who], 0.9)
    quantity = 1 + rng.binomial(4, extra_p)
    paid = np.array([p.paid_fraction for p in traits])[persona] * rng.uniform(0.9, 1.1, m)
    price = products["price"].to_numpy()[product_row]
    amount = np.round(quantity * price * paid, 2)

    order_t = np.argsort(times_s, kind="stable")
    return pd.DataFrame(
        {
            "customer_id": who[order_t] + 1,
            "product_id": product_row[order_t] + 1,
            "timestamp": (times_s[order_t] * 1_000_000_000).astype("datetime64[ns]"),
            "quantity": quantity[order_t].astype(np.float64),
            "amount": amount[order_t],
        }
    )


def _sample_rows(rng: np.random.Generator, cum_rows: FloatArray, row: IntArray) -> IntArray:
    """For each i, a column index drawn from the row ``row[i]`` of the row-wise cumulative weights."""
    u = rng.random(len(row)) * cum_rows[row, -1]
    picked: IntArray = (cum_rows[row] < u[:, None]).sum(axis=1).astype(np.int64)
    return picked
