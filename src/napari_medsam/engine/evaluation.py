"""Kept import path: the metrics live in :mod:`.metrics`, the cases format in :mod:`.cases`."""

from .cases import Case, load_cases, parse_box, safe_name
from .metrics import dice, nsd

__all__ = ["Case", "dice", "load_cases", "nsd", "parse_box", "safe_name"]
