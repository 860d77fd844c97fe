"""The `pipeline` command: one verb per module, wired here and nowhere else.

`build_app()` lists every verb on one line each, so `pipeline --help` and this file read the
same. The verb modules import only what their options need at import time (typer, plain
configuration); torch, Ray and spaCy load inside the command that uses them, so `pipeline
--help` stays fast. Each verb reports a user's mistake through `pipeline.user_errors`.
"""

from __future__ import annotations

import typer

from jobs.submit import job_app, submit_command
from pipeline.demo.run import demo_command
from pipeline.evaluation.calibrate import calibrate_command
from pipeline.evaluation.check_parity import check_parity_command
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.ground import ground
from pipeline.report.command import report_command
from pipeline.stages.decontaminate import decontaminate_command
from pipeline.stages.filter_stage import filter_command
from pipeline.stages.inspect_labels import export_command, show_command, stats_command
from pipeline.stages.pack import pack_command
from pipeline.stages.parse_captions import parse_captions_command
from pipeline.stages.pseudo_label import pseudo_label_command
from pipeline.train.student import train_student


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="pipeline",
        help="GLIP self-training data engine: parse captions, pseudo-label, filter, train a student.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        # click's plain help: rich's option tables cut long flag names at 80 columns
        rich_markup_mode=None,
    )
    app.callback()(_options)
    app.command("pack")(pack_command)
    app.command("parse-captions")(parse_captions_command)
    app.command("ground")(ground)
    app.command("pseudo-label")(pseudo_label_command)
    app.command("filter")(filter_command)
    app.command("calibrate")(calibrate_command)
    app.command("decontaminate")(decontaminate_command)
    app.command("show")(show_command)
    app.command("export")(export_command)
    app.command("stats")(stats_command)
    app.command("report")(report_command)
    app.command("train-student")(train_student)
    app.command("eval")(evaluate)
    app.command("check-parity")(check_parity_command)
    app.command("demo")(demo_command)
    app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(submit_command)
    app.add_typer(job_app, name="job")
    return app


def _options(
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's own log lines on the terminal (also GLIP_VERBOSE=1)."),
) -> None:
    """GLIP self-training data engine: parse captions, pseudo-label, filter, train a student."""
    if verbose:
        from pipeline.run_log import set_verbose

        set_verbose()


app = build_app()

if __name__ == "__main__":  # `python -m pipeline.cli`
    app()
