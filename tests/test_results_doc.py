"""The tables of committed results in docs/RESULTS.md and in every study of docs/studies/ are
what `attndrift summarize` prints from the committed raw lines (results/*.jsonl.gz), character
for character.

A recomputable table sits between two HTML comments, the first holding the command that prints
it::

    <!-- attndrift summarize results/NAME.jsonl --markdown ... -->
    ...the command's output...
    <!-- end -->

`python scripts/refresh_results_doc.py` reprints every table after new lines are committed.
"""

import re
import shlex
from pathlib import Path

import pytest

from attndrift import cli, summary

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- (attndrift summarize [^\n]*?) -->\n(.*?)<!-- end -->", re.S)
DOCS = [ROOT / "docs" / "RESULTS.md", *sorted((ROOT / "docs" / "studies").glob("*.md"))]


def _name(path: Path) -> str:
    return path.relative_to(ROOT / "docs").as_posix()


def _blocks() -> list[tuple[str, str, str]]:
    """(document, command, printed table) of every recomputable table."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        out += [(_name(path), command, printed) for command, printed in BLOCK.findall(text)]
    return out


def test_the_documents_exist():
    names = [_name(p) for p in DOCS]
    assert "RESULTS.md" in names
    assert any(n.startswith("studies/") for n in names), names


def test_results_have_recomputable_tables():
    blocks = _blocks()
    assert len(blocks) >= 1
    for doc, command, _ in blocks:
        args = shlex.split(command)[2:]
        files = [a for a in args if a.startswith("results/")]
        assert files and "--markdown" in args, f"{doc}: {command}"


def test_every_block_is_closed():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        opened = len(re.findall(r"<!-- attndrift summarize ", text))
        assert opened == len(BLOCK.findall(text)), f"{_name(path)}: a table without <!-- end -->"


@pytest.mark.parametrize(
    "doc,command,printed", _blocks(), ids=[f"{d}: {c}" for d, c, _ in _blocks()]
)
def test_table_is_what_summarize_prints(doc, command, printed, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert out.strip() == printed.strip(), f"docs/{doc} differs from `{command}`"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[_name(p) for p in DOCS])
def test_links_reach_a_file_and_a_heading(path):
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"docs/{_name(path)}: {target} is not a file"
        if anchor:
            where = file or "itself"
            assert anchor in _anchors(dest), f"docs/{_name(path)}: no heading #{anchor} in {where}"


def test_markdown_cells_keep_their_pipes():
    import pandas as pd

    frame = pd.DataFrame({"ES": ["100.0 ± 0.0"]}, index=pd.Index(["rome|g=0|steps=25"], name="s"))
    text = summary.markdown(frame)
    assert "rome\\|g=0\\|steps=25" in text
    # every row has the same number of cell separators (| not preceded by a backslash)
    counts = {len(re.findall(r"(?<!\\)\|", row)) for row in text.splitlines()}
    assert counts == {3}
