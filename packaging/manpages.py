"""Man pages for vhdblkd(8), vhdblkctl(8) and vhdtab(5), generated from the argparse trees.

NAME, SYNOPSIS, DESCRIPTION, OPTIONS and COMMANDS come from the same parsers
that print `--help`, so the pages cannot drift from the code; what `--help`
cannot hold (FILES, EXIT STATUS, EXAMPLES, SEE ALSO) is written by hand in
packaging/man/PAGE.in (roff) and appended.  vhdtab(5) is written by hand
whole; a test checks it names every option the vhdtab parser accepts.

    PYTHONPATH=. python3 packaging/manpages.py --outdir DIR

Standard library only (run at package build time with Debian's python3).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WRITTEN = HERE / "man"


@dataclass(frozen=True)
class Page:
    name: str
    section: int
    # None for a page written by hand whole (vhdtab(5)).
    parser: argparse.ArgumentParser | None

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.section}"


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The two programs' argparse trees, as their entry points build them."""
    from vhdblkd.cli.main import build_parser as ctl_parser
    from vhdblkd.daemon.main import build_parser as daemon_parser

    return {"vhdblkd": daemon_parser(), "vhdblkctl": ctl_parser()}


def pages() -> list[Page]:
    p = parsers()
    return [Page("vhdblkd", 8, p["vhdblkd"]), Page("vhdblkctl", 8, p["vhdblkctl"]), Page("vhdtab", 5, None)]


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) for each subcommand, in --help order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, sub, helps.get(name, "")


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Optional arguments except -h/--help, which every command has."""
    return [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def help_text(action: argparse.Action, prog: str) -> str:
    """The help string as --help prints it (%(default)s and friends expanded)."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return text % params


def usage(parser: argparse.ArgumentParser) -> str:
    """argparse's own usage line, unwrapped, without the -h every command has."""
    formatter = argparse.HelpFormatter(parser.prog, width=100000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    line = " ".join(formatter.format_help().split())
    return line.replace(" [-h]", "", 1)


# --- roff --------------------------------------------------------------------


def esc(text: str) -> str:
    """Escape text for roff: backslashes, hyphens (as minus signs), leading dots and quotes."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line if line[:1] in (".", "'") else line) for line in text.split("\n"))


def paragraphs(text: str) -> str:
    """A description (argparse's: blank lines separate paragraphs) as roff paragraphs."""
    chunks = [" ".join(chunk.split()) for chunk in re.split(r"\n\s*\n", text.strip()) if chunk.strip()]
    return "\n.PP\n".join(esc(c) for c in chunks)


def option_label(action: argparse.Action) -> str:
    """`\\fB\\-\\-name\\fR \\fIN\\fR, \\fB\\-n\\fR ...`: each spelling with its metavar."""
    takes_value = action.nargs != 0
    if takes_value:
        if action.metavar is not None:
            metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
        elif action.choices is not None:
            metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
        else:
            metavar = action.dest.upper()
    spellings = []
    for opt in action.option_strings:
        label = f"\\fB{esc(opt)}\\fR"
        if takes_value:
            label += f" \\fI{esc(metavar)}\\fR"
        spellings.append(label)
    return ", ".join(spellings)


def _arguments(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    out: list[str] = []
    for action in positionals(parser):
        if not action.help:
            continue  # named in the synopsis; nothing more to say
        name = action.metavar if isinstance(action.metavar, str) else action.dest
        out += [".TP", f"\\fI{esc(name)}\\fR", esc(help_text(action, prog))]
    for action in options(parser):
        out += [".TP", option_label(action), esc(help_text(action, prog) or " ")]
    return out


def synopsis(parser: argparse.ArgumentParser) -> str:
    """The usage line with the program (and command) in bold."""
    line = usage(parser)
    rest = line[len(parser.prog) :] if line.startswith(parser.prog) else " " + line
    return f"\\fB{esc(parser.prog)}\\fR{esc(rest)}"


def summary(parser: argparse.ArgumentParser) -> str:
    """NAME's one-liner: the description's first sentence, lower-cased, without the full stop."""
    text = " ".join((parser.description or parser.prog).split())
    first = text.split(". ")[0].rstrip(".")
    return first[:1].lower() + first[1:]


def render(page: Page, *, version: str, date: str, written: str) -> str:
    title = f'.TH {page.name.upper()} {page.section} "{date}" "vhdblkd {version}" ' + (
        '"System Administration"' if page.section == 8 else '"File Formats"'
    )
    # .nh: no hyphenation, so option names are never split across lines.
    head = [".\\\" Generated by packaging/manpages.py from the argparse definitions; do not edit.", title, ".nh"]
    if page.parser is None:
        return "\n".join(head) + "\n" + written
    parser = page.parser
    out = head + [".SH NAME", f"{page.name} \\- {esc(summary(parser))}", ".SH SYNOPSIS"]
    subs = list(subcommands(parser))
    for sub in [s for _, s, _ in subs] or [parser]:
        out += [".PP", synopsis(sub)]
    out += [".SH DESCRIPTION", paragraphs(parser.description or "")]
    out += [".SH OPTIONS", *_arguments(parser, parser.prog)]
    if subs:
        out.append(".SH COMMANDS")
        for name, sub, oneline in subs:
            out += [f'.SS "{esc(name)} \\- {esc(oneline)}"' if oneline else f'.SS "{esc(name)}"', synopsis(sub), ".PP"]
            out.append(paragraphs(sub.description or oneline))
            out += _arguments(sub, sub.prog)
    return "\n".join(out) + "\n" + written


def build_date() -> str:
    """SOURCE_DATE_EPOCH (set by dpkg-buildpackage from the changelog) for reproducible pages."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch else datetime.datetime.now(datetime.timezone.utc)
    return when.strftime("%Y-%m-%d")


def write_all(outdir: Path, *, written_dir: Path = WRITTEN) -> list[Path]:
    from vhdblkd import __version__

    outdir.mkdir(parents=True, exist_ok=True)
    made = []
    for page in pages():
        written = (written_dir / f"{page.filename}.in").read_text(encoding="utf-8")
        path = outdir / page.filename
        path.write_text(render(page, version=__version__, date=build_date(), written=written), encoding="utf-8")
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write vhdblkd(8), vhdblkctl(8) and vhdtab(5) into a directory.")
    ap.add_argument("--outdir", type=Path, required=True)
    args = ap.parse_args(argv)
    for path in write_all(args.outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
