"""Views of the temporal graph and of sampled subgraphs as PyG ``HeteroData``.

The sampler and encoder work on :class:`~service.graph.temporal.TemporalGraph` (CSR per edge type,
built for "most recent k at or before T" lookups), but the same data is a standard PyG object here, so
PyG tooling (``HeteroData.validate``, ``to_homogeneous``, transforms, other models) applies.
"""

from __future__ import annotations

import torch
from torch_geometric.data import HeteroData

from service.graph.sampler import SampledSubgraph
from service.graph.temporal import TemporalGraph
from service.model.encoder import FeatureBatch


def graph_to_hetero_data(graph: TemporalGraph) -> HeteroData:
    """The whole graph: per node type ``x`` (numeric), ``x_cat`` (categorical codes), ``time`` (seconds,
    0 = always visible) and ``node_id`` (primary keys); per edge type ``edge_index`` (row 0 = neighbour,
    row 1 = the node that aggregates) and ``time`` (the edge's time)."""
    data = HeteroData()
    for t, n in graph.nodes.items():
        data[t].x = n.numeric
        data[t].x_cat = n.categorical
        data[t].time = n.time
        data[t].num_nodes = n.num_nodes
        if n.ids is not None:
            data[t].node_id = n.ids
    for et, e in graph.edges.items():
        center = torch.repeat_interleave(torch.arange(e.rowptr.numel() - 1), e.rowptr.diff())
        data[et].edge_index = torch.stack([e.col, center])
        data[et].time = e.key & ((1 << 32) - 1)
    return data


def subgraph_to_hetero_data(sub: SampledSubgraph, feats: FeatureBatch) -> HeteroData:
    """A sampled subgraph as NeighborLoader would return it: relabelled ``edge_index``, ``n_id`` (graph
    rows), ``num_sampled_nodes`` / ``num_sampled_edges`` per hop (for ``trim_to_layer``), the seeds first
    (``batch_size``), and each node's age at the cutoff in days."""
    data = HeteroData()
    for t, rows in sub.node_ids.items():
        data[t].n_id = rows
        data[t].x = feats.numeric[t]
        data[t].x_cat = feats.categorical[t]
        data[t].age_days = feats.age_days[t]
        data[t].num_nodes = int(rows.numel())
        data[t].num_sampled_nodes = list(sub.num_sampled_nodes[t])
    for et, ei in sub.edge_index.items():
        data[et].edge_index = ei
        data[et].num_sampled_edges = list(sub.num_sampled_edges[et])
    data[sub.seed_type].batch_size = sub.num_seeds
    data.seed_time = sub.seed_time
    return data
