"""Man pages from the click definitions: one page per command, `lmaczs.1` for the group.

    python -m lmaczs_cli.manpages --out man/          # (re)write the pages
    python -m lmaczs_cli.manpages --out man/ --check  # exit 1 when a page is out of date

The pages say what `--help` says (the same click objects feed both), laid out as man(7):
NAME, SYNOPSIS, DESCRIPTION, OPTIONS, EXAMPLES (the help's no-rewrap ``\\b`` blocks), and
COMMANDS / SEE ALSO. Output is deterministic (no date, the package version only), so a
checked-in page can be compared byte for byte with a fresh one.

Written here rather than with click-man: that tool neither escapes roff (a backslash or a
line starting with "." in a help text becomes a request) nor keeps click's ``\\b`` blocks
unwrapped, and it stamps the build date into every page.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click

from . import __version__

SECTION = "1"


def roff_escape(text: str) -> str:
    """Text -> roff-safe text: backslashes doubled, hyphens as \\-, and a line that starts
    with "." or "'" protected by a zero-width \\& so it is not read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.split("\n"))


def page_name(path: list[str]) -> str:
    """["lmaczs", "explain"] -> "lmaczs-explain"."""
    return "-".join(path)


def _paragraphs(help_text: str) -> tuple[list[str], list[list[str]]]:
    """Split a click help text into prose paragraphs and ``\\b`` (no-rewrap) blocks."""
    prose, blocks = [], []
    for para in inspect.cleandoc(help_text).split("\n\n"):
        lines = para.split("\n")
        if lines[0].strip() == "\b":
            blocks.append([ln for ln in lines[1:]])
        else:
            prose.append(" ".join(ln.strip() for ln in lines))
    return prose, blocks


def _option_records(ctx: click.Context) -> list[tuple[str, str]]:
    records = []
    for param in ctx.command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        rec = param.get_help_record(ctx)
        if rec is not None:
            records.append(rec)
    return records


def render(command: click.Command, path: list[str], parent: click.Context | None = None) -> str:
    """One man page (roff source) for `command`, reached as `path` from the group."""
    ctx = click.Context(command, info_name=path[-1], parent=parent, **command.context_settings)
    name = page_name(path)
    prose, blocks = _paragraphs(command.help or "")
    short = command.get_short_help_str(limit=80)
    out = [f'.TH "{name.upper()}" "{SECTION}" "" "lmaczs {__version__}" "lmaczs manual"',
           ".SH NAME", f"{roff_escape(name)} \\- {roff_escape(short)}",
           ".SH SYNOPSIS", f".B {roff_escape(' '.join(path))}",
           roff_escape(" ".join(command.collect_usage_pieces(ctx)))]
    if prose:
        out.append(".SH DESCRIPTION")
        for i, para in enumerate(p for p in prose if p.rstrip(":").lower() != "examples"):
            out += ([".PP"] if i else []) + [roff_escape(para)]
    options = _option_records(ctx)
    if options:
        out.append(".SH OPTIONS")
        for opts, text in options:
            out += [".TP", f"\\fB{roff_escape(opts)}\\fR", roff_escape(text)]
    if blocks:
        out.append(".SH EXAMPLES")
        for block in blocks:
            out += [".PP", ".nf", ".RS 4", *(roff_escape(ln.strip()) for ln in block), ".RE", ".fi"]
    subcommands = _subcommands(command, ctx)
    if subcommands:
        out.append(".SH COMMANDS")
        for sub_name, sub in subcommands:
            out += [".TP", f"\\fB{roff_escape(sub_name)}\\fR",
                    f"{roff_escape(sub.get_short_help_str(limit=80))} See \\fB{roff_escape(page_name(path + [sub_name]))}\\fR({SECTION})."]
    see = [page_name(path[:1])] if len(path) > 1 else [page_name(path + [n]) for n, _ in subcommands]
    out += [".SH SEE ALSO", ", ".join(f"\\fB{roff_escape(s)}\\fR({SECTION})" for s in see)]
    return "\n".join(out) + "\n"


def _subcommands(command: click.Command, ctx: click.Context) -> list[tuple[str, click.Command]]:
    if not isinstance(command, click.Group):
        return []
    names = command.list_commands(ctx)
    return [(n, command.get_command(ctx, n)) for n in names if not command.get_command(ctx, n).hidden]


def all_pages(group: click.Group, name: str = "lmaczs") -> dict[str, str]:
    """File name -> roff source for the group and each of its commands."""
    root = click.Context(group, info_name=name, **group.context_settings)   # -h as well as --help
    pages = {f"{name}.{SECTION}": render(group, [name])}
    for sub_name, sub in _subcommands(group, root):
        pages[f"{page_name([name, sub_name])}.{SECTION}"] = render(sub, [name, sub_name], parent=root)
    return pages


def stale_pages(folder: Path, pages: dict[str, str]) -> list[str]:
    """Names of pages missing from `folder` or differing from `pages`, and extra .1 files."""
    stale = [n for n, text in pages.items()
             if not (folder / n).is_file() or (folder / n).read_text(encoding="utf-8") != text]
    extra = [p.name for p in folder.glob(f"*.{SECTION}") if p.name not in pages] if folder.is_dir() else []
    return sorted(stale + extra)


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_group
    from .files import atomic_path

    ap = argparse.ArgumentParser(description="Write (or --check) the man pages of lmaczs.")
    ap.add_argument("--out", type=Path, default=Path("man"))
    ap.add_argument("--check", action="store_true", help="exit 1 when a page is missing or out of date")
    args = ap.parse_args(argv)
    pages = all_pages(cli_group)
    stale = stale_pages(args.out, pages)
    if args.check:
        for name in stale:
            print(f"out of date: {args.out / name}  (run: python -m lmaczs_cli.manpages --out {args.out})")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in pages.items():
        with atomic_path(args.out / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    for name in stale:
        if name not in pages:
            (args.out / name).unlink()
    print(f"wrote {len(pages)} pages to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
