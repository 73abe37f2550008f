"""The runtime: owns the model, graph, cache, batcher and heads. Only this layer touches tensors on the
request path; the API layer calls :meth:`Runtime.predict` and the admin methods.

Lifecycle: ``start()`` returns at once and loads in a worker thread (model store -> verified weights ->
graph -> device -> warm-up), so the process answers liveness probes while readiness is 503 with the
current step as the reason.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
import torch
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.cache.embeddings import BreakerState, CircuitBreaker, EmbeddingCache
from service.config import Settings
from service.data.sources import load_source
from service.errors import InvalidInputError, NotReadyError, UnknownIdsError
from service.graph.sampler import sample
from service.graph.temporal import TemporalGraph, build_graph
from service.model.encoder import GraphEncoder, gather_features
from service.runtime.batcher import DynamicBatcher
from service.runtime.heads import HeadSet, activate
from service.runtime.registry import HeadManager
from service.runtime.telemetry import Telemetry
from service.store.store import LoadedModel, ModelStore
from service.training.trainer import resolve_device

log = logging.getLogger(__name__)
GOLDEN_SIZE = 256


@dataclass
class Served:
    """Everything one loaded model version needs at request time."""

    model: LoadedModel
    graph: TemporalGraph
    encoder: GraphEncoder
    device: torch.device
    cache: EmbeddingCache
    batcher: DynamicBatcher
    golden: torch.Tensor  # embeddings of a fixed customer sample, for admin golden checks
    golden_ids: list[int]

    @property
    def namespace(self) -> str:
        return f"{self.model.encoder_hash}:{self.graph.snapshot_id}"


def make_redis(settings: Settings) -> aioredis.Redis | None:
    """Async Redis client with bounded timeouts and no retries (the circuit breaker decides)."""
    if not settings.redis_url:
        return None
    return aioredis.from_url(  # type: ignore[no-any-return]
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class Runtime:
    """The model server's runtime layer."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry()
        self.store = ModelStore(settings.model_store)
        self.state = "starting"
        self.reason = "not started"
        self.served: Served | None = None
        self.heads: HeadSet | None = None
        self.previous: dict[str, list[Any]] = {}  # task -> stack of earlier ActiveHead (rollback)
        self.redis: aioredis.Redis | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.startup_s: float | None = None
        self.manager = HeadManager(self)
        self._t0 = time.perf_counter()

    # ----- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._t0 = time.perf_counter()
        self.redis = make_redis(self.settings)
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="onepass-load")

    async def wait_ready(self, timeout_s: float | None = 300.0) -> None:
        assert self._load_task is not None
        await asyncio.wait_for(asyncio.shield(self._load_task), timeout_s)

    async def _load(self) -> None:
        try:
            served, heads = await asyncio.to_thread(self._load_blocking)
            served.batcher.start()
            self.served, self.heads = served, heads
            self.reason = "applying the shared head record"
            await self.manager.start_listener()  # a late replica comes up with the current heads
            self._publish_info()
            # Everything loaded so far lives until shutdown: move it out of the collector's view so a
            # full collection does not walk the model, graph and imports on the request path.
            gc.collect()
            gc.freeze()
            self.state, self.reason = "ready", "ok"
            self.startup_s = time.perf_counter() - self._t0
            self.telemetry.ready.set(1)
            log.info(
                "ready in %.1f s: %s/%s on %s",
                self.startup_s,
                served.model.name,
                served.model.version,
                served.device,
            )
        except Exception as e:
            self.state, self.reason = "failed", f"{type(e).__name__}: {e}"
            log.exception("model load failed")
            raise

    def _load_blocking(self, name: str | None = None, version: str | None = None) -> tuple[Served, HeadSet]:
        s = self.settings
        self.reason = "loading model from the model store"
        model = self.store.load(name or s.model_name, version if name else s.model_version)
        self.reason = "loading the database and building the graph"
        db = load_source(model.data_source, s.data_dir)
        graph = build_graph(db, spec=model.spec)
        device = resolve_device(s.device)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        encoder = model.encoder.to(device)
        heads = HeadSet(
            {t: activate(r, model.config.hidden, device) for t, r in model.heads.items()},
            device,
            fragment_entries=s.local_cache_entries,
        )
        cache = EmbeddingCache(
            self.redis,
            namespace=f"{model.encoder_hash}:{graph.snapshot_id}",
            dim=model.config.hidden,
            ttl_s=s.cache_ttl_s,
            dtype=s.cache_dtype,
            breaker=CircuitBreaker(s.breaker_failures, s.breaker_reset_s),
            local_entries=s.local_cache_entries,
            on_error=self.telemetry.cache_error.inc,
        )
        self.reason = "warming up"
        served = Served(model, graph, encoder, device, cache, None, torch.empty(0), [])  # type: ignore[arg-type]
        served.batcher = DynamicBatcher(
            lambda rows: self._encode(served, rows),
            max_batch=s.batch_max_size,
            max_wait_ms=s.batch_max_wait_ms,
            batching=s.batching,
            on_queue_wait=self.telemetry.queue_wait.observe,
            on_batch=lambda rows, embs: self._write_back(served, rows, embs),
        )
        # Warm-up doubles as the golden set: embeddings of a fixed, spread-out customer sample.
        n = graph.nodes[graph.spec.seed_type].num_nodes
        rows = np.unique(np.linspace(0, n - 1, min(GOLDEN_SIZE, n)).astype(np.int64))
        served.golden = torch.from_numpy(self._encode(served, rows, record=False))
        ids = graph.nodes[graph.spec.seed_type].ids
        served.golden_ids = ids[torch.from_numpy(rows)].tolist() if ids is not None else []
        heads.run(served.golden)
        return served, heads

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.manager.close()
        if self.served is not None:
            await self.served.batcher.close()
            await self.served.cache.drain()
        if self.redis is not None:
            await self.redis.aclose()

    # ----- readiness ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def probe_dependencies(self) -> None:
        """Check Redis now (one PING through the breaker) before a readiness answer."""
        if self.served is not None:
            await self.served.cache.probe()

    def health(self) -> dict[str, Any]:
        """Readiness body: ready flag, reason, and 'degraded' when the Redis cache is unavailable."""
        served = self.served
        degraded = served is None or served.cache.degraded
        if served is not None:
            self.telemetry.breaker_state.set(int(served.cache.breaker.state))
        return {
            "ready": self.ready,
            "state": self.state,
            "reason": self.reason,
            "degraded": bool(degraded) if self.ready else None,
            "redis": self._redis_state(),
            "startup_s": self.startup_s,
        }

    def _redis_state(self) -> str:
        if self.redis is None:
            return "not configured"
        if self.served is None:
            return "unknown"
        return {0: "ok", 1: "probing", 2: "unavailable"}[int(self.served.cache.breaker.state)]

    def _publish_info(self) -> None:
        assert self.served is not None and self.heads is not None
        m = self.served.model
        self.telemetry.model_info.clear()
        self.telemetry.model_info.labels(m.name, m.version, m.encoder_hash, self.served.graph.snapshot_id).set(1)
        self.telemetry.head_info.clear()
        for t, a in self.heads.heads.items():
            self.telemetry.head_info.labels(t, a.record.version, a.record.sha256[:16]).set(1)

    # ----- the hot path ------------------------------------------------------------------------------
    def _encode(self, served: Served, rows: np.ndarray, record: bool = True) -> np.ndarray:
        """ONE sampled subgraph and ONE encoder pass for all ``rows`` (runs in the encoder thread)."""
        t0 = time.perf_counter()
        seeds = torch.from_numpy(rows)
        sub = sample(served.graph, seeds, served.graph.max_time, served.model.config.fanouts)
        feats = gather_features(served.graph, sub)
        t1 = time.perf_counter()
        with torch.inference_mode():
            emb = served.encoder(feats.to(served.device), sub).float().cpu().numpy()
        t2 = time.perf_counter()
        if record:
            tm = self.telemetry
            tm.stage_sample.observe(t1 - t0)
            tm.stage_encode.observe(t2 - t1)
            tm.encoder_latency.observe(t2 - t0)
            tm.encoder_batch.observe(len(rows))
            tm.sampled_nodes.observe(sub.num_nodes())
            tm.encoder_passes.inc()
        return np.ascontiguousarray(emb, dtype=np.float32)

    def _write_back(self, served: Served, rows: np.ndarray, embs: np.ndarray) -> None:
        """After an encoder pass: keep the embeddings locally and write them to Redis in one pipeline."""
        ids = served.graph.nodes[served.graph.spec.seed_type].ids
        assert ids is not None
        served.cache.remember(ids.numpy()[rows].tolist(), embs)

    def loaded(self) -> tuple[Served, HeadSet]:
        if self.served is None or self.heads is None:
            raise NotReadyError(f"model not loaded: {self.reason}")
        return self.served, self.heads

    def require_ready(self) -> tuple[Served, HeadSet]:
        if not self.ready:
            raise NotReadyError(f"model not ready: {self.reason}")
        return self.loaded()

    async def predict(self, customer_ids: list[int]) -> dict[str, Any]:
        """Outputs of every head for each requested id, with provenance and cache counts."""
        result: dict[str, Any] = orjson.loads(await self.predict_json(customer_ids))
        return result

    async def predict_json(self, customer_ids: list[int]) -> bytes:
        """The /v1/predict response body as JSON bytes.

        Hot path: a customer whose outputs were already computed by the current head set is served from
        that head set's fragment cache (its JSON object, ready to splice) without touching Redis or
        torch. The cache belongs to the HeadSet, so a head swap starts a fresh one, and the HeadSet
        belongs to one encoder and graph, so outputs never outlive the weights that made them.
        """
        served, heads = self.require_ready()  # one HeadSet for the whole request: never a mix
        if not customer_ids:
            raise InvalidInputError("customer_ids: at least one id is required")
        if len(customer_ids) > self.settings.max_ids_per_request:
            raise InvalidInputError(
                f"customer_ids: {len(customer_ids)} ids, at most {self.settings.max_ids_per_request} per request"
            )
        tm = self.telemetry
        t0 = time.perf_counter()
        uniq = list(dict.fromkeys(customer_ids))
        # Read every fragment now, before any await: another request may evict entries meanwhile.
        frags: dict[int, bytes] = {}
        need: list[int] = []
        for cid in uniq:
            f = heads.fragments.get(cid)
            if f is None:
                need.append(cid)
            else:
                frags[cid] = f
        hits, misses = len(uniq) - len(need), 0
        if need:
            rows = served.graph.lookup_np(served.graph.spec.seed_type, np.asarray(need, dtype=np.int64))
            if (rows < 0).any():
                raise UnknownIdsError(sorted({need[k] for k in np.flatnonzero(rows < 0).tolist()}))
            cached = await served.cache.get_many(need)
            miss = [k for k, e in enumerate(cached) if e is None]
            hits += len(need) - len(miss)
            misses = len(miss)
            tm.stage_cache.observe(time.perf_counter() - t0)
            if miss:
                fresh = await served.batcher.embed(rows[miss])
                for k, e in zip(miss, fresh, strict=True):
                    cached[k] = e  # the batcher writes them back to the cache, once per encoder pass
            t2 = time.perf_counter()
            outputs = heads.run(torch.from_numpy(np.stack(cached)))  # type: ignore[arg-type]
            for cid, frag in zip(need, self._fragments(need, heads, outputs), strict=True):
                frags[cid] = frag
                heads.fragments.put(cid, frag)
            tm.stage_heads.observe(time.perf_counter() - t2)
        if hits:
            tm.cache_hit.inc(hits)
        if misses:
            tm.cache_miss.inc(misses)
        tm.predictions.inc(len(customer_ids))
        if heads.provenance is None:
            heads.provenance = orjson.dumps(
                {
                    "name": served.model.name,
                    "version": served.model.version,
                    "encoder_hash": served.model.encoder_hash,
                    "graph_snapshot": served.graph.snapshot_id,
                    "heads": heads.versions,
                }
            )
        return b"".join(
            (
                b'{"model":',
                heads.provenance,
                b',"cache":{"hits":%d,"misses":%d},"predictions":[' % (hits, misses),
                b",".join([frags[c] for c in customer_ids]),
                b"]}",
            )
        )

    @staticmethod
    def _fragments(ids: list[int], heads: HeadSet, outputs: dict[str, torch.Tensor]) -> list[bytes]:
        """One JSON object per customer: ``<task>_probability`` (binary), ``<task>`` (regression, dollars),
        ``<task>: {label, probabilities}`` (multi-class)."""
        columns: list[tuple[str, str, Any, tuple[str, ...]]] = []
        for task, out in outputs.items():
            spec = heads.heads[task].spec
            values = out.tolist()
            if spec.kind == "binary":
                columns.append((f"{task}_probability", "scalar", values, ()))
            elif spec.kind == "regression":
                columns.append((task, "scalar", values, ()))
            else:
                columns.append((task, "classes", values, spec.classes))
        result = []
        for k, cid in enumerate(ids):
            item: dict[str, Any] = {"customer_id": cid}
            for name, kind, values, classes in columns:
                if kind == "scalar":
                    item[name] = values[k]
                else:
                    probs = values[k]
                    best = max(range(len(probs)), key=probs.__getitem__)
                    item[name] = {"label": classes[best], "probabilities": dict(zip(classes, probs, strict=True))}
            result.append(orjson.dumps(item))
        return result

    @property
    def breaker_state(self) -> BreakerState | None:
        return self.served.cache.breaker.state if self.served is not None else None
