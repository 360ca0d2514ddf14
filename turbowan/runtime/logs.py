"""A job's log: one format for the job's own lines and the lines its worker sends back."""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | None) -> None:
    """Log to stderr and (fresh) to the job's log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True, format=LOG_FORMAT)


def write_lines(line: str) -> None:
    """A line already formatted elsewhere (by a worker), into this process's log handlers as it is."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None:
            stream.write(line + "\n")
            stream.flush()


def flush_job_output() -> None:
    """Write out the job's log and streams."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # (a stream closed or gone)
            pass
