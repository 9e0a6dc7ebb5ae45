"""Command-line entry points: a refused run is one line on stderr and a non-zero exit, not a traceback.

`--debug` brings the traceback back. Warnings print as one line each, too.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from opd_local.config_parsing import parse_config
from opd_local.exits import EXIT_INTERRUPTED, EXIT_REFUSED, RunInterrupted

# What a bad setting, file, row, model path or checkpoint raises (ConfigError and DataError are
# ValueErrors; a missing file an OSError; a missing package an ImportError; a device a RuntimeError).
REFUSALS = (ValueError, OSError, ImportError, RuntimeError)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def run_refusing(body: Callable[[], object], debug: bool) -> int:
    """Run `body`; a refusal prints `error: <what and where>` on one line and returns 2, Ctrl-C
    `interrupted ...` and 130."""
    warnings.showwarning = _one_line_warning
    try:
        body()
    except (RunInterrupted, KeyboardInterrupt) as err:
        if debug:
            traceback.print_exc()
        print(str(err) or "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except REFUSALS as err:
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {' '.join(str(err).split()) or type(err).__name__} (--debug for the traceback)", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def train_main(argv: Sequence[str] | None = None, description: str = "opd-local") -> int:
    """`scripts/train.py`: parse, check and train; returns the exit code."""
    from opd_local.loop import train  # heavy (torch, transformers); --help and refused flags need none of it

    argv = list(sys.argv[1:] if argv is None else argv)

    def body():
        run_dir = train(parse_config(argv, description))
        print(f"run directory: {run_dir}")

    return run_refusing(body, debug="--debug" in argv)
