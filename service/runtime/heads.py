"""The served set of heads: an immutable snapshot, replaced by one reference assignment.

A request reads ``registry.current`` once and uses that :class:`HeadSet` for all of its ids, so a swap
in flight can never give one response a mix of old and new heads. All heads of a set run fused: their
first layers are concatenated into one matrix and their output layers into one block-diagonal matrix,
two matmuls for any number of heads.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from service.cache.embeddings import LocalLRU
from service.model.heads import HeadSpec, TaskHead, postprocess
from service.store.store import HeadRecord


@dataclass(frozen=True)
class ActiveHead:
    record: HeadRecord
    module: TaskHead
    loaded_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def spec(self) -> HeadSpec:
        return self.record.spec


class FusedHeads(nn.Module):
    """All heads as two matmuls: ``z = W1 h`` (concatenated first layers), ReLU on the hidden units
    of MLP heads, then ``W2 z`` with a block-diagonal W2 (identity blocks for single-Linear heads)."""

    w1: Tensor
    b1: Tensor
    relu: Tensor
    w2: Tensor
    b2: Tensor

    def __init__(self, heads: dict[str, TaskHead]) -> None:
        super().__init__()
        w1, b1, relu, blocks, b2, self.slices = [], [], [], [], [], {}
        out_at = 0
        for task, head in heads.items():
            layers = [m for m in head.net.modules() if isinstance(m, nn.Linear)]
            first, last = layers[0], layers[-1]
            w1.append(first.weight.detach())
            b1.append(first.bias.detach())
            if len(layers) == 2:
                relu.append(torch.ones(first.out_features, dtype=torch.bool))
                blocks.append(last.weight.detach())
                b2.append(last.bias.detach())
            else:
                relu.append(torch.zeros(first.out_features, dtype=torch.bool))
                blocks.append(torch.eye(first.out_features, device=first.weight.device))
                b2.append(torch.zeros(first.out_features, device=first.weight.device))
            n_out = blocks[-1].shape[0]
            self.slices[task] = (out_at, out_at + n_out)
            out_at += n_out
        self.register_buffer("w1", torch.cat(w1))
        self.register_buffer("b1", torch.cat(b1))
        self.register_buffer("relu", torch.cat(relu).to(self.w1.device))
        self.register_buffer("w2", torch.block_diag(*blocks))  # type: ignore[no-untyped-call]
        self.register_buffer("b2", torch.cat(b2))

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        z = torch.addmm(self.b1, h, self.w1.t())
        z = torch.where(self.relu, torch.relu(z), z)
        out = torch.addmm(self.b2, z, self.w2.t())
        return {task: out[:, a:b] for task, (a, b) in self.slices.items()}


class HeadSet:
    """An immutable set of active heads plus their fused executor."""

    def __init__(self, heads: dict[str, ActiveHead], device: torch.device, fragment_entries: int = 0) -> None:
        self.heads = dict(heads)
        self.device = device
        # customer id -> that customer's JSON response object, computed by exactly these heads.
        self.fragments: LocalLRU[int, bytes] = LocalLRU(fragment_entries)
        self.provenance: bytes | None = None  # the response's "model" object, filled by the runtime
        self.fused = FusedHeads({t: a.module for t, a in self.heads.items()}).to(device) if self.heads else None

    @property
    def versions(self) -> dict[str, str]:
        return {t: a.record.version for t, a in self.heads.items()}

    @torch.inference_mode()
    def run(self, h: Tensor) -> dict[str, Tensor]:
        """Reported-unit outputs (CPU) of every head for embeddings ``h`` [B, H]."""
        if self.fused is None:
            return {}
        raw = self.fused(h.to(self.device))
        return {t: postprocess(self.heads[t].spec, raw[t]).float().cpu() for t in self.heads}

    def replace(self, task: str, head: ActiveHead | None) -> HeadSet:
        """A new set with ``task`` replaced (or removed when ``head`` is None)."""
        heads = dict(self.heads)
        if head is None:
            heads.pop(task, None)
        else:
            heads[task] = head
        return HeadSet(heads, self.device, self.fragments.capacity)


def activate(record: HeadRecord, in_dim: int, device: torch.device) -> ActiveHead:
    """Build, verify and place one head (runs off the request path)."""
    module = record.build(in_dim).to(device)
    return ActiveHead(record, module)
