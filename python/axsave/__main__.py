"""``python -m axsave ARGS``: runs the axsave binary with ARGS.

On POSIX the binary replaces this process (exec), so its exit code, its signals and its standard
streams are the command's own, exactly as if ``axsave ARGS`` had been typed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from axsave._bin import binary_path


def main() -> int:
    """Runs the binary with this process's arguments; returns only where exec is unavailable."""
    try:
        exe = binary_path()
    except FileNotFoundError as e:
        print(f"axsave: {e}", file=sys.stderr)
        return 1
    args = [exe, *sys.argv[1:]]
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(exe, args)
    # No exec (Windows): run it and hand back its exit code.
    return subprocess.call(args)


if __name__ == "__main__":
    sys.exit(main())
