"""Registers every stage's command on the `pipeline` app (one line per verb)."""

from __future__ import annotations

from pipeline.cli import app
from pipeline.ground import ground

app.command("ground")(ground)
