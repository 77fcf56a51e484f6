"""On a free-threaded CPython (3.13t, 3.14t) the compiled core re-enables the
GIL when it is imported.

It does not declare that it can run without the GIL (its tables are mutated
without locks: docs/install.md, "Free-threaded Python"), and this test keeps
it that way until that changes on purpose.  It runs only on a free-threaded
build with the compiled core; CI runs the rest of the suite there with
``PYTHON_GIL=1``, so the child process here drops that setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest
from _cores import PURE_ONLY, PURE_ONLY_REASON

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

pytestmark = [
    pytest.mark.skipif(not FREE_THREADED, reason="not a free-threaded CPython build"),
    pytest.mark.skipif(PURE_ONLY, reason=PURE_ONLY_REASON),
]

CHECK = """
import sys
assert not sys._is_gil_enabled(), "the GIL is on before livemap_core is imported"
import livemap_core
print(livemap_core.IMPLEMENTATION, sys._is_gil_enabled())
"""


def test_importing_the_compiled_core_enables_the_gil() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON_GIL", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "cython True\n"
    assert "The global interpreter lock (GIL) has been enabled" in proc.stderr
    assert "livemap_core._core" in proc.stderr
