"""A pytest plugin (``-p diga_fast.benchmarks.pytest_rows``): one JSON line per test, appended to the file
named by ``DIGA_TEST_ROWS`` the moment the test ends, so a run killed at any point keeps every result
before it. ``benchmarks/gpu_check.py`` loads it for the kernel tests; with pytest-xdist the controller
writes (the workers only report to it)."""

from __future__ import annotations

import json
import os

_writer = {"on": False}


def pytest_configure(config) -> None:
    _writer["on"] = bool(os.environ.get("DIGA_TEST_ROWS")) and not hasattr(config, "workerinput")


def pytest_runtest_logreport(report) -> None:
    if not _writer["on"] or not (report.when == "call" or report.outcome != "passed"):
        return
    row = {"test": report.nodeid, "file": report.nodeid.split("::")[0], "when": report.when,
           "outcome": report.outcome, "seconds": round(report.duration, 3)}
    if report.outcome != "passed":
        row["detail"] = report.longreprtext[-2000:]
    with open(os.environ["DIGA_TEST_ROWS"], "a") as rows:
        rows.write(json.dumps(row) + "\n")
