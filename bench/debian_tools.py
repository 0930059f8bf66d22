"""nginx and wrk for the benchmark: the installed ones, else Debian's packages unpacked into a cache.

`apt-get download` fetches the .deb files (no root needed, nothing installed system-wide) and `dpkg-deb -x`
unpacks them under ~/.cache/edge-proxy-bench (or $XDG_CACHE_HOME), so later runs reuse them. Without apt (or
offline), `find_tool` says why and the benchmark skips that comparator; `apt-get install nginx-light wrk` is the
other way to have them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Tool:
    """A runnable binary and the environment it needs (the cached libraries on LD_LIBRARY_PATH)."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)


# command -> (path inside the unpacked packages, the Debian packages that carry it and its uncommon libraries)
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "nginx": ("usr/sbin/nginx", ("nginx",)),
    "wrk": ("usr/bin/wrk", ("wrk", "libluajit-5.1-2")),
}


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-proxy-bench" / "debian"


def find_tool(command: str) -> Tool | str:
    """The tool, or a one-line reason it cannot be had (the caller skips what needs it)."""
    installed = shutil.which(command) or (f"/usr/sbin/{command}" if Path(f"/usr/sbin/{command}").is_file() else None)
    if installed:
        return Tool(Path(installed))
    relative, packages = PACKAGES[command]
    root = cache_root() / command
    if not (root / relative).is_file():
        problem = _unpack(packages, root)
        if problem:
            return f"{command} is not installed and its Debian package cannot be had ({problem}); apt-get install nginx-light wrk"
    libraries = [str(d) for d in sorted((root / "usr" / "lib").glob("*-linux-gnu"))]
    return Tool(root / relative, {"LD_LIBRARY_PATH": os.pathsep.join(libraries)} if libraries else {})


def _unpack(packages: tuple[str, ...], root: Path) -> str | None:
    """apt-get download `packages` and unpack them into `root` (atomically: a whole tree or none)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "no apt-get/dpkg-deb here"
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as work:
        try:
            fetched = subprocess.run(["apt-get", "download", "-q", *packages], cwd=work, capture_output=True,
                                     text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return "apt-get download timed out"
        debs = sorted(Path(work).glob("*.deb"))
        if fetched.returncode != 0 or len(debs) != len(packages):
            return (fetched.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
        tree = Path(work) / "tree"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=60)
        if root.exists():  # a concurrent run won the race
            return None
        tree.rename(root)
    return None
