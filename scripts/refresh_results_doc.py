"""Reprint every recomputable table of docs/RESULTS.md and docs/studies/*.md from the
committed raw lines.

A table sits between ``<!-- attndrift summarize … -->`` and ``<!-- end -->``
(tests/test_results_doc.py checks that each is what its command prints). After new lines are
committed, or summarize prints more, this rewrites each table with its command's output:

    python scripts/refresh_results_doc.py [--check]

``--check`` only lists the tables that differ (exit 1 if any).
"""

import contextlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

from attndrift import cli

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- (attndrift summarize [^\n]*?) -->\n)(.*?)(<!-- end -->)", re.S)


def documents() -> list[Path]:
    """docs/RESULTS.md, then every study of docs/studies/ in name order."""
    return [ROOT / "docs" / "RESULTS.md", *sorted((ROOT / "docs" / "studies").glob("*.md"))]


def printed(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if cli.main(shlex.split(command)[1:]) != 0:
            raise SystemExit(f"failed: {command}")
    return out.getvalue().strip() + "\n"


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    changed = []
    for path in documents():
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT).as_posix()

        def refresh(m: re.Match, name: str = name) -> str:
            new = printed(m.group(2))
            if new.strip() != m.group(3).strip():
                changed.append(f"{name}: {m.group(2)}")
            return m.group(1) + new + m.group(4)

        new_text = BLOCK.sub(refresh, text)
        if "--check" not in argv and new_text != text:
            path.write_text(new_text, encoding="utf-8")
    for c in changed:
        print(("differs: " if "--check" in argv else "reprinted: ") + c[:120])
    if "--check" in argv:
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
