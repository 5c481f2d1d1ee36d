"""The documentation: the options page generated from the config, tables that render, the README's shape, links."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from evaluation.options_doc import COMMAND, config_options, options_markdown, parse_options

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^\s*(```|~~~)")
SEPARATOR = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def markdown_files() -> list[pathlib.Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            lines.append((number, line))
    return lines


def cut_tables(text: str) -> list[int]:
    """Line numbers of table rows that a blank line cut off from the table above them.

    A '|' line after blank lines that follow a table row is a cut-off piece, unless the line after it is a
    separator row (``|---|---|``): then it is the header of a new table."""
    lines = text.splitlines()
    inside, cuts = False, []
    for i, line in enumerate(lines):
        if FENCE.match(line):
            inside = not inside
        if inside or not line.lstrip().startswith("|"):
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == i + 1 or j >= len(lines) or not lines[j].lstrip().startswith("|"):
            continue
        if j + 1 >= len(lines) or not SEPARATOR.match(lines[j + 1].strip()):
            cuts.append(j + 1)
    return cuts


def headings(text: str) -> list[str]:
    return [re.sub(r"^#+\s*", "", line).strip() for _, line in prose_lines(text) if re.match(r"^#{1,6}\s", line)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link and image outside code."""
    found = []
    for number, line in prose_lines(text):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            found.append((number, match.group(1)))
    return found


# (a), (b): the options page and the config cannot drift apart.


def test_options_page_equals_what_the_config_docstring_renders():
    assert (DOCS / "options.md").read_text() == options_markdown(), (
        f"docs/options.md differs from TokenFusionConfig's docstring; regenerate it with `{COMMAND}`"
    )


def test_every_config_field_has_a_section_on_the_options_page():
    from tofu_sd import TokenFusionConfig

    sections = set(re.findall(r"^### (\w+)$", (DOCS / "options.md").read_text(), re.M))
    fields = [field.name for field in dataclasses.fields(TokenFusionConfig)]
    assert fields and not [name for name in fields if name not in sections]


def test_an_undocumented_or_unknown_field_is_refused():
    doc = "A toy.\n\n    Args:\n        a (`int`, defaults to `1`):\n            The first.\n"

    @dataclasses.dataclass
    class Undocumented:
        __doc__ = doc
        a: int = 1
        b: int = 2

    @dataclasses.dataclass
    class Unknown:
        __doc__ = doc + "        c (`int`, *optional*):\n            Not a field.\n"
        a: int = 1

    with pytest.raises(ValueError, match="not documented in its docstring: b"):
        config_options(Undocumented)
    with pytest.raises(ValueError, match="documents fields it does not have: c"):
        config_options(Unknown)


def test_parse_options_reads_types_defaults_optional_and_text():
    doc = """Summary.

    Args:
        ratio (`float`, defaults to `0.5`):
            Fraction, ``r = int(N * ratio)``; see :func:`~tofu_sd.remove`.

            - a list item
              continued.
        blocks (`str` or `tuple[int, ...]`, *optional*):
            Which blocks (:mod:`tofu_sd.dit`).

    Returns:
        nothing.
    """
    ratio, blocks = parse_options(doc)
    assert ratio == ("ratio", "`float`", "0.5", "Fraction, `r = int(N * ratio)`; see `remove`.\n\n- a list item\n  continued.", False)
    assert blocks == ("blocks", "`str` or `tuple[int, ...]`", "None", "Which blocks (`tofu_sd.dit`).", True)
    with pytest.raises(ValueError, match="field header"):
        parse_options(doc.replace("ratio (`float`, defaults to `0.5`):", "ratio: a float"))


# (c): no table is cut in two by a blank line.


def test_no_markdown_table_is_cut_by_a_blank_line():
    cut = {path.name: cut_tables(path.read_text()) for path in markdown_files()}
    assert not {name: lines for name, lines in cut.items() if lines}, "table rows cut off by a blank line (line numbers)"


def test_a_cut_table_is_found_and_two_tables_are_not():
    cut = "| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n| 5 | 6 |\n"
    assert cut_tables(cut) == [5]
    assert cut_tables("| a | b |\n|---|---|\n| 1 | 2 |\n\n| c | d |\n| :-- | --: |\n| 3 | 4 |\n") == []
    assert cut_tables("```\n| a |\n\n| b |\n```\n") == []
    assert cut_tables("| a | b |\n|---|---|\n| 1 | 2 |\n\ntext\n\n| 3 | 4 |\n") == []


# (d): the README is a front door, and its first two commands are the main job and the tests.


def test_readme_is_short_and_its_first_two_commands_are_the_main_job_and_the_tests():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, "the README is a front door: at most 300 lines; move details to docs/"
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
    assert [language for language, _ in blocks[:2]] == ["bash", "bash"]
    assert "tofu-sd generate" in blocks[0][1] and "python -m pytest" in blocks[1][1]


# (e): every relative link and image resolves, anchors included; (f) no page repeats a heading.


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for path in markdown_files():
        for number, target in links(path.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.is_file():
                broken.append(f"{path.name}:{number}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in {slug(h) for h in headings(resolved.read_text())}:
                broken.append(f"{path.name}:{number}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_links_are_found_in_prose_and_not_in_code():
    text = "See [a](a.md) and ![b](img/b.png \"t\").\n`[c](c.md)`\n```\n[d](d.md)\n```\n[e](https://x.org/y)\n"
    assert [target for _, target in links(text)] == ["a.md", "img/b.png", "https://x.org/y"]
    assert slug("Fidelity at equal cost: ToFu that keeps every query (`reduce=\"kv\"`)") == (
        "fidelity-at-equal-cost-tofu-that-keeps-every-query-reducekv"
    )
    assert slug("The diffusion-transformer model: `--model tiny-sd3`") == "the-diffusion-transformer-model---model-tiny-sd3"


def test_no_page_has_two_headings_of_the_same_name():
    repeated = {}
    for path in markdown_files():
        names = headings(path.read_text())
        if len(set(names)) != len(names):
            repeated[path.name] = sorted({name for name in names if names.count(name) > 1})
    assert not repeated
