"""What the study scripts (bench/*_study.py) share: running an `fmjax`
command with its output in a log, and writing a report's results between
the RESULTS markers of its doc under docs/."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- RESULTS BEGIN -->", "<!-- RESULTS END -->"


def run_fmjax(argv: list[str], log: str, capture: bool = False) -> str:
    """`python -m fmjax.cli ARGV` in the repo, output appended to `log` (with
    `capture`, stdout is returned instead and only stderr goes to the log)."""
    command = [sys.executable, "-m", "fmjax.cli", *argv]
    print("$", shlex.join(command), flush=True)
    with open(log, "a") as f:
        out = subprocess.run(
            command,
            check=True,
            stdout=subprocess.PIPE if capture else f,
            stderr=f if capture else subprocess.STDOUT,
            cwd=REPO,
            text=True,
        )
    return out.stdout if capture else ""


def write_results(doc: str, title: str, body: str) -> None:
    """`body` between the RESULTS markers of `doc` (a new doc headed `title`
    if there is none); the prose around the markers is kept."""
    text = open(doc).read() if os.path.exists(doc) else f"# {title}\n\n{BEGIN}\n{END}\n"
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    with open(doc, "w") as f:
        f.write(text[:start] + "\n" + body + text[end:])
    print(body)
