"""Device-parametrised checks: always on CPU, on CUDA too when the machine has it (PyG's withDevice habit)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from service.graph.sampler import sample
from service.graph.temporal import build_graph, to_seconds
from service.model.encoder import gather_features
from service.runtime.heads import HeadSet, activate
from service.store.store import ModelStore
from tests.factories import T0, tiny_db
from tests.model.test_encoder import make_model

DEVICES = [pytest.param("cpu")] + [
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    )
]


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_on_device_matches_cpu(device):
    graph = build_graph(tiny_db())
    model = make_model(graph)
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=150))[0])
    sub = sample(graph, torch.arange(16), cutoff, model.encoder.cfg.fanouts)
    feats = gather_features(graph, sub)
    with torch.inference_mode():
        ref = model.encoder(feats, sub)
        out = model.encoder.to(device)(feats.to(torch.device(device)), sub).cpu()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_stored_heads_run_fused_on_device(model_store, device):
    loaded = ModelStore(model_store).load("tiny")
    dev = torch.device(device)
    heads = HeadSet({t: activate(r, loaded.config.hidden, dev) for t, r in loaded.heads.items()}, dev)
    out = heads.run(torch.randn(5, loaded.config.hidden))
    assert set(out) == {"churn", "ltv", "segment"}
    assert out["churn"].device.type == "cpu" and bool(((out["churn"] >= 0) & (out["churn"] <= 1)).all())
    torch.testing.assert_close(out["segment"].sum(-1), torch.ones(5))
