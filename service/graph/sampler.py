"""Temporal k-hop neighbour sampler in plain torch (PyG's NeighborLoader needs pyg-lib/torch-sparse).

For a set of seed nodes and one cutoff time T it takes, per hop and edge type, the *most recent* k
neighbours whose edge time is <= T: deterministic, so serving is reproducible and a cached embedding
equals a recomputed one. All work is vectorised over the frontier; the cost is
O(sampled edges x log E) for the binary searches plus O(subgraph log subgraph) for relabelling, so it
grows with the sampled subgraph, not with the graph.

The output is laid out for layer-wise trimming (PyG's ``trim_to_layer`` convention): nodes are
numbered hop by hop (seeds first) and edges are appended hop by hop, so layer l of an L-layer encoder
only needs the first ``sum(num_sampled_nodes[:L - l + 1])`` nodes and the first
``sum(num_sampled_edges[:L - l])`` edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.graph.temporal import TIME_BITS, EdgeType, TemporalGraph


@dataclass
class SampledSubgraph:
    """A relabelled subgraph around the seeds, ready for the encoder.

    Attributes:
        seed_type: node type of the seeds; the seeds are local nodes ``0..num_seeds-1`` of that type.
        seed_time: the cutoff T in seconds; no node or edge after it is present.
        node_ids: per type, graph row index of each local node (hop order).
        num_sampled_nodes: per type, how many nodes each hop added (hop 0 = seeds).
        edge_index: per edge type, ``[2, E]`` local indices, row 0 = neighbour (source), row 1 = center.
        num_sampled_edges: per edge type, how many edges each hop added.
    """

    seed_type: str
    seed_time: int
    num_seeds: int
    node_ids: dict[str, Tensor]
    num_sampled_nodes: dict[str, list[int]]
    edge_index: dict[EdgeType, Tensor]
    num_sampled_edges: dict[EdgeType, list[int]]

    def num_nodes(self) -> int:
        return sum(int(v.numel()) for v in self.node_ids.values())

    def num_edges(self) -> int:
        return sum(int(v.shape[1]) for v in self.edge_index.values())


class _Relabel:
    """Global row -> local index for one node type, growing hop by hop.

    Uses a sorted copy of the rows seen so far and ``searchsorted``: memory and time follow the
    subgraph, never the node table (a dense global map would cost O(N) per call).
    """

    def __init__(self, first: Tensor) -> None:
        self.rows = first
        self._sorted, self._perm = torch.sort(first)

    def add(self, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """Map candidate rows to local ids, appending unseen ones. Returns (local ids, new rows)."""
        n_old = self.rows.numel()
        if n_old:
            pos = torch.searchsorted(self._sorted, candidates).clamp_(max=n_old - 1)
            found = self._sorted[pos] == candidates
        else:
            pos = torch.zeros_like(candidates)
            found = torch.zeros_like(candidates, dtype=torch.bool)
        local = torch.empty_like(candidates)
        local[found] = self._perm[pos[found]]
        new_rows, inverse = torch.unique(candidates[~found], return_inverse=True)
        local[~found] = inverse + n_old
        if new_rows.numel():
            self.rows = torch.cat([self.rows, new_rows])
            self._sorted, self._perm = torch.sort(self.rows)
        return local, new_rows


def most_recent_neighbours(
    graph: TemporalGraph, edge_type: EdgeType, centers: Tensor, cutoff: int, k: int
) -> tuple[Tensor, Tensor]:
    """The (up to) k most recent neighbours at or before ``cutoff`` of each center row.

    Returns:
        (center position in ``centers`` for each edge, neighbour row for each edge), ordered by center
        then by edge time ascending.
    """
    store = graph.edges[edge_type]
    start = store.rowptr[centers]
    # Last edge with time <= cutoff, per center, in one vectorised binary search over the composite key.
    end = torch.searchsorted(store.key, (centers << TIME_BITS) | cutoff, right=True)
    take = (end - start).clamp_(min=0, max=k)
    total = int(take.sum())
    which = torch.repeat_interleave(torch.arange(centers.numel()), take)
    first = torch.cumsum(take, 0) - take
    offsets = torch.arange(total) - first[which]
    eidx = (end - take)[which] + offsets
    return which, store.col[eidx]


def sample(
    graph: TemporalGraph,
    seeds: Tensor,
    cutoff: int,
    fanouts: Sequence[int],
    *,
    seed_type: str | None = None,
) -> SampledSubgraph:
    """Sample ``len(fanouts)`` hops around ``seeds`` (graph rows of ``seed_type``) as of ``cutoff``.

    Args:
        graph: the temporal graph.
        seeds: int64 row indices (not primary keys), unique.
        cutoff: T, seconds since the graph epoch; only edges with time <= T are followed.
        fanouts: k per hop, applied to every edge type whose center type is in the frontier.
        seed_type: defaults to the graph's seed type (customers).
    """
    seed_type = seed_type or graph.spec.seed_type
    seeds = seeds.to(torch.int64)
    node_types = list(graph.nodes)
    relabel = {t: _Relabel(seeds if t == seed_type else torch.empty(0, dtype=torch.int64)) for t in node_types}
    num_nodes = {t: [int(seeds.numel()) if t == seed_type else 0] for t in node_types}
    edges: dict[EdgeType, list[Tensor]] = {et: [] for et in graph.edges}
    num_edges: dict[EdgeType, list[int]] = {et: [] for et in graph.edges}

    # frontier[type] = (local ids, graph rows) of the nodes added by the previous hop
    frontier = {seed_type: (torch.arange(seeds.numel()), seeds)}
    for k in fanouts:
        added: dict[str, list[Tensor]] = {t: [] for t in node_types}
        for et in graph.edges:
            nbr_type, _, center_type = et
            if center_type not in frontier or frontier[center_type][1].numel() == 0:
                num_edges[et].append(0)
                continue
            local_c, rows_c = frontier[center_type]
            which, nbr_rows = most_recent_neighbours(graph, et, rows_c, cutoff, k)
            local_n, new_rows = relabel[nbr_type].add(nbr_rows)
            added[nbr_type].append(new_rows)
            edges[et].append(torch.stack([local_n, local_c[which]]))
            num_edges[et].append(int(which.numel()))
        frontier = {}
        for t in node_types:
            n_before = sum(num_nodes[t])
            new = torch.cat(added[t]) if added[t] else torch.empty(0, dtype=torch.int64)
            # Several edge types can add rows of the same type in one hop; `_Relabel` numbered them
            # consecutively, so the new local ids are exactly n_before .. n_before + len(new).
            num_nodes[t].append(int(new.numel()))
            frontier[t] = (torch.arange(n_before, n_before + new.numel()), new)

    return SampledSubgraph(
        seed_type=seed_type,
        seed_time=int(cutoff),
        num_seeds=int(seeds.numel()),
        node_ids={t: relabel[t].rows for t in node_types},
        num_sampled_nodes=num_nodes,
        edge_index={et: torch.cat(v, dim=1) if v else torch.empty(2, 0, dtype=torch.int64) for et, v in edges.items()},
        num_sampled_edges=num_edges,
    )
