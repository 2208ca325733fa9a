"""The tables of committed results in README.md, docs/RESULTS.md and every study of
docs/studies/ are what `attndrift summarize` prints from the committed raw lines
(results/*.jsonl.gz), character for character; so are the counts in their prose that are
marked with the command that counts them.

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

from attndrift import cli
from attndrift.experiments import summary

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- (attndrift summarize [^\n]*?) -->\n(.*?)<!-- end -->", re.S)
DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "RESULTS.md",
    *sorted((ROOT / "docs" / "studies").glob("*.md")),
]


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _blocks() -> list[tuple[str, str, str]]:
    """(document, command, printed table) of every recomputable table."""
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        out += [(_name(path), command, printed) for command, printed in BLOCK.findall(text)]
    return out


def test_the_documents_exist():
    names = [_name(p) for p in DOCS]
    assert "docs/RESULTS.md" in names
    assert any(n.startswith("docs/studies/") for n in names), names


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
    assert out.strip() == printed.strip(), f"{doc} differs from `{command}`"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


#: a count in prose, followed by the command whose support table prints it, e.g.
#: ``35<!-- RS records of attndrift summarize results/x.jsonl.gz --records 0-119 -->``
COUNT = re.compile(
    r"(\d[\d,]*)[^\d<]{0,40}<!-- (ES|PS|NS|RS|DNS|RS_D) (records|probes) of "
    r"(attndrift summarize [^\n]*?) -->"
)


def _counts() -> list[tuple[str, int, str, str, str]]:
    """(document, number, probe kind, records|probes, command) of every checked count."""
    out = []
    for path in DOCS:
        for m in COUNT.finditer(path.read_text(encoding="utf-8")):
            out.append((_name(path), int(m[1].replace(",", "")), m[2], m[3], m[4]))
    return out


def test_prose_counts_are_checked():
    assert len([c for c in _counts() if c[0] == "docs/RESULTS.md"]) >= 3


@pytest.mark.parametrize(
    "doc,number,kind,unit,command",
    _counts(),
    ids=[f"{c[0]}: {c[1]} {c[2]} {c[3]}" for c in _counts()],
)
def test_prose_count_is_what_summarize_counts(
    doc, number, kind, unit, command, capsys, monkeypatch
):
    """The unedited row ("none") of the support table: "<records> / <probes>" per probe kind."""
    monkeypatch.chdir(ROOT)
    args = shlex.split(command)[1:]
    assert cli.main([*args, "--markdown"] if "--markdown" not in args else args) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| setting | records |"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    none = next(line for line in lines[head:] if line.startswith("| none |"))
    cell = [c.strip() for c in none.strip("|").split("|")][columns.index(kind)]
    records, probes = (int(x) for x in cell.split(" / "))
    assert number == (records if unit == "records" else probes), f"{doc}: `{command}`"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[_name(p) for p in DOCS])
def test_links_reach_a_file_and_a_heading(path):
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{_name(path)}: {target} is not a file"
        if anchor:
            where = file or "itself"
            assert anchor in _anchors(dest), f"{_name(path)}: no heading #{anchor} in {where}"


def test_markdown_cells_keep_their_pipes():
    import pandas as pd

    frame = pd.DataFrame({"ES": ["100.0 ± 0.0"]}, index=pd.Index(["rome|g=0|steps=25"], name="s"))
    text = summary.markdown(frame)
    assert "rome\\|g=0\\|steps=25" in text
    # every row has the same number of cell separators (| not preceded by a backslash)
    counts = {len(re.findall(r"(?<!\\)\|", row)) for row in text.splitlines()}
    assert counts == {3}
