"""Training: successive temporal cutoffs, minibatches of seeds sampled as of their cutoff, balanced
multi-task loss, per-epoch validation, early stopping on a combined score.

Every minibatch holds seeds of one cutoff T, so the sampler sees one T per call and nothing after T
reaches the model (labels come from (T, T+W], features and edges from <= T).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from service.data.labels import make_labels, make_splits, segment_classes
from service.data.schema import Database
from service.graph.sampler import sample
from service.graph.temporal import TemporalGraph, build_graph, to_seconds
from service.model.encoder import EncoderConfig, gather_features
from service.model.heads import HeadSpec, init_bias_from_prior, postprocess
from service.model.multitask import MultiTaskGNN
from service.training.losses import make_balancer
from service.training.metrics import task_metrics, task_score

ALL_TASKS: tuple[str, ...] = ("churn", "ltv", "segment")
TASK_KINDS = {"churn": "binary", "ltv": "regression", "segment": "multiclass"}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the manifest)."""

    tasks: tuple[str, ...] = ALL_TASKS
    loss: str = "uncertainty"
    fixed_weights: dict[str, float] | None = None
    gradnorm_alpha: float = 1.5
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head_hidden: int = 32
    epochs: int = 20
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 4
    seed: int = 0
    window_days: int = 90
    num_train_cutoffs: int = 3
    device: str = "auto"
    max_train_seeds: int | None = None  # subsample per cutoff for quick runs

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASK_KINDS]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(ALL_TASKS)}, got {bad or 'none'}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["encoder"] = self.encoder.to_json()
        d["tasks"] = list(self.tasks)
        return d


@dataclass
class LabelledSeeds:
    """Seeds of one cutoff with their targets (``segment`` = -1 where unknown)."""

    cutoff: int
    rows: Tensor
    customer_ids: Tensor
    targets: dict[str, Tensor]


def labelled_seeds(
    db: Database, graph: TemporalGraph, cutoff: pd.Timestamp, window: pd.Timedelta, classes: Sequence[str]
) -> LabelledSeeds:
    labels = make_labels(db, cutoff, window)
    ids = torch.as_tensor(labels["customer_id"].to_numpy(dtype=np.int64))
    rows = graph.lookup(graph.spec.seed_type, ids)
    keep = rows >= 0
    index = {c: i for i, c in enumerate(classes)}
    seg = labels["segment"].map(lambda s: index.get(s, -1) if isinstance(s, str) else -1)
    targets = {
        "churn": torch.as_tensor(labels["churn"].to_numpy(dtype=np.float32))[keep],
        "ltv": torch.as_tensor(labels["ltv"].to_numpy(dtype=np.float32))[keep],
        "segment": torch.as_tensor(seg.to_numpy(dtype=np.int64))[keep],
    }
    return LabelledSeeds(int(to_seconds(cutoff)[0]), rows[keep], ids[keep], targets)


def _batches(
    sets: Sequence[LabelledSeeds], batch_size: int, rng: random.Random
) -> Iterator[tuple[LabelledSeeds, Tensor]]:
    chunks: list[tuple[LabelledSeeds, Tensor]] = []
    for s in sets:
        perm = torch.randperm(s.rows.numel(), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        chunks.extend((s, perm[i : i + batch_size]) for i in range(0, perm.numel(), batch_size))
    rng.shuffle(chunks)
    yield from chunks


def fit_feature_stats(model: MultiTaskGNN, graph: TemporalGraph, cutoff: int) -> None:
    """Standardisation statistics of numeric columns from rows visible at the last training cutoff."""
    for t, enc in model.encoder.inputs.items():
        store = graph.nodes[t]
        if store.numeric.shape[1] == 0:
            continue
        visible = store.numeric[store.time <= cutoff]
        if visible.shape[0] < 2:
            visible = store.numeric
        enc.num_mean.copy_(visible.mean(0))  # type: ignore[operator]
        enc.num_std.copy_(visible.std(0).clamp(min=1e-6))  # type: ignore[operator]


@torch.inference_mode()
def predict_seeds(
    model: MultiTaskGNN,
    graph: TemporalGraph,
    rows: Tensor,
    cutoff: int,
    device: torch.device,
    batch_size: int = 2048,
) -> dict[str, Tensor]:
    """Reported-unit outputs of every head for ``rows`` as of ``cutoff`` (CPU tensors)."""
    model.eval()
    outs: dict[str, list[Tensor]] = {t: [] for t in model.tasks}
    for i in range(0, rows.numel(), batch_size):
        sub = sample(graph, rows[i : i + batch_size], cutoff, model.encoder.cfg.fanouts)
        raw = model(gather_features(graph, sub).to(device), sub)
        for t, head in model.heads.items():
            outs[t].append(postprocess(head.spec, raw[t]).cpu())  # type: ignore[arg-type]
    return {t: torch.cat(v) for t, v in outs.items()}


def evaluate_split(
    model: MultiTaskGNN, graph: TemporalGraph, seeds: LabelledSeeds, device: torch.device, baseline_mae: float
) -> tuple[dict[str, dict[str, float]], float]:
    """Per-task metrics and the combined score (mean of per-task scores) on one labelled cutoff."""
    preds = predict_seeds(model, graph, seeds.rows, seeds.cutoff, device)
    metrics: dict[str, dict[str, float]] = {}
    scores = []
    for t, head in model.heads.items():
        spec: HeadSpec = head.spec  # type: ignore[assignment]
        target = seeds.targets[t]
        pred = preds[t]
        if spec.kind == "multiclass":
            mask = target >= 0
            pred, target = pred[mask], target[mask]
        metrics[t] = task_metrics(spec.kind, pred, target, len(spec.classes))
        score = task_score(spec.kind, metrics[t], baseline_mae)
        if not math.isnan(score):
            scores.append(score)
    return metrics, float(np.mean(scores)) if scores else float("nan")


@dataclass
class TrainResult:
    model: MultiTaskGNN
    graph: TemporalGraph
    config: TrainConfig
    history: list[dict[str, Any]]
    val_metrics: dict[str, dict[str, float]]
    test_metrics: dict[str, dict[str, float]]
    splits: dict[str, list[str]]
    best_epoch: int
    balancer_weights: dict[str, float]


def train(
    db: Database,
    cfg: TrainConfig,
    *,
    graph: TemporalGraph | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train a multi-task (or single-task) model on ``db`` and evaluate it on the latest cutoff.

    Deterministic under ``cfg.seed`` on CPU (seeded torch/numpy/python RNGs, deterministic sampling).
    """
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = resolve_device(cfg.device)
    graph = graph or build_graph(db)
    window = pd.Timedelta(days=cfg.window_days)
    splits = make_splits(db, window, num_train_cutoffs=cfg.num_train_cutoffs)
    classes = tuple(segment_classes(db))
    train_sets = [labelled_seeds(db, graph, t, window, classes) for t in splits["train"]]
    if cfg.max_train_seeds:
        for s in train_sets:
            keep = torch.randperm(s.rows.numel(), generator=torch.Generator().manual_seed(cfg.seed))
            keep = keep[: cfg.max_train_seeds].sort().values
            s.rows, s.customer_ids = s.rows[keep], s.customer_ids[keep]
            s.targets = {k: v[keep] for k, v in s.targets.items()}
    val = labelled_seeds(db, graph, splits["val"][0], window, classes)
    test = labelled_seeds(db, graph, splits["test"][0], window, classes)

    heads = [
        HeadSpec(t, TASK_KINDS[t], classes if t == "segment" else (), cfg.head_hidden)  # type: ignore[arg-type]
        for t in cfg.tasks
    ]
    num_rows = {t: n.num_nodes for t, n in graph.nodes.items()}
    model = MultiTaskGNN(graph.spec, cfg.encoder, heads, num_rows)
    fit_feature_stats(model, graph, max(s.cutoff for s in train_sets))
    all_targets = {k: torch.cat([s.targets[k] for s in train_sets]) for k in ALL_TASKS}
    for t, head in model.heads.items():
        target = all_targets[t]
        init_bias_from_prior(head, target[target >= 0] if t == "segment" else target)  # type: ignore[arg-type]
    baseline_mae = float((all_targets["ltv"] - all_targets["ltv"].median()).abs().mean().clamp(min=1e-6))
    model.to(device)

    balancer = make_balancer(cfg.loss, cfg.tasks, fixed_weights=cfg.fixed_weights, alpha=cfg.gradnorm_alpha).to(device)
    params = list(model.parameters()) + list(balancer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    shared = list(model.encoder.last_layer.parameters())

    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -math.inf, -1, copy.deepcopy(model.state_dict())
    best_val: dict[str, dict[str, float]] = {}
    n_batches = sum(math.ceil(s.rows.numel() / cfg.batch_size) for s in train_sets)
    for epoch in range(cfg.epochs):
        model.train()
        total, steps = 0.0, 0
        for seeds, idx in _batches(train_sets, cfg.batch_size, rng):
            sub = sample(graph, seeds.rows[idx], seeds.cutoff, cfg.encoder.fanouts)
            raw = model(gather_features(graph, sub).to(device), sub)
            losses: dict[str, Tensor] = {}
            for t, head in model.heads.items():
                target = seeds.targets[t][idx].to(device)
                out = raw[t]
                if t == "segment":
                    mask = target >= 0
                    if not bool(mask.any()):
                        continue  # no labelled customer in this batch: the balancer skips the task
                    out, target = out[mask], target[mask]
                losses[t] = head.loss(out, target)  # type: ignore[operator]
            loss = balancer.combine(losses, shared)
            opt.zero_grad(set_to_none=False)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            balancer.after_step()
            total += float(loss.detach())
            steps += 1
            if on_batch is not None:
                on_batch(steps, n_batches)
        val_metrics, score = evaluate_split(model, graph, val, device, baseline_mae)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(steps, 1),
            "val_score": score,
            "val": val_metrics,
            "weights": balancer.weights(),
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if score > best_score + 1e-4:
            best_score, best_epoch, best_val = score, epoch + 1, val_metrics
            best_state = copy.deepcopy(model.state_dict())
        elif epoch + 1 - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    test_metrics, test_score = evaluate_split(model, graph, test, device, baseline_mae)
    test_metrics["combined"] = {"score": test_score}
    best_val["combined"] = {"score": best_score}
    return TrainResult(
        model=model.cpu(),
        graph=graph,
        config=cfg,
        history=history,
        val_metrics=best_val,
        test_metrics=test_metrics,
        splits={k: [str(t.date()) for t in v] for k, v in splits.items()},
        best_epoch=best_epoch,
        balancer_weights=balancer.weights(),
    )
