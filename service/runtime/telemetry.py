"""Prometheus metrics, one registry per server (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
NODE_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)


class Telemetry:
    """Every metric the service exports. Names follow Prometheus conventions (base units, _total)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        self.http_latency = Histogram(
            "onepass_http_request_duration_seconds", "HTTP request latency.", ["route", "method", "status"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.http_requests = Counter(
            "onepass_http_requests", "HTTP requests served.", ["route", "method", "status"], registry=r
        )
        self.predictions = Counter("onepass_predictions", "Customer predictions returned.", registry=r)
        self.cache_lookups = Counter(
            "onepass_cache_lookups", "Embedding cache lookups by result.", ["result"], registry=r
        )
        self.encoder_batch = Histogram(
            "onepass_encoder_batch_size", "Seed customers per encoder pass.", buckets=SIZE_BUCKETS, registry=r
        )
        self.encoder_passes = Counter("onepass_encoder_passes", "Encoder passes run.", registry=r)
        self.encoder_latency = Histogram(
            "onepass_encoder_duration_seconds", "Wall time of one encoder pass (sample + encode).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_latency = Histogram(
            "onepass_stage_duration_seconds", "Time per request stage.", ["stage"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.sampled_nodes = Histogram(
            "onepass_sampled_nodes", "Nodes in the sampled subgraph of one encoder pass.", buckets=NODE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "onepass_queue_wait_seconds", "Time a cache miss waited for its encoder pass to start.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "onepass_model_info", "Served model (value 1).", ["model", "version", "encoder_hash", "snapshot"],
            registry=r,
        )  # fmt: skip
        self.head_info = Gauge(
            "onepass_head_info", "Served heads (value 1).", ["task", "version", "sha256"], registry=r
        )
        self.breaker_state = Gauge(
            "onepass_redis_breaker_state", "Redis circuit breaker: 0 closed, 1 half-open, 2 open.", registry=r
        )
        self.ready = Gauge("onepass_ready", "1 when the model is loaded and warmed.", registry=r)
        # Children bound once: `.labels()` costs a dict lookup and a lock per call on the hot path.
        self.stage_cache = self.stage_latency.labels("cache")
        self.stage_heads = self.stage_latency.labels("heads")
        self.stage_sample = self.stage_latency.labels("sample")
        self.stage_encode = self.stage_latency.labels("encode")
        self.cache_hit = self.cache_lookups.labels("hit")
        self.cache_miss = self.cache_lookups.labels("miss")
        self.cache_error = self.cache_lookups.labels("error")
        self.head_swaps = Counter("onepass_head_swaps", "Admin head changes applied.", ["action", "result"], registry=r)
