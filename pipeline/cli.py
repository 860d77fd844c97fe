"""The `pipeline` command: one verb per stage module.

Each stage lives in its own module and exposes a typer command function; this file only
wires them into one app, so `pipeline --help` lists every verb.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="pipeline",
    help="GLIP self-training data engine: parse captions, pseudo-label, filter, train a student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported here so `import pipeline.cli` stays cheap and each verb's heavy imports
    # (torch, ray, spacy) happen inside the command that needs them.
    from pipeline import commands  # noqa: F401  (registers the verbs on `app`)


_register()

if __name__ == "__main__":  # `python -m pipeline.cli`: run the registered app, not this copy
    from pipeline.cli import app as registered

    registered()
