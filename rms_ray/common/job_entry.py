"""The ``ray job submit`` entrypoints (``jobs/*.py``): what would fail or lose work inside a job is refused in one
``error:`` line before anything runs.

* The entrypoint's ``python`` is whichever ``python`` is first on the PATH of the environment that ran
  ``ray start`` on the head node (Ray's runtime env does not change it: ``py_executable`` sets the interpreter of
  Ray's workers only). If that is not the environment rms_ray was installed in, importing the CLI fails with
  ``No module named 'typer'`` (or another dependency); say what to do instead.
* A job runs in a temporary copy of the uploaded working directory, removed when the job ends: a relative
  ``--output`` would be written into that copy and lost.

Only the standard library is imported here, so this module itself works in any Python.
"""

from __future__ import annotations

import os
import sys

HEAD_ENV_HINT = ("the job's `python` is the one on the Ray head's PATH: start the head from the environment rms_ray "
                 "is installed in (`source .venv/bin/activate && ray start --head ...`, or the cluster image), "
                 "see cluster/README.md")


def _output_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("-o", "--output") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--output="):
            return a.split("=", 1)[1]
    return None


def run(command: str, argv: list[str], prog: str) -> None:
    """Run ``rms-ray <command> <argv>`` as a job entrypoint (exits with the command's status).

    Exits 1 with one ``error:`` line when rms_ray's dependencies are missing from this interpreter, and 2 when
    ``--output`` is not an absolute path (or a URI).
    """
    try:
        from rms_ray.cli import app
    except ModuleNotFoundError as e:
        sys.exit(f"error: {e} in {sys.executable}: {HEAD_ENV_HINT}")
    out = _output_arg(argv)
    if out is not None and not (os.path.isabs(out) or "://" in out):
        print(f"error: --output {out} is relative: a Ray job runs in a temporary copy of the working directory, "
              "removed when the job ends; give an absolute path on storage every node sees", file=sys.stderr)
        sys.exit(2)
    app([command, *argv], prog_name=prog)
