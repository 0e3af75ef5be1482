"""Where the ``axsave`` binary is."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from importlib import metadata

_EXE = "axsave.exe" if sys.platform == "win32" else "axsave"


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _installed_by_wheel() -> list[str]:
    """The binary the axsave wheel installed, from the distribution's RECORD (right under
    ``--prefix``, ``--target`` and ``--user`` installs alike), then the usual scripts directories:
    the current interpreter's and the user scheme's."""
    found: list[str] = []
    try:
        files = metadata.distribution("axsave").files or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _EXE and f.parent.name in ("bin", "Scripts"):
            found.append(os.path.normpath(str(f.locate())))
    schemes = [None]
    try:
        schemes.append(sysconfig.get_preferred_scheme("user"))
    except (AttributeError, KeyError):  # Python < 3.10
        schemes.append(f"{os.name}_user")
    for scheme in schemes:
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        if scripts:
            found.append(os.path.join(scripts, _EXE))
    return found


def binary_path() -> str:
    """The path of the ``axsave`` binary.

    In order: the ``AXSAVE_BIN`` environment variable, else the binary installed by the axsave
    wheel (the scripts directory of this interpreter or of the user scheme), else ``axsave`` on
    ``PATH``.

    Raises:
        FileNotFoundError: ``AXSAVE_BIN`` names no executable file, or no binary was found.
    """
    env = os.environ.get("AXSAVE_BIN")
    if env:
        if _executable(env):
            return env
        raise FileNotFoundError(f"AXSAVE_BIN={env!r} is not an executable file")
    for candidate in _installed_by_wheel():
        if _executable(candidate):
            return candidate
    on_path = shutil.which(_EXE)
    if on_path:
        return on_path
    raise FileNotFoundError(
        "the axsave binary was not found (not installed by the axsave wheel in "
        f"{sysconfig.get_path('scripts')}, not on PATH): install the wheel "
        "(pip install axsave), put axsave on PATH, or set AXSAVE_BIN to its path"
    )
