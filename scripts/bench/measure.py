#!/usr/bin/env python3
"""Runs a command and prints one JSON line: wall seconds, peak RSS (MiB) and exit code.

Peak RSS is the kernel's ru_maxrss of the command's process tree (os.wait4 on the child, which
includes its waited-for descendants), so it covers a Python interpreter and its workers too.
Usage: measure.py LABEL -- CMD [ARGS...]
"""
import json
import os
import resource
import subprocess
import sys
import time


def main() -> int:
    label = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    start = time.perf_counter()
    # The command's own output goes to stderr, so stdout carries only the JSON line.
    proc = subprocess.Popen(cmd, stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_kib = max(usage.ru_maxrss, children.ru_maxrss)
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"label": label, "seconds": wall, "peak_rss_mib": rss_kib / 1024, "exit": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
