"""The shared encoder: every convolution, layer-wise trimming, and no information from after T."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from service.data.labels import database_at
from service.graph.sampler import sample
from service.graph.temporal import build_graph, infer_graph_spec, to_seconds
from service.model.encoder import CONV_KINDS, EncoderConfig, gather_features
from service.model.heads import HeadSpec
from service.model.multitask import MultiTaskGNN
from tests.factories import T0, tiny_db

HEADS = [HeadSpec("churn", "binary"), HeadSpec("ltv", "regression"), HeadSpec("segment", "multiclass", ("a", "b", "c"))]


def make_model(graph, conv="sage", layers=2, hidden=16):
    cfg = EncoderConfig(conv=conv, layers=layers, hidden=hidden, fanouts=(5, 3, 2)[:layers],
                        id_embedding_types=("products",), dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = MultiTaskGNN(graph.spec, cfg, HEADS, {t: n.num_nodes for t, n in graph.nodes.items()})
    return model.eval()


@pytest.mark.parametrize("conv", CONV_KINDS)
def test_forward_gives_every_head_for_every_conv(conv):
    graph = build_graph(tiny_db())
    model = make_model(graph, conv)
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=120))[0])
    sub = sample(graph, torch.arange(12), cutoff, model.encoder.cfg.fanouts)
    out = model(gather_features(graph, sub), sub)
    assert out["churn"].shape == (12, 1) and out["ltv"].shape == (12, 1) and out["segment"].shape == (12, 3)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


@pytest.mark.parametrize("conv", CONV_KINDS)
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_trimmed_pass_equals_untrimmed_pass(conv, layers):
    graph = build_graph(tiny_db(transactions=600))
    model = make_model(graph, conv, layers)
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=200))[0])
    sub = sample(graph, torch.arange(8), cutoff, model.encoder.cfg.fanouts)
    feats = gather_features(graph, sub)
    with torch.inference_mode():
        trimmed = model.encoder(feats, sub, trim=True)
        full = model.encoder(feats, sub, trim=False)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_trimming_computes_last_layer_only_for_seeds():
    graph = build_graph(tiny_db(transactions=600))
    model = make_model(graph)
    cutoff = int(to_seconds(T0 + pd.Timedelta(days=200))[0])
    sub = sample(graph, torch.arange(4), cutoff, model.encoder.cfg.fanouts)
    seen = []
    model.encoder.layers[-1].register_forward_hook(
        lambda _m, _i, out: seen.append({t: v.shape[0] for t, v in out.items()})
    )
    with torch.inference_mode():
        model.encoder(gather_features(graph, sub), sub)
    assert seen[0]["customers"] == 4
    assert seen[0]["transactions"] == 0 and seen[0]["products"] == 0
    assert sub.num_nodes() > 20  # the leaves existed; the last layer just did not compute them


def test_nothing_after_the_cutoff_reaches_the_model():
    """Embeddings at T from the full database equal those from a database cut at T."""
    db = tiny_db(transactions=800)
    cutoff_ts = T0 + pd.Timedelta(days=120)
    cutoff = int(to_seconds(cutoff_ts)[0])
    full = build_graph(db)
    spec = infer_graph_spec(db)
    cut = build_graph(database_at(db, cutoff_ts), spec=spec)
    model = make_model(full)
    ids = torch.as_tensor(database_at(db, cutoff_ts).customers["customer_id"].to_numpy()[:10])
    with torch.inference_mode():
        outs = []
        for g in (full, cut):
            sub = sample(g, g.lookup("customers", ids), cutoff, model.encoder.cfg.fanouts)
            outs.append(model.encoder(gather_features(g, sub), sub))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)

    # And changing every row after T (amounts, new purchases) changes nothing at T.
    later = db.transactions["timestamp"] > cutoff_ts
    db2 = tiny_db(transactions=800)
    db2.tables["transactions"].loc[later, "amount"] *= 100.0
    g2 = build_graph(db2, spec=spec)
    sub = sample(g2, g2.lookup("customers", ids), cutoff, model.encoder.cfg.fanouts)
    with torch.inference_mode():
        torch.testing.assert_close(model.encoder(gather_features(g2, sub), sub), outs[0], atol=1e-6, rtol=1e-6)
