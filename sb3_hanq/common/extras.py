"""Optional dependencies: which extra provides what, and a one-line message when one is missing.

Each extra in ``pyproject.toml`` (``pip install "sb3-hanq[<extra>]"``) covers a set of features; a feature
that is used without its extra raises :class:`MissingExtraError`, whose message names the extra and the
missing modules, instead of a bare ``ModuleNotFoundError`` from deep inside a dependency.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


class MissingExtraError(ImportError):
    """A feature was used without the optional dependencies of its extra."""


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The top-level modules of ``modules`` that cannot be imported (found without importing them)."""
    if isinstance(modules, str):
        raise TypeError(f"modules must be a sequence of module names, not the string {modules!r}")
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_extra_message(extra: str, missing: Sequence[str], feature: str) -> str:
    """One line naming the extra to install, e.g. for ``sb3-hanq-zoo`` without rl-zoo3."""
    return (
        f"{feature} needs the '{extra}' extra (missing: {', '.join(missing)}); "
        f'install it with: pip install "sb3-hanq[{extra}]"'
    )


def require_extra(extra: str, modules: Sequence[str], feature: str) -> None:
    """Raise :class:`MissingExtraError` if any of ``modules`` is missing.

    :param extra: name of the extra in ``pyproject.toml`` that installs ``modules``.
    :param modules: top-level module names the feature imports.
    :param feature: what the user tried to use, for the message (e.g. ``"sb3-hanq-zoo train -tb"``).
    """
    missing = missing_modules(modules)
    if missing:
        raise MissingExtraError(missing_extra_message(extra, missing, feature))
