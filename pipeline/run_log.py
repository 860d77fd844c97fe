"""Where a run's lines go: ours on the terminal, Ray's own in the run's log file.

Quiet (the default), while this process's Ray is up:
- Ray's Python loggers on the driver (`ray`, `ray.data`, `ray.train`, `ray.tune`: "Started a
  local Ray instance", "Starting execution of Dataset ...", "Progress bars disabled") write to
  the log file instead of stderr;
- the driver's native stderr (file descriptor 2), where Ray's C++ core worker writes its
  ERROR-level lines (`core_worker.cc: Actor ... has constructor arguments in the object
  store`), points at the log file too, while Python's `sys.stderr` (our progress lines, user
  errors, tracebacks) stays on the terminal; done only when `sys.stderr` is the process's own
  stderr (not under a test runner's capture);
- an embedded Ray does not forward its workers' stdout and stderr to the driver
  (`ray.init(log_to_driver=False)`): the Ray Train controller's start-up lines and the actors'
  chatter stay in Ray's session logs, and the training progress comes from the driver itself
  (`pipeline.train.driver` follows rank 0's `metrics.jsonl`). Errors still reach the terminal:
  a failed task or training raises in the driver with the worker's message.

`--verbose` (`pipeline demo --verbose`, `pipeline --verbose VERB`) or `GLIP_VERBOSE=1` keeps
Ray's defaults: everything on the terminal, worker output forwarded.

The log file is the caller's (`use_log_file`: the demo's `OUT/demo.log`), else a file of this
process's own in the temp folder, named on the terminal once when Ray starts.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
from pathlib import Path

VERBOSE_ENV = "GLIP_VERBOSE"
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")

_log_file: Path | None = None
_announced = False
_native: tuple[int, io.TextIOBase] | None = None  # (saved fd 2, the sys.stderr it replaced)
_handler: logging.Handler | None = None
_saved: dict[str, tuple[list[logging.Handler], bool, int]] = {}  # a logger's handlers, propagate, level


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose() -> None:
    """Ray's own lines on the terminal for this process and the stages it runs."""
    os.environ[VERBOSE_ENV] = "1"


def use_log_file(path: Path, *, announced: bool = True) -> None:
    """Ray's lines of this process go to `path` (appended). `announced`: the caller names it."""
    global _log_file, _announced
    _log_file, _announced = Path(path).resolve(), announced


def log_file() -> Path:
    global _log_file
    if _log_file is None:
        _log_file = Path(tempfile.gettempdir()) / f"glip-ray-{os.getpid()}.log"
    return _log_file


def quiet_ray() -> None:
    """Before `ray.init`: Ray's lines of this driver to the log file (nothing with --verbose)."""
    global _announced, _handler
    if verbose() or _handler is not None:
        return
    path = log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _announced:
        _announced = True
        print(f"Ray's own log lines: {path} (GLIP_VERBOSE=1 shows them here)", file=sys.stderr, flush=True)
    _handler = logging.FileHandler(path, delay=True, encoding="utf-8")
    _handler.setLevel(logging.INFO)  # what Ray's console handlers print; Ray Data's DEBUG stays in its session file
    _handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))
    _capture_native_stderr(path)
    quiet_ray_loggers()


def quiet_ray_loggers() -> None:
    """Ray's console handlers on the driver replaced by the log file's (idempotent)."""
    if _handler is None:
        return
    import ray.data  # noqa: F401  (Ray Data gives its logger a console handler when imported)

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if name not in _saved:
            _saved[name] = (list(logger.handlers), logger.propagate, logger.level)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        if name == "ray" or not logger.propagate:  # the others reach the file through `ray`
            if _handler not in logger.handlers:
                logger.addHandler(_handler)
            logger.propagate = False  # not to the root logger's last-resort stderr either
        if name == "ray" and logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def restore() -> None:
    """Ray's console handlers and the native stderr back, once this process's Ray is down."""
    global _handler, _native
    for name, (handlers, propagate, level) in _saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level
    _saved.clear()
    if _handler is not None:
        _handler.close()
        _handler = None
    if _native is not None:
        saved, previous = _native
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        ours, sys.stderr, _native = sys.stderr, previous, None
        ours.close()


def _capture_native_stderr(path: Path) -> None:
    """fd 2 to `path`; `sys.stderr` to a copy of the old fd 2 (only for the process's own stderr)."""
    global _native
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # a test runner's capture: no descriptor of its own
        return
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    previous = sys.stderr
    sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=previous.encoding or "utf-8", errors="backslashreplace")
    _native = (saved, previous)


def append_worker_output(logs_dir: str) -> None:
    """Append the embedded Ray's worker stdout/stderr files (what `log_to_driver` would have
    forwarded) to the log file, each under its name, before the session's folder is removed."""
    if _handler is None:
        return
    files = sorted(p for p in Path(logs_dir).glob("worker-*") if p.suffix in (".out", ".err") and p.stat().st_size)
    with log_file().open("a", encoding="utf-8", errors="backslashreplace") as log:
        for path in files:
            log.write(f"==> Ray worker output {path.name} <==\n")
            log.write(path.read_text(encoding="utf-8", errors="backslashreplace"))
