"""docs/RESULTS.md's tables of committed results are what `attndrift summarize` prints from the
committed raw lines (results/*.jsonl.gz), character for character.

A recomputable table in RESULTS.md sits between two HTML comments, the first holding the
command that prints it::

    <!-- attndrift summarize results/NAME.jsonl --markdown ... -->
    ...the command's output...
    <!-- end -->

`python scripts/refresh_results_doc.py` reprints every table after new lines are committed.
"""

import re
import shlex
from pathlib import Path

import pytest

from attndrift import cli

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- (attndrift summarize [^\n]*?) -->\n(.*?)<!-- end -->", re.S)


def _blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8"))


def test_results_md_has_recomputable_tables():
    assert len(_blocks()) >= 1
    for command, _ in _blocks():
        args = shlex.split(command)[2:]
        files = [a for a in args if a.startswith("results/")]
        assert files and "--markdown" in args, command


@pytest.mark.parametrize("command,printed", _blocks(), ids=[c for c, _ in _blocks()])
def test_table_is_what_summarize_prints(command, printed, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert out.strip() == printed.strip(), f"RESULTS.md differs from `{command}`"


def test_markdown_cells_keep_their_pipes():
    import pandas as pd

    frame = pd.DataFrame({"ES": ["100.0 ± 0.0"]}, index=pd.Index(["rome|g=0|steps=25"], name="s"))
    text = cli._markdown(frame)
    assert "rome\\|g=0\\|steps=25" in text
    # every row has the same number of cell separators (| not preceded by a backslash)
    counts = {len(re.findall(r"(?<!\\)\|", row)) for row in text.splitlines()}
    assert counts == {3}
