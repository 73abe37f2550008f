"""Start and stop a private redis-server process (the run command without ONEPASS_REDIS_URL, and tests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalRedis:
    """A redis-server bound to 127.0.0.1 on a free port, with persistence off; stopped on ``stop()``."""

    def __init__(self, port: int | None = None, maxmemory: str = "256mb") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH: run scripts/setup or set ONEPASS_REDIS_URL")
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="onepass-redis-")
        self.proc = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir, "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own session: Ctrl-C in the terminal reaches onepass only, which drains and then stops Redis.
            start_new_session=True,
        )  # fmt: skip
        try:
            self._wait()
        except BaseException:
            self.stop()  # no orphan redis-server or temp folder when it never came up
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _wait(self, timeout_s: float = 10.0) -> None:
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(Path(self._dir), ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
