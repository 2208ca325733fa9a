"""Command line: ``attndrift <command> --help``.

The CLI presents and saves; the computation lives in the library modules. One module per
command group: ``model`` (prepare, eval), ``sweeps`` (sweep, summarize), ``demo``, ``edit``
and ``analysis`` (drift, patch, trace, knockout); ``common`` holds the command table and the
arguments and checks they share. This module runs a command and turns expected errors into
one line.
"""

import logging
import sys
from collections.abc import Sequence

# isort: off
# the command groups register their commands when imported, in the order ``attndrift --help``
# lists them
from attndrift.cli import model, sweeps, demo, edit, analysis  # noqa: F401
from attndrift.cli.common import COMMANDS
# isort: on

#: commands that pick up where an interrupted run stopped
RESUMABLE = ("sweep",)


def _error_text(e: BaseException) -> str:
    """One line that says what is wrong (and, for file errors, which path)."""
    if isinstance(e, KeyError) and e.args:  # an unknown record id: its message is args[0]
        text = str(e.args[0])
    elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
        text = f"{e.filename}: {e.strerror or e}"
        if e.filename2:
            text += f" (-> {e.filename2})"
    else:
        text = str(e) or type(e).__name__
    if isinstance(e, FloatingPointError | RuntimeError) and type(e).__name__ not in text:
        text = f"{type(e).__name__}: {text}"
    return " ".join(text.split())  # one line


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attndrift <command> [options]``; expected failures print one line
    ``attndrift <command>: error: <message>`` to stderr and return 2 (``--debug``, anywhere on
    the line: re-raise them, with the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: attndrift <command> [options]   (attndrift <command> --help)\n")
        print("attndrift: attention drift in edited language models, and SADR editing\n")
        for name, (help_, _) in COMMANDS.items():
            print(f"  {name:<10} {help_}")
        print("\n  --debug    (any command) show the traceback of an error")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"attndrift: error: unknown command {name!r}; try attndrift --help", file=sys.stderr)
        return 2
    from safetensors import SafetensorError

    expected = (
        ValueError,  # bad values, malformed data (JSONDecodeError, UnicodeDecodeError)
        OSError,  # missing, unreadable or unwritable files (FileNotFoundError, PermissionError)
        SafetensorError,  # a damaged .safetensors file
        RuntimeError,  # device selection, a damaged cache, torch refusing a shape
        FloatingPointError,  # a non-finite loss while editing
        KeyError,  # an unknown record id
    )
    try:
        return COMMANDS[name][1](rest)
    except expected as e:
        if debug:
            raise
        print(f"attndrift {name}: error: {_error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the model and the files are intact (the guarantees)
        if debug:
            raise
        hint = "; rerun the same command to resume" if name in RESUMABLE else ""
        print(f"\nattndrift {name}: interrupted{hint}", file=sys.stderr)
        return 130
