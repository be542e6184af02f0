"""Print pip constraints pinning every ``>=`` lower bound declared in pyproject.toml (``make test-min``).

Usage: ``python .ci/min_constraints.py [extra ...]``: the base dependencies plus the named extras; each
requirement with a lower bound ``>=X`` becomes ``name==X`` (an ``==`` pin is kept as it is).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def lower_bounds(extras: list[str]) -> dict[str, str]:
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")  # type: ignore[union-attr]
        bound = re.search(r"(>=|==)\s*([0-9][0-9A-Za-z.]*)", requirement)
        if bound:
            pins[name] = bound.group(2)
    return pins


if __name__ == "__main__":
    for name, version in sorted(lower_bounds(sys.argv[1:]).items()):
        print(f"{name}=={version}")
