"""The image's install and start-up, replayed outside Docker (Docker cannot build images on every machine).

The Dockerfile is read, not copied: its builder stage's COPY, WORKDIR and RUN steps are replayed under a
temporary "root" folder (``/opt/venv`` becomes ``<tmp>/root/opt/venv``), running the same
``docker/install.sh`` into a real, fresh venv; then the runtime stage's ENV, WORKDIR, ENTRYPOINT and CMD
start the server, against a real redis-server, with the admin token mounted as a file as in Kubernetes.

Deliberate differences from the image, each because the test machine differs from a build machine:
- ``TORCH_INDEX_URL`` is emptied, so pip's configured index supplies torch (test machines may have no
  route to download.pytorch.org; the version pin, ``torch==$TORCH_VERSION``, is the Dockerfile's);
- the interpreter is this test's Python, not the base image's (same minor version, 3.11);
- ports are free ones and the host is 127.0.0.1, instead of 0.0.0.0:8000 and :8001;
- the root filesystem is writable; Kubernetes makes it read-only (test_manifests checks that side).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .manifests import DOCKERFILE, REPO, dockerfile_args, dockerfile_env, dockerfile_stages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

READY_TIMEOUT_S = 180.0
ADMIN_TOKEN = "deploy-test-" + "0123456789abcdef" * 2  # 44 characters; any 16+ would do
# The image's base (python:3.11-slim) PATH after its own /usr/local/bin.
IMAGE_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Image:
    """What the Dockerfile says, mapped under ``root``."""

    root: Path
    builder_args: dict[str, str]
    builder_env: dict[str, str]
    runtime_env: dict[str, str]
    workdir: Path
    command: list[str]
    healthcheck: list[str]
    runtime_copies: list[tuple[str, str]] = field(default_factory=list)

    def path(self, image_path: str) -> Path:
        """Where an absolute path of the image lives under the test's root."""
        return self.root / image_path.lstrip("/")

    @property
    def venv(self) -> Path:
        return self.path("/opt/venv")


def _expand(value: str, env: dict[str, str]) -> str:
    for key, val in env.items():
        value = value.replace("${" + key + "}", val).replace("$" + key, val)
    return value


def build_context() -> set[Path]:
    """The files ``docker build .`` sends, relative to the repo, per .dockerignore.

    Handles the shape that file has (``*``, then ``!path`` re-inclusions, then ``**/name`` exclusions)
    and refuses any other, so a new rule cannot be silently misread.
    """
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert rules[0] == "*", "expected an allow-list .dockerignore"
    files: set[Path] = set()
    excluded: list[str] = []
    for rule in rules[1:]:
        if rule.startswith("!"):
            assert not excluded, "re-inclusions after exclusions are not handled"
            root = REPO / rule[1:].rstrip("/")
            if root.is_file():
                files.add(root.relative_to(REPO))
            elif root.is_dir():
                files |= {f.relative_to(REPO) for f in root.rglob("*") if f.is_file()}
        else:
            assert rule.startswith("**/") and "/" not in rule[3:], f"unhandled .dockerignore rule {rule!r}"
            excluded.append(rule[3:])
    return {f for f in files if not any(fnmatch.fnmatch(part, pat) for part in f.parts for pat in excluded)}


def _copy(context: set[Path], src: str, dest: Path) -> None:
    """COPY ``src`` (a path in the build context) to ``dest``, as Docker would: only context files."""
    src_path = Path(src)
    chosen = [f for f in context if f == src_path or src_path in f.parents]
    assert chosen, f"COPY {src}: not in the build context (missing, or excluded by .dockerignore)"
    for f in chosen:
        target = dest if f == src_path else dest / f.relative_to(src_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)


def _replay_builder(root: Path) -> Image:
    """Replay the builder stage (COPY, WORKDIR, RUN) under ``root``; returns the parsed image."""
    stages = dockerfile_stages(DOCKERFILE.read_text())
    builder, runtime = stages["builder"], stages["runtime"]
    args = dockerfile_args(builder)
    args = {k: _expand(v, args) for k, v in args.items()}
    image = Image(root, args, dockerfile_env(builder), {}, Path("/"), [], [])

    run_env = {
        **os.environ,  # pip's own configuration (index, find-links, certificates) of this machine
        **args,
        **image.builder_env,
        "TORCH_INDEX_URL": "",  # see the module docstring
        "PYTHON": sys.executable,
        "PATH": f"{image.path('/usr/local/bin')}:{os.environ['PATH']}",
    }
    context = build_context()
    workdir = "/"
    runs = []
    for instr, rest in builder:
        if instr == "WORKDIR":
            workdir = rest
            image.path(workdir).mkdir(parents=True, exist_ok=True)
        elif instr == "COPY":
            words = rest.split()
            flags = [w for w in words if w.startswith("--")]
            *sources, dest = [w for w in words if not w.startswith("--")]
            mode = None
            for flag in flags:
                assert flag.startswith("--chmod="), f"unsupported COPY flag in the builder: {flag}"
                mode = int(flag.removeprefix("--chmod="), 8)
            target = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
            for src in sources:
                into_dir = dest.endswith("/") or len(sources) > 1
                out = image.path(target) / Path(src).name if into_dir else image.path(target)
                _copy(context, src, out)
                if mode is not None:
                    out.chmod(mode)
        elif instr == "RUN":
            argv = [a if not a.startswith("/") else str(image.path(a)) for a in shlex.split(rest)]
            runs.append(argv)
            proc = subprocess.run(
                argv, cwd=image.path(workdir), env=run_env, capture_output=True, text=True, timeout=800
            )
            assert proc.returncode == 0, f"RUN {rest} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    # The steps this test exists for: if the Dockerfile stops using install.sh, it must be rewritten.
    assert [r[:2] for r in runs] == [["onepass-install", "torch"], ["onepass-install", "app"]], runs

    image.runtime_env = {k: _expand(v, {"PATH": IMAGE_BASE_PATH}) for k, v in dockerfile_env(runtime).items()}
    for instr, rest in runtime:
        if instr == "WORKDIR":
            image.workdir = Path(rest)
        elif instr == "COPY" and not rest.startswith("--from"):
            src, dest = rest.split()
            image.runtime_copies.append((src, dest))
        elif instr == "ENTRYPOINT":
            image.command = json.loads(rest)
        elif instr == "CMD":
            image.command += json.loads(rest)
        elif instr == "HEALTHCHECK":
            image.healthcheck = json.loads(rest[rest.index("CMD") + 3 :])
    return image


def _bake_runtime_files(image: Image) -> None:
    """The runtime stage's COPYs from the build context (the demo model); fails as `docker build` would."""
    context = build_context()
    for src, dest in image.runtime_copies:
        if not any(f == Path(src) or Path(src) in f.parents for f in context):
            pytest.fail(
                f"COPY {src} {dest}: nothing in the build context. The repository must commit the demo model "
                "(model_store/demo): without it `docker build` fails, and `onepass serve` would try to train "
                "one into the image's read-only model store"
            )
        _copy(context, src, image.path(dest))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return _replay_builder(tmp_path_factory.mktemp("image") / "root")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/setup installs it)")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------
# Install


def test_install_builds_a_fresh_venv_with_the_pinned_torch(image: Image) -> None:
    py = image.venv / "bin" / "python"
    assert "include-system-site-packages = false" in (image.venv / "pyvenv.cfg").read_text()
    out = subprocess.run(
        [str(py), "-c", "import torch, service.config; print(torch.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=image.root,  # not the repo: the import must come from the venv, not the source tree
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split("+")[0] == image.builder_args["TORCH_VERSION"]
    # `pip install .`, not editable: the package lives in the venv's site-packages.
    origin = subprocess.run(
        [str(py), "-c", "import service; print(service.__file__)"], capture_output=True, text=True, cwd=image.root
    ).stdout
    assert str(image.venv) in origin


def test_install_provides_the_onepass_console_script(image: Image) -> None:
    script = image.venv / "bin" / image.command[0]
    assert script.exists(), f"ENTRYPOINT {image.command[0]!r} is not a console script of the venv"
    assert script.read_text().splitlines()[0] == f"#!{image.venv / 'bin' / 'python'}"


def test_image_carries_the_demo_model(image: Image) -> None:
    _bake_runtime_files(image)
    demo = image.path(image.runtime_env["ONEPASS_MODEL_STORE"]) / image.runtime_env.get("ONEPASS_MODEL_NAME", "demo")
    assert demo.is_dir() and any(demo.iterdir())


# ----------------------------------------------------------------------------------------------------
# Start-up, probes and shutdown


@pytest.fixture(scope="module")
def server(image: Image, redis_url: str) -> Iterator[dict[str, object]]:
    _bake_runtime_files(image)
    port, admin_port = _free_port(), _free_port()
    token_file = image.path("/etc/onepass/admin/token")
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(ADMIN_TOKEN)
    image.path("/tmp").mkdir(parents=True, exist_ok=True)
    # The image's environment only (nothing of this machine's ONEPASS_* leaks in), paths under root.
    env = {
        "LANG": "C.UTF-8",
        **{k: str(image.path(v)) if v.startswith("/") and k != "PATH" else v for k, v in image.runtime_env.items()},
        "PATH": f"{image.venv / 'bin'}:{IMAGE_BASE_PATH}",
        "ONEPASS_HOST": "127.0.0.1",
        "ONEPASS_PORT": str(port),
        "ONEPASS_ADMIN_PORT": str(admin_port),
        "ONEPASS_REDIS_URL": redis_url,
        "ONEPASS_ADMIN_TOKEN_FILE": str(token_file),
    }
    log = (image.root / "server.log").open("w+b")
    cwd = image.path(str(image.workdir))
    cwd.mkdir(parents=True, exist_ok=True)
    exe = shutil.which(image.command[0], path=env["PATH"])
    assert exe is not None, f"{image.command[0]} is not on the image's PATH"
    proc = subprocess.Popen([exe, *image.command[1:]], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        log.flush()
        log.seek(0)
        return log.read().decode(errors="replace")[-6000:]

    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        status = 0
        while status != 200:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(image.command)}` exited with {proc.returncode}:\n{log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"/readyz not 200 within {READY_TIMEOUT_S} s (last {status}):\n{log_tail()}")
            try:
                status, _ = _get(f"{base}/readyz")
            except OSError:
                status = 0
            time.sleep(0.5)
        yield {"proc": proc, "base": base, "admin": f"http://127.0.0.1:{admin_port}", "env": env, "log": log_tail}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_server_becomes_ready_and_live(server: dict[str, object]) -> None:
    base = server["base"]
    status, body = _get(f"{base}/readyz")
    assert status == 200, body
    ready = json.loads(body)
    assert ready["ready"] is True
    assert ready["degraded"] is False, "Redis is up: the server must use it"
    status, body = _get(f"{base}/healthz")
    assert status == 200, body


def test_dockerfile_healthcheck_passes_against_the_server(image: Image, server: dict[str, object]) -> None:
    env = dict(server["env"])  # type: ignore[call-overload]
    exe = shutil.which(image.healthcheck[0], path=env["PATH"])
    assert exe is not None
    proc = subprocess.run([exe, *image.healthcheck[1:]], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_metrics_expose_the_names_dashboards_use(server: dict[str, object]) -> None:
    status, body = _get(f"{server['base']}/metrics")
    assert status == 200
    text = body.decode()
    for name in ("onepass_ready 1.0", "onepass_model_info{", "onepass_head_info{", "process_resident_memory_bytes"):
        assert name in text, name


def test_admin_api_listens_only_on_its_own_port(server: dict[str, object]) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    status, _ = _get(f"{server['base']}/admin/v1/model", auth)
    assert status == 404, "the public listener must not route the admin API"
    status, _ = _get(f"{server['admin']}/admin/v1/model")
    assert status == 401
    status, body = _get(f"{server['admin']}/admin/v1/model", auth)
    assert status == 200, body


def test_sigterm_drains_within_the_graceful_budget(image: Image, server: dict[str, object]) -> None:
    # Last in this module: it stops the shared server. Kubernetes sends SIGTERM after the preStop sleep.
    proc: subprocess.Popen[bytes] = server["proc"]  # type: ignore[assignment]
    budget_s = int(image.runtime_env["ONEPASS_GRACEFUL_SHUTDOWN_S"])
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=budget_s + 5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {budget_s + 5} s after SIGTERM:\n{server['log']()}")  # type: ignore[operator]
    # uvicorn re-raises the captured SIGTERM once it has shut down cleanly, so -SIGTERM is a clean exit too.
    assert rc in (0, -signal.SIGTERM), server["log"]()  # type: ignore[operator]
    # Idle server: nothing to drain, so it must not sit out the whole budget.
    assert time.monotonic() - started < budget_s
