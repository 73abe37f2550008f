"""The `onepass` command line (also `python -m service`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="onepass: multi-task GNN training and serving.")
models_app = typer.Typer(no_args_is_help=True, help="Inspect the model store.")
app.add_typer(models_app, name="models")
console = Console()


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="public port (ONEPASS_PORT)")] = None,
    model: Annotated[str | None, typer.Option(help="NAME or NAME/VERSION (ONEPASS_MODEL_NAME/_VERSION)")] = None,
) -> None:
    """Serve the model over HTTP (settings from ONEPASS_* environment variables)."""
    from service.config import get_settings
    from service.server import serve as run

    overrides: dict[str, Any] = {}
    if port is not None:
        overrides["port"] = port
    if model is not None:
        name, _, version = model.partition("/")
        overrides["model_name"] = name
        overrides["model_version"] = version or None
    settings = get_settings(**overrides)
    _ensure_demo_model(settings.model_store, settings.model_name)
    run(settings)


def _ensure_demo_model(store_root: Path, name: str) -> None:
    """The run command on a fresh clone: train the demo model once if the store has none."""
    from service.store.store import ModelStore

    if name != "demo" or ModelStore(store_root).versions(name):
        return
    console.print("[yellow]no demo model in the store: training one (about a minute)...[/yellow]")
    _train(
        data="demo", customers=3000, data_seed=0, out=store_root, name="demo", tasks="churn,ltv,segment",
        loss="uncertainty", conv="sage", layers=2, hidden=32, epochs=8, seed=0, device="auto", quiet=False,
    )  # fmt: skip


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="output folder")],
    customers: Annotated[int, typer.Option(min=10, help="number of customers")] = 10_000,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same database)")] = 0,
    segment_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="customers with a known segment")] = 0.2,
    fmt: Annotated[str, typer.Option("--format", help="parquet or csv")] = "parquet",
) -> None:
    """Write a synthetic e-commerce database (customers, products, transactions, segments)."""
    from service.data.loader import save_database
    from service.data.synthetic import generate

    t0 = time.perf_counter()
    db = generate(customers, seed, segment_fraction=segment_fraction)
    if fmt not in ("parquet", "csv"):
        raise _fail(f"--format must be parquet or csv, got {fmt!r}")
    save_database(db, out, fmt="csv" if fmt == "csv" else "parquet")
    n_tx = len(db.transactions)
    console.print(
        f"wrote {customers:,} customers, {len(db.tables['products']):,} products, {n_tx:,} transactions "
        f"to {out} in {time.perf_counter() - t0:.1f} s (snapshot {db.snapshot_id()})"
    )


def _train(
    *, data: str, customers: int, data_seed: int, out: Path, name: str, tasks: str, loss: str, conv: str,
    layers: int, hidden: int, epochs: int, seed: int, device: str, quiet: bool,
) -> str:  # fmt: skip
    from service.data.sources import source_for
    from service.model.encoder import EncoderConfig
    from service.training.pipeline import train_and_save
    from service.training.trainer import TrainConfig

    source = source_for(data, customers=customers, seed=data_seed)
    fanouts = (20, 10, 5, 5)[:layers]
    # Products get a learned id embedding: which products a customer buys is the signal.
    id_types = ("products",) if source["kind"] != "cdnow" else ()
    cfg = TrainConfig(
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
        loss=loss,
        encoder=EncoderConfig(conv=conv, layers=layers, hidden=hidden, fanouts=fanouts, id_embedding_types=id_types),  # type: ignore[arg-type]
        epochs=epochs,
        seed=seed,
        device=device,
    )
    with Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=quiet, transient=True,
    ) as progress:  # fmt: skip
        bar = progress.add_task("train", total=None, epoch=1)

        def on_batch(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        def on_epoch(rec: dict[str, Any]) -> None:
            progress.update(bar, epoch=rec["epoch"] + 1, completed=0)
            if not quiet:
                console.print(f"epoch {rec['epoch']:>3}  loss {rec['train_loss']:.4f}  {_fmt_metrics(rec['val'])}  "
                              f"score {rec['val_score']:.4f}")  # fmt: skip

        version, result = train_and_save(source, cfg, out, name, on_epoch=on_epoch, on_batch=on_batch)
    console.print(f"saved [bold]{name}/{version}[/bold] to {out}  test: {_fmt_metrics(result.test_metrics)}")
    return version


def _fmt_metrics(metrics: dict[str, dict[str, float]]) -> str:
    return "  ".join(
        f"{task}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items())
        for task, m in metrics.items()
        if task != "combined"
    )


@app.command("train")
def train_cmd(
    data: Annotated[str, typer.Option(help="database folder, or 'demo' (synthetic) or 'cdnow'")],
    out: Annotated[Path, typer.Option(help="model store folder")] = Path("model_store"),
    name: Annotated[str, typer.Option(help="model name")] = "model",
    tasks: Annotated[str, typer.Option(help="comma-separated: churn,ltv,segment")] = "churn,ltv,segment",
    loss: Annotated[str, typer.Option(help="fixed | equal | uncertainty | gradnorm")] = "uncertainty",
    conv: Annotated[str, typer.Option(help="sage | gat | gcn | transformer")] = "sage",
    layers: Annotated[int, typer.Option(min=0, max=4, help="message-passing layers (0 = MLP baseline)")] = 2,
    hidden: Annotated[int, typer.Option(min=4, max=1024)] = 64,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    seed: Annotated[int, typer.Option()] = 0,
    customers: Annotated[int, typer.Option(help="with --data demo: customers to generate")] = 5000,
    data_seed: Annotated[int, typer.Option(help="with --data demo: generator seed")] = 0,
    device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto",
) -> None:
    """Train a multi-task (or, with one task, single-task) GNN and save it as a new model version."""
    from service.errors import OnepassError
    from service.store.store import check_name
    from service.training.losses import LOSS_METHODS

    # Refuse bad arguments before loading data and training, not after.
    try:
        check_name(name, "--name")
    except OnepassError as e:
        raise _fail(str(e)) from e
    if loss not in LOSS_METHODS:
        raise _fail(f"--loss must be one of {', '.join(LOSS_METHODS)}, got {loss!r}")
    try:
        _train(
            data=data, customers=customers, data_seed=data_seed, out=out, name=name, tasks=tasks, loss=loss,
            conv=conv, layers=layers, hidden=hidden, epochs=epochs, seed=seed, device=device, quiet=False,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, OnepassError) as e:
        raise _fail(str(e)) from e


@models_app.command("list")
def models_list(
    store: Annotated[Path, typer.Option(help="model store folder")] = Path("model_store"),
) -> None:
    """Every model and version with its tasks and test metrics."""
    from service.store.store import ModelStore

    if not store.is_dir():
        raise _fail(f"--store {store}: no such folder")
    ms = ModelStore(store)
    table = Table("model", "version", "default", "tasks", "conv", "created", "test metrics")
    for name in ms.models():
        default = ms.default_version(name) if ms.versions(name) else ""
        for v in ms.versions(name):
            m = ms.manifest(name, v)
            table.add_row(
                name, v, "*" if v == default else "", ",".join(m["tasks"]), m["encoder"]["config"]["conv"],
                m["created"], _fmt_metrics(m["metrics"].get("test", {})),
            )  # fmt: skip
    console.print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME or NAME/VERSION")],
    store: Annotated[Path, typer.Option(help="model store folder")] = Path("model_store"),
) -> None:
    """One model version's manifest: config, tasks, metrics, files."""
    from service.errors import OnepassError
    from service.store.store import ModelStore

    name, _, version = ref.partition("/")
    try:
        manifest = ModelStore(store).manifest(name, version or None)
    except OnepassError as e:
        raise _fail(str(e)) from e
    console.print_json(json.dumps(manifest))


@app.command()
def predict(
    ids: Annotated[str, typer.Option(help="comma-separated customer ids")],
    url: Annotated[str | None, typer.Option(help="server URL (default: localhost, port $ONEPASS_PORT or 8000)")] = None,
    timeout_s: Annotated[float, typer.Option(help="request timeout, seconds")] = 30.0,
) -> None:
    """Call a running server's /v1/predict and print the JSON."""
    from service.client import OnepassClient, OnepassClientError

    try:
        id_list = [int(x) for x in ids.split(",") if x.strip()]
    except ValueError as e:
        raise _fail(f"--ids: expected comma-separated integers, got {ids!r}") from e
    url = url or f"http://localhost:{os.environ.get('ONEPASS_PORT', '8000')}"
    try:
        with OnepassClient(url, timeout_s=timeout_s) as client:
            result = client.predict(id_list)
    except OnepassClientError as e:
        raise _fail(str(e)) from e
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


@app.command()
def evaluate(
    datasets: Annotated[str, typer.Option(help="comma-separated: synthetic,cdnow")] = "synthetic,cdnow",
    customers: Annotated[int, typer.Option(help="synthetic database size")] = 5000,
    seeds: Annotated[str, typer.Option(help="comma-separated training seeds")] = "0,1,2",
    methods: Annotated[str, typer.Option(help="loss balancers to compare")] = "fixed,equal,uncertainty,gradnorm",
    epochs: Annotated[int, typer.Option(min=1)] = 15,
    hidden: Annotated[int, typer.Option(min=4)] = 32,
    max_train_seeds: Annotated[int, typer.Option(help="training customers per cutoff (subsampled; 0 = all)")] = 10_000,
    out: Annotated[Path, typer.Option(help="folder for evaluation.md / evaluation.json")] = Path("docs"),
    device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto",
) -> None:
    """Multi-task vs single-task, every loss balancer and an MLP baseline, mean ± std over seeds."""
    from service.training.evaluate import default_base
    from service.training.evaluate import evaluate as run_evaluation

    sources: dict[str, dict[str, Any]] = {
        "synthetic": {"kind": "synthetic", "customers": customers, "seed": 0, "segment_fraction": 0.2},
        "cdnow": {"kind": "cdnow"},
    }
    chosen = [d.strip() for d in datasets.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in sources]
    if unknown:
        raise _fail(f"--datasets: unknown {unknown}; choose from {list(sources)}")
    command = "onepass evaluate " + " ".join(sys.argv[2:])
    run_evaluation(
        {d: sources[d] for d in chosen}, default_base(epochs, hidden, device, max_train_seeds or None),
        [int(x) for x in seeds.split(",")], [m.strip() for m in methods.split(",")], out, command.strip(),
        lambda msg: console.print(msg),
    )  # fmt: skip
    console.print(f"wrote {out / 'evaluation.md'} and {out / 'evaluation.json'}")


@app.command("train-head")
def train_head_cmd(
    model: Annotated[str, typer.Option(help="NAME or NAME/VERSION whose frozen encoder the head is trained on")],
    task: Annotated[str, typer.Option(help="name of the (new or existing) task")],
    labels: Annotated[Path | None, typer.Option(help="CSV or Parquet file of customer_id,label")] = None,
    demo_task: Annotated[str | None, typer.Option(help="built-in label instead of --labels (see docs)")] = None,
    kind: Annotated[str | None, typer.Option(help="binary | regression | multiclass (default: inferred)")] = None,
    store: Annotated[Path, typer.Option(help="model store folder")] = Path("model_store"),
    data_dir: Annotated[Path | None, typer.Option(help="database folder (default: the model's own source)")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a head on the frozen encoder's embeddings and store it as a new head version.

    Swap it in with the admin API (PUT /admin/v1/heads/<task> or POST /admin/v1/heads).
    """
    from service.errors import OnepassError
    from service.training.head_trainer import train_new_head

    name, _, version = model.partition("/")
    try:
        hv, metrics = train_new_head(
            store, name, version or None, task, labels=labels, demo_task=demo_task, kind=kind,
            epochs=epochs, seed=seed, data_dir=data_dir,
        )  # fmt: skip
    except (OnepassError, ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    console.print(f"saved head [bold]{task}/{hv}[/bold] for {model}: {metrics}")


def main() -> None:
    app()
