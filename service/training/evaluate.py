"""`onepass evaluate`: multi-task vs single-task, each loss balancer, and an MLP baseline without
message passing, on the synthetic database and on CDNOW, mean and std over seeds.

Every variant trains with the same data, splits, epochs and early stopping; only the tasks, the loss
balancer or the number of message-passing layers change.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.data.schema import Database
from service.data.sources import load_source
from service.graph.temporal import build_graph
from service.model.encoder import EncoderConfig
from service.training.trainer import ALL_TASKS, TrainConfig, train

METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("churn", "auroc", "churn AUROC ↑"),
    ("churn", "ap", "churn AP ↑"),
    ("ltv", "mae", "LTV MAE $ ↓"),
    ("ltv", "rmse", "LTV RMSE $ ↓"),
    ("segment", "accuracy", "segment acc ↑"),
    ("segment", "macro_f1", "segment macro-F1 ↑"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    tasks: tuple[str, ...]
    loss: str
    layers: int = 2


def variants(methods: Sequence[str]) -> list[Variant]:
    out = [Variant(f"multi-task GNN, {m}", ALL_TASKS, m) for m in methods]
    out += [Variant(f"single-task GNN ({t})", (t,), "equal") for t in ALL_TASKS]
    out.append(Variant("multi-task MLP, no message passing (uncertainty)", ALL_TASKS, "uncertainty", layers=0))
    return out


def _config(v: Variant, base: TrainConfig, seed: int, id_types: tuple[str, ...]) -> TrainConfig:
    layers = v.layers
    enc = replace(
        base.encoder,
        layers=layers,
        fanouts=base.encoder.fanouts[:layers],
        id_embedding_types=id_types if layers else (),  # the MLP sees only the customer's own row
    )
    weights = {"churn": 1.0, "ltv": 0.5, "segment": 1.0} if v.loss == "fixed" else None
    return replace(base, tasks=v.tasks, loss=v.loss, fixed_weights=weights, encoder=enc, seed=seed)


def run_dataset(
    db: Database,
    base: TrainConfig,
    seeds: Sequence[int],
    methods: Sequence[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train every variant with every seed; per variant, mean and std of each test metric."""
    graph = build_graph(db)  # shared by all runs: the graph does not depend on the variant
    id_types = ("products",) if "products" in db.tables else ()
    rows: dict[str, Any] = {}
    for v in variants(methods):
        runs: list[dict[str, dict[str, float]]] = []
        t0 = time.perf_counter()
        for seed in seeds:
            result = train(db, _config(v, base, seed, id_types), graph=graph)
            runs.append(result.test_metrics)
        summary: dict[str, dict[str, list[float]]] = {}
        for task, metric, _ in METRIC_COLUMNS:
            values = [r[task][metric] for r in runs if task in r and not math.isnan(r[task][metric])]
            if values:
                summary.setdefault(task, {})[metric] = [float(np.mean(values)), float(np.std(values))]
        rows[v.name] = {"tasks": list(v.tasks), "loss": v.loss, "layers": v.layers, "metrics": summary,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
        log(f"  {v.name}: {_cells(summary)} ({time.perf_counter() - t0:.0f} s)")
    return rows


def _cells(summary: dict[str, dict[str, list[float]]]) -> str:
    out = []
    for task, metric, label in METRIC_COLUMNS:
        if task in summary and metric in summary[task]:
            mean, std = summary[task][metric]
            out.append(f"{label.split(' ')[0]} {metric} {mean:.3f}±{std:.3f}")
    return ", ".join(out)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Evaluation: multi-task vs single-task, loss balancing, message passing",
        "",
        f"Made by `{report['command']}` on {report['created']} ({report['device']}); "
        f"test metrics on the latest cutoff, mean ± std over seeds {report['seeds']}.",
        "",
    ]
    for ds, block in report["datasets"].items():
        lines += [f"## {ds}", "", block["description"], ""]
        header = "| variant | " + " | ".join(label for _, _, label in METRIC_COLUMNS) + " |"
        lines += [header, "|" + "---|" * (len(METRIC_COLUMNS) + 1)]
        for name, row in block["variants"].items():
            cells = []
            for task, metric, _ in METRIC_COLUMNS:
                m = row["metrics"].get(task, {}).get(metric)
                cells.append(f"{m[0]:.3f} ± {m[1]:.3f}" if m else "—")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def evaluate(
    datasets: dict[str, dict[str, Any]],
    base: TrainConfig,
    seeds: Sequence[int],
    methods: Sequence[str],
    out_dir: Path,
    command: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run every dataset, write ``evaluation.json`` and ``evaluation.md`` into ``out_dir``."""
    report: dict[str, Any] = {
        "command": command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": base.device,
        "seeds": list(seeds),
        "config": base.to_json(),
        "datasets": {},
    }
    for name, source in datasets.items():
        db = load_source(source)
        desc = (
            f"{len(db.customers):,} customers, {len(db.transactions):,} transactions, source `{json.dumps(source)}`, "
            f"segment rule `{db.segment_rule}`."
        )
        log(f"{name}: {desc}")
        report["datasets"][name] = {"source": source, "description": desc,
                                    "variants": run_dataset(db, base, seeds, methods, log)}  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2))
        (out_dir / "evaluation.md").write_text(to_markdown(report))
    return report


def default_base(epochs: int, hidden: int, device: str, max_train_seeds: int | None = None) -> TrainConfig:
    return TrainConfig(
        encoder=EncoderConfig(hidden=hidden, fanouts=(20, 10)),
        epochs=epochs,
        device=device,
        max_train_seeds=max_train_seeds,
    )
