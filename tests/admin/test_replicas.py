"""Point 5 and the admin listener, end to end: real `onepass serve` processes sharing one Redis and one
model store. A change made through one replica's admin port reaches the others; a replica started
later comes up with the current heads; without a token the admin port is not listening."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.cache.local_redis import LocalRedis, free_port
from service.store.store import ModelStore
from tests.admin.support import AUTH, TOKEN, churn, head_bytes, shifted_head

pytestmark = pytest.mark.slow

ONEPASS = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "onepass"
START_TIMEOUT_S = 90.0


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def predict(self, ids: list[int]) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/v1/predict", json={"customer_ids": ids}, timeout=10)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def churn_version(self, ids: list[int]) -> str:
        version: str = self.predict(ids)["model"]["heads"]["churn"]
        return version

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready after {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def shared_redis(redis_server: LocalRedis) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="module")
def shared_store(admin_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("replicas") / "store"
    shutil.copytree(admin_template, root)
    return root


@pytest.fixture(scope="module")
def start(
    shared_store: Path, shared_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Replica]]:
    """Start `onepass serve` processes (not waiting for readiness); all are stopped at the end."""
    logs = tmp_path_factory.mktemp("replica-logs")
    started: list[Replica] = []

    def launch(*, token: str | None = TOKEN) -> Replica:
        port, admin_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONEPASS_")}
        env.update({
            "ONEPASS_MODEL_STORE": str(shared_store), "ONEPASS_MODEL_NAME": "tiny", "ONEPASS_REDIS_URL": shared_redis,
            "ONEPASS_PORT": str(port), "ONEPASS_ADMIN_PORT": str(admin_port), "ONEPASS_HOST": "127.0.0.1",
            "ONEPASS_DEVICE": "cpu", "ONEPASS_GRACEFUL_SHUTDOWN_S": "2", "ONEPASS_LOG_LEVEL": "info",
        })  # fmt: skip
        if token is not None:
            env["ONEPASS_ADMIN_TOKEN"] = token
        log = logs / f"replica-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([str(ONEPASS), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
        replica = Replica(proc, port, admin_port, log)
        started.append(replica)
        return replica

    yield launch
    for replica in started:
        replica.stop()


@pytest.fixture(scope="module")
def pair(start: Callable[..., Replica]) -> tuple[Replica, Replica]:
    a, b = start(), start()
    a.wait_ready()
    b.wait_ready()
    return a, b


@pytest.fixture(scope="module")
def ids() -> list[int]:
    """Customer ids of the tiny database (ids run from 1)."""
    return [1, 2, 3, 5, 8, 13, 21, 34]


def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_swap_through_one_replica_reaches_the_other(pair: tuple[Replica, Replica], ids: list[int]) -> None:
    a, b = pair
    assert b.churn_version(ids) == "v1"
    r = httpx.put(f"{a.admin_url}/admin/v1/heads/churn", json={"version": "v2"}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["propagated"] is True
    assert a.churn_version(ids) == "v2"
    assert _eventually(lambda: b.churn_version(ids) == "v2"), b.log.read_text()[-3000:]
    assert churn(b.predict(ids)) == churn(a.predict(ids))
    # The audit line is in replica A's log; the token is in no log.
    assert '"action": "swap"' in a.log.read_text()
    assert TOKEN not in a.log.read_text() + b.log.read_text()


def test_upload_through_one_replica_reaches_the_other(
    pair: tuple[Replica, Replica], ids: list[int], shared_store: Path
) -> None:
    a, b = pair
    data = head_bytes(shifted_head(ModelStore(shared_store), "tiny", "churn", -1.0))
    r = httpx.put(f"{a.admin_url}/admin/v1/heads/churn", content=data,
                  headers={**AUTH, "content-type": "application/octet-stream"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    version = r.json()["new"]["version"]
    assert _eventually(lambda: b.churn_version(ids) == version), b.log.read_text()[-3000:]
    model = httpx.get(f"{b.admin_url}/admin/v1/model", headers=AUTH, timeout=10).json()
    assert model["heads"]["churn"]["sha256"] == r.json()["new"]["sha256"]


def test_replica_started_later_comes_up_with_current_heads(
    pair: tuple[Replica, Replica], start: Callable[..., Replica], ids: list[int]
) -> None:
    a, _ = pair
    r = httpx.put(f"{a.admin_url}/admin/v1/heads/churn", json={"version": "v3"}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.delete(f"{a.admin_url}/admin/v1/heads/segment", headers=AUTH, timeout=30).status_code == 200
    late = start()
    late.wait_ready()
    body = late.predict(ids)
    assert body["model"]["heads"] == {"churn": "v3", "ltv": "v1"}
    assert churn(body) == churn(a.predict(ids))
    assert httpx.post(f"{a.admin_url}/admin/v1/heads/segment/rollback", headers=AUTH, timeout=30).status_code == 200
    assert _eventually(lambda: "segment" in late.predict(ids)["model"]["heads"])


def test_admin_port_is_not_listening_without_a_token(start: Callable[..., Replica], ids: list[int]) -> None:
    replica = start(token=None)
    replica.wait_ready()
    assert replica.predict(ids)["predictions"]
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", replica.admin_port), timeout=2):
        pass
    assert "admin API disabled" in replica.log.read_text()


def test_admin_port_does_not_serve_public_routes(pair: tuple[Replica, Replica], ids: list[int]) -> None:
    a, _ = pair
    assert httpx.post(f"{a.admin_url}/v1/predict", json={"customer_ids": ids}, timeout=10).status_code == 404
    assert httpx.get(f"{a.url}/admin/v1/model", headers=AUTH, timeout=10).status_code == 404
    assert httpx.get(f"{a.admin_url}/admin/v1/model", timeout=10).status_code == 401
