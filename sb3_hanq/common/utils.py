"""Helpers shared by the algorithms: argument checks and errors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from gymnasium import spaces


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss becomes NaN or infinite; the message names the gradient step."""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``ValueError`` naming the argument and the accepted values when ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}={value!r}: expected one of {choices}")


def check_action_space(action_space: spaces.Space, supported: tuple[type[spaces.Space], ...], algo: str) -> None:
    """``ValueError`` naming the supported action spaces (SB3 itself only asserts)."""
    if not isinstance(action_space, supported):
        names = ", ".join(s.__name__ for s in supported)
        raise ValueError(
            f"{algo} does not support action space {action_space} ({type(action_space).__name__}); "
            f"supported action spaces: {names}"
        )


def check_positive_lr(name: str, value: Any) -> None:
    """Learning rates may be a float or an SB3 schedule; a float must be > 0."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"Invalid {name}={value!r}: must be > 0 (or a schedule returning values > 0)")


def check_gamma(value: Any) -> None:
    """``gamma`` is a discount factor: a real number in [0, 1] (``ValueError`` naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"Invalid gamma={value!r}: must be a float in [0, 1]")


def check_non_negative(name: str, value: Any, hint: str = "") -> None:
    """``ValueError`` naming the argument when ``value`` is not a real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"Invalid {name}={value!r}: must be a float >= 0{hint}")


class SupportedActionSpacesMixin:
    """Mixin for SB3 algorithms: a ``ValueError`` naming ``supported_action_spaces`` for any other action space.

    SB3 only ``assert``s the action space. Put the mixin first in the bases, e.g.
    ``class HANQ(SupportedActionSpacesMixin, DQN)``, and set ``supported_action_spaces``.
    """

    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]]

    @classmethod
    def _wrap_env(cls, env: Any, verbose: int = 0, monitor_wrapper: bool = True) -> Any:
        if hasattr(env, "action_space"):  # anything else (e.g. an env id given to load()): SB3's own ValueError
            check_action_space(env.action_space, cls.supported_action_spaces, cls.__name__)
        return super()._wrap_env(env, verbose, monitor_wrapper)  # type: ignore[misc]
