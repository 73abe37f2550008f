"""FusedHeads (all heads in two matmuls) against each TaskHead run on its own."""

from __future__ import annotations

import pytest
import torch

from service.model.heads import HeadSpec, TaskHead
from service.runtime.heads import FusedHeads

HIDDEN = 16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_heads(specs: list[HeadSpec], seed: int = 0) -> dict[str, TaskHead]:
    torch.manual_seed(seed)
    heads = {s.task: TaskHead(s, HIDDEN).eval() for s in specs}
    with torch.no_grad():  # non-zero biases everywhere, so a bias in the wrong place would show
        for h in heads.values():
            for p in h.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return heads


MIXED = [
    HeadSpec("churn", "binary", hidden=8),
    HeadSpec("ltv", "regression", hidden=0),
    HeadSpec("segment", "multiclass", classes=("a", "b", "c"), hidden=5),
    HeadSpec("tier", "multiclass", classes=("x", "y", "z", "w"), hidden=0),
    HeadSpec("upsell", "binary", hidden=0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "specs",
    [MIXED, MIXED[:1], [MIXED[1]], [MIXED[3], MIXED[2]], [MIXED[1], MIXED[4]]],
    ids=["mixed", "one-mlp", "one-linear", "linear-then-mlp", "linear-only"],
)
def test_fused_heads_equal_each_head_run_alone(specs: list[HeadSpec], device: str) -> None:
    heads = make_heads(specs)
    h = torch.randn(7, HIDDEN)
    fused = FusedHeads(heads).to(device)

    with torch.inference_mode():
        out = fused(h.to(device))
        want = {t: head(h) for t, head in heads.items()}

    assert list(out) == list(want)
    for task, w in want.items():
        assert out[task].shape == w.shape
        torch.testing.assert_close(out[task].cpu(), w, atol=1e-6, rtol=1e-5)


def test_fused_heads_keep_rows_independent() -> None:
    heads = make_heads(MIXED)
    h = torch.randn(5, HIDDEN)
    fused = FusedHeads(heads)

    with torch.inference_mode():
        batch = fused(h)
        rows = [fused(h[i : i + 1]) for i in range(5)]

    for task in heads:
        torch.testing.assert_close(torch.cat([r[task] for r in rows]), batch[task], atol=1e-6, rtol=1e-5)


def test_fused_heads_output_slices_tile_the_output() -> None:
    fused = FusedHeads(make_heads(MIXED))

    spans = list(fused.slices.values())

    assert spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] == fused.w2.shape[0] == sum(s.out_dim for s in MIXED)
