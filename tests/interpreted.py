"""Run a test module's Triton kernels on the CPU, under triton's interpreter, in a process started with it.

triton reads TRITON_INTERPRET when it and each kernel are defined, and turning it on inside a pytest process
that also imports the kernels elsewhere (or runs them on a GPU) would change them all. So a module of
interpreted kernel tests ends with ``replace_unless_interpreted(globals(), __file__)``: in a process started with
``TRITON_INTERPRET=1`` its tests run as written; in any other they are replaced by one test that runs the
module in such a process and fails if any case fails or is skipped.
"""

import os
import subprocess
import sys

import pytest

ACTIVE = os.environ.get("TRITON_INTERPRET") == "1"


def replace_unless_interpreted(namespace: dict, path: str) -> None:
    """Swaps the ``test_*`` functions of ``namespace`` for one running ``path`` interpreted (unless ACTIVE)."""
    if ACTIVE:
        return
    for name in [n for n in namespace if n.startswith("test_")]:
        del namespace[name]

    def test_interpreted_cases_in_fresh_process():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout

    marked = pytest.mark.slow(pytest.mark.multiprocess(test_interpreted_cases_in_fresh_process))
    namespace[test_interpreted_cases_in_fresh_process.__name__] = marked
