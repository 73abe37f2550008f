"""The torch sampler against a brute-force reference built straight from the tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from service.graph.sampler import sample
from service.graph.temporal import build_graph, to_seconds
from tests.factories import T0, tiny_db


def reference_edges(db, graph):
    """(edge type) -> list of (center row, nbr row, edge time, tie order), from the raw tables."""
    cust_rows = pd.Index(db.customers.sort_values("customer_id")["customer_id"].to_numpy())
    prod_rows = pd.Index(db.tables["products"].sort_values("product_id")["product_id"].to_numpy())
    tx = db.transactions
    t_tx = to_seconds(tx["timestamp"])
    c = cust_rows.get_indexer(tx["customer_id"])
    p = prod_rows.get_indexer(tx["product_id"])
    t_cust = graph.nodes["customers"].time.numpy()[c]
    t_edge = np.maximum(t_tx, t_cust)
    rows = np.arange(len(tx))
    return {
        ("transactions", "of_customer", "customers"): list(zip(c, rows, t_edge, rows, strict=True)),
        ("customers", "rev_of_customer", "transactions"): list(zip(rows, c, t_edge, c, strict=True)),
        ("transactions", "of_product", "products"): list(zip(p, rows, t_tx, rows, strict=True)),
        ("products", "rev_of_product", "transactions"): list(zip(rows, p, t_tx, p, strict=True)),
    }


def brute_force_sample(edges, seed_type, seeds, cutoff, fanouts):
    """Plain-Python temporal sampling: per hop, each new node's k most recent neighbours <= cutoff."""
    seen = {t: set() for t in ("customers", "products", "transactions")}
    seen[seed_type] = set(seeds)
    frontier = {seed_type: set(seeds)}
    picked = {et: set() for et in edges}
    per_hop = {t: [len(seeds) if t == seed_type else 0] for t in seen}
    for k in fanouts:
        new = {t: set() for t in seen}
        for et, lst in edges.items():
            nbr_t, _, center_t = et
            for center in frontier.get(center_t, ()):
                cand = sorted((t, order, n) for (c, n, t, order) in lst if c == center and t <= cutoff)
                for _, _, n in cand[max(0, len(cand) - k) :]:
                    picked[et].add((int(n), int(center)))
                    if n not in seen[nbr_t]:
                        new[nbr_t].add(int(n))
        for t in seen:
            seen[t] |= new[t]
            per_hop[t].append(len(new[t]))
        frontier = new
    return seen, picked, per_hop


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fanouts", [(3,), (4, 2), (2, 3, 2)])
def test_sample_matches_brute_force_reference(seed, fanouts):
    db = tiny_db(seed=seed)
    graph = build_graph(db)
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=150))[0])
    seeds = torch.tensor([0, 3, 5, 11, 29])
    sub = sample(graph, seeds, cutoff, fanouts)

    seen, picked, per_hop = brute_force_sample(reference_edges(db, graph), "customers", seeds.tolist(), cutoff, fanouts)
    for t, rows in sub.node_ids.items():
        assert set(rows.tolist()) == seen[t], t
        assert len(rows) == len(set(rows.tolist())), f"{t}: duplicate nodes"
        assert sub.num_sampled_nodes[t] == per_hop[t], t
    for et, ei in sub.edge_index.items():
        src_t, _, dst_t = et
        got = {(int(sub.node_ids[src_t][s]), int(sub.node_ids[dst_t][d])) for s, d in ei.t().tolist()}
        assert got == picked[et], et
    assert sub.node_ids["customers"][:5].tolist() == seeds.tolist(), "seeds come first, in order"


def test_sample_excludes_everything_after_the_cutoff():
    db = tiny_db()
    graph = build_graph(db)
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=90))[0])
    sub = sample(graph, torch.arange(10), cutoff, (10, 10))
    for t, rows in sub.node_ids.items():
        if t == "customers":
            continue  # seeds are given; their own signup is <= cutoff by construction of the labels
        assert bool((graph.nodes[t].time[rows] <= cutoff).all()), t


def test_sample_is_deterministic_and_picks_most_recent():
    db = tiny_db()
    graph = build_graph(db)
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=200))[0])
    a = sample(graph, torch.tensor([4, 1]), cutoff, (3, 2))
    b = sample(graph, torch.tensor([4, 1]), cutoff, (3, 2))
    for t in a.node_ids:
        assert torch.equal(a.node_ids[t], b.node_ids[t])
    et = ("transactions", "of_customer", "customers")
    tx_time = graph.nodes["transactions"].time
    for center_local in (0, 1):
        mask = a.edge_index[et][1] == center_local
        chosen = a.node_ids["transactions"][a.edge_index[et][0][mask]]
        row = int(a.node_ids["customers"][center_local])
        cust_id = int(graph.nodes["customers"].ids[row])
        all_tx = np.flatnonzero((db.transactions["customer_id"] == cust_id).to_numpy())
        visible = [r for r in all_tx if tx_time[r] <= cutoff]
        newest = sorted(visible, key=lambda r: (int(tx_time[r]), r))[-3:]
        assert sorted(chosen.tolist()) == sorted(newest)


def test_sample_of_seed_without_history_has_no_edges():
    db = tiny_db()
    graph = build_graph(db)
    before_everything = int(to_seconds(T0 - pd.Timedelta(days=1))[0])
    sub = sample(graph, torch.tensor([0, 1]), before_everything, (5, 5))
    assert sub.num_edges() == 0
    assert sub.num_nodes() == 2


def test_lookup_maps_primary_keys_to_rows_and_unknown_to_minus_one():
    db = tiny_db()
    graph = build_graph(db)
    rows = graph.lookup("customers", torch.tensor([3, 10, 4, 10_000]))
    assert rows.tolist() == [0, 1, -1, -1]


def test_build_graph_names_table_column_and_row_of_a_timestamp_before_1970():
    db = tiny_db()
    db.customers.loc[3, "signup_time"] = pd.Timestamp("1960-05-01")
    with pytest.raises(ValueError, match=r"customers: column 'signup_time', row \d+: 1960-05-01"):
        build_graph(db)
