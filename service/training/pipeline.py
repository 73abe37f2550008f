"""Train on a data source and store the result as a new model version (CLI and tests share this)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.data.sources import load_source
from service.store.store import ModelStore
from service.training.trainer import TrainConfig, TrainResult, train


def train_and_save(
    source: dict[str, Any],
    cfg: TrainConfig,
    store_root: Path,
    name: str,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[str, TrainResult]:
    """Load ``source``, train, and write ``store_root/name/<new version>``; returns (version, result)."""
    db = load_source(source)
    result = train(db, cfg, on_epoch=on_epoch, on_batch=on_batch)
    version = ModelStore(store_root).save(
        name,
        result.model.encoder,
        dict(result.model.heads.items()),  # type: ignore[arg-type]
        num_rows={t: n.num_nodes for t, n in result.graph.nodes.items()},
        data={
            "source": source,
            "snapshot_id": db.snapshot_id(),
            "window_days": cfg.window_days,
            "cutoffs": result.splits,
        },
        training={**cfg.to_json(), "best_epoch": result.best_epoch, "balancer_weights": result.balancer_weights},
        metrics={"val": result.val_metrics, "test": result.test_metrics},
    )
    return version, result
