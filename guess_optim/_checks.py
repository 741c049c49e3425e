"""Validation of user input, with messages that name the value and what was expected (never a bare ``assert``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_device", "check_float", "check_int"]


def check_int(name: str, value: Any, *, low: int = 0, none_ok: bool = False) -> int | None:
    """``value`` as an int ``>= low`` (a ``bool`` is not an int here; numpy integers are).

    Raises:
        ValueError: ``Invalid {name}: {value!r}; expected an int >= {low}``.
    """
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Invalid {name}: {value!r}; expected an int >= {low}" + (" or None" if none_ok else ""))
    return int(value)


def check_float(name: str, value: Any, *, low: float | None = None, strict: bool = False,
                high: float | None = None, high_strict: bool = False) -> float:
    """``value`` as a finite float, ``> low`` (``strict``) or ``>= low``, and ``< high`` (``high_strict``) or
    ``<= high``.

    Raises:
        ValueError: not a finite real number in the range.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or (value > low if strict else value >= low))
    ok = ok and (high is None or (value < high if high_strict else value <= high))
    if not ok:
        bounds = [] if low is None else [f"{'>' if strict else '>='} {low:g}"]
        bounds += [] if high is None else [f"{'<' if high_strict else '<='} {high:g}"]
        raise ValueError(f"Invalid {name}: {value!r}; expected a finite number" + (f" {' and '.join(bounds)}"
                                                                                    if bounds else ""))
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: ``Invalid {name}: {value!r}; expected one of ...``.
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_device(name: str, value: Any) -> Any:
    """``value`` as a ``torch.device`` that exists on this machine (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Raises:
        ValueError: ``Invalid {name}: {value!r}; ...``: not a device string, or a backend or device index this machine
            does not have (e.g. ``"cuda"`` without a GPU).
    """
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"Invalid {name}: {value!r}; expected a torch device such as 'cpu', 'cuda' or 'cuda:0'"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"Invalid {name}: {value!r}; CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False): use 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"Invalid {name}: {value!r}; this machine has {count} CUDA device(s): 0 to {count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"Invalid {name}: {value!r}; MPS is not available on this machine: use 'cpu'")
    elif device.type not in ("cpu", "meta", "cuda", "mps"):
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"Invalid {name}: {value!r}; {device.type} is not available on this machine: use 'cpu'")
    return device
