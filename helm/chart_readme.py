"""Write helm/edge-proxy/README.md from values.yaml: every key, its default and its `# --` comment.

Run after changing values.yaml:  python helm/chart_readme.py
tests/test_helm.py fails when the committed README differs from what this prints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

CHART = Path(__file__).resolve().parent / "edge-proxy"
README = CHART / "README.md"
# Sections whose inside is documented elsewhere: one row for the whole section.
OPAQUE = {"config": "the gateway's config.yaml (docs/configuration.md); the chart sets the keys docs/helm.md lists",
          "policies": "policies/*.yaml: file name -> content (docs/policies.md)"}
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):")

HEADER = """# edge-proxy Helm chart

Generated from `values.yaml` by `helm/chart_readme.py` (a test fails when it is stale). How to install,
scale, rotate keys, upgrade and roll back: `docs/deploy.md`; what the chart creates: `docs/helm.md`.

| key | default | description |
|---|---|---|
"""


def _documented_keys(text: str) -> Iterator[tuple[str, str, bool]]:
    """(dotted key, its `# --` comment, whether its value is on its line) in file order; no comment: ""."""
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment:
            comment.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith("-"):
            comment = [] if not stripped.startswith("#") else comment
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        path = ".".join(key for _, key in stack)
        yield path, " ".join(comment), bool(line[match.end():].split("#")[0].strip())
        comment = []


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def render() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    rows = []
    for path, doc, inline in _documented_keys(text):
        top = path.split(".")[0]
        if top in OPAQUE and path != top:
            continue
        try:
            default = _lookup(values, path)
        except (KeyError, TypeError):
            continue  # a key inside a list item (e.g. ingress.hosts[].paths): the list's row shows it
        if top in OPAQUE:
            shown = "see description"
        elif isinstance(default, dict) and not inline:
            if not doc:
                continue  # a plain grouping: its keys have rows of their own
            shown = "section"
        else:
            shown = json.dumps(default, separators=(", ", ": "))
        rows.append(f"| `{path}` | `{shown}` | {OPAQUE.get(path, doc)} |".replace("``", "`\"\"`"))
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    README.write_text(render())
    print(f"wrote {README.relative_to(CHART.parent.parent)}")
