"""``napari-medsam`` command line: segment, batch, models, download, demo.

A thin argparse layer over :mod:`napari_medsam.engine.batch`. Every error the engine
raises on purpose (:class:`MedSAMError`) ends as one line
``napari-medsam: error: ...`` and exit status 2; ``batch`` exits 1 when some rows
failed (they are listed on stderr and in ``summary.csv``), 0 otherwise.
"""

from __future__ import annotations

import re
import sys
import warnings

from .commands import COMMANDS
from .parser import PROG, build_parser

__all__ = ["COMMANDS", "NUMERIC_VALUE_OPTIONS", "PROG", "build_parser", "join_negative_values", "main"]


def _quiet_third_party_warnings() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")


#: options whose value may start with a minus sign (a box left of the image, a negative CT level)
NUMERIC_VALUE_OPTIONS = ("--box", "--z-range", "--window", "--slice", "--channels")


def _negative_value(text: str) -> bool:
    """``-5,0,10,10``, ``-600,1500``, ``-3``, ``-inf,...``: a value, not an option such as ``-o``."""
    return (
        text.startswith("-")
        and not text.startswith("--")
        and ("," in text or re.match(r"^-\s*([\d.]|inf|nan)", text, re.IGNORECASE) is not None)
    )


def join_negative_values(argv: list[str]) -> list[str]:
    """``--box -5,0,10,10`` -> ``--box=-5,0,10,10``: argparse would read ``-5,...`` as an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in NUMERIC_VALUE_OPTIONS and nxt is not None and _negative_value(nxt):
            out.append(f"{tok}={nxt}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some batch rows failed, 2 error)."""
    _quiet_third_party_warnings()
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    from napari_medsam.engine.errors import MedSAMError

    try:
        return COMMANDS[args.command](args)
    except MedSAMError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # cannot write the output, disk full...
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
