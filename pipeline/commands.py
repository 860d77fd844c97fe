"""Registers every stage's command on the `pipeline` app (one line per verb)."""

from __future__ import annotations

from jobs.submit import job_app, submit_command
from pipeline.calibrate import calibrate_command
from pipeline.cli import app
from pipeline.decontaminate import decontaminate_command
from pipeline.demo import demo_command
from pipeline.evaluate import evaluate
from pipeline.filter_stage import filter_command
from pipeline.ground import ground
from pipeline.inspect_labels import export_command, show_command, stats_command
from pipeline.parse_captions import parse_captions_command
from pipeline.pseudo_label import pseudo_label_command
from pipeline.train_student import train_student

app.command("parse-captions")(parse_captions_command)
app.command("ground")(ground)
app.command("pseudo-label")(pseudo_label_command)
app.command("filter")(filter_command)
app.command("calibrate")(calibrate_command)
app.command("decontaminate")(decontaminate_command)
app.command("show")(show_command)
app.command("export")(export_command)
app.command("stats")(stats_command)
app.command("train-student")(train_student)
app.command("eval")(evaluate)
app.command("demo")(demo_command)
app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(submit_command)
app.add_typer(job_app, name="job")
