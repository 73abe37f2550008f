"""The model store: versions, verified loading, refusal of tampered or foreign artefacts."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from safetensors.torch import save as st_save

from service.errors import ModelStoreError, NotFoundError
from service.store.store import ModelStore, check_name


def test_save_then_load_round_trips_encoder_and_heads(model_store):
    store = ModelStore(model_store)
    loaded = store.load("tiny")
    m = loaded.manifest
    assert loaded.version == store.default_version("tiny") == "v1"
    assert set(loaded.heads) == {"churn", "ltv", "segment"}
    assert m["format_version"] == 1 and m["encoder_hash"] == loaded.encoder_hash
    assert set(m["files"]) == {"encoder.safetensors", "heads/churn.safetensors", "heads/ltv.safetensors",
                               "heads/segment.safetensors"}  # fmt: skip
    assert m["tasks"]["segment"]["head"]["kind"] == "multiclass" and len(m["tasks"]["segment"]["head"]["classes"]) >= 2
    assert {"val", "test"} <= set(m["metrics"]) and "auroc" in m["metrics"]["test"]["churn"]
    assert m["data"]["snapshot_id"] and m["data"]["cutoffs"]["test"]
    head = loaded.heads["churn"].build(loaded.config.hidden)
    assert head(torch.zeros(2, loaded.config.hidden)).shape == (2, 1)


@pytest.fixture
def store_copy(model_store, tmp_path):
    shutil.copytree(model_store, tmp_path / "store")
    return tmp_path / "store"


def test_load_refuses_a_file_whose_hash_differs(store_copy):
    path = store_copy / "tiny" / "v1" / "heads" / "ltv.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="ltv.safetensors: sha256"):
        ModelStore(store_copy).load("tiny")


def test_load_refuses_wrong_shapes_even_with_matching_hash(store_copy):
    vdir = store_copy / "tiny" / "v1"
    bad = st_save({"net.0.weight": torch.zeros(3, 3), "net.0.bias": torch.zeros(3),
                   "net.2.weight": torch.zeros(1, 3), "net.2.bias": torch.zeros(1)})  # fmt: skip
    (vdir / "heads" / "churn.safetensors").write_bytes(bad)
    manifest = json.loads((vdir / "manifest.json").read_text())
    import hashlib

    manifest["files"]["heads/churn.safetensors"] = hashlib.sha256(bad).hexdigest()
    (vdir / "manifest.json").write_text(json.dumps(manifest))
    loaded = ModelStore(store_copy).load("tiny")  # hashes match now ...
    with pytest.raises(ModelStoreError, match=r"tensor 'net\.0\.(weight|bias)' is torch.float32 \(3"):  # ... but shapes
        loaded.heads["churn"].build(loaded.config.hidden)


def test_load_refuses_pickle_files(store_copy):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    from service.model.heads import HeadSpec, TaskHead
    from service.store.store import load_state

    with pytest.raises(ModelStoreError, match="not a valid safetensors file"):
        load_state(TaskHead(HeadSpec("churn", "binary"), 4), buf.getvalue(), "upload")


@pytest.mark.parametrize("bad", ["../etc", "/abs/path", "a/b", "http://x", "", ".hidden", "x" * 80])
def test_names_that_could_escape_the_store_are_refused(bad):
    with pytest.raises(ModelStoreError):
        check_name(bad, "model name")


def test_unknown_model_or_version_is_not_found(store_copy):
    store = ModelStore(store_copy)
    with pytest.raises(NotFoundError):
        store.load("tiny", "v9")
    with pytest.raises(NotFoundError):
        store.default_version("nope")


def test_save_creates_a_new_version_and_moves_the_default(store_copy):
    store = ModelStore(store_copy)
    loaded = store.load("tiny")
    heads = {t: r.build(loaded.config.hidden) for t, r in loaded.heads.items()}
    v = store.save("tiny", loaded.encoder, heads, num_rows=loaded.manifest["encoder"]["num_rows"],
                   data=loaded.manifest["data"], training={}, metrics={})  # fmt: skip
    assert v == "v2" and store.versions("tiny") == ["v1", "v2"] and store.default_version("tiny") == "v2"
    assert store.load("tiny", "v2").encoder_hash == loaded.encoder_hash  # same weights, same hash
    assert not any(p.name.startswith(".incoming") for p in (store_copy / "tiny").iterdir())
