"""MkDocs hook: the command-line reference in docs/cli.md, generated from the argparse parsers themselves.

`on_page_markdown` replaces the marker `<!-- cli-reference -->` in cli.md with one section per sub-command of
`par_demo.cli.build_parser()`: its description, its usage (formatted at a fixed width, so the page does not depend
on the terminal that built it) and a table of its arguments (flags, default, help), all read from the argparse
actions. Nothing here is written by hand, so the page cannot drift from `python -m par_demo COMMAND --help`.

Registered in mkdocs.yml under `hooks:`. Importing par_demo.cli imports torch and transformers.
"""

from __future__ import annotations

import argparse
import html
import sys
from functools import lru_cache
from pathlib import Path

from mkdocs.exceptions import PluginError

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
WIDTH = 78  # characters per usage line, whatever COLUMNS says (what a code block of these pages shows unscrolled)
ROOT = Path(__file__).resolve().parent.parent

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's par_demo, installed or not


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    try:
        return parser.formatter_class(prog=parser.prog, width=WIDTH)
    except TypeError:  # a formatter class that takes no width
        return argparse.HelpFormatter(prog=parser.prog, width=WIDTH)


def _cell(text: str) -> str:
    """Plain text made safe for one markdown table cell (no HTML, no emphasis, no column break)."""
    text = html.escape(" ".join(text.split()), quote=False)
    for char in "\\`*_[]":
        text = text.replace(char, "\\" + char)
    return text.replace("|", "&#124;")


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"`` {text} ``"


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if isinstance(action, argparse._StoreFalseAction):
        return "on"
    default = action.default
    if default is None or default is argparse.SUPPRESS:
        return ""
    if isinstance(default, (list, tuple)):
        default = ",".join(str(item) for item in default)
    default = str(default)
    if default.startswith(str(ROOT)):  # a path in this checkout: shown as the user's checkout would have it
        default = Path(default).relative_to(ROOT).as_posix() or "."
    return _code(default)


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = _formatter(parser)
    return ", ".join(_code(part) for part in formatter._format_action_invocation(action).split(", "))


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return _cell(_formatter(parser)._expand_help(action))


def _exclusive_note(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            others = [a.option_strings[0] for a in group._group_actions if a is not action and a.option_strings]
            kind = "one of them required" if group.required else "at most one of them"
            return f"not with {', '.join(_code(o) for o in others)} ({kind})"
    return ""


def command_section(name: str, parser: argparse.ArgumentParser, level: int = 3) -> str:
    formatter = _formatter(parser)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    usage = formatter.format_help().strip()
    lines = [f"{'#' * level} {name}", ""]
    if parser.description:
        lines += [_cell(parser.description), ""]
    lines += ["```text", usage, "```", ""]
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
            continue
        default = _default(action)
        note = _exclusive_note(parser, action)
        if note:
            default = f"{default}; {note}" if default and default != "required" else note
        rows.append(f"| {_invocation(parser, action)} | {default} | {_help(parser, action)} |")
    if rows:
        lines += ["| argument | default | meaning |", "|---|---|---|", *rows, ""]
    return "\n".join(lines)


@lru_cache(maxsize=1)
def reference() -> str:
    from par_demo.cli import build_parser

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if len(subparsers) != 1:
        raise PluginError(f"cli_reference: expected one sub-command action in par_demo.cli, found {len(subparsers)}")
    commands = subparsers[0]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = [
        f"Generated from `par_demo.cli.build_parser()` when these pages were built (usage lines at {WIDTH} columns).",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name in commands.choices:
        lines.append(f"| [`{name}`](#{name}) | {_cell(helps.get(name) or '')} |")
    lines.append("")
    for name, sub in commands.choices.items():
        lines.append(command_section(name, sub))
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"cli_reference: {PAGE} lost its marker {MARKER}")
    return markdown.replace(MARKER, reference())
