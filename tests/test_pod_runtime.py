"""The image's runtime contract without a Docker daemon: the wheel in a fresh venv, run the way the pod runs it.

bubblewrap (Debian's `bubblewrap`) gives the process what the chart gives the container: uid/gid 10001, a
read-only root, and writable only what the Deployment mounts writable (an emptyDir at /tmp); the config,
policies and signing key are the chart's own render (helm), mounted read-only at the Deployment's paths.
The gateway then serves a streamed chat through the openai SDK and a minted token, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from proxy.auth.api_keys import generate_key, hash_key
from tests.gateway_harness import wait_healthy
from tests.helm_tool import Helm, find, helm_binary
from tests.redis_server import free_port
from tests.test_helm_render import materialize_pod_files

ROOT = Path(__file__).resolve().parents[1]
POD_UID = 10001


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from the repository, installed with the image's pins into a venv of its own."""
    work = tmp_path_factory.mktemp("image")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "wheels"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (work / "wheels").glob("edge_proxy-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    subprocess.run([str(work / "venv" / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    "--constraint", str(ROOT / "constraints.txt"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    (work / "venv").chmod(0o755)
    return work / "venv"


def _bwrap() -> str:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.fail("the pod-like run needs bubblewrap (Debian package `bubblewrap`; .ci/run installs it)",
                    pytrace=False)
    return bwrap


def pod_command(venv: Path, pod_files: Path, args: list[str]) -> list[str]:
    """bwrap as the kubelet would start the container: the chart's mounts, everything else read-only."""
    mounts = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
              "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
              # The chart's emptyDir; first, because the venv below may live under the host's /tmp.
              "--tmpfs", "/tmp",
              # The interpreter the venv was made from, and the venv, at their own paths (scripts name them).
              "--ro-bind", sys.base_prefix, sys.base_prefix, "--ro-bind", str(venv), str(venv),
              "--ro-bind", str(pod_files / "etc/edge-proxy"), "/etc/edge-proxy",
              "--ro-bind", str(pod_files / "var/run/secrets/edge-proxy/signing"), "/var/run/secrets/edge-proxy/signing",
              "--dev", "/dev", "--proc", "/proc"]
    return [_bwrap(), "--unshare-user", "--uid", str(POD_UID), "--gid", str(POD_UID), "--unshare-pid",
            "--unshare-ipc", "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", f"{venv}/bin",
            "--setenv", "PYTHONUNBUFFERED", "1", *mounts, "--remount-ro", "/", "--chdir", "/", *args]


class Pod:
    """The gateway as PID 1 of its own PID namespace (`--as-pid-1`), as the exec-form entrypoint makes it."""

    def __init__(self, command: list[str], log: Path) -> None:
        self._log = log.open("wb")
        info_read, info_write = os.pipe()
        command = [command[0], "--as-pid-1", "--info-fd", str(info_write), *command[1:]]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(info_write,))
        os.close(info_write)
        with os.fdopen(info_read) as info:  # bwrap writes the child's host pid, then closes its end
            self.gateway_pid = json.loads(info.read())["child-pid"]
        self.log = log

    def stop(self) -> int:
        """SIGTERM to the gateway itself, as the kubelet sends it to PID 1; bwrap exits with its status."""
        if self.process.poll() is None:
            os.kill(self.gateway_pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def api_key() -> str:
    return generate_key()


@pytest.fixture(scope="module")
def pod_files(tmp_path_factory: pytest.TempPathFactory, api_key: str) -> Iterator[tuple[Path, int]]:
    """The chart's defaults, plus one policy file with a key, rendered by helm and laid out as mounted."""
    port = free_port()
    helm = Helm(helm_binary(), tmp_path_factory.mktemp("helm"))
    values: dict[str, Any] = {"containerPort": port, "metrics": {"port": free_port()}, "policies": {
        "pod-test.yaml": {"keys": [{"id": "pod-test", "hash": hash_key(api_key), "plan": "demo"}]}}}
    manifests = helm.template(values)
    files = tmp_path_factory.mktemp("pod")
    materialize_pod_files(manifests, files)
    container = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] + container["args"] == ["edge-proxy", "serve", "--config", "/etc/edge-proxy/config.yaml"]
    for path in files.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)  # the kubelet's modes: readable by the pod's user
    yield files, port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pod(venv: Path, pod_files: tuple[Path, int], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    files, port = pod_files
    running = Pod(pod_command(venv, files, ["edge-proxy", "serve", "--config", "/etc/edge-proxy/config.yaml"]),
                  tmp_path_factory.mktemp("log") / "pod.log")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", lambda: running.process.poll() is not None, timeout_s=60)
    except AssertionError:
        running.stop()
        raise AssertionError(running.log.read_text()) from None
    running.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield running
    running.stop()


def test_the_sandbox_is_what_the_pod_gets(venv: Path, pod_files: tuple[Path, int]) -> None:
    """uid/gid 10001, a read-only root and mounts, a writable /tmp: else the test below proves less."""
    files, _ = pod_files
    probe = ("import os; print(os.getuid(), os.getgid());"
             "[print(p, os.access(p, os.W_OK)) for p in ('/', '/etc/edge-proxy', '/usr', '/tmp')]")
    result = subprocess.run(pod_command(venv, files, [f"{venv}/bin/python", "-c", probe]),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    writable_check = subprocess.run(pod_command(venv, files, ["/bin/sh", "-c", "touch /x || echo refused"]),
                                    capture_output=True, text=True, timeout=60)
    assert result.stdout.split("\n")[0] == f"{POD_UID} {POD_UID}"
    assert "refused" in writable_check.stdout
    assert "/tmp True" in result.stdout and "/etc/edge-proxy False" in result.stdout


@pytest.mark.asyncio(loop_scope="module")
async def test_pod_serves_a_streamed_chat_and_a_minted_token(pod: Any, api_key: str) -> None:
    client = AsyncOpenAI(base_url=f"{pod.url}/v1", api_key=api_key, max_retries=0)
    stream = await client.chat.completions.create(
        model="demo/chat", messages=[{"role": "user", "content": "hello"}], stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert text
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{pod.url}/v1/tokens", json={"sub": "user-1"},
                             headers={"Authorization": f"Bearer {api_key}"}) as response:
            assert response.status == 200, await response.text()
            token = (await response.json())["token"]
    minted = AsyncOpenAI(base_url=f"{pod.url}/v1", api_key=token, max_retries=0)
    answer = await minted.chat.completions.create(model="demo/chat", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content


@pytest.mark.asyncio(loop_scope="module")
async def test_pod_drains_and_exits_cleanly_on_sigterm(pod: Any) -> None:
    assert await asyncio.to_thread(pod.stop) == 0, pod.log.read_text()
    log = pod.log.read_text()
    assert "Traceback" not in log and "Read-only file system" not in log, log
    assert os.path.getsize(pod.log) > 0
