"""Train one new head on a stored model's frozen encoder (`onepass train-head`).

The encoder is never updated: every labelled customer is embedded once, as the server would embed it,
and a small :class:`~service.model.heads.TaskHead` is fitted on those embeddings. The head is written to
the model store as a new head version of the model version (``head_versions/<task>/<hv>``), recorded as
trained on that version's encoder hash, so the admin API can swap it in (``PUT /admin/v1/heads/<task>``
with ``{"version": hv}``) or add it as a new task (``POST /admin/v1/heads``).

Labels come from a file or from a built-in demo task:

- a CSV or Parquet file with columns ``customer_id,label``: one row per customer. The label describes the
  customer as the server sees them, so embeddings are computed as of the graph's latest time (what
  ``/v1/predict`` uses). The kind is inferred unless given: labels all in {0, 1} -> ``binary``; other
  numbers -> ``regression`` (non-negative amounts, e.g. dollars: the head trains on ``log1p``);
  strings -> ``multiclass`` with the sorted distinct labels as classes.
- ``active_30d`` (binary): 1 if the customer buys anything in (T, T + 30 days], else 0, where
  T = the latest transaction time - 30 days. Customers who signed up and bought at least once by T
  are labelled, and their embeddings are computed as of T, so the label lies in the future of
  every feature and edge the encoder sees (no leakage).
- ``spend_30d`` (regression): dollars spent in (T, T + 30 days], same T, customers and embeddings.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from service.data.labels import make_labels
from service.data.schema import Database
from service.data.sources import load_source
from service.graph.sampler import sample
from service.graph.temporal import TemporalGraph, build_graph, to_seconds
from service.model.encoder import GraphEncoder, gather_features
from service.model.heads import HEAD_KINDS, HeadSpec, TaskHead, init_bias_from_prior, postprocess
from service.store.store import LoadedModel, ModelStore, check_name
from service.training.metrics import task_metrics, task_score
from service.training.trainer import resolve_device

#: Fraction of the labelled customers held out for validation (at least one customer each side).
VAL_FRACTION = 0.2
#: Fewest labelled customers a head is trained on.
MIN_LABELLED = 10
#: How many unknown customer ids an error message names.
SHOWN_IDS = 5
DEMO_WINDOW = pd.Timedelta(days=30)


@dataclass
class HeadLabels:
    """Labelled customers for one head: ids, reported-unit targets, and the cutoff T of the features."""

    customer_ids: np.ndarray  # int64 [N], unique
    targets: Tensor  # float32 (binary, regression) or int64 class index (multiclass) [N]
    kind: str
    classes: tuple[str, ...]
    cutoff: int  # seconds since the graph epoch: embeddings are computed as of this time
    source: str


def _demo_window_labels(db: Database) -> tuple[np.ndarray, pd.DataFrame, pd.Timestamp]:
    """The temporal labels of :func:`make_labels` at T = last transaction - 30 days, over (T, T + 30 days]."""
    cutoff = db.max_time - DEMO_WINDOW
    labels = make_labels(db, cutoff, DEMO_WINDOW)
    return labels["customer_id"].to_numpy(dtype=np.int64), labels, cutoff


def _active_30d(db: Database) -> HeadLabels:
    ids, labels, cutoff = _demo_window_labels(db)
    target = torch.as_tensor(1.0 - labels["churn"].to_numpy(dtype=np.float32))  # active = did not churn
    return HeadLabels(ids, target, "binary", (), int(to_seconds(cutoff)[0]), "demo:active_30d")


def _spend_30d(db: Database) -> HeadLabels:
    ids, labels, cutoff = _demo_window_labels(db)
    target = torch.as_tensor(labels["ltv"].to_numpy(dtype=np.float32))
    return HeadLabels(ids, target, "regression", (), int(to_seconds(cutoff)[0]), "demo:spend_30d")


#: Built-in demo tasks (see the module docstring).
DEMO_TASKS: dict[str, Callable[[Database], HeadLabels]] = {"active_30d": _active_30d, "spend_30d": _spend_30d}


def read_label_file(path: Path) -> pd.DataFrame:
    """A ``customer_id,label`` table from CSV or Parquet, checked: integer unique ids, no missing label.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, a non-integer or repeated id, or a missing label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--labels {path}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path)
    missing = [c for c in ("customer_id", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"{path.name}: missing column(s) {', '.join(missing)} (expected customer_id,label)")
    ids = pd.to_numeric(df["customer_id"], errors="coerce")
    bad = ids.isna() | (ids != ids.round())
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        got = df["customer_id"].iloc[first]
        got = got.item() if isinstance(got, np.generic) else got
        raise ValueError(f"{path.name}: column 'customer_id', row {first + 1}: expected an integer, got {got!r}")
    if df["label"].isna().any():
        first = int(np.flatnonzero(df["label"].isna().to_numpy())[0])
        raise ValueError(f"{path.name}: column 'label', row {first + 1}: missing label")
    out = pd.DataFrame({"customer_id": ids.astype(np.int64), "label": df["label"]})
    dup = out["customer_id"].duplicated()
    if dup.any():
        shown = ", ".join(map(str, out["customer_id"][dup].unique()[:SHOWN_IDS].tolist()))
        raise ValueError(f"{path.name}: customer_id repeated: {shown}")
    if len(out) < MIN_LABELLED:
        raise ValueError(f"{path.name}: {len(out)} labelled customers, at least {MIN_LABELLED} are needed")
    return out


def infer_kind(labels: pd.Series) -> str:
    """``binary`` for labels all in {0, 1} (or booleans), ``regression`` for other numbers, else ``multiclass``."""
    if pd.api.types.is_bool_dtype(labels):
        return "binary"
    if pd.api.types.is_numeric_dtype(labels):
        return "binary" if set(pd.unique(labels)).issubset({0, 1}) else "regression"
    return "multiclass"


def _file_labels(path: Path, kind: str | None, graph: TemporalGraph) -> HeadLabels:
    df = read_label_file(path)
    kind = kind or infer_kind(df["label"])
    values = df["label"]
    classes: tuple[str, ...] = ()
    if kind == "multiclass":
        names = values.astype(str)
        classes = tuple(sorted(names.unique()))
        index = {c: i for i, c in enumerate(classes)}
        target = torch.as_tensor(names.map(index).to_numpy(dtype=np.int64))
    else:
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.isna().any():
            first = int(np.flatnonzero(numeric.isna().to_numpy())[0])
            raise ValueError(
                f"{path.name}: row {first + 1}: a {kind} label must be a number, got {values.iloc[first]!r}"
            )
        if kind == "binary" and not set(pd.unique(numeric)).issubset({0, 1}):
            raise ValueError(f"{path.name}: binary labels must be 0 or 1, got {sorted(pd.unique(numeric))[:SHOWN_IDS]}")
        if kind == "regression" and (numeric < 0).any():
            raise ValueError(f"{path.name}: regression labels must be >= 0 (amounts; the head trains on log1p)")
        target = torch.as_tensor(numeric.to_numpy(dtype=np.float32))
    return HeadLabels(df["customer_id"].to_numpy(np.int64), target, kind, classes, graph.max_time, path.name)


@torch.inference_mode()
def embed(
    encoder: GraphEncoder,
    graph: TemporalGraph,
    rows: Tensor,
    cutoff: int,
    device: torch.device,
    batch_size: int = 2048,
) -> Tensor:
    """Frozen-encoder embeddings ``[N, hidden]`` (CPU, float32) of seed ``rows`` as of ``cutoff`` (seconds)."""
    encoder.eval()
    out = []
    for i in range(0, rows.numel(), batch_size):
        sub = sample(graph, rows[i : i + batch_size], cutoff, encoder.cfg.fanouts)
        out.append(encoder(gather_features(graph, sub).to(device), sub).float().cpu())
    return torch.cat(out) if out else torch.empty(0, encoder.cfg.hidden)


def _head_spec(model: LoadedModel, store: ModelStore, task: str, labels: HeadLabels) -> HeadSpec:
    """The new head's spec; an existing task keeps its kind and classes, so the head can be swapped in."""
    hidden = next(iter(model.heads.values())).spec.hidden if model.heads else 32
    spec = HeadSpec(task, labels.kind, labels.classes, hidden)  # type: ignore[arg-type]
    existing = model.heads.get(task)
    if existing is None:
        versions = store.head_versions(model.name, model.version, task)
        if versions:
            existing = store.load_head(model.name, model.version, task, versions[-1])
    if existing is not None:
        old = existing.spec
        if (old.kind, old.classes) != (spec.kind, spec.classes):
            raise ValueError(
                f"task '{task}' is already a {_describe(old)} head in {model.name}/{model.version}; these labels "
                f"give a {_describe(spec)} head: use a new task name"
            )
        spec = HeadSpec(task, old.kind, old.classes, old.hidden)
    return spec


def _describe(spec: HeadSpec) -> str:
    return f"{spec.kind} (classes {', '.join(spec.classes)})" if spec.classes else spec.kind


def _split(n: int, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(n * VAL_FRACTION)), n - 1)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def fit_head(
    spec: HeadSpec,
    h_train: Tensor,
    y_train: Tensor,
    h_val: Tensor,
    y_val: Tensor,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 256,
    lr: float = 3e-3,
) -> tuple[TaskHead, dict[str, Any]]:
    """Fit a head on fixed embeddings; keep the epoch with the best validation score.

    Returns:
        The head (CPU, eval mode) and ``{"val": metrics, "best_epoch": e}``.
    """
    torch.manual_seed(seed)
    head = TaskHead(spec, h_train.shape[1])
    init_bias_from_prior(head, y_train)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    baseline_mae = float((y_val.float() - y_train.float().median()).abs().mean().clamp(min=1e-6))

    def evaluate() -> tuple[dict[str, float], float]:
        head.eval()
        with torch.inference_mode():
            out = postprocess(spec, head(h_val))
        metrics = task_metrics(spec.kind, out, y_val, len(spec.classes))
        return metrics, task_score(spec.kind, metrics, baseline_mae)

    best_metrics, best_score = evaluate()
    best_epoch, best_state = 0, copy.deepcopy(head.state_dict())
    for epoch in range(1, epochs + 1):
        head.train()
        perm = torch.randperm(h_train.shape[0], generator=gen)
        for i in range(0, perm.numel(), batch_size):
            idx = perm[i : i + batch_size]
            loss = head.loss(head(h_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        metrics, score = evaluate()
        # NaN scores (e.g. a validation split with one class) never win; the last epoch is kept then.
        if math.isnan(best_score) or (not math.isnan(score) and score > best_score):
            best_metrics, best_score, best_epoch = metrics, score, epoch
            best_state = copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.eval()
    return head, {"val": best_metrics, "best_epoch": best_epoch}


def train_new_head(
    store_root: Path,
    name: str,
    version: str | None,
    task: str,
    *,
    labels: Path | None,
    demo_task: str | None,
    kind: str | None,
    epochs: int,
    seed: int,
    data_dir: Path | None,
    device: str = "auto",
) -> tuple[str, dict[str, Any]]:
    """Train a head for ``task`` on the frozen encoder of ``name/version`` and store it as a head version.

    Args:
        store_root: model store folder.
        name: model name; ``version`` None means the store's default version.
        task: the task name (new, or an existing task to retrain: its kind and classes are kept).
        labels: CSV or Parquet file of ``customer_id,label`` (exactly one of ``labels`` and ``demo_task``).
        demo_task: a built-in label, one of :data:`DEMO_TASKS` (see the module docstring).
        kind: ``binary``, ``regression`` or ``multiclass``; inferred from the labels when None.
        epochs: passes over the training customers.
        seed: seeds the split, the initialisation and the batch order (deterministic on CPU).
        data_dir: database folder; default: the model's own data source.
        device: ``auto``, ``cuda`` or ``cpu`` for the encoder pass and the head.

    Returns:
        (head version, metrics): ``metrics["val"]`` holds the validation metrics of
        :func:`~service.training.metrics.task_metrics`, plus split sizes, best epoch, cutoff and label source.

    Raises:
        ValueError: bad arguments or labels, including customer ids unknown to the graph (the first few named).
        FileNotFoundError: the label file does not exist.
        OnepassError: the model version is missing or fails verification.
    """
    check_name(task, "task")
    if (labels is None) == (demo_task is None):
        raise ValueError("give exactly one of --labels FILE or --demo-task NAME")
    if kind is not None and kind not in HEAD_KINDS:
        raise ValueError(f"--kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    if demo_task is not None and demo_task not in DEMO_TASKS:
        raise ValueError(f"--demo-task must be one of {', '.join(DEMO_TASKS)}, got {demo_task!r}")
    store = ModelStore(store_root)
    model = store.load(name, version)
    db = load_source(model.data_source, data_dir)
    graph = build_graph(db, spec=model.spec)
    if demo_task is not None:
        head_labels = DEMO_TASKS[demo_task](db)
        if kind is not None and kind != head_labels.kind:
            raise ValueError(f"demo task '{demo_task}' is a {head_labels.kind} task, not {kind}")
    else:
        assert labels is not None
        head_labels = _file_labels(labels, kind, graph)
    ids = torch.as_tensor(head_labels.customer_ids, dtype=torch.int64)
    rows = graph.lookup(graph.spec.seed_type, ids)
    unknown = ids[rows < 0]
    if unknown.numel():
        shown = ", ".join(map(str, unknown[:SHOWN_IDS].tolist()))
        more = f" and {unknown.numel() - SHOWN_IDS} more" if unknown.numel() > SHOWN_IDS else ""
        raise ValueError(f"{head_labels.source}: unknown customer_id(s) {shown}{more} (not in {model.name}'s database)")
    if rows.numel() < MIN_LABELLED:
        raise ValueError(f"{head_labels.source}: {rows.numel()} labelled customers, at least {MIN_LABELLED} are needed")
    spec = _head_spec(model, store, task, head_labels)

    dev = resolve_device(device)
    h = embed(model.encoder.to(dev), graph, rows, head_labels.cutoff, dev)
    train_idx, val_idx = _split(rows.numel(), seed)
    y = head_labels.targets
    head, result = fit_head(spec, h[train_idx], y[train_idx], h[val_idx], y[val_idx], epochs=epochs, seed=seed)
    cutoff = pd.Timestamp(head_labels.cutoff, unit="s")
    metrics: dict[str, Any] = {
        **result,
        "train_size": int(train_idx.numel()),
        "val_size": int(val_idx.numel()),
        "labels": head_labels.source,
        "cutoff": cutoff.isoformat(),
        "kind": spec.kind,
    }
    hv = store.save_head(model.name, model.version, head, trained_on=model.encoder_hash, metrics=metrics)
    return hv, metrics
