"""The shared encoder: per-type input encoders, then L heterogeneous message-passing layers.

The encoder sees a :class:`~service.graph.sampler.SampledSubgraph` plus the graph's raw features and
returns one embedding per seed. Layer l only computes outputs for nodes within ``L - 1 - l`` hops of
the seeds (layer-wise trimming), so an encoder pass for 64 seeds never computes final-layer outputs for
the thousands of leaf nodes the sampler brought in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch_geometric.nn import GATConv, MessagePassing, SAGEConv, TransformerConv
from torch_geometric.utils import degree

from service.graph.sampler import SampledSubgraph
from service.graph.temporal import EdgeType, GraphSpec, TemporalGraph

ConvKind = Literal["sage", "gat", "gcn", "transformer"]
CONV_KINDS: tuple[str, ...] = ("sage", "gat", "gcn", "transformer")
SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder hyper-parameters (saved in the manifest)."""

    conv: ConvKind = "sage"
    layers: int = 2
    hidden: int = 64
    fanouts: tuple[int, ...] = (20, 10)
    dropout: float = 0.1
    heads: int = 2  # attention heads for gat / transformer
    #: node types that also get a learned per-row embedding (small tables such as products)
    id_embedding_types: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.conv not in CONV_KINDS:
            raise ValueError(f"conv must be one of {', '.join(CONV_KINDS)}, got {self.conv!r}")
        if len(self.fanouts) != self.layers:
            raise ValueError(f"fanouts needs one entry per layer ({self.layers}), got {list(self.fanouts)}")

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["fanouts"] = list(self.fanouts)
        d["id_embedding_types"] = list(self.id_embedding_types)
        return d

    @staticmethod
    def from_json(raw: dict[str, object]) -> EncoderConfig:
        fan = raw["fanouts"]
        ids = raw.get("id_embedding_types", [])
        assert isinstance(fan, list) and isinstance(ids, list)
        return EncoderConfig(
            conv=raw["conv"],  # type: ignore[arg-type]
            layers=int(raw["layers"]),  # type: ignore[call-overload]
            hidden=int(raw["hidden"]),  # type: ignore[call-overload]
            fanouts=tuple(int(x) for x in fan),
            dropout=float(raw["dropout"]),  # type: ignore[arg-type]
            heads=int(raw.get("heads", 2)),  # type: ignore[call-overload]
            id_embedding_types=tuple(str(x) for x in ids),
        )


@dataclass
class FeatureBatch:
    """Raw features of a sampled subgraph's nodes, gathered from the graph (CPU or device)."""

    numeric: dict[str, Tensor]
    categorical: dict[str, Tensor]
    age_days: dict[str, Tensor]  # T - node time, days (>= 0); 0 for types without time
    rows: dict[str, Tensor]  # graph rows (for id embeddings)

    def to(self, device: torch.device) -> FeatureBatch:
        def mv(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return FeatureBatch(mv(self.numeric), mv(self.categorical), mv(self.age_days), mv(self.rows))


def gather_features(graph: TemporalGraph, sub: SampledSubgraph) -> FeatureBatch:
    """Look up the raw features of every sampled node."""
    numeric, categorical, age, rows = {}, {}, {}, {}
    for t, r in sub.node_ids.items():
        store = graph.nodes[t]
        numeric[t] = store.numeric[r]
        categorical[t] = store.categorical[r]
        has_time = graph.spec.nodes[t].time is not None
        age[t] = (
            (sub.seed_time - store.time[r]).clamp_(min=0).to(torch.float32) / SECONDS_PER_DAY
            if has_time
            else torch.zeros(r.numel())
        )
        rows[t] = r
    return FeatureBatch(numeric, categorical, age, rows)


class NodeInputEncoder(nn.Module):
    """Numeric (standardised), categorical (embedded), time (relative age) columns -> hidden."""

    num_mean: Tensor
    num_std: Tensor

    def __init__(self, num_numeric: int, vocab_sizes: list[int], has_time: bool, hidden: int, num_ids: int):
        super().__init__()
        # Training statistics live in buffers so they travel inside encoder.safetensors.
        self.register_buffer("num_mean", torch.zeros(num_numeric))
        self.register_buffer("num_std", torch.ones(num_numeric))
        self.numeric = nn.Linear(num_numeric, hidden) if num_numeric else None
        self.categorical = nn.ModuleList(nn.Embedding(v + 1, hidden) for v in vocab_sizes)
        # Age enters as log1p(days) and years: recency matters on a log scale, seasonality linearly.
        self.time = nn.Linear(2, hidden) if has_time else None
        self.ids = nn.Embedding(num_ids, hidden) if num_ids else None
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, numeric: Tensor, categorical: Tensor, age_days: Tensor, rows: Tensor) -> Tensor:
        h = self.bias.expand(age_days.shape[0], -1)
        if self.numeric is not None:
            z = (numeric - self.num_mean) / self.num_std
            # Heavy-tailed money columns: a signed log keeps outliers from dominating.
            h = h + self.numeric(torch.sign(z) * torch.log1p(z.abs()))
        for i, emb in enumerate(self.categorical):
            h = h + emb(categorical[:, i])
        if self.time is not None:
            h = h + self.time(torch.stack([torch.log1p(age_days), age_days / 365.0], dim=1))
        if self.ids is not None:
            h = h + self.ids(rows.clamp(max=self.ids.num_embeddings - 1))
        return torch.relu(self.norm(h))


class BipartiteGCNConv(MessagePassing):
    """GCN (Kipf & Welling 2017) for bipartite relations: symmetric degree normalisation
    1/sqrt(deg_src * deg_dst) over the relation's edges. PyG's GCNConv assumes one node set, which a
    heterogeneous relation does not have."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(aggr="add")
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: tuple[Tensor, Tensor], edge_index: Tensor) -> Tensor:
        src, dst = edge_index
        deg_src = degree(src, x[0].shape[0]).clamp_(min=1)
        deg_dst = degree(dst, x[1].shape[0]).clamp_(min=1)
        norm = (deg_src[src] * deg_dst[dst]).rsqrt()
        out: Tensor = self.propagate(
            edge_index, x=(self.lin(x[0]), x[1]), norm=norm, size=(x[0].shape[0], x[1].shape[0])
        )
        return out + self.bias

    def message(self, x_j: Tensor, norm: Tensor) -> Tensor:
        return norm.unsqueeze(-1) * x_j


def make_conv(kind: str, hidden: int, heads: int) -> nn.Module:
    if kind == "sage":
        conv: nn.Module = SAGEConv((hidden, hidden), hidden)
        return conv
    if kind == "gat":
        conv = GATConv((hidden, hidden), hidden, heads=heads, concat=False, add_self_loops=False)
        return conv
    if kind == "gcn":
        return BipartiteGCNConv(hidden, hidden)
    if kind == "transformer":
        conv = TransformerConv((hidden, hidden), hidden, heads=heads, concat=False, root_weight=True)
        return conv
    raise ValueError(f"unknown conv {kind!r}")


def _key(et: EdgeType) -> str:
    return "__".join(et)


class HeteroLayer(nn.Module):
    """One message-passing layer: a conv per edge type, summed per destination type, then a
    residual connection and LayerNorm (types that receive no message keep their input)."""

    def __init__(self, edge_types: tuple[EdgeType, ...], node_types: list[str], cfg: EncoderConfig):
        super().__init__()
        self.edge_types = edge_types
        self.convs = nn.ModuleDict({_key(et): make_conv(cfg.conv, cfg.hidden, cfg.heads) for et in edge_types})
        self.norms = nn.ModuleDict({t: nn.LayerNorm(cfg.hidden) for t in node_types})
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: dict[str, Tensor], edge_index: dict[EdgeType, Tensor], n_out: dict[str, int]
    ) -> dict[str, Tensor]:
        agg: dict[str, Tensor] = {}
        for et in self.edge_types:
            ei = edge_index.get(et)
            src_t, _, dst_t = et
            # Run the conv even with zero edges in this pass: a node's output must not depend on
            # whether other nodes in the batch have neighbours (the root/self term still applies).
            if ei is None or n_out[dst_t] == 0:
                continue
            x_dst = x[dst_t][: n_out[dst_t]]
            msg = self.convs[_key(et)]((x[src_t], x_dst), ei)
            agg[dst_t] = agg[dst_t] + msg if dst_t in agg else msg
        out: dict[str, Tensor] = {}
        for t, n in n_out.items():
            h = x[t][:n]
            if t in agg:
                h = self.norms[t](h + self.dropout(torch.relu(agg[t])))
            out[t] = h
        return out


class GraphEncoder(nn.Module):
    """Shared encoder: ``forward(features, subgraph) -> [num_seeds, hidden]`` seed embeddings."""

    def __init__(self, spec: GraphSpec, cfg: EncoderConfig, num_rows: dict[str, int]):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        node_types = list(spec.nodes)
        self.inputs = nn.ModuleDict(
            {
                t: NodeInputEncoder(
                    len(f.numeric),
                    [len(v) for v in f.categorical.values()],
                    f.time is not None,
                    cfg.hidden,
                    num_rows.get(t, 0) if t in cfg.id_embedding_types else 0,
                )
                for t, f in spec.nodes.items()
            }
        )
        self.layers = nn.ModuleList(HeteroLayer(spec.edges, node_types, cfg) for _ in range(cfg.layers))

    def input_encoders(self) -> dict[str, NodeInputEncoder]:
        """Per node type input encoder (typed view of ``self.inputs``)."""
        return {t: m for t, m in self.inputs.items() if isinstance(m, NodeInputEncoder)}

    @property
    def last_layer(self) -> nn.Module:
        """GradNorm's W: the shared parameters closest to the heads (the seed type's input encoder
        when the encoder has no message-passing layer, i.e. the MLP baseline)."""
        return self.layers[-1] if len(self.layers) else self.inputs[self.spec.seed_type]

    def forward(self, feats: FeatureBatch, sub: SampledSubgraph, *, trim: bool = True) -> Tensor:
        """Seed embeddings. ``trim=False`` computes every layer for every sampled node (the reference
        the trimmed pass must equal; only useful in tests)."""
        L = self.cfg.layers
        x = {
            t: enc(feats.numeric[t], feats.categorical[t], feats.age_days[t], feats.rows[t])
            for t, enc in self.inputs.items()
        }
        for layer_idx, layer in enumerate(self.layers):
            if trim:
                keep_hops = L - layer_idx  # outputs needed within keep_hops - 1 hops of the seeds
                n_out = {t: sum(n[:keep_hops]) for t, n in sub.num_sampled_nodes.items()}
                ei = {et: e[:, : sum(sub.num_sampled_edges[et][:keep_hops])] for et, e in sub.edge_index.items()}
            else:
                n_out = {t: sum(n) for t, n in sub.num_sampled_nodes.items()}
                ei = sub.edge_index
            x = layer(x, ei, n_out)
        out: Tensor = x[sub.seed_type][: sub.num_seeds]
        return out
