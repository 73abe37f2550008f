"""Head hot-swap: verify off the request path, swap one reference, keep the previous head, and
propagate the change to every replica that shares the Redis.

Replica protocol: the desired head set of a model version is a Redis hash
``onepass:heads:<model>:<version>`` (task -> {"version", "sha256"}); every change rewrites the hash
and publishes on the channel of the same name. Each replica subscribes, and on a message (or at start)
reconciles: it loads every head whose version differs from the model store, checks the sha256 the
record names, and swaps. A replica that starts later reads the hash and comes up with the current heads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from service.errors import ConflictError, InvalidInputError, ModelStoreError, NotFoundError
from service.runtime.heads import ActiveHead, HeadSet, activate
from service.store.store import HeadRecord, check_name, sha256_bytes

if TYPE_CHECKING:
    from service.runtime.predictor import Runtime, Served

log = logging.getLogger(__name__)
audit_log = logging.getLogger("onepass.audit")


@dataclass
class SwapReport:
    task: str
    action: str
    old: dict[str, str] | None
    new: dict[str, str] | None
    drift: dict[str, float] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "action": self.action,
            "old": self.old,
            "new": self.new,
            "drift": self.drift,
        }


def _ref(head: ActiveHead | None) -> dict[str, str] | None:
    return None if head is None else {"version": head.record.version, "sha256": head.record.sha256}


def audit(
    action: str, task: str, old: dict[str, str] | None, new: dict[str, str] | None, result: str, **extra: Any
) -> None:
    """One structured line per admin action. Never includes credentials."""
    audit_log.info(json.dumps({"event": "admin", "action": action, "task": task, "old": old, "new": new,
                               "result": result, **extra}, sort_keys=True))  # fmt: skip


class HeadManager:
    """Admin operations on a runtime's heads, serialised by one lock."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.replica_id = uuid.uuid4().hex[:12]
        self._lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None

    # ----- helpers -----------------------------------------------------------------------------------
    @property
    def served(self) -> Served:
        served, _ = self.rt.loaded()
        return served

    def channel(self) -> str:
        m = self.served.model
        return f"onepass:heads:{m.name}:{m.version}"

    def _golden(self, served: Served, new: ActiveHead, old: ActiveHead | None) -> dict[str, float]:
        """Run the candidate on the stored golden embeddings: outputs must be finite; report the drift
        from the current head (mean and max absolute difference, in reported units)."""
        out = HeadSet({new.spec.task: new}, served.device).run(served.golden)[new.spec.task]
        if not bool(torch.isfinite(out).all()):
            raise ModelStoreError(f"head '{new.spec.task}': golden check produced non-finite outputs")
        if old is None:
            return {"mean_abs": 0.0, "max_abs": 0.0, "golden_size": float(served.golden.shape[0])}
        ref = HeadSet({old.spec.task: old}, served.device).run(served.golden)[old.spec.task]
        diff = (out - ref).abs()
        return {
            "mean_abs": float(diff.mean()),
            "max_abs": float(diff.max()),
            "golden_size": float(out.shape[0]),
        }

    def _check_compatible(self, record: HeadRecord, current: ActiveHead | None, served: Served) -> None:
        if record.trained_on != served.model.encoder_hash:
            raise ModelStoreError(
                f"head '{record.spec.task}' {record.version} was trained on encoder {record.trained_on}, "
                f"the served encoder is {served.model.encoder_hash}"
            )
        if current is not None and (current.spec.kind, current.spec.classes) != (
            record.spec.kind,
            record.spec.classes,
        ):
            raise ModelStoreError(
                f"head '{record.spec.task}': kind/classes {record.spec.kind} {list(record.spec.classes)} differ from "
                f"the served head's {current.spec.kind} {list(current.spec.classes)}"
            )

    async def _activate(self, record: HeadRecord, current: ActiveHead | None) -> tuple[ActiveHead, dict[str, float]]:
        served = self.served
        self._check_compatible(record, current, served)
        # Building and checking the head happens in a thread: requests keep flowing meanwhile.
        head = await asyncio.to_thread(activate, record, served.model.config.hidden, served.device)
        drift = await asyncio.to_thread(self._golden, served, head, current)
        return head, drift

    def _install(self, task: str, head: ActiveHead | None, *, keep_previous: bool = True) -> ActiveHead | None:
        _, heads = self.rt.loaded()
        old = heads.heads.get(task)
        if keep_previous and old is not None:
            self.rt.previous.setdefault(task, []).append(old)
        self.rt.heads = heads.replace(task, head)  # the one atomic reference swap
        self.rt._publish_info()
        return old

    # ----- operations --------------------------------------------------------------------------------
    def record_from_upload(self, task: str, data: bytes) -> HeadRecord:
        """An uploaded safetensors head for an existing task; stored as a new head version."""
        check_name(task, "task")
        _, heads = self.rt.loaded()
        current = heads.heads.get(task)
        if current is None:
            raise NotFoundError(f"task '{task}' is not served; add a head with POST /admin/v1/heads")
        served = self.served
        record = HeadRecord(current.spec, "upload", sha256_bytes(data), data, served.model.encoder_hash)
        record.build(served.model.config.hidden)  # names, shapes, dtypes, finiteness (raises ModelStoreError)
        return record

    def record_from_store(self, task: str, version: str) -> HeadRecord:
        m = self.served.model
        return self.rt.store.load_head(m.name, m.version, check_name(task, "task"), check_name(version, "version"))

    async def swap(self, task: str, record: HeadRecord, action: str = "swap") -> SwapReport:
        async with self._lock:
            _, heads = self.rt.loaded()
            current = heads.heads.get(task)
            if current is None:
                raise NotFoundError(f"task '{task}' is not served; add a head with POST /admin/v1/heads")
            try:
                if record.version == "upload":
                    record = await asyncio.to_thread(self._persist_upload, record)
                head, drift = await self._activate(record, current)
            except Exception as e:
                audit(action, task, _ref(current), {"sha256": record.sha256}, f"rejected: {e}")
                self.rt.telemetry.head_swaps.labels(action, "rejected").inc()
                raise
            old = self._install(task, head)
            report = SwapReport(task, action, _ref(old), _ref(head), drift)
            await self._publish()
            audit(action, task, report.old, report.new, "ok", drift=drift)
            self.rt.telemetry.head_swaps.labels(action, "ok").inc()
            return report

    def _persist_upload(self, record: HeadRecord) -> HeadRecord:
        """Uploads become head versions in the model store, so every replica can load and verify them."""
        m = self.served.model
        head = record.build(m.config.hidden)
        try:
            hv = self.rt.store.save_head(m.name, m.version, head, trained_on=record.trained_on, metrics={})
        except OSError as e:
            raise ConflictError(f"model store is not writable ({e.strerror}); store the head with "
                                "`onepass train-head` and swap by reference") from e  # fmt: skip
        return self.rt.store.load_head(m.name, m.version, record.spec.task, hv)

    async def rollback(self, task: str) -> SwapReport:
        async with self._lock:
            _, heads = self.rt.loaded()
            stack = self.rt.previous.get(task)
            if not stack:
                raise NotFoundError(f"task '{task}' has no previous head to roll back to")
            current = heads.heads.get(task)
            previous = stack.pop()
            self._install(task, previous, keep_previous=False)
            report = SwapReport(task, "rollback", _ref(current), _ref(previous), None)
            await self._publish()
            audit("rollback", task, report.old, report.new, "ok")
            self.rt.telemetry.head_swaps.labels("rollback", "ok").inc()
            return report

    async def add(self, task: str, version: str) -> SwapReport:
        async with self._lock:
            _, heads = self.rt.loaded()
            if task in heads.heads:
                raise ConflictError(f"task '{task}' is already served; use PUT /admin/v1/heads/{task} to swap it")
            record = self.record_from_store(task, version)
            try:
                head, drift = await self._activate(record, None)
            except Exception as e:
                audit("add", task, None, {"version": version}, f"rejected: {e}")
                raise
            self._install(task, head)
            report = SwapReport(task, "add", None, _ref(head), drift)
            await self._publish()
            audit("add", task, None, report.new, "ok")
            self.rt.telemetry.head_swaps.labels("add", "ok").inc()
            return report

    async def remove(self, task: str) -> SwapReport:
        async with self._lock:
            _, heads = self.rt.loaded()
            if task not in heads.heads:
                raise NotFoundError(f"task '{task}' is not served")
            if len(heads.heads) == 1:
                raise ConflictError(f"task '{task}' is the last head; a model needs at least one")
            old = self._install(task, None)
            report = SwapReport(task, "remove", _ref(old), None, None)
            await self._publish()
            audit("remove", task, report.old, None, "ok")
            self.rt.telemetry.head_swaps.labels("remove", "ok").inc()
            return report

    def describe(self) -> dict[str, Any]:
        served, heads = self.rt.loaded()
        m = served.model
        return {
            "model": {"name": m.name, "version": m.version},
            "encoder_hash": m.encoder_hash,
            "graph_snapshot": served.graph.snapshot_id,
            "cache_namespace": served.namespace,
            "replica": self.replica_id,
            "heads": {
                t: {
                    "version": a.record.version, "sha256": a.record.sha256, "kind": a.spec.kind,
                    "classes": list(a.spec.classes), "loaded_at": a.loaded_at,
                    "previous": [p.record.version for p in self.rt.previous.get(t, [])],
                }
                for t, a in heads.heads.items()
            },
        }  # fmt: skip

    # ----- replicas ----------------------------------------------------------------------------------
    async def _publish(self) -> None:
        """Write the desired head set and notify the other replicas (best effort: Redis may be down)."""
        redis = self.rt.redis
        if redis is None:
            return
        _, heads = self.rt.loaded()
        state = {
            t: json.dumps({"version": a.record.version, "sha256": a.record.sha256}) for t, a in heads.heads.items()
        }
        key = self.channel()
        try:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=state)  # type: ignore[arg-type]
                pipe.publish(key, json.dumps({"origin": self.replica_id}))
                await pipe.execute()
        except Exception as e:  # noqa: BLE001 - local swap stands; other replicas catch up at next change
            log.warning("could not propagate head change to other replicas: %s", e)

    async def reconcile(self) -> list[str]:
        """Make the local heads equal the shared record; returns the tasks that changed."""
        redis = self.rt.redis
        if redis is None:
            return []
        raw = await redis.hgetall(self.channel())  # type: ignore[misc]
        if not raw:
            return []
        wanted = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
        changed = []
        async with self._lock:
            _, heads = self.rt.loaded()
            for task, ref in wanted.items():
                cur = heads.heads.get(task)
                if cur is not None and cur.record.sha256 == ref["sha256"]:
                    continue
                record = self.record_from_store(task, ref["version"])
                if record.sha256 != ref["sha256"]:
                    log.error("head %s %s: store sha256 %s != published %s; not swapping", task, ref["version"],
                              record.sha256[:12], ref["sha256"][:12])  # fmt: skip
                    continue
                head, _ = await self._activate(record, cur)
                self._install(task, head)
                _, heads = self.rt.loaded()
                changed.append(task)
            for task in [t for t in heads.heads if t not in wanted]:
                self._install(task, None)
                changed.append(task)
        if changed:
            audit("reconcile", ",".join(changed), None, None, "ok", replica=self.replica_id)
        return changed

    async def start_listener(self) -> None:
        """Subscribe to head changes and reconcile at start (a late replica gets the current heads)."""
        self.rt.loaded()
        if self.rt.redis is None:
            return
        try:
            await self.reconcile()
        except Exception as e:  # noqa: BLE001 - Redis down at start: serve the manifest heads
            log.warning("head reconcile at start failed: %s", e)
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="onepass-head-listener")

    async def _listen(self) -> None:
        assert self.rt.redis is not None
        while True:
            try:
                pubsub = self.rt.redis.pubsub()
                await pubsub.subscribe(self.channel())
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    origin = json.loads(msg["data"]).get("origin")
                    if origin != self.replica_id:
                        await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep listening across Redis outages
                log.debug("head listener: %s; resubscribing", e)
                await asyncio.sleep(1.0)
                try:
                    await self.reconcile()
                except Exception:  # noqa: BLE001, S110
                    pass

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


def validate_task_name(task: str) -> str:
    try:
        return check_name(task, "task")
    except ModelStoreError as e:
        raise InvalidInputError(str(e)) from e
