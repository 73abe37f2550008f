"""The database as a heterogeneous, time-aware graph.

Every table is a node type and every row a node (RelBench's relational-entity graph); every foreign
key gives two edge types, one per direction. A transaction is therefore a node, linked to its
customer and its product: its columns (quantity, amount, time) become node features, and a product
reaches the customers who bought it in two hops. A node exists from its row's time on; an edge from
the later of its two rows' times. Tables without a time column (products) are always visible.

Edges are stored once per edge type in CSR form keyed by the node that aggregates (the "center"),
sorted by edge time inside each row, with a composite ``row << 32 | time`` key so that "the most
recent k neighbours at or before T" is one vectorised ``searchsorted`` for a whole frontier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from service.data.schema import ColumnKind, Database

EdgeType = tuple[str, str, str]  # (neighbour type, relation, center type): messages flow nbr -> center

#: Times are stored as seconds since this epoch, so they fit in 32 bits for 136 years.
EPOCH = pd.Timestamp("1970-01-01")
TIME_BITS = 32
NO_TIME = 0  # rows without a time column are visible at every cutoff


def to_seconds(ts: pd.Timestamp | pd.Series | np.ndarray, what: str = "timestamps") -> np.ndarray:
    """Timestamps to int64 seconds since :data:`EPOCH` (the graph's time unit).

    Args:
        ts: one timestamp or a column of them.
        what: how to name the values in an error, e.g. ``"customers: column 'signup_time'"``.
    """
    values = pd.to_datetime(pd.Series(np.atleast_1d(ts))).to_numpy(dtype="datetime64[s]")
    out: np.ndarray = values.astype(np.int64)
    bad = np.flatnonzero((out < 0) | (out >= 1 << TIME_BITS))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{what}, row {row + 1}: {values[row]} is outside the supported range 1970-01-01 to 2106-02-07 "
            f"({bad.size} such rows)"
        )
    return out


@dataclass(frozen=True)
class NodeFeatureSpec:
    """Which columns of a table feed the encoder, and the categorical vocabularies.

    Vocabularies are fixed at training time and stored in the manifest: code 0 is "unknown", so a
    category first seen at serving time maps to 0 rather than to another category's embedding.
    """

    numeric: tuple[str, ...]
    categorical: dict[str, tuple[str, ...]]  # column -> vocabulary (code = index + 1)
    time: str | None
    primary_key: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "numeric": list(self.numeric),
            "categorical": {k: list(v) for k, v in self.categorical.items()},
            "time": self.time,
            "primary_key": self.primary_key,
        }

    @staticmethod
    def from_json(raw: dict[str, object]) -> NodeFeatureSpec:
        cats = raw["categorical"]
        assert isinstance(cats, dict)
        numeric = raw["numeric"]
        assert isinstance(numeric, list)
        time, pk = raw.get("time"), raw.get("primary_key")
        return NodeFeatureSpec(
            numeric=tuple(str(c) for c in numeric),
            categorical={str(k): tuple(str(x) for x in v) for k, v in cats.items()},
            time=str(time) if time is not None else None,
            primary_key=str(pk) if pk is not None else None,
        )


@dataclass(frozen=True)
class GraphSpec:
    """The graph's shape: node types with feature specs, and edge types. Saved in the manifest."""

    nodes: dict[str, NodeFeatureSpec]
    edges: tuple[EdgeType, ...]
    seed_type: str = "customers"

    def to_json(self) -> dict[str, object]:
        return {
            "nodes": {k: v.to_json() for k, v in self.nodes.items()},
            "edges": [list(e) for e in self.edges],
            "seed_type": self.seed_type,
        }

    @staticmethod
    def from_json(raw: dict[str, object]) -> GraphSpec:
        nodes = raw["nodes"]
        edges = raw["edges"]
        assert isinstance(nodes, dict) and isinstance(edges, list)
        return GraphSpec(
            nodes={str(k): NodeFeatureSpec.from_json(v) for k, v in nodes.items()},
            edges=tuple((str(a), str(b), str(c)) for a, b, c in edges),
            seed_type=str(raw.get("seed_type", "customers")),
        )


def infer_graph_spec(db: Database, *, max_vocab: int = 1000) -> GraphSpec:
    """Derive node features and edge types from the schema, vocabularies from the data."""
    nodes: dict[str, NodeFeatureSpec] = {}
    edges: list[EdgeType] = []
    for name, schema in db.schemas.items():
        df = db.tables[name]
        cats: dict[str, tuple[str, ...]] = {}
        for col in schema.of_kind(ColumnKind.CATEGORICAL):
            counts = df[col.name].astype(str).value_counts()
            cats[col.name] = tuple(sorted(counts.index[:max_vocab].tolist()))
        nodes[name] = NodeFeatureSpec(
            numeric=tuple(c.name for c in schema.of_kind(ColumnKind.NUMERIC)),
            categorical=cats,
            time=schema.time_column,
            primary_key=schema.primary_key,
        )
        for fk in schema.of_kind(ColumnKind.FOREIGN_KEY):
            assert fk.references is not None
            rel = fk.name.removesuffix("_id")
            edges.append((name, f"of_{rel}", fk.references))  # e.g. customer aggregates its transactions
            edges.append((fk.references, f"rev_of_{rel}", name))  # the transaction sees its customer
    return GraphSpec(nodes=nodes, edges=tuple(edges))


@dataclass
class NodeStore:
    """Raw features of one node type, in row order. Standardisation happens inside the encoder."""

    num_nodes: int
    numeric: Tensor  # float32 [N, F]
    categorical: Tensor  # int64 [N, C], 0 = unknown
    time: Tensor  # int64 [N] seconds since EPOCH (NO_TIME when the table has none)
    ids: Tensor | None  # int64 [N] primary-key values, sorted ascending when present


@dataclass
class EdgeStore:
    """CSR of one edge type keyed by center node: neighbours sorted by (time, row order)."""

    rowptr: Tensor  # int64 [N_center + 1]
    col: Tensor  # int64 [E] neighbour index
    key: Tensor  # int64 [E] center << 32 | edge time, ascending

    @property
    def num_edges(self) -> int:
        return int(self.col.numel())


@dataclass
class TemporalGraph:
    """Node stores and CSR edge stores of a database, plus what identifies it."""

    spec: GraphSpec
    nodes: dict[str, NodeStore]
    edges: dict[EdgeType, EdgeStore]
    snapshot_id: str
    max_time: int  # seconds: the latest row; serving predicts "as of" this time

    def lookup(self, node_type: str, ids: Tensor) -> Tensor:
        """Primary-key values to row indices; -1 for ids not in the table (vectorised, O(n log N))."""
        store = self.nodes[node_type]
        if store.ids is None:
            raise KeyError(f"{node_type} has no primary key")
        pos = torch.searchsorted(store.ids, ids).clamp_(max=max(store.num_nodes - 1, 0))
        found = store.ids[pos] == ids if store.num_nodes else torch.zeros_like(ids, dtype=torch.bool)
        return torch.where(found, pos, torch.full_like(pos, -1))

    def lookup_np(self, node_type: str, ids: np.ndarray) -> np.ndarray:
        """:meth:`lookup` in numpy: a few microseconds for a handful of ids (no torch dispatch)."""
        store = self.nodes[node_type]
        if store.ids is None:
            raise KeyError(f"{node_type} has no primary key")
        sorted_ids = store.ids.numpy()
        pos = np.searchsorted(sorted_ids, ids).clip(max=max(store.num_nodes - 1, 0))
        found = sorted_ids[pos] == ids if store.num_nodes else np.zeros(len(ids), dtype=bool)
        out: np.ndarray = np.where(found, pos, -1)
        return out

    def num_bytes(self) -> int:
        total = 0
        for n in self.nodes.values():
            total += sum(t.numel() * t.element_size() for t in (n.numeric, n.categorical, n.time))
        for e in self.edges.values():
            total += sum(t.numel() * t.element_size() for t in (e.rowptr, e.col, e.key))
        return total


def _encode_categorical(values: pd.Series, vocab: tuple[str, ...]) -> np.ndarray:
    mapping = {v: i + 1 for i, v in enumerate(vocab)}
    codes: np.ndarray = values.astype(str).map(mapping).fillna(0).to_numpy(dtype=np.int64)
    return codes


def _build_csr(center: np.ndarray, nbr: np.ndarray, time: np.ndarray, num_center: int) -> EdgeStore:
    # lexsort is stable: ties in time keep row order, so sampling is reproducible across runs.
    order = np.lexsort((time, center))
    center_s, nbr_s, time_s = center[order], nbr[order], time[order]
    counts = np.bincount(center_s, minlength=num_center)
    rowptr = np.zeros(num_center + 1, dtype=np.int64)
    np.cumsum(counts, out=rowptr[1:])
    key = (center_s.astype(np.int64) << TIME_BITS) | time_s.astype(np.int64)
    return EdgeStore(
        rowptr=torch.from_numpy(rowptr),
        col=torch.from_numpy(nbr_s.astype(np.int64)),
        key=torch.from_numpy(key),
    )


def build_graph(db: Database, spec: GraphSpec | None = None) -> TemporalGraph:
    """Build the temporal graph of a database.

    Args:
        db: the loaded database.
        spec: feature spec from a trained model's manifest (serving); inferred from ``db`` when None.
    """
    spec = spec or infer_graph_spec(db)
    nodes: dict[str, NodeStore] = {}
    row_of: dict[str, pd.Index] = {}
    for name, fspec in spec.nodes.items():
        df = db.tables[name]
        if fspec.primary_key is not None:
            # Rows sorted by primary key so `lookup` is a binary search.
            df = df.sort_values(fspec.primary_key, kind="stable").reset_index(drop=True)
            row_of[name] = pd.Index(df[fspec.primary_key].to_numpy())
        n = len(df)
        numeric = (
            df[list(fspec.numeric)].to_numpy(dtype=np.float32) if fspec.numeric else np.zeros((n, 0), dtype=np.float32)
        )
        cats = (
            np.stack([_encode_categorical(df[c], v) for c, v in fspec.categorical.items()], axis=1)
            if fspec.categorical
            else np.zeros((n, 0), dtype=np.int64)
        )
        times = (
            to_seconds(df[fspec.time], f"{name}: column '{fspec.time}'")
            if fspec.time
            else np.full(n, NO_TIME, dtype=np.int64)
        )
        ids = df[fspec.primary_key].to_numpy(dtype=np.int64) if fspec.primary_key else None
        nodes[name] = NodeStore(
            num_nodes=n,
            numeric=torch.from_numpy(
                np.array(numeric, dtype=np.float32)
            ),  # own copy: pandas may hand out read-only views
            categorical=torch.from_numpy(np.array(cats, dtype=np.int64)),
            time=torch.from_numpy(times.astype(np.int64)),
            ids=torch.from_numpy(np.array(ids)) if ids is not None else None,
        )

    edges: dict[EdgeType, EdgeStore] = {}
    for nbr_type, rel, center_type in spec.edges:
        if rel.startswith("rev_of_"):
            continue  # built together with its forward type below
        # Forward: center = referenced row (customer), nbr = referencing row (transaction).
        fk_col = rel.removeprefix("of_") + "_id"
        child = db.tables[nbr_type]
        child_rows = np.arange(len(child), dtype=np.int64)
        parent_rows = row_of[center_type].get_indexer(child[fk_col].to_numpy())
        if (parent_rows < 0).any():
            bad = int(np.flatnonzero(parent_rows < 0)[0])
            raise ValueError(f"{nbr_type}: column '{fk_col}', row {bad + 1}: unknown {center_type} id")
        t_child = nodes[nbr_type].time.numpy()
        t_parent = nodes[center_type].time.numpy()[parent_rows]
        t_edge = np.maximum(t_child, t_parent)  # an edge exists once both rows exist
        edges[(nbr_type, rel, center_type)] = _build_csr(parent_rows, child_rows, t_edge, nodes[center_type].num_nodes)
        edges[(center_type, f"rev_{rel}", nbr_type)] = _build_csr(
            child_rows, parent_rows, t_edge, nodes[nbr_type].num_nodes
        )
    max_time = int(max(int(n.time.max()) for n in nodes.values() if n.num_nodes))
    return TemporalGraph(spec=spec, nodes=nodes, edges=edges, snapshot_id=db.snapshot_id(), max_time=max_time)
