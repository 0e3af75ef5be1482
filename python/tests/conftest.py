"""Shared helpers for the Python tests: the package, the binary, the fixtures, a clean env.

The package is imported from ``python/`` of this checkout unless an installed axsave is
asked for (``AXSAVE_TEST_INSTALLED=1``, used after installing the wheel). The binary is
``AXSAVE_BIN``, else ``target/release/axsave``, else ``target/debug/axsave``, else what the
package finds (the wheel's, or PATH).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

if os.environ.get("AXSAVE_TEST_INSTALLED") != "1":
    sys.path.insert(0, str(ROOT / "python"))

LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI", "TORCHELASTIC", "MV2_", "MPI_LOCAL")
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "AXSAVE_RUN_ID",
    "RUST_LOG",
)


def find_binary() -> str:
    env = os.environ.get("AXSAVE_BIN")
    if env:
        return env
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "axsave"
        if p.is_file():
            return str(p)
    from axsave._bin import binary_path

    try:
        return binary_path()
    except FileNotFoundError as e:
        pytest.fail(f"no axsave binary: build it (cargo build) or set AXSAVE_BIN ({e})")


def clean_env(env: dict) -> dict:
    """``env`` without launcher variables leaked from whoever runs the tests."""
    return {k: v for k, v in env.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_VARS}


@pytest.fixture(autouse=True)
def _binary_and_clean_env(monkeypatch):
    for k in list(os.environ):
        if k not in clean_env({k: ""}):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AXSAVE_BIN", find_binary())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_named(directory: Path) -> list:
    """Files in ``directory`` that are not hidden temporaries (none when it does not exist)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def all_names(directory: Path) -> list:
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir())


def read_safetensors(path: Path) -> dict:
    """name → (dtype, shape, bytes) of a safetensors file, an index, or a directory with one
    (pure Python: the tests that use it run without torch)."""
    import json
    import struct

    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        path = index if index.exists() else path / "model.safetensors"
    if path.name.endswith(".index.json"):
        files = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out = {}
        for f in files:
            out.update(read_safetensors(path.parent / f))
        return out
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    return {
        k: (v["dtype"], tuple(v["shape"]), data[base + v["data_offsets"][0] : base + v["data_offsets"][1]])
        for k, v in header.items()
    }
