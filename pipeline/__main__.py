"""`python -m pipeline ...`: the same app as the `pipeline` console script."""

from pipeline.cli import app

app()
