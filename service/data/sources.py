"""Where a model's database comes from, recorded in its manifest so a server can rebuild it.

``{"kind": "synthetic", "customers": N, "seed": S, "segment_fraction": F}`` regenerates the demo
database deterministically; ``{"kind": "cdnow"}`` reads the CDNOW log; ``{"kind": "folder", ...}``
needs the folder passed again at serving time (``ONEPASS_DATA_DIR``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.data.schema import Database


def source_for(data: str, *, customers: int = 5000, seed: int = 0, segment_fraction: float = 0.2) -> dict[str, Any]:
    """Parse a ``--data`` argument: a folder path, ``demo`` or ``cdnow``."""
    if data == "demo":
        return {
            "kind": "synthetic",
            "customers": customers,
            "seed": seed,
            "segment_fraction": segment_fraction,
        }
    if data == "cdnow":
        return {"kind": "cdnow"}
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data!r}: not a folder (or use 'demo' / 'cdnow')")
    return {"kind": "folder", "path": str(path.resolve())}


def load_source(source: dict[str, Any], data_dir: Path | None = None) -> Database:
    """Load the database a source describes; ``data_dir`` (a folder) wins when given."""
    if data_dir is not None:
        from service.data.loader import load_database

        return load_database(data_dir)
    kind = source.get("kind")
    if kind == "synthetic":
        from service.data.synthetic import generate

        return generate(
            int(source["customers"]),
            int(source["seed"]),
            segment_fraction=float(source.get("segment_fraction", 0.2)),
        )
    if kind == "cdnow":
        from service.data.cdnow import load_cdnow

        return load_cdnow()
    if kind == "folder":
        from service.data.loader import load_database

        return load_database(Path(source["path"]))
    raise ValueError(f"unknown data source kind {kind!r}")
