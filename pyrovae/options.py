"""The errors of a configuration, and the checks a part runs on its own options.

Parts (priors, likelihoods, posteriors, networks) check their options with the helpers here and
raise :class:`OptionError` naming the option; ``build_vae`` turns it into one message naming the
config field (``model.prior_options.bins must be ...``). This module imports nothing of pyrovae, so
every part can use it without importing the config.
"""

from __future__ import annotations

import math

__all__ = ["ConfigError", "OptionError", "option_int", "option_number", "option_widths"]


class ConfigError(ValueError):
    """A configuration value is unknown or out of range."""


class OptionError(ConfigError):
    """A part refuses the value of one of its options.

    A part raises it with the option's name (``OptionError("bins", "must be a positive integer, got 0")``
    reads "bins must be a positive integer, got 0"); ``build_vae`` names the config field,
    ``model.prior_options.bins``. Parts from plugins may raise it too, or any ``ValueError``.
    """

    def __init__(self, option: str, message: str):
        super().__init__(f"{option} {message}")
        self.option = option


def _aside(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


def option_int(option: str, value, *, low: int = 1, high: int | None = None, meaning: str = "") -> int:
    """``value`` if it is an integer from ``low`` to ``high`` (``None``: no upper bound), else an
    :class:`OptionError` naming ``option``; ``meaning`` says what the option is (and a good value)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        if high is not None:
            span = f"an integer from {low} to {high}"
        else:
            span = "a positive integer" if low == 1 else f"an integer of at least {low}"
        raise OptionError(option, f"must be {span}{_aside(meaning)}, got {value!r}")
    return value


def option_number(option: str, value, *, low: float = 0.0, strict: bool = True, meaning: str = "") -> float:
    """``value`` as a float if it is a finite number above ``low`` (at least ``low`` unless ``strict``),
    else an :class:`OptionError` naming ``option``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and (value > low if strict else value >= low)):
        if low == 0:
            span = "a positive finite number" if strict else "a finite number of at least 0"
        else:
            span = f"a finite number {'above' if strict else 'of at least'} {low}"
        raise OptionError(option, f"must be {span}{_aside(meaning)}, got {value!r}")
    return float(value)


def option_widths(option: str, value, *, low: int = 1, meaning: str = "") -> tuple[int, ...] | None:
    """``value`` as a tuple if it is one or more integer widths of at least ``low``, ``None`` if it is
    ``None``, else an :class:`OptionError` naming ``option``."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or \
            any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
        raise OptionError(option, f"must be one or more layer widths of at least {low}, such as "
                                  f"[{2 * low}, {2 * low}], or unset{_aside(meaning)}; got {value!r}")
    return tuple(value)
