"""The registry of zoo domains by name (kept apart from `domain.py`, which the domains themselves import)."""

from __future__ import annotations

from .digits import DIGITS
from .domain import Domain
from .shapes import SHAPES

DOMAINS: dict[str, Domain] = {"digits": DIGITS, "shapes": SHAPES}
DOMAIN_NAMES = tuple(DOMAINS)


def get_domain(name: str) -> Domain:
    """The domain called `name` (``digits`` or ``shapes``)."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise KeyError(f"unknown zoo domain {name!r} (digits, shapes)") from None
