"""Where the ``axsave`` binary is (minimal stand-in; the wheel's own version replaces it)."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig


def binary_path() -> str:
    """The axsave binary: ``AXSAVE_BIN``, else the one the wheel installed, else ``PATH``.

    Raises FileNotFoundError when none is found.
    """
    env = os.environ.get("AXSAVE_BIN")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env
        raise FileNotFoundError(f"AXSAVE_BIN={env} is not an executable file")
    exe = "axsave.exe" if sys.platform == "win32" else "axsave"
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidate = os.path.join(scripts, exe)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(exe)
    if found:
        return found
    raise FileNotFoundError(
        "the axsave binary was not found: install the axsave wheel, put axsave on PATH, or set AXSAVE_BIN"
    )
