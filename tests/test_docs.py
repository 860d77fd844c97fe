"""Docs that cannot drift: README.md and docs/*.md are checked against the code.

1. Every `pipeline ...` command in a fenced shell block, or in an inline code span, names a
   real verb and only flags that verb has. A runnable line goes through the verb's own click
   option parser (`command.make_parser(ctx).parse_args`, typer's copy of click: unknown
   options, options missing their value and surplus arguments fail; values are not converted,
   so placeholders such as `N` or `OUT` pass; nothing runs). A usage line (`[--flag X]`, `a|b` alternatives) cannot be parsed as a command, so
   each flag it names is looked up in the verb's options instead.
2. Every relative link and every `#anchor` resolves (GitHub's heading slugs).
3. A figure table names its date and its command. A figure table is a Markdown table whose
   header row names a measured quantity (AP, AUC, precision, recall, seconds, s, ms, a rate
   such as img/s or samples/s, a ratio, speed, time, memory, GB/GiB/MB/MiB): name the quantity
   in the header of a table of measured numbers. (Tables of configured values, such as a
   recipe's dropout rates, name none and need no date.) Its nearby text
   (from the previous heading or table down to the next heading or table) must hold a date
   written YYYY-MM-DD and the command that produced the figures in backticks or in a fenced
   block (`pipeline ...`, `python ...`, `bash ...`, `pytest ...`).
4. The README stays a five-minute read (at most 150 lines) and keeps the two blocks `.ci/run`
   executes (after `<!-- setup -->` and `<!-- test -->`).

Every failure names the file, the line and what is wrong.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.exceptions import TyperException

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


# ---------------------------------------------------------------------------------------------
# Reading Markdown: fenced blocks, prose with code blanked out, headings, tables
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass
class Block:
    lang: str
    lines: list[tuple[int, str]]  # (1-based line number, text)


def split_markdown(text: str) -> tuple[list[Block], list[str]]:
    """Fenced blocks, and the document's lines with every fenced line blanked (prose only)."""
    blocks: list[Block] = []
    prose: list[str] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            blocks.append(Block(opened.group(2).lower(), []))
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            else:
                blocks[-1].lines.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return blocks, prose


INLINE_CODE = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def inline_code(prose: list[str]) -> list[tuple[int, str]]:
    """(line number, content) of every inline code span; a span may run over several lines."""
    spans = []
    for paragraph_start, paragraph in paragraphs(prose):
        for match in INLINE_CODE.finditer(paragraph):
            line = paragraph_start + paragraph.count("\n", 0, match.start())
            spans.append((line, " ".join(match.group(2).split())))
    return spans


def paragraphs(prose: list[str]) -> list[tuple[int, str]]:
    out, start, current = [], 0, []
    for number, line in enumerate(prose + [""], 1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            out.append((start, "\n".join(current)))
            current = []
    return out


def without_inline_code(line: str) -> str:
    return INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def heading_lines(prose: list[str]) -> dict[int, str]:
    return {n: m.group(2) for n, line in enumerate(prose, 1) if (m := HEADING.match(line))}


# ---------------------------------------------------------------------------------------------
# 1. Commands
# ---------------------------------------------------------------------------------------------

ROOT = typer.main.get_command(app)
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "zsh"}
PROGRAM = re.compile(r"^(?:\./)?(?:\.venv/bin/)?pipeline$")
# `[--flag X]` or `a|b` alternatives: a usage line, documentation rather than a shell command.
USAGE_LINE = re.compile(r"\[--?\w|\w\|\w")
FLAG = re.compile(r"(?<![\w.-])(--?[A-Za-z][\w-]*)")
SHELL_SEPARATOR = re.compile(r"\s*(?:&&|\|\||;|\|)\s*")


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """A block's lines with `\\` continuations joined, a `$ ` prompt dropped."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in block.lines:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        out.append((number, re.sub(r"^\s*\$\s+", "", line)))
    if pending is not None:
        out.append(pending)
    return out


def invocations(line: str) -> list[tuple[list[str], bool]]:
    """The `pipeline` invocations on a shell line: (words after the program, is_usage_line)."""
    code = re.sub(r"(^|\s)#.*$", "", line).strip()  # a trailing comment is the reader's note
    if not code:
        return []
    # A usage line, or a line of a data-flow picture (`  | pipeline VERB --flag  (what it does)`).
    if USAGE_LINE.search(code) or code.startswith("|"):
        words = code.split()
        for i, word in enumerate(words):
            if PROGRAM.match(word):
                return [(words[i + 1:], True)]
        return []
    found = []
    for segment in SHELL_SEPARATOR.split(code):
        try:
            words = shlex.split(segment)
        except ValueError:  # an unbalanced quote: not a command we can read
            continue
        while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in {"do", "then", "time", "nice"}):
            words = words[1:]
        if words and PROGRAM.match(words[0]):
            found.append((words[1:], False))
    return found


def is_group(command) -> bool:
    return hasattr(command, "list_commands")


def options_of(command) -> set[str]:
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def resolve(words: list[str]) -> tuple[list[tuple[str, object]], list[str], str | None]:
    """Walk `pipeline [group ...] verb`: ([(path, command)], remaining words, error)."""
    found = [("pipeline", ROOT)]
    while is_group(found[0][1]) and words and not words[0].startswith("-"):
        nxt = []
        for path, group in found:
            for name in words[0].split("|"):  # `job status|logs|stop` in a usage line
                sub = group.get_command(typer.Context(group), name)
                if sub is None:
                    verbs = ", ".join(sorted(group.list_commands(typer.Context(group))))
                    return [], words, f"`{path} {name}` is not a verb (verbs: {verbs})"
                nxt.append((f"{path} {name}", sub))
        found, words = nxt, words[1:]
    return found, words, None


def check_invocation(words: list[str], usage: bool) -> list[str]:
    commands, rest, error = resolve(words)
    if error:
        return [error]
    if "--" in rest and any(path.endswith(" submit") for path, _ in commands):
        # `pipeline submit [options] -- STAGE ARGS`: the stage is a pipeline command of its own.
        cut = rest.index("--")
        head, stage = rest[:cut], rest[cut + 1:]
        problems = [f"`{path}` has no option {flag}" for path, cmd in commands
                    for flag in FLAG.findall(" ".join(head)) if flag not in options_of(cmd)]
        return problems + check_invocation(stage, usage)
    problems = []
    for path, command in commands:
        if usage:
            problems += [f"`{path}` has no option {flag}" for flag in FLAG.findall(" ".join(rest))
                         if flag not in options_of(command)]
            continue
        # The verb's own option parser, without the rest of make_context: unknown options and
        # options missing their value fail, while values are not converted, so a placeholder such
        # as `N` or `OUT` stands for any value and a required option may be left out.
        ctx = typer.Context(command, info_name=path)
        try:
            _, leftover, _ = command.make_parser(ctx).parse_args(list(rest))
        except TyperException as err:  # typer's click: NoSuchOption, BadOptionUsage, ...
            problems.append(f"`{path}`: {err.format_message() if hasattr(err, 'format_message') else err}")
            continue
        if leftover and not is_group(command) and not ctx.allow_extra_args:
            problems.append(f"`{path}` does not take {' '.join(leftover)!r}")
    return problems


def command_problems(path: Path) -> list[str]:
    blocks, prose = split_markdown(path.read_text())
    lines: list[tuple[int, str]] = []
    for block in blocks:
        if block.lang in SHELL_BLOCKS:
            lines += logical_lines(block)
    spans = inline_code(prose)
    lines += [(n, span) for n, span in spans if re.match(r"^(?:\.venv/bin/)?pipeline(\s|$)", span)]
    problems = []
    for number, line in lines:
        for words, usage in invocations(line):
            problems += [f"{rel(path)}:{number}: {p}" for p in check_invocation(words, usage)]
    # Prose names a verb's flags without the program too (`train-student --workers N --use-gpu`):
    # each flag is looked up, as on a usage line.
    verbs = set(ROOT.list_commands(typer.Context(ROOT)))
    for number, span in spans:
        words = span.split()
        if words and words[0] in verbs and any(w.startswith("-") for w in words[1:]):
            problems += [f"{rel(path)}:{number}: {p}" for p in check_invocation(words, usage=True)]
    return problems


# ---------------------------------------------------------------------------------------------
# 2. Links and anchors
# ---------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_LINK = re.compile(r"""<(?:a|img)\s[^>]*?(?:href|src)=["']([^"']+)["']""", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"""<a\s[^>]*?(?:name|id)=["']([^"']+)["']""", re.IGNORECASE)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_markdown(path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for heading in heading_lines(prose).values():
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    for line in prose:
        found.update(HTML_ANCHOR.findall(line))
    return found


def link_problems(path: Path) -> list[str]:
    _, prose = split_markdown(path.read_text())
    problems = []
    for number, line in enumerate(prose, 1):
        text = without_inline_code(line)
        targets = LINK.findall(text) + HTML_LINK.findall(text)
        if (ref := REFERENCE_LINK.match(text)):
            targets.append(ref.group(1))
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{rel(path)}:{number}: link {target!r}"
            if not linked.exists():
                problems.append(f"{where}: {file_part} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{where}: {linked.name} has no heading with anchor #{anchor}")
    return problems


# ---------------------------------------------------------------------------------------------
# 3. Figure tables
# ---------------------------------------------------------------------------------------------

TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
MEASURED = re.compile(
    r"\b(AP\w*|AUC|ms|GB|GiB|MB|MiB)\b|\w/s\b|(^|\|)\s*s\s*(\||$)|\(s\)"
    r"|(?i:\b(precision|recall|seconds?|ratio|speed|throughput|time|memory)\b)"
)
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
COMMAND = re.compile(r"^(?:sudo\s+)?(?:\S*/)?(?:pipeline|python3?|pytest|bash)\b(?!/)")


def tables(prose: list[str]) -> list[tuple[int, int]]:
    """(first, last) 1-based line numbers of each Markdown table."""
    found, number = [], 0
    while number < len(prose) - 1:
        if prose[number].lstrip().startswith("|") and TABLE_RULE.match(prose[number + 1]):
            last = number + 1
            while last + 1 < len(prose) and prose[last + 1].lstrip().startswith("|"):
                last += 1
            found.append((number + 1, last + 1))
            number = last + 1
        else:
            number += 1
    return found


def names_a_command(lines: list[str], blocks: list[Block], first: int, last: int) -> bool:
    spans = [span for _, span in inline_code(lines)]
    fenced = [text.strip() for b in blocks for n, text in b.lines if first <= n <= last]
    return any(COMMAND.match(code) for code in spans + fenced)


def figure_table_problems(path: Path) -> list[str]:
    blocks, prose = split_markdown(path.read_text())
    found = tables(prose)
    boundaries = sorted({*heading_lines(prose), *(t for table in found for t in table)})
    problems = []
    for first, last in found:
        if not MEASURED.search(prose[first - 1]):
            continue
        start = max([b for b in boundaries if b < first], default=0) + 1
        end = min([b for b in boundaries if b > last], default=len(prose) + 1) - 1
        nearby = prose[start - 1:first - 1] + prose[last:end]
        missing = []
        if not any(DATE.search(line) for line in nearby):
            missing.append("a date (YYYY-MM-DD)")
        if not names_a_command(prose[start - 1:first - 1] + [""] + prose[last:end], blocks, start, end):
            missing.append("the command that produced it (`pipeline ...`, `python ...`, `bash ...`)")
        if missing:
            header = " ".join(prose[first - 1].split())[:60]
            problems.append(f"{rel(path)}:{first}: figure table {header!r} lacks nearby {' and '.join(missing)}")
    return problems


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

FILES = [rel(p) for p in doc_files()]


def report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(problems)


@pytest.mark.parametrize("name", FILES)
def test_documented_commands_parse(name):
    problems = command_problems(REPO / name)
    assert not problems, report(problems)


@pytest.mark.parametrize("name", FILES)
def test_links_and_anchors_resolve(name):
    problems = link_problems(REPO / name)
    assert not problems, report(problems)


@pytest.mark.parametrize("name", FILES)
def test_figure_tables_name_date_and_command(name):
    problems = figure_table_problems(REPO / name)
    assert not problems, report(problems)


def test_readme_is_short_and_keeps_the_ci_blocks():
    lines = (REPO / "README.md").read_text().splitlines()
    problems = []
    if len(lines) > README_MAX_LINES:
        problems.append(f"README.md: {len(lines)} lines, more than {README_MAX_LINES}: move details into docs/")
    for marker in ("<!-- setup -->", "<!-- test -->"):
        if marker not in lines:
            problems.append(f"README.md: no line {marker!r}: .ci/run reads the fenced block after it")
        elif not FENCE.match(lines[lines.index(marker) + 1]):
            problems.append(f"README.md:{lines.index(marker) + 2}: the line after {marker!r} must open a fenced block")
    assert not problems, report(problems)


def test_the_checker_catches_what_it_should(tmp_path):
    """The checker itself, on a page holding one instance of every mistake it must report."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Setting up: `pipeline demo` now\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "```bash\n"
        ".venv/bin/pipeline demo --seed 0 --out OUT \\\n    --no-such-flag 3\n"
        "pipeline no-such-verb --x\n"
        "pipeline train-student [--steps N] [--not-a-flag]\n"
        "pipeline submit --address http://HEAD:8265 -- pseudo-label S --bogus\n"
        "pipeline demo --seed 0   # fine\n"
        "# pipeline demo --bogus  (a comment)\n"
        "```\n\n"
        "Inline: `pipeline filter --nope`, `eval --model`, `filter --nope2`.\n\n"
        "[fine](other.md#setting-up-pipeline-demo-now) [gone](missing.md) [bad](other.md#nope) [self](#page)\n\n"
        "Measured somewhere:\n\n| run | AP |\n|---|---|\n| a | 1.0 |\n\n"
        "## Dated\n\nOn 2026-12-06, `pipeline demo --seed 0`:\n\n| step | seconds |\n| --- | ---: |\n| x | 3 |\n"
        "\n## Undated\n\n| arm | samples/s |\n|---|---|\n| a | 41.9 |\n| b | **+7.0** |\n"
        "\n| variant | dropout |\n|---|---|\n| tiny | 0.1 |\n"
    )
    commands = command_problems(page)
    assert any(":4: `pipeline demo`" in p and "--no-such-flag" in p for p in commands), commands
    assert any(":6: `pipeline no-such-verb` is not a verb" in p for p in commands), commands
    assert any(":7:" in p and "no option --not-a-flag" in p for p in commands), commands
    assert any(":8:" in p and "--bogus" in p for p in commands), commands
    assert any(":13:" in p and "--nope" in p for p in commands), commands
    assert any(":13:" in p and "`pipeline filter` has no option --nope2" in p for p in commands), commands
    assert len(commands) == 6, commands
    links = link_problems(page)
    assert [p.split(": ", 1)[1] for p in links] == [
        "link 'missing.md': missing.md does not exist",
        "link 'other.md#nope': other.md has no heading with anchor #nope",
    ], links
    figures = figure_table_problems(page)
    assert [p.split(": figure table ")[0] for p in figures] == ["page.md:19", "page.md:33"], figures
    assert figures[1].endswith("lacks nearby a date (YYYY-MM-DD) and the command that produced it"
                               " (`pipeline ...`, `python ...`, `bash ...`)"), figures
