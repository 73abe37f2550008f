"""The graph and sampled subgraphs as PyG HeteroData."""

from __future__ import annotations

import pandas as pd
import torch

from service.graph.pyg import graph_to_hetero_data, subgraph_to_hetero_data
from service.graph.sampler import sample
from service.graph.temporal import build_graph, to_seconds
from service.model.encoder import gather_features
from tests.factories import T0, tiny_db


def test_graph_to_hetero_data_is_valid_and_matches_the_spec():
    db = tiny_db()
    graph = build_graph(db)
    data = graph_to_hetero_data(graph)
    assert data.validate()
    node_types, edge_types = data.metadata()
    assert set(node_types) == {"customers", "products", "transactions"}
    assert set(edge_types) == set(graph.spec.edges)
    assert data["transactions"].num_nodes == len(db.transactions)
    assert data["transactions", "of_customer", "customers"].edge_index.shape == (2, len(db.transactions))
    # every transaction -> customer edge points at the row of that transaction's customer
    ei = data["transactions", "of_customer", "customers"].edge_index
    cust_ids = data["customers"].node_id[ei[1]]
    tx_cust = torch.as_tensor(db.transactions["customer_id"].to_numpy())[ei[0]]
    assert torch.equal(cust_ids, tx_cust)


def test_subgraph_to_hetero_data_carries_hop_counts_and_seeds():
    graph = build_graph(tiny_db())
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=150))[0])
    sub = sample(graph, torch.arange(6), cutoff, (5, 3))
    data = subgraph_to_hetero_data(sub, gather_features(graph, sub))
    assert data.validate()
    assert data["customers"].batch_size == 6 and data.seed_time == cutoff
    assert data["customers"].n_id[:6].tolist() == list(range(6))
    assert sum(data["transactions"].num_sampled_nodes) == data["transactions"].num_nodes
    assert bool((data["transactions"].age_days >= 0).all())
