"""How every verb reports a user's mistake: `error: <one line>` on stderr, exit code 2.

A verb names the exceptions that mean "the input or the options are wrong" (a missing file, a
bad value, an unwritable folder, a checkpoint that does not load) and is wrapped once:

    @user_errors(FileNotFoundError, ValueError)
    def filter_command(...): ...

Inside, code raises those exceptions with a message that names the file, key or option and
the reason; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, TypeVar

import typer

Command = TypeVar("Command", bound=Callable)


def first_line(error: BaseException) -> str:
    """One line for an error: its message's first line; a Ray server error carrying the
    server's traceback keeps its status line and the traceback's last line (the exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and "Traceback (most recent call last)" in lines[0]:
        raised = [line for line in lines[1:] if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        return f"{lines[0].split(': Traceback', 1)[0]}: {raised[-1] if raised else lines[-1]}"
    return lines[0]


class RunAborted(RuntimeError):
    """The run cannot go on for a reason outside the user's input (every worker node of the
    cluster gone): what it finished is kept. Every verb prints it as one `error:` line and
    exits with code 1."""


def fail(message: str) -> typer.Exit:
    """Print `error: message` on stderr; returns the exit-code-2 exception to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=2)


def user_errors(*kinds: type[BaseException]) -> Callable[[Command], Command]:
    """Decorate a typer command: `kinds` raised inside become one `error:` line and exit 2.
    typer reads the options from the wrapped function's signature (`functools.wraps`)."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except kinds as error:
                raise fail(first_line(error)) from None
            except RunAborted as error:
                print(f"error: {first_line(error)}", file=sys.stderr)
                raise typer.Exit(code=1) from None

        return wrapper  # type: ignore[return-value]

    return decorate
