"""Many `mlxq` command lines in one fresh Python process, each with its own stdout, stderr and
exit status, as `python -m mlxq ARGV` gives them.

A process per command line pays for importing torch, transformers and mlxq every time (a few
seconds of CPU each); tests that check what many command lines print (one malformed
checkpoint each) run them here instead. Each runs `mlxq.cli.main(argv)` as `mlxq/__main__.py`
does (`sys.exit(main())`), with file descriptors 1 and 2 redirected to files of its own, so
that what native code writes is captured too, and an escaping exception prints its traceback
to that stderr with status 1, as the interpreter would. What a process does once (a warning
shown once, an import's own output) happens for the first command line only: tests that count
every line a command prints keep a process each (tests/test_cli.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

_RUNNER = r"""
import json, os, sys, tempfile, traceback
from mlxq.cli import main

jobs = json.loads(sys.stdin.read())
results = {}
for name, argv in jobs.items():
    sys.stdout.flush(); sys.stderr.flush()
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    saved = [os.dup(1), os.dup(2)]
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    try:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        if code is None:
            code = 0
        elif not isinstance(code, int):  # sys.exit("message"): printed, status 1
            print(code, file=sys.stderr)
            code = 1
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
    out = []
    for f in files:
        f.seek(0)
        out.append(f.read().decode(errors="replace"))
        f.close()
    results[name] = [code, *out]
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""


def run_cli_batch(
    argvs: dict[str, list[str]], env: dict[str, str] | None = None, timeout: float = 900
) -> dict[str, subprocess.CompletedProcess]:
    """name -> the result of `mlxq ARGV` for each entry, all run in one new process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(out)],
            input=json.dumps(argvs),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"the batch runner failed ({proc.returncode}): {proc.stderr[-3000:]}"
            )
        results = json.loads(out.read_text())
    return {
        name: subprocess.CompletedProcess(["mlxq", *argvs[name]], code, stdout, stderr)
        for name, (code, stdout, stderr) in results.items()
    }
