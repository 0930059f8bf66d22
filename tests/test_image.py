"""The container image's build files: hadolint-clean, a build context that holds what it copies, pinned deps."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert hadolint.is_file(), "hadolint is missing: install the test extras (pip install -e '.[test]')"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_contract_of_the_image() -> None:
    """What the chart and the drain logic rely on: uid/gid 10001, exec-form entrypoint, unbuffered output."""
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE)
    assert len(stages) >= 2, "multi-stage: wheels are built apart from the runtime"
    assert stages[-1][0].endswith("-slim"), "the runtime stage is a slim Python image"
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert "--uid 10001" in text and "--gid 10001" in text
    assert re.search(r'^ENTRYPOINT \["edge-proxy"\]$', text, re.MULTILINE), "exec form: the gateway is PID 1"
    assert "PYTHONUNBUFFERED=1" in text
    for pip in re.findall(r"pip (?:install|wheel)[^\n]*", text):
        assert "--no-cache-dir" in pip, pip
    assert "--constraint constraints.txt" in text


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; `!` re-includes; a directory pattern covers its files."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        ):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [src for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
              for src in line.split()[:-1]]
    assert copied
    for source in copied:
        files = [p for p in (ROOT / source).rglob("*.py")] if (ROOT / source).is_dir() else [ROOT / source]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _ignored(relative, patterns), f"{relative} is copied by the Dockerfile but .dockerignore drops it"
    for kept_out in (".git/HEAD", ".venv/pyvenv.cfg", "tests/conftest.py", "helm/edge-proxy/Chart.yaml",
                     "proxy/__pycache__/app.cpython-312.pyc"):
        assert _ignored(kept_out, patterns), f"{kept_out} would be sent to the docker daemon"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _runtime_requirements(distribution: str) -> list[Requirement]:
    """The distribution's requirements that apply without extras on this interpreter."""
    requirements = [Requirement(line) for line in metadata.requires(distribution) or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_constraints_pin_every_runtime_dependency() -> None:
    """constraints.txt pins the whole runtime closure, each pin within what pyproject.toml asks for."""
    pins = _pins()
    seen: set[str] = set()
    pending = _runtime_requirements("edge-proxy")
    for requirement in pending:
        assert requirement.specifier.contains(pins.get(canonicalize_name(requirement.name), "0"), prereleases=True), (
            f"pyproject.toml asks for {requirement}; constraints.txt pins "
            f"{pins.get(canonicalize_name(requirement.name), 'nothing')}"
        )
    while pending:
        name = canonicalize_name(pending.pop().name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} is a runtime dependency but constraints.txt does not pin it"
        pending.extend(_runtime_requirements(name))
    assert set(pins) == seen, f"constraints.txt pins packages nothing needs: {sorted(set(pins) - seen)}"
