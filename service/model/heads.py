"""Task heads: small MLPs from a seed embedding to one task's output.

A head is stored on its own (``heads/<task>.safetensors``) so it can be trained, swapped or added
without touching the encoder or the cached embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

HeadKind = Literal["binary", "regression", "multiclass"]
HEAD_KINDS: tuple[str, ...] = ("binary", "regression", "multiclass")


@dataclass(frozen=True)
class HeadSpec:
    """What a head predicts.

    ``regression`` heads are trained on ``log1p(dollars)`` and report dollars (``expm1``, clamped at 0);
    the transformed space keeps a few big spenders from dominating the squared loss.
    """

    task: str
    kind: HeadKind
    classes: tuple[str, ...] = field(default_factory=tuple)
    hidden: int = 32  # 0 = a single Linear layer

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        if self.kind == "multiclass" and len(self.classes) < 2:
            raise ValueError(f"multiclass head '{self.task}' needs at least two class names")

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.kind == "multiclass" else 1

    def to_json(self) -> dict[str, object]:
        return {"task": self.task, "kind": self.kind, "classes": list(self.classes), "hidden": self.hidden}

    @staticmethod
    def from_json(raw: dict[str, object]) -> HeadSpec:
        classes = raw.get("classes", [])
        assert isinstance(classes, list)
        return HeadSpec(
            task=str(raw["task"]),
            kind=raw["kind"],  # type: ignore[arg-type]
            classes=tuple(str(c) for c in classes),
            hidden=int(raw.get("hidden", 32)),  # type: ignore[call-overload]
        )


class TaskHead(nn.Module):
    """``embedding [B, H] -> raw output [B, out_dim]`` (logits, or log1p-dollars)."""

    def __init__(self, spec: HeadSpec, in_dim: int):
        super().__init__()
        self.spec = spec
        self.in_dim = in_dim
        if spec.hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, spec.out_dim)
            )
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, spec.out_dim))

    def forward(self, h: Tensor) -> Tensor:
        out: Tensor = self.net(h)
        return out

    def loss(self, raw: Tensor, target: Tensor) -> Tensor:
        """Training loss in the head's own space; ``target`` is in reported units (0/1, dollars, class)."""
        if self.spec.kind == "binary":
            return F.binary_cross_entropy_with_logits(raw.squeeze(-1), target.float())
        if self.spec.kind == "regression":
            return F.mse_loss(raw.squeeze(-1), torch.log1p(target.float().clamp(min=0)))
        return F.cross_entropy(raw, target.long())


def postprocess(spec: HeadSpec, raw: Tensor) -> Tensor:
    """Raw head output to reported units: probability, dollars, or class probabilities."""
    if spec.kind == "binary":
        return torch.sigmoid(raw.squeeze(-1))
    if spec.kind == "regression":
        # expm1 of a huge value overflows float32; cap at e^20 - 1 ~ $485M per customer.
        return torch.expm1(raw.squeeze(-1).clamp(max=20.0)).clamp(min=0.0)
    return torch.softmax(raw, dim=-1)


def init_bias_from_prior(head: TaskHead, target: Tensor) -> None:
    """Start the output layer at the label prior (base rate, mean log-spend, class frequencies):
    the first epochs then learn signal instead of the intercept."""
    last = list(head.net.children())[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        if head.spec.kind == "binary":
            p = float(target.float().mean().clamp(1e-4, 1 - 1e-4))
            last.bias.fill_(math.log(p / (1 - p)))
        elif head.spec.kind == "regression":
            last.bias.fill_(float(torch.log1p(target.float().clamp(min=0)).mean()))
        else:
            counts = torch.bincount(target.long(), minlength=head.spec.out_dim).float() + 1.0
            last.bias.copy_(torch.log(counts / counts.sum()))
