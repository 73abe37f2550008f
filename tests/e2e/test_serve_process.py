"""`onepass serve` and `scripts/run` as real processes: uvicorn on a free port, its own redis-server
(ONEPASS_REDIS_URL unset), HTTP from outside, the `onepass predict` client, and a clean stop on a signal
that leaves no redis-server behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from service.cache.local_redis import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv this test runs in, where `onepass` is installed
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 40.0
REDIS_LINE = re.compile(r"started a local redis-server on redis://127\.0\.0\.1:(\d+)/")


def server_env(model_store: Path, port: int) -> dict[str, str]:
    """The environment of a new user's shell: no ONEPASS_* from the test run, the venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEPASS_")}
    env.update(
        ONEPASS_MODEL_STORE=str(model_store),
        ONEPASS_MODEL_NAME="tiny",
        ONEPASS_PORT=str(port),
        ONEPASS_HOST="127.0.0.1",
        ONEPASS_DEVICE="cpu",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


class Server:
    """A started server process with its output in a file (a pipe could fill up and block it)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        # Own session: on failure the test can kill the whole group, the redis-server child included.
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout_s: float = READY_TIMEOUT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} before {pattern!r}:\n{self.output()}")
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} in the server output within {timeout_s} s:\n{self.output()}")

    def wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"{url}/readyz not 200 within {READY_TIMEOUT_S} s:\n{self.output()}")

    def redis_children(self) -> list[int]:
        """Pids of redis-server processes this server started (its direct children)."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        pids.append(int(pid))
                except FileNotFoundError:
                    continue
        return pids

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {STOP_TIMEOUT_S} s after {sig.name}:\n{self.output()}")

    def kill_group(self) -> None:
        if self.proc.poll() is None or self._group_alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._out.close()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


@contextmanager
def started(args: list[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    server = Server(args, env, log)
    try:
        yield server
    finally:
        server.kill_group()


def process_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # a zombie has exited; only its parent's bookkeeping is left
            return True
        time.sleep(0.05)
    return False


def redis_answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "onepass"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_serve_answers_over_http_and_stops_on_sigterm_without_leaving_redis(model_store: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(model_store, port)
    with started([str(BIN / "onepass"), "serve"], env, tmp_path / "serve.log") as server:
        server.wait_ready(url)
        redis_port = int(server.wait_for_output(REDIS_LINE.pattern).group(1))
        children = server.redis_children()
        assert len(children) == 1, server.output()
        assert redis_answers(redis_port)

        r = httpx.post(f"{url}/v1/predict", json={"customer_ids": [1, 2, 3]}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == "tiny"
        assert [p["customer_id"] for p in body["predictions"]] == [1, 2, 3]
        again = httpx.post(f"{url}/v1/predict", json={"customer_ids": [1, 2, 3]}, timeout=30).json()
        assert again["cache"] == {"hits": 3, "misses": 0}
        assert redis.Redis(port=redis_port).keys("onepass:emb:*"), "embeddings were not written to the local Redis"

        unknown = httpx.post(f"{url}/v1/predict", json={"customer_ids": [999_999]}, timeout=30)
        assert unknown.status_code == 404
        assert unknown.json()["details"] == {"unknown_ids": [999_999]}

        docs = httpx.get(f"{url}/docs", timeout=10)
        assert docs.status_code == 200
        assert "/openapi.json" in docs.text
        openapi = httpx.get(f"{url}/openapi.json", timeout=10)
        assert openapi.status_code == 200
        assert "/v1/predict" in openapi.json()["paths"]
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
        assert "onepass_predictions_total" in httpx.get(f"{url}/metrics", timeout=10).text

        cli = run_cli("predict", "--ids", "1,2,3", "--url", url, env=env)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        printed = json.loads(cli.stdout)
        assert [p["customer_id"] for p in printed["predictions"]] == [1, 2, 3]
        assert printed["predictions"] == body["predictions"]

        cli_unknown = run_cli("predict", "--ids", "1,999999", "--url", url, env=env)
        assert cli_unknown.returncode == 2
        assert "999999" in cli_unknown.stdout + cli_unknown.stderr

        code = server.stop(signal.SIGTERM)

        assert code == 0, server.output()
        assert all(process_gone(pid) for pid in children), "the local redis-server outlived the server"
        assert not redis_answers(redis_port)
        assert "Application shutdown complete" in server.output()


def test_predict_command_reports_an_unreachable_server(model_store: Path) -> None:
    port = free_port()  # nothing listens here

    cli = run_cli("predict", "--ids", "1", "--url", f"http://127.0.0.1:{port}", env=server_env(model_store, port))

    assert cli.returncode == 2
    assert "cannot reach" in cli.stdout + cli.stderr


def setup_is_current() -> bool:
    """scripts/setup skips pip when its stamp matches pyproject.toml (scripts/test runs setup first)."""
    stamp = REPO / ".venv" / ".onepass-installed"
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    return stamp.is_file() and stamp.read_text().strip() == want and shutil.which("redis-server") is not None


@pytest.mark.skipif(
    not setup_is_current(),
    reason="scripts/setup has not run since pyproject.toml changed: scripts/run would reinstall first "
    "(scripts/test runs setup before the tests)",
)
def test_run_command_starts_and_answers_as_a_new_user_would(model_store: Path, tmp_path: Path) -> None:
    port = free_port()
    env = server_env(model_store, port)
    del env["ONEPASS_PORT"]  # the flag sets it, as the README shows
    with started([str(REPO / "scripts" / "run"), "--port", str(port)], env, tmp_path / "run.log") as server:
        server.wait_for_output(r"onepass ready in [0-9.]+ s\. Try:")
        hint = server.wait_for_output(r"\n  (onepass predict --ids 1,2,3 --url (\S+))\n")
        assert hint.group(2) == f"http://127.0.0.1:{port}"
        assert f"curl -s 127.0.0.1:{port}/v1/predict" in server.output()
        children = server.redis_children()
        assert len(children) == 1, server.output()

        # The hint, as the user would paste it.
        cli = subprocess.run(
            hint.group(1), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert [p["customer_id"] for p in json.loads(cli.stdout)["predictions"]] == [1, 2, 3]

        code = server.stop(signal.SIGINT)  # Ctrl-C

        assert code == 0, server.output()
        assert all(process_gone(pid) for pid in children), "the local redis-server outlived the run command"
        assert "Traceback" not in server.output()
