"""The model store: versioned models on disk, safetensors weights + a JSON manifest, never pickle.

Layout::

    model_store/<name>/default.json                 {"version": "v2"}: the version served by default
    model_store/<name>/<version>/manifest.json      config, graph spec, tasks, metrics, sha256 of files
    model_store/<name>/<version>/encoder.safetensors
    model_store/<name>/<version>/heads/<task>.safetensors          the heads trained with the encoder
    model_store/<name>/<version>/head_versions/<task>/<hv>.safetensors + <hv>.json   heads added later

Names and versions are validated against a strict pattern before they touch the filesystem, so a
reference coming from the admin API can never escape the store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from service.errors import ModelStoreError, NotFoundError
from service.graph.temporal import GraphSpec
from service.model.encoder import EncoderConfig, GraphEncoder
from service.model.heads import HeadSpec, TaskHead

FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str, what: str) -> str:
    """Refuse anything that is not a plain store name: no '/', '..', absolute paths or URLs."""
    if not NAME_RE.fullmatch(value) or ".." in value:
        raise ModelStoreError(f"{what} {value!r} is not a valid name (letters, digits, '_', '.', '-')")
    return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; a non-root server user must read the store
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def module_bytes(module: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return st_save(state, metadata=metadata)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, then JSON);
    empty when absent or unreadable (``load_state`` reports a malformed file)."""
    if len(data) < 8:
        return {}
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data) or n > 100 * 2**20:
        return {}
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def load_state(module: nn.Module, data: bytes, what: str) -> None:
    """Load safetensors bytes into ``module``, requiring the exact tensor names, shapes and dtypes."""
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise ModelStoreError(f"{what}: not a valid safetensors file ({e})") from e
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelStoreError(f"{what}: tensor names differ (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, v in sorted(state.items()):  # sorted: the first mismatch reported is deterministic
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise ModelStoreError(
                f"{what}: tensor '{k}' is {v.dtype} {tuple(v.shape)}, "
                f"expected {expected[k].dtype} {tuple(expected[k].shape)}"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ModelStoreError(f"{what}: tensor '{k}' has NaN or infinite values")
    module.load_state_dict(state, strict=True)


@dataclass
class HeadRecord:
    """One head version as stored: spec, bytes, sha256."""

    spec: HeadSpec
    version: str
    sha256: str
    data: bytes
    trained_on: str  # encoder hash the head was trained against
    metrics: dict[str, Any] = field(default_factory=dict)

    def build(self, in_dim: int) -> TaskHead:
        head = TaskHead(self.spec, in_dim)
        load_state(head, self.data, f"head '{self.spec.task}' version {self.version}")
        head.eval()
        return head


@dataclass
class LoadedModel:
    """A verified model version: encoder built and loaded, head records ready to build."""

    name: str
    version: str
    manifest: dict[str, Any]
    spec: GraphSpec
    config: EncoderConfig
    encoder: GraphEncoder
    encoder_hash: str
    heads: dict[str, HeadRecord]

    @property
    def data_source(self) -> dict[str, Any]:
        src: dict[str, Any] = self.manifest["data"]["source"]
        return src


class ModelStore:
    """Versioned models under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ----- reading -------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))

    def versions(self, name: str) -> list[str]:
        d = self.root / check_name(name, "model name")
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if (p / "manifest.json").is_file()]
        return sorted(found, key=lambda v: (len(v), v))

    def default_version(self, name: str) -> str:
        ptr = self.root / check_name(name, "model name") / "default.json"
        if ptr.is_file():
            return check_name(str(json.loads(ptr.read_text())["version"]), "version")
        versions = self.versions(name)
        if not versions:
            raise NotFoundError(f"model '{name}' has no versions in {self.root}")
        return versions[-1]

    def set_default(self, name: str, version: str) -> None:
        if version not in self.versions(name):
            raise NotFoundError(f"model '{name}' has no version '{version}'")
        _atomic_write(self.root / name / "default.json", json.dumps({"version": version}).encode())

    def manifest(self, name: str, version: str | None = None) -> dict[str, Any]:
        version = check_name(version or self.default_version(name), "version")
        path = self.root / check_name(name, "model name") / version / "manifest.json"
        if not path.is_file():
            raise NotFoundError(f"model '{name}' version '{version}' not found in the model store")
        raw: dict[str, Any] = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise ModelStoreError(f"{name}/{version}: unsupported manifest format {raw.get('format_version')}")
        return raw

    def _read_verified(self, vdir: Path, rel: str, expected_sha: str) -> bytes:
        data = (vdir / rel).read_bytes()
        got = sha256_bytes(data)
        if got != expected_sha:
            raise ModelStoreError(f"{vdir.name}/{rel}: sha256 {got[:12]} does not match manifest {expected_sha[:12]}")
        return data

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        """Load and verify a model version: every file's sha256, every tensor's name, shape and dtype."""
        version = version or self.default_version(name)
        manifest = self.manifest(name, version)
        vdir = self.root / name / version
        spec = GraphSpec.from_json(manifest["graph"])
        cfg = EncoderConfig.from_json(manifest["encoder"]["config"])
        num_rows = {str(k): int(v) for k, v in manifest["encoder"]["num_rows"].items()}
        files: dict[str, str] = manifest["files"]
        enc_bytes = self._read_verified(vdir, "encoder.safetensors", files["encoder.safetensors"])
        encoder = GraphEncoder(spec, cfg, num_rows)
        load_state(encoder, enc_bytes, f"{name}/{version}/encoder.safetensors")
        encoder.eval()
        heads: dict[str, HeadRecord] = {}
        for task, t in manifest["tasks"].items():
            data = self._read_verified(vdir, t["file"], files[t["file"]])
            heads[task] = HeadRecord(
                spec=HeadSpec.from_json(t["head"]),
                version=str(t.get("version", "v1")),
                sha256=files[t["file"]],
                data=data,
                trained_on=str(manifest["encoder_hash"]),
                metrics=t.get("metrics", {}),
            )
        return LoadedModel(
            name=name,
            version=version,
            manifest=manifest,
            spec=spec,
            config=cfg,
            encoder=encoder,
            encoder_hash=str(manifest["encoder_hash"]),
            heads=heads,
        )

    # ----- writing -------------------------------------------------------------------------------------
    def next_version(self, name: str) -> str:
        nums = [int(v[1:]) for v in self.versions(name) if re.fullmatch(r"v\d+", v)]
        return f"v{max(nums, default=0) + 1}"

    def save(
        self,
        name: str,
        encoder: GraphEncoder,
        heads: dict[str, TaskHead],
        *,
        num_rows: dict[str, int],
        data: dict[str, Any],
        training: dict[str, Any],
        metrics: dict[str, Any],
        make_default: bool = True,
    ) -> str:
        """Write a new version folder (never overwrites) and return its version name."""
        check_name(name, "model name")
        version = self.next_version(name)
        vdir = self.root / name / version
        files: dict[str, bytes] = {"encoder.safetensors": module_bytes(encoder)}
        encoder_hash = sha256_bytes(files["encoder.safetensors"])[:16]
        tasks: dict[str, Any] = {}
        for task, head in heads.items():
            rel = f"heads/{check_name(task, 'task')}.safetensors"
            # The head file says which encoder it belongs to, so an upload can be checked against it.
            files[rel] = module_bytes(head, {"task": task, "version": "v1", "trained_on": encoder_hash})
            tasks[task] = {"head": head.spec.to_json(), "file": rel, "version": "v1"}
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "encoder_hash": encoder_hash,
            "encoder": {"config": encoder.cfg.to_json(), "num_rows": num_rows, "file": "encoder.safetensors"},
            "graph": encoder.spec.to_json(),
            # Standardisation statistics of the numeric columns (the encoder's buffers carry the same
            # values; here for people and tools that read manifests).
            "feature_stats": {
                t: {
                    col: {"mean": float(enc.num_mean[i]), "std": float(enc.num_std[i])}
                    for i, col in enumerate(encoder.spec.nodes[t].numeric)
                }
                for t, enc in encoder.input_encoders().items()
            },
            "data": data,
            "tasks": tasks,
            "training": training,
            "metrics": metrics,
            "files": {rel: sha256_bytes(b) for rel, b in files.items()},
        }
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root / name, prefix=".incoming-"))
        tmp.chmod(0o755)
        try:
            for rel, b in files.items():
                _atomic_write(tmp / rel, b)
            _atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=2).encode())
            vdir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, vdir)  # the version appears complete or not at all
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if make_default:
            self.set_default(name, version)
        return version

    # ----- head versions (added after training: `onepass train-head`) ---------------------------------------
    def head_versions(self, name: str, version: str, task: str) -> list[str]:
        d = self.root / check_name(name, "model name") / check_name(version, "version") / "head_versions"
        d = d / check_name(task, "task")
        if not d.is_dir():
            return []
        return sorted((p.stem for p in d.glob("*.json")), key=lambda v: (len(v), v))

    def save_head(self, name: str, version: str, head: TaskHead, *, trained_on: str, metrics: dict[str, Any]) -> str:
        """Store a new head version next to a model version; returns the head version name."""
        task = check_name(head.spec.task, "task")
        d = self.root / check_name(name, "model name") / check_name(version, "version") / "head_versions" / task
        nums = [int(v[1:]) for v in self.head_versions(name, version, task) if re.fullmatch(r"v\d+", v)]
        base = 1 if task in self.manifest(name, version)["tasks"] else 0
        hv = f"v{max(nums, default=base) + 1}"
        data = module_bytes(head, {"task": task, "version": hv, "trained_on": trained_on})
        meta = {
            "task": task,
            "version": hv,
            "head": head.spec.to_json(),
            "sha256": sha256_bytes(data),
            "trained_on": trained_on,
            "metrics": metrics,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _atomic_write(d / f"{hv}.safetensors", data)
        _atomic_write(d / f"{hv}.json", json.dumps(meta, indent=2).encode())
        return hv

    def load_head(self, name: str, version: str, task: str, head_version: str) -> HeadRecord:
        """A head version by reference (names only). ``v1`` of a trained task is the manifest's head."""
        check_name(task, "task")
        check_name(head_version, "head version")
        manifest = self.manifest(name, version)
        vdir = self.root / name / version
        t = manifest["tasks"].get(task)
        if t is not None and head_version == t.get("version", "v1"):
            data = self._read_verified(vdir, t["file"], manifest["files"][t["file"]])
            return HeadRecord(
                HeadSpec.from_json(t["head"]), head_version, manifest["files"][t["file"]], data,
                str(manifest["encoder_hash"]), t.get("metrics", {}),
            )  # fmt: skip
        meta_path = vdir / "head_versions" / task / f"{head_version}.json"
        if not meta_path.is_file():
            raise NotFoundError(f"task '{task}' has no head version '{head_version}' in {name}/{version}")
        meta = json.loads(meta_path.read_text())
        data = self._read_verified(vdir, f"head_versions/{task}/{head_version}.safetensors", meta["sha256"])
        return HeadRecord(
            HeadSpec.from_json(meta["head"]), head_version, meta["sha256"], data,
            str(meta["trained_on"]), meta.get("metrics", {}),
        )  # fmt: skip
