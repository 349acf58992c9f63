"""Console scripts: `gsd-train`, `gsd-evaluate`, ... one per documented `python -m gsd.<command>`.

Each script runs the command's `main` through `gsd.cli.run_main`, exactly as `python -m` does,
so bad input ends in one line and exit code 2 (never a traceback) whichever way a user starts
it. Commands are imported only when their script runs: `gsd-edit` does not load gsd.train.
"""

from __future__ import annotations

import importlib
import sys

from gsd.cli import exit_process, run_main

# console script -> the command module it runs (pyproject.toml [project.scripts] names these)
COMMANDS = {
    "gsd-train": "gsd.train",
    "gsd-evaluate": "gsd.evaluate",
    "gsd-experiments": "gsd.experiments",
    "gsd-edit": "gsd.edit",
    "gsd-sample": "gsd.sample",
    "gsd-teacher": "gsd.teacher",
    "gsd-import-teacher": "gsd.import_teacher",
    "gsd-generate": "gsd.generate",
    "gsd-export": "gsd.export",
    "gsd-fid": "gsd.fid",
}


def run_command(module: str) -> int:
    return run_main(importlib.import_module(module).main, sys.argv[1:])


def _entry(script: str):
    def entry() -> None:
        exit_process(run_command(COMMANDS[script]))
    entry.__name__ = script.replace("-", "_")
    entry.__doc__ = f"`{script}`: `python -m {COMMANDS[script]}` as a console script."
    return entry


train = _entry("gsd-train")
evaluate = _entry("gsd-evaluate")
experiments = _entry("gsd-experiments")
edit = _entry("gsd-edit")
sample = _entry("gsd-sample")
teacher = _entry("gsd-teacher")
import_teacher = _entry("gsd-import-teacher")
generate = _entry("gsd-generate")
export = _entry("gsd-export")
fid = _entry("gsd-fid")
