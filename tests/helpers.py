"""Factories shared by the tests: tiny databases, tiny trained models, settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.config import Settings
from service.model.encoder import EncoderConfig
from service.training.pipeline import train_and_save
from service.training.trainer import TrainConfig

TINY_SOURCE: dict[str, Any] = {"kind": "synthetic", "customers": 400, "seed": 1, "segment_fraction": 0.5}


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """A model that trains in about a second on TINY_SOURCE."""
    enc = overrides.pop("encoder", EncoderConfig(hidden=16, fanouts=(8, 4), id_embedding_types=("products",)))
    base: dict[str, Any] = {"encoder": enc, "epochs": 2, "batch_size": 128, "head_hidden": 8, "seed": 0,
                            "device": "cpu"}  # fmt: skip
    base.update(overrides)
    return TrainConfig(**base)


def train_tiny_model(root: Path, name: str = "tiny", **overrides: Any) -> str:
    source = overrides.pop("source", TINY_SOURCE)
    version, _ = train_and_save(source, tiny_train_config(**overrides), root, name)
    return version


def make_settings(store: Path, redis_url: str | None, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "model_store": store,
        "model_name": "tiny",
        "redis_url": redis_url,
        "device": "cpu",
        "batch_max_wait_ms": 2.0,
    }
    base.update(overrides)
    return Settings(**base)
