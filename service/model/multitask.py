"""MultiTaskGNN: one shared encoder, one small head per task."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from service.graph.sampler import SampledSubgraph
from service.graph.temporal import GraphSpec
from service.model.encoder import EncoderConfig, FeatureBatch, GraphEncoder
from service.model.heads import HeadSpec, TaskHead


class MultiTaskGNN(nn.Module):
    """``encode`` once, then every head: the encoder is the expensive part, heads are a few matmuls."""

    def __init__(
        self, spec: GraphSpec, cfg: EncoderConfig, heads: Sequence[HeadSpec], num_rows: dict[str, int]
    ) -> None:
        super().__init__()
        self.encoder = GraphEncoder(spec, cfg, num_rows)
        self.heads = nn.ModuleDict({h.task: TaskHead(h, cfg.hidden) for h in heads})

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def encode(self, feats: FeatureBatch, sub: SampledSubgraph) -> Tensor:
        out: Tensor = self.encoder(feats, sub)
        return out

    def forward(self, feats: FeatureBatch, sub: SampledSubgraph) -> dict[str, Tensor]:
        h = self.encode(feats, sub)
        return {task: head(h) for task, head in self.heads.items()}
