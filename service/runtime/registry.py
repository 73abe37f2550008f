"""Head hot-swap: verify off the request path, swap one reference, keep the previous head, and
propagate the change to every replica that shares the Redis.

Replica protocol: the desired head set of a served model is a Redis hash
``onepass:heads:<model>:<version>:<encoder hash>`` (task -> ``{"version", "sha256"}``). A change on
one replica updates only its task's field (a Lua script writes the replica's whole head set first when
the hash does not exist yet, so concurrent changes to different tasks on different replicas do not
undo each other) and publishes on the channel of the same name. Every replica subscribes; on a
message, at start, after a reconnect and every :data:`RESYNC_S` seconds it reconciles: for every task
whose sha256 differs from its own it loads that head version from the model store, checks that the
store's sha256 equals the published one, runs the same checks as an admin swap, and swaps. A replica
that starts later reads the hash and comes up with the current heads.

The record lives in the cache Redis, which may evict keys (``allkeys-lru``) or be flushed: the periodic
resync writes it back from the local head set when it is missing, so it survives as long as one
replica runs. Redis trouble never fails a request or an admin swap on the local replica; the response
says whether the change was propagated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import torch

from service.errors import ConflictError, InvalidInputError, ModelStoreError, NotFoundError, OnepassError
from service.runtime.heads import ActiveHead, HeadSet, activate
from service.store.store import HeadRecord, check_name, safetensors_metadata, sha256_bytes

if TYPE_CHECKING:
    from service.runtime.predictor import Runtime, Served
    from service.runtime.telemetry import Telemetry

log = logging.getLogger(__name__)
audit_log = logging.getLogger("onepass.audit")

#: Earlier heads kept per task for rollback (each is a few KB of weights).
MAX_PREVIOUS = 5
#: Seconds between two periodic reconciles of a replica with the shared record.
RESYNC_S = 10.0
#: Timeout (s) of the replica-control Redis calls: off the request path, so longer than the cache's.
CONTROL_TIMEOUT_S = 2.0

# KEYS[1]: the record (also the channel). ARGV: task, ref JSON ("" = removed), message, then the
# replica's whole head set as task/ref pairs, written only when the record does not exist yet.
_PUBLISH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return redis.call('PUBLISH', KEYS[1], ARGV[3])
"""
# Re-create a missing record (evicted or flushed) from the local head set; never overwrites one.
_RESTORE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip archive


@dataclass
class SwapReport:
    """The outcome of one admin action: the heads before and after, the golden-set drift, and whether
    the shared record (other replicas) was updated."""

    task: str
    action: str
    old: dict[str, str] | None
    new: dict[str, str] | None
    drift: dict[str, float] | None
    propagated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "action": self.action,
            "old": self.old,
            "new": self.new,
            "drift": self.drift,
            "propagated": self.propagated,
        }


def _ref(head: ActiveHead | None) -> dict[str, str] | None:
    return None if head is None else {"version": head.record.version, "sha256": head.record.sha256}


def audit(
    action: str, task: str | None, old: dict[str, str] | None, new: dict[str, str] | None, result: str, **extra: Any
) -> None:
    """One structured JSON line on the ``onepass.audit`` logger. Callers never pass credentials."""
    audit_log.info(json.dumps({"event": "admin", "action": action, "task": task, "old": old, "new": new,
                               "result": result, **extra}, sort_keys=True, default=str))  # fmt: skip


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OnepassError):
        return f"{exc.code}: {exc}"
    # Unexpected errors: the type only; the traceback goes to the error log, not the audit trail.
    return f"internal_error: {type(exc).__name__}"


@dataclass
class AuditEntry:
    """Context manager: writes exactly one audit line when the action ends, ``ok`` or ``rejected: <why>``.

    The action fills in ``old`` and ``new`` (version and sha256) as it learns them, so a rejection says
    which head was refused in favour of which.
    """

    action: str
    task: str | None
    telemetry: Telemetry | None = None
    old: dict[str, str] | None = None
    new: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> AuditEntry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        result = "ok" if exc is None else f"rejected: {_reason(exc)}"
        audit(self.action, self.task, self.old, self.new, result, **self.extra)
        if self.telemetry is not None:
            self.telemetry.head_swaps.labels(self.action, "ok" if exc is None else "rejected").inc()


def validate_task_name(task: str) -> str:
    """A task name from a request: a plain store name (no '/', '..', absolute path or URL). HTTP 422."""
    return _validate(task, "task")


def validate_version(version: str) -> str:
    """A head version from a request: a plain store name. HTTP 422."""
    return _validate(version, "version")


def _validate(value: str, what: str) -> str:
    try:
        return check_name(value, what)
    except ModelStoreError as e:
        raise InvalidInputError(str(e)) from e


def _origin(msg: dict[str, Any]) -> str | None:
    """The replica that published a change message (None when the message is not ours)."""
    try:
        origin = json.loads(msg["data"]).get("origin")
    except (ValueError, AttributeError, KeyError):
        return None
    return origin if isinstance(origin, str) else None


def output_key(task: str, kind: str) -> str:
    """The key a head's output has in each /v1/predict item."""
    return f"{task}_probability" if kind == "binary" else task


class HeadManager:
    """Admin operations on a runtime's heads, serialised by one lock, and the replica listener."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.replica_id = uuid.uuid4().hex[:12]
        self._lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._control: aioredis.Redis | None = None

    # ----- helpers -----------------------------------------------------------------------------------
    @property
    def served(self) -> Served:
        served, _ = self.rt.loaded()
        return served

    def channel(self) -> str:
        """The shared record's key and the change channel of the served model and encoder."""
        m = self.served.model
        return f"onepass:heads:{m.name}:{m.version}:{m.encoder_hash}"

    @staticmethod
    def _golden(served: Served, new: ActiveHead, old: ActiveHead | None) -> dict[str, float] | None:
        """Run the candidate on the stored golden embeddings: outputs must be finite. Returns the drift
        from the current head (mean and max absolute difference, in reported units), None without one."""
        task = new.spec.task
        out = HeadSet({task: new}, served.device).run(served.golden)[task]
        if not bool(torch.isfinite(out).all()):
            raise ModelStoreError(f"head '{task}': the golden check produced non-finite outputs")
        if old is None:
            return None
        ref = HeadSet({task: old}, served.device).run(served.golden)[task]
        diff = (out - ref).abs()
        return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "golden_size": int(out.shape[0])}

    @staticmethod
    def _check_compatible(task: str, record: HeadRecord, current: ActiveHead | None, served: Served) -> None:
        if record.spec.task != task:
            raise ModelStoreError(
                f"head version {record.version} is a head for task '{record.spec.task}', not '{task}'"
            )
        if record.trained_on != served.model.encoder_hash:
            raise ModelStoreError(
                f"head '{task}' {record.version} was trained on encoder {record.trained_on}, "
                f"the served encoder is {served.model.encoder_hash}"
            )
        if current is not None and (current.spec.kind, current.spec.classes) != (
            record.spec.kind,
            record.spec.classes,
        ):
            raise ModelStoreError(
                f"head '{task}': kind/classes {record.spec.kind} {list(record.spec.classes)} differ from "
                f"the served head's {current.spec.kind} {list(current.spec.classes)}"
            )

    async def _verify(
        self, task: str, record: HeadRecord, current: ActiveHead | None, served: Served
    ) -> tuple[ActiveHead, dict[str, float] | None]:
        """Every check before a swap: task, encoder, kind and classes; tensor names, shapes, dtypes and
        finite values (``activate``); finite outputs on the golden set. Runs in a worker thread, so
        requests keep flowing meanwhile."""
        self._check_compatible(task, record, current, served)
        head = await asyncio.to_thread(activate, record, served.model.config.hidden, served.device)
        drift = await asyncio.to_thread(self._golden, served, head, current)
        return head, drift

    def current_ref(self, task: str) -> dict[str, str] | None:
        """Version and sha256 of the head serving ``task`` now (None when none or not loaded yet)."""
        heads = self.rt.heads
        return None if heads is None else _ref(heads.heads.get(task))

    def _current(self, task: str) -> ActiveHead:
        _, heads = self.rt.loaded()
        current = heads.heads.get(task)
        if current is None:
            raise NotFoundError(f"task '{task}' is not served; add a head with POST /admin/v1/heads")
        return current

    def _install(self, task: str, head: ActiveHead | None, *, keep_previous: bool = True) -> ActiveHead | None:
        _, heads = self.rt.loaded()
        old = heads.heads.get(task)
        if keep_previous and old is not None:
            stack = self.rt.previous.setdefault(task, [])
            stack.append(old)
            del stack[:-MAX_PREVIOUS]
        self.rt.heads = heads.replace(task, head)  # the one atomic reference swap
        self.rt._publish_info()
        return old

    def _load_record(self, task: str, version: str) -> HeadRecord:
        m = self.served.model
        return self.rt.store.load_head(m.name, m.version, task, version)

    async def _commit(
        self, task: str, head: ActiveHead | None, action: str, drift: dict[str, float] | None, *, keep_previous: bool
    ) -> SwapReport:
        old = self._install(task, head, keep_previous=keep_previous)
        propagated = await self._publish(task, head)
        return SwapReport(task, action, _ref(old), _ref(head), drift, propagated)

    # ----- operations (task and version names are validated by the caller) --------------------------------
    async def swap_upload(self, task: str, data: bytes, entry: AuditEntry) -> SwapReport:
        """Swap ``task`` to an uploaded safetensors head. Verified first, then stored in the model store
        as a new head version, so every replica can load and verify it by name."""
        upload_sha = sha256_bytes(data)
        entry.new = {"version": "upload", "sha256": upload_sha}
        if data.startswith(PICKLE_MAGIC):
            raise ModelStoreError(
                "upload is a pickle or torch.save file; only safetensors is accepted (loading a pickle runs code)"
            )
        async with self._lock:
            served = self.served
            current = self._current(task)
            entry.old = _ref(current)
            # Heads written by onepass name their encoder in the file's metadata; a file without it is
            # taken as meant for the served encoder and must pass the shape and golden checks.
            trained_on = safetensors_metadata(data).get("trained_on", served.model.encoder_hash)
            record = HeadRecord(current.spec, "upload", upload_sha, data, trained_on)
            head, drift = await self._verify(task, record, current, served)
            stored = await asyncio.to_thread(self._persist_upload, head, upload_sha)
            head = ActiveHead(stored, head.module)
            entry.new = {**(_ref(head) or {}), "upload_sha256": upload_sha}
            return await self._commit(task, head, "swap", drift, keep_previous=True)

    def _persist_upload(self, head: ActiveHead, upload_sha: str) -> HeadRecord:
        m = self.served.model
        try:
            hv = self.rt.store.save_head(
                m.name, m.version, head.module, trained_on=m.encoder_hash,
                metrics={"source": "admin upload", "upload_sha256": upload_sha},
            )  # fmt: skip
        except OSError as e:
            raise ConflictError(
                f"model store is not writable ({e.strerror}); store the head with `onepass train-head` and "
                "swap by reference"
            ) from e
        return self.rt.store.load_head(m.name, m.version, head.spec.task, hv)

    async def swap_version(self, task: str, version: str, entry: AuditEntry) -> SwapReport:
        """Swap ``task`` to a head version already in the model store."""
        entry.new = {"version": version}
        async with self._lock:
            served = self.served
            current = self._current(task)
            entry.old = _ref(current)
            record = await asyncio.to_thread(self._load_record, task, version)
            entry.new = {"version": record.version, "sha256": record.sha256}
            if record.sha256 == current.record.sha256:
                # PUT is idempotent: the head already serves; no swap, no rollback entry, no propagation.
                same = _ref(current)
                return SwapReport(task, "unchanged", same, same, {"mean_abs": 0.0, "max_abs": 0.0}, True)
            head, drift = await self._verify(task, record, current, served)
            return await self._commit(task, head, "swap", drift, keep_previous=True)

    async def rollback(self, task: str, entry: AuditEntry) -> SwapReport:
        """Put back the head that served ``task`` before its last swap (or removal)."""
        async with self._lock:
            _, heads = self.rt.loaded()
            entry.old = _ref(heads.heads.get(task))
            stack = self.rt.previous.get(task)
            if not stack:
                raise NotFoundError(f"task '{task}' has no previous head to roll back to")
            previous = stack.pop()
            entry.new = _ref(previous)
            return await self._commit(task, previous, "rollback", None, keep_previous=False)

    async def add(self, task: str, version: str, entry: AuditEntry) -> SwapReport:
        """Serve a new task from a head version in the model store."""
        entry.new = {"version": version}
        async with self._lock:
            served, heads = self.rt.loaded()
            if task in heads.heads:
                raise ConflictError(f"task '{task}' is already served; use PUT /admin/v1/heads/{task} to swap it")
            record = await asyncio.to_thread(self._load_record, task, version)
            entry.new = {"version": record.version, "sha256": record.sha256}
            key = output_key(task, record.spec.kind)
            taken = {"customer_id"} | {output_key(t, a.spec.kind) for t, a in heads.heads.items()}
            if key in taken:
                raise ConflictError(f"task '{task}': its output key '{key}' is already used in /v1/predict responses")
            head, drift = await self._verify(task, record, None, served)
            return await self._commit(task, head, "add", drift, keep_previous=True)

    async def remove(self, task: str, entry: AuditEntry) -> SwapReport:
        """Stop serving ``task``; the head stays available to rollback."""
        async with self._lock:
            _, heads = self.rt.loaded()
            if task not in heads.heads:
                raise NotFoundError(f"task '{task}' is not served")
            entry.old = _ref(heads.heads[task])
            if len(heads.heads) == 1:
                raise ConflictError(f"task '{task}' is the last head; a model needs at least one")
            return await self._commit(task, None, "remove", None, keep_previous=True)

    def describe(self) -> dict[str, Any]:
        """Encoder hash, graph snapshot, cache namespace and every head's version, sha256 and load time."""
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
    def _state(self) -> list[str]:
        _, heads = self.rt.loaded()
        pairs: list[str] = []
        for t, a in heads.heads.items():
            pairs += [t, json.dumps({"version": a.record.version, "sha256": a.record.sha256})]
        return pairs

    async def _publish(self, task: str, head: ActiveHead | None) -> bool:
        """Record the change of ``task`` in the shared record and notify the other replicas. Best effort:
        with Redis down the local change stands, and the others catch up at the next change."""
        redis = self._control
        if redis is None:
            return False
        ref = "" if head is None else json.dumps(_ref(head))
        message = json.dumps({"origin": self.replica_id, "task": task})
        try:
            await redis.eval(_PUBLISH_LUA, 1, self.channel(), task, ref, message, *self._state())  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - any Redis failure: the local swap stands
            log.warning("could not propagate the change of head '%s' to other replicas: %s", task, e)
            return False
        return True

    async def reconcile(self) -> list[str]:
        """Make the local heads equal the shared record; returns the tasks that changed.

        Each head is loaded from the model store, its sha256 checked against the record, and verified
        like an admin swap; a head that fails is logged and skipped (the replica keeps its own).
        """
        redis = self._control
        if redis is None:
            return []
        # Read the record under the lock: an admin change on this replica between the read and the apply
        # would otherwise be undone by the (older) record until the next resync.
        async with self._lock:
            raw = await redis.hgetall(self.channel())  # type: ignore[misc]
            return await self._apply_record(raw)

    async def _apply_record(self, raw: dict[Any, Any]) -> list[str]:
        wanted: dict[str, dict[str, str]] = {}
        malformed: set[str] = set()  # present but unreadable: left alone, never taken as a removal
        for k, v in raw.items():
            task = k.decode() if isinstance(k, bytes) else str(k)
            try:
                ref = json.loads(v)
                wanted[validate_task_name(task)] = {
                    "version": validate_version(ref["version"]),
                    "sha256": ref["sha256"],
                }
            except (ValueError, KeyError, TypeError, InvalidInputError) as e:
                log.error("shared head record: ignoring malformed entry for %r: %s", task, e)
                malformed.add(task)
        if not wanted:
            return []
        changed: list[str] = []
        # The caller (reconcile) holds self._lock.
        served, heads = self.rt.loaded()
        for task, ref in wanted.items():
            cur = heads.heads.get(task)
            if cur is not None and cur.record.sha256 == ref["sha256"]:
                continue
            try:
                with AuditEntry("reconcile", task, self.rt.telemetry, _ref(cur), ref, {"replica": self.replica_id}):
                    record = await asyncio.to_thread(self._load_record, task, ref["version"])
                    if record.sha256 != ref["sha256"]:
                        raise ModelStoreError(
                            f"head '{task}' {ref['version']}: model store sha256 {record.sha256[:12]} differs from "
                            f"the published {ref['sha256'][:12]}; not swapping"
                        )
                    head, _ = await self._verify(task, record, cur, served)
                    self._install(task, head)
            except Exception as e:  # noqa: BLE001 - one bad head must not block the others
                log.error("reconcile: keeping the local head '%s': %s", task, e)
                continue
            _, heads = self.rt.loaded()
            changed.append(task)
        for task in [t for t in heads.heads if t not in wanted and t not in malformed]:
            if len(self.rt.loaded()[1].heads) == 1:
                log.error("reconcile: not removing '%s', the last head", task)
                break
            with AuditEntry("reconcile", task, self.rt.telemetry, _ref(heads.heads[task]), None,
                            {"replica": self.replica_id}):  # fmt: skip
                self._install(task, None)
            changed.append(task)
        return changed

    async def _restore_record(self, *, at_start: bool = False) -> None:
        """Write the shared record from the local heads when it is missing (first replica, eviction, flush)."""
        assert self._control is not None
        if await self._control.eval(_RESTORE_LUA, 1, self.channel(), *self._state()):  # type: ignore[misc]
            if at_start:
                log.info("shared head record %s created from this replica's heads", self.channel())
            else:
                log.warning("shared head record %s was missing; restored it from this replica", self.channel())

    async def start_listener(self) -> None:
        """Reconcile with the shared record (a late replica comes up with the current heads), then listen."""
        self.rt.loaded()
        url = self.rt.settings.redis_url
        if url is None:
            return
        self._control = aioredis.from_url(
            url, socket_timeout=CONTROL_TIMEOUT_S, socket_connect_timeout=CONTROL_TIMEOUT_S,
            health_check_interval=30,
        )  # fmt: skip
        try:
            await self.reconcile()
            await self._restore_record(at_start=True)
        except Exception as e:  # noqa: BLE001 - Redis down at start: serve the manifest heads
            log.warning("head reconcile at start failed: %s", e)
        self._listener = asyncio.get_running_loop().create_task(self._listen(), name="onepass-head-listener")

    async def _listen(self) -> None:
        assert self._control is not None
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            pubsub = self._control.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel())
                await self.reconcile()  # changes made while (re)subscribing
                if failing:
                    log.info("head listener: resubscribed")
                failing = False
                last_sync = loop.time()
                while True:
                    # A timeout instead of a blocking read: the loop also drives the periodic resync.
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message" and _origin(msg) != self.replica_id:
                        await self.reconcile()
                    if loop.time() - last_sync >= RESYNC_S:
                        await self._restore_record()
                        await self.reconcile()
                        last_sync = loop.time()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep listening across Redis outages
                # Warn once per outage, not once a second for its whole length.
                (log.debug if failing else log.warning)("head listener: %s; resubscribing every 1 s", e)
                failing = True
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001 - the connection may already be gone
                    log.debug("head listener: closing the subscription failed", exc_info=True)

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            # One cancel is not always enough: redis-py's `get_message(timeout=...)` can swallow a
            # CancelledError that races its internal asyncio.timeout (about 1 in 50 cancels with redis-py 8.2
            # on Python 3.11), and the listener then loops on and hangs shutdown. Cancel until it is done.
            while not listener.done():
                listener.cancel()
                await asyncio.wait({listener}, timeout=0.2)
            if not listener.cancelled():
                listener.exception()  # retrieved, so asyncio does not log it again; the listener logged it
        if self._control is not None:
            await self._control.aclose()
            self._control = None
