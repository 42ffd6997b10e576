"""The dataset card escapes model-written text: it renders as written and never breaks a table or injects HTML."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rms_ray.construct.card import md_code, md_text, write_card

# What a model (or text it read off an image) can put into a hazard, and so into category names and examples.
HOSTILE = [
    "knife | scissors | glass",
    "**bold** and _under_ and *star*",
    "<script>alert('x')</script><img src=x onerror=alert(1)>",
    "run `rm -rf /` now ``twice``",
    "first line\n# not a heading\n- not a list\n\n| not | a | row |",
    "# heading at the start",
    "1. numbered & [link](http://evil.example) ![img](x.png) ~~gone~~ \\ back",
]


class _Cells(HTMLParser):
    """Table cells, tags seen, and headings of rendered HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.rows: list[list[str]] = []
        self.headings: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif re.fullmatch(r"h\d", tag):
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        elif re.fullmatch(r"h\d", tag) and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data):
        for buf in (self._cell, self._heading):
            if buf is not None:
                buf.append(data)


def _manifest(names: list[str]) -> dict:
    return {
        "profile": "cpu-tiny <b>x</b> | #1", "model_id": "builtin:tiny", "config_hash": "0123456789abcdef",
        "accounting": {"images_in": 3, "images_accepted": 2, "images_rejected": 1, "images_quarantined": 0,
                       "images_duplicate": 0, "balanced": True, "samples_accepted": len(names),
                       "samples_rejected": 1, "contrast_queries": 0, "contrast_queries_failed": 0,
                       "naive_responses": 0, "naive_responses_failed": 0},
        "categories": {n: i + 1 for i, n in enumerate(names)},
        "mlcommons_categories": {"X1": 2, "unmapped": 1},
        "files": {"plot": None},
        "prompt_versions": {"scene": "scene@v1+abcd1234", "odd": "odd@v1+`tick`"},
    }


def test_card_escapes_model_written_text(tmp_path: Path):
    markdown_it = pytest.importorskip("markdown_it")
    names = [f"cat{i} {text}" for i, text in enumerate(HOSTILE)]
    taxonomy = {"categories": [{"name": n, "examples": [HOSTILE[(i + 1) % len(HOSTILE)], "plain example"]}
                               for i, n in enumerate(names)]}
    text = write_card(tmp_path, _manifest(names), taxonomy).read_text()

    html = markdown_it.MarkdownIt("commonmark").enable("table").render(text.split("---\n", 2)[2])
    parsed = _Cells()
    parsed.feed(html)
    assert "script" not in parsed.tags and "img" not in parsed.tags and "a" not in parsed.tags
    # exactly our headings: nothing model-written became one
    assert parsed.headings == ["RMS dataset (cpu-tiny <b>x</b> | #1)", "Counts", "Emergent risk categories",
                               "Mapping to the MLCommons hazard taxonomy", "Files and loading", "Prompt versions"]
    category_rows = [r for r in parsed.rows if r and re.match(r"cat\d ", r[0])]
    assert len(category_rows) == len(HOSTILE)
    for row in category_rows:
        assert len(row) == 4  # category | rows | share | examples: no cell was split by a "|"
        i = int(row[0][3])
        assert row[0] == " ".join(names[i].split())  # shown exactly as written (whitespace runs -> one space)
        assert row[3] == " ".join(f"{HOSTILE[(i + 1) % len(HOSTILE)]}; plain example".split())
    assert "<code>odd@v1+`tick`</code>" in html  # a backtick inside a code span does not end it


def test_md_text_and_md_code_one_line_literal():
    assert md_text("a\n# b") == "a \\# b"
    assert md_text("| x |") == "\\| x \\|"
    assert md_text("<script>") == "&lt;script&gt;"
    assert md_text("1. item") == "1\\. item" and md_text("- item") == "\\- item"
    assert md_code("a`b") == "``a`b``" and md_code("`x") == "`` `x ``"
