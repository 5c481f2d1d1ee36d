"""The options page, ``docs/options.md``, generated from the one place the options are documented: the field docs
("Args" section) of :class:`tofu_sd.TokenFusionConfig`'s docstring.

``python -m evaluation.options_doc > docs/options.md`` regenerates it; ``tests/test_docs.py`` checks that the page
in the repository equals what this module renders, so the page and the configuration cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import NamedTuple

#: A field's header line in the docstring: ``name (`type`, defaults to `value`):`` or ``name (`type`, *optional*):``.
_HEADER = re.compile(r"^(?P<name>\w+) \((?P<type>.+?), (?:defaults to `(?P<default>.*)`|(?P<optional>\*optional\*))\):$")
#: Sphinx cross-references, ``:func:`~a.b.c``` or ``:mod:`a.b```: shown as code, the ``~`` form by its last part.
_ROLE = re.compile(r":\w+:`(~?)([\w.]+)`")

COMMAND = "python -m evaluation.options_doc > docs/options.md"


class Option(NamedTuple):
    """One documented field: its name, type and default as the docstring writes them, and its text (Markdown)."""

    name: str
    type: str
    default: str
    text: str
    optional: bool = False


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ````code```` as ```code```, Sphinx roles as code."""
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return text.replace("``", "`")


def parse_options(doc: str) -> list[Option]:
    """The fields documented in the ``Args:`` section of ``doc``, in order; ``ValueError`` if it is malformed."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index("Args:") + 1
    except ValueError:
        raise ValueError("the docstring has no 'Args:' section") from None
    options: list[Option] = []
    header = None
    body: list[str] = []

    def close() -> None:
        if header is not None:
            text = "\n".join(line[8:] if line.strip() else "" for line in body).strip("\n")
            if not text:
                raise ValueError(f"field {header.group('name')!r} has no text")
            default = "None" if header.group("optional") else header.group("default")  # *optional*: None
            optional = header.group("optional") is not None
            options.append(Option(header.group("name"), header.group("type"), default, _markdown(text), optional))

    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break  # the end of the Args section: the next unindented line
        if line.startswith("    ") and not line.startswith("        ") and line.strip():
            close()
            header, body = _HEADER.match(line[4:]), []
            if header is None:
                raise ValueError(f"cannot read the field header {line.strip()!r}")
        elif header is not None:
            if line.strip() and not line.startswith("        "):
                raise ValueError(f"field {header.group('name')!r}: text not indented by 8 spaces: {line!r}")
            body.append(line)
    close()
    return options


def config_options(config_class: type | None = None) -> list[Option]:
    """The options documented in ``config_class``'s docstring (default :class:`tofu_sd.TokenFusionConfig`), checked
    against its dataclass fields: ``ValueError`` if a field is undocumented or a documented name is no field."""
    if config_class is None:
        from tofu_sd import TokenFusionConfig as config_class
    name = config_class.__name__
    options = parse_options(config_class.__doc__ or "")
    documented = [option.name for option in options]
    declared = [field.name for field in dataclasses.fields(config_class)]
    missing = [field for field in declared if field not in documented]
    if missing:
        raise ValueError(f"{name} fields not documented in its docstring: {', '.join(missing)}")
    extra = [option for option in documented if option not in declared]
    if extra:
        raise ValueError(f"{name}'s docstring documents fields it does not have: {', '.join(extra)}")
    if len(set(documented)) != len(documented):
        raise ValueError(f"{name}'s docstring documents a field twice")
    return options


def options_markdown() -> str:
    """``docs/options.md``: a heading, where it comes from, and one section per option."""
    parts = [
        "# Options of `tofu_sd.apply` and `TokenFusionConfig`\n",
        "This page is generated from the docstring of `tofu_sd.TokenFusionConfig` by "
        f"`{COMMAND}`; edit the docstring, not this page.\n",
        "`tofu_sd.apply` takes each option below as a keyword argument (`ratio` also as its second positional "
        "argument); `TokenFusionConfig(**options)` holds them and checks them (a bad value raises a `ValueError` "
        "that says what to change).\n",
    ]
    for option in config_options():
        parts.append(f"### {option.name}\n")
        kind = f"{option.type}, optional" if option.optional else option.type
        parts.append(f"Type: {kind}. Default: `{option.default}`.\n")
        parts.append(option.text + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(options_markdown(), end="")
