"""Every verb's `--help` at 80 columns shows each flag name whole (rich's option tables cut them)."""

from __future__ import annotations

import re

import click
import typer.main
from typer.testing import CliRunner

from pipeline.cli import app


def _verbs(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    found = {}
    for name, command in group.commands.items():
        found[(*prefix, name)] = command
        if isinstance(command, click.Group):
            found.update(_verbs(command, (*prefix, name)))
    return found


def test_help_tables_show_whole_flag_names_at_80_columns() -> None:
    verbs = _verbs(typer.main.get_command(app))
    assert {("train-student",), ("pack",), ("demo",)} <= set(verbs)
    runner = CliRunner()
    for path, command in verbs.items():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, (path, result.output)
        shown = set(re.findall(r"(?<![\w-])--?[\w][\w-]*", result.output))
        flags = {flag for param in command.params for flag in (*param.opts, *param.secondary_opts) if flag.startswith("-")}
        assert flags <= shown, (path, sorted(flags - shown))
        assert "…" not in result.output and max(map(len, result.output.splitlines())) <= 80, path


def test_the_cli_and_parse_captions_start_without_torch() -> None:
    """`pipeline --help` and `parse-captions` have no use for PyTorch (1.3 s and ~600 MB to
    import): the verbs that run a model import it when they run."""
    import subprocess
    import sys

    probe = (
        "import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
        "result = CliRunner().invoke(app, ['parse-captions', '--help']); "
        "print(result.exit_code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "False"], done.stdout + done.stderr
