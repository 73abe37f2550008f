"""Helpers for the deployment tests: render the kustomize overlays, find objects, parse the Dockerfile.

Rendering: the real kustomize (``kubectl kustomize`` or ``kustomize build``) when one is on PATH, else
:func:`render_lite`, a small renderer for exactly the kustomization features this repository uses
(``resources``, ``namespace``, ``images``, and ``patches`` holding inline RFC 6902 JSON patches with a
kind/name target). It refuses anything else instead of guessing. Strategic-merge patches are not
supported, which is why the overlays use JSON patches. ``test_lite_renderer_matches_kustomize`` checks
that both renderers produce the same objects wherever kustomize exists, so the fallback cannot drift.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
DOCKERFILE = REPO / "Dockerfile"

#: Metric names the server exports (its contract with dashboards and alerts). Histograms add the
#: ``_bucket``, ``_sum`` and ``_count`` series; counters are named with their ``_total`` suffix.
CONTRACT_METRICS = frozenset(
    {
        "onepass_http_request_duration_seconds",
        "onepass_http_requests_total",
        "onepass_predictions_total",
        "onepass_cache_lookups_total",
        "onepass_encoder_batch_size",
        "onepass_encoder_duration_seconds",
        "onepass_stage_duration_seconds",
        "onepass_sampled_nodes",
        "onepass_queue_wait_seconds",
        "onepass_model_info",
        "onepass_head_info",
        "onepass_redis_breaker_state",
        "onepass_ready",
        "process_resident_memory_bytes",
    }
)

Manifest = dict[str, Any]

_CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"})
_LITE_KEYS = frozenset({"apiVersion", "kind", "resources", "namespace", "images", "patches"})


# ----------------------------------------------------------------------------------------------------
# Rendering


def kustomize_command(path: Path) -> list[str] | None:
    """The command that renders ``path`` with a real kustomize, or None when none is installed."""
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(path)]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(path)]
    return None


def render_kustomize(path: Path) -> list[Manifest]:
    """Render with the real kustomize; raises LookupError when none is installed."""
    cmd = kustomize_command(path)
    if cmd is None:
        raise LookupError("neither kustomize nor kubectl is on PATH")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render(path: Path) -> list[Manifest]:
    """Render a kustomization folder: the real kustomize when available, else :func:`render_lite`."""
    if kustomize_command(path) is not None:
        return render_kustomize(path)
    return render_lite(path)


def render_lite(path: Path) -> list[Manifest]:
    """Render the subset of kustomize this repository uses (see the module docstring)."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unsupported = set(kust) - _LITE_KEYS
    if unsupported:
        raise NotImplementedError(f"{path}: render_lite does not support {sorted(unsupported)}")
    docs: list[Manifest] = []
    for res in kust.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            docs.extend(render_lite(target))
        else:
            docs.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
    for patch in kust.get("patches", []):
        _apply_patch(docs, patch, path)
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    for image in kust.get("images", []):
        _apply_image(docs, image)
    return docs


def _apply_patch(docs: list[Manifest], patch: dict[str, Any], where: Path) -> None:
    if set(patch) - {"target", "patch"} or set(patch["target"]) - {"kind", "name"}:
        raise NotImplementedError(f"{where}: render_lite supports inline patches with a kind/name target only")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise NotImplementedError(f"{where}: strategic-merge patches are not supported, use JSON 6902")
    target = patch["target"]
    # kustomize reads target names as anchored regular expressions.
    matched = [
        d for d in docs if d["kind"] == target["kind"] and re.fullmatch(target.get("name", ".*"), d["metadata"]["name"])
    ]
    if not matched:
        raise ValueError(f"{where}: patch target {target} matches nothing")
    for doc in matched:
        for op in ops:
            json_patch(doc, op)


def _split_pointer(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {pointer!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def _child(node: Any, key: str) -> Any:
    return node[int(key)] if isinstance(node, list) else node[key]


def json_patch(doc: Any, op: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation (add, replace, remove, test) to ``doc`` in place."""
    *parents, last = _split_pointer(op["path"])
    node = doc
    for key in parents:
        node = _child(node, key)
    kind = op["op"]
    value = copy.deepcopy(op.get("value"))
    if kind == "test":
        if _child(node, last) != value:
            raise AssertionError(f"JSON patch test failed at {op['path']}: {_child(node, last)!r} != {value!r}")
    elif kind == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            node[last] = value
    elif kind == "replace":
        _child(node, last)  # RFC 6902: the target must exist
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    elif kind == "remove":
        del node[int(last) if isinstance(node, list) else last]
    else:
        raise NotImplementedError(f"JSON patch op {kind!r}")


def _apply_image(docs: list[Manifest], image: dict[str, str]) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise NotImplementedError(f"images entry {image}")
    for container in pod_containers(docs):
        ref = container["image"]
        name = re.split(r"[@]|:(?=[^/]*$)", ref, maxsplit=1)[0]
        if name != image["name"]:
            continue
        new = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{new}@{image['digest']}"
        else:
            tag = image.get("newTag", ref[len(name) + 1 :] if len(ref) > len(name) else "")
            container["image"] = f"{new}:{tag}" if tag else new


# ----------------------------------------------------------------------------------------------------
# Lookups


def find(docs: Iterable[Manifest], kind: str, name: str) -> Manifest:
    """The one object of ``kind`` named ``name``."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: Iterable[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    """(workload, pod spec) for every object with a pod template."""
    for doc in docs:
        template = doc.get("spec", {}).get("template")
        if template is not None:
            yield doc, template["spec"]


def pod_containers(docs: Iterable[Manifest]) -> Iterator[dict[str, Any]]:
    """Every container and init container of every pod template."""
    for _, spec in pod_specs(docs):
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def container(docs: Iterable[Manifest], deployment: str, name: str) -> dict[str, Any]:
    """Container ``name`` of Deployment ``deployment``."""
    spec = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found


def identity(doc: Manifest) -> tuple[str, str, str]:
    """(kind, namespace, name): unique within one rendered overlay."""
    meta = doc["metadata"]
    return doc["kind"], meta.get("namespace", ""), meta["name"]


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes memory quantity or a Redis size ("1536Mi", "1gb", "512mb") in bytes."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]i|[kmgt]b|[KMGT])?", str(q).strip())
    assert m, f"cannot parse quantity {q!r}"
    units = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
    units |= {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    return int(m.group(1)) * (units[m.group(2).lower()] if m.group(2) else 1)


# ----------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    joined: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    out = []
    for line in joined:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def dockerfile_stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions by stage name (``FROM ... AS name``)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for instr, args in dockerfile_instructions(text):
        if instr == "FROM":
            name = args.split()[-1] if " as " in args.lower() else str(len(stages))
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((instr, args))
    return stages


def dockerfile_env(instructions: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The ``ENV key=value`` pairs of some instructions (``$VAR`` references left as written)."""
    env: dict[str, str] = {}
    for instr, args in instructions:
        if instr == "ENV":
            for pair in args.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_args(instructions: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The ``ARG name=default`` pairs of some instructions."""
    return {key: value for instr, args in instructions if instr == "ARG" for key, _, value in [args.partition("=")]}
