"""``axsave.save``: the command line as a Python function.

The function validates its keyword arguments, starts the ``axsave`` binary with ``--json``,
streams the binary's log lines to ``sys.stderr`` while keeping the last ones, and returns the
parsed summary, or raises :class:`AxsaveError` with axsave's one-line error. Nothing here
imports torch: inside a running ``torch.distributed`` job, ``torch.distributed`` is looked up
in ``sys.modules`` (it is already imported there), never imported.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from ._bin import binary_path

__all__ = ["AxsaveError", "save"]


class AxsaveError(RuntimeError):
    """A save that failed: axsave exited non-zero (or its ranks could not meet).

    ``str(e)`` is axsave's one-line error (the last ``ERROR`` line it logged, which names
    the file and, where it helps, the byte offset). Attributes:

    * ``message``: that line;
    * ``returncode``: the binary's exit code (negative: killed by that signal; ``None`` when
      the binary never ran, e.g. the ranks could not agree on a rendezvous);
    * ``stderr``: the last lines the binary wrote to stderr, as one string.
    """

    def __init__(self, message: str, returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.message = message
        self.returncode = returncode
        self.stderr = stderr


# ---------------------------------------------------------------------------------------------
# Options

_CHOICES: Mapping[str, tuple] = {
    "dtype": ("keep", "bf16", "fp16", "fp32"),
    "mode": ("gather", "sharded"),
    "transport": ("auto", "nccl", "mpi", "tcp"),
}
# Spellings people use for dtypes (and what str() of a torch dtype gives).
_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
}
_SIZES = ("max_shard_size", "memory_budget")
_FLAGS = ("force", "cleanup", "dry_run", "quiet")
_COUNTS = {"device": 0, "workers": 1}  # smallest value allowed
_SECONDS = ("timeout", "rendezvous_timeout")
_PATHS = ("config",)

#: Every keyword ``save`` accepts besides ``source`` and ``output``.
OPTIONS = tuple(sorted((*_CHOICES, *_SIZES, *_FLAGS, *_COUNTS, *_SECONDS, *_PATHS)))

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_size(name: str, value: Any) -> str:
    """A size as axsave reads it (``5GB``, ``500MB``, ``2GiB``, ``1000000``); ints are bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}: expected a size such as '2GB' or a number of bytes, got {value!r}")  # noqa: TRY004 (the API promises ValueError for a bad value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}: a size cannot be negative, got {value}")
        return str(value)
    m = re.fullmatch(r"\s*([0-9_.]+)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).lower() if m else None
    number = m.group(1).replace("_", "") if m else ""
    try:
        ok = m is not None and unit in _SIZE_UNITS and math.isfinite(float(number))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: invalid size {value!r} (examples: '5GB', '500MB', '2GiB', 1000000)")
    return value.strip()


def _check_seconds(name: str, value: Any) -> str:
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a number of seconds, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return str(math.ceil(value))


def _check_count(name: str, value: Any, least: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")  # noqa: TRY004 (the API promises ValueError for a bad value)
    if value < least:
        raise ValueError(f"{name}: must be at least {least}, got {value}")
    return str(value)


def _check_choice(name: str, value: Any) -> str:
    text = str(value) if value is not None else ""
    if name == "dtype":
        text = _DTYPE_ALIASES.get(text, text)
    if text not in _CHOICES[name]:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(_CHOICES[name])}")
    return text


def _check_path(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name}: expected a path, got {value!r}")  # noqa: TRY004 (the API promises ValueError for a bad value)
    text = os.fspath(value)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ValueError(f"{name}: the path is empty")
    return text


def build_args(source: Any = None, output: Any = None, **options: Any) -> list:
    """The binary's arguments for ``save(source, output, **options)`` (``--json`` included).

    Raises TypeError for an unknown keyword and ValueError for a bad value, each naming it.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"save() got an unexpected keyword argument {unknown[0]!r} "
            f"(axsave's options: {', '.join(OPTIONS)})"
        )
    args = ["--json"]
    config = options.get("config")
    if config is not None:
        args += ["--config", _check_path("config", config)]
    for name, value in (("source", source), ("output", output)):
        if value is not None:
            args += [_flag(name), _check_path(name, value)]
        elif config is None:
            raise ValueError(f"{name}: required unless config is given")
    for name in OPTIONS:
        value = options.get(name)
        if value is None or name in _PATHS:
            continue
        if name in _FLAGS:
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected True or False, got {value!r}")
            if value:
                args.append(_flag(name))
            continue
        if name in _CHOICES:
            text = _check_choice(name, value)
        elif name in _SIZES:
            text = _check_size(name, value)
        elif name in _SECONDS:
            text = _check_seconds(name, value)
        else:
            text = _check_count(name, value, _COUNTS[name])
        args += [_flag(name), text]
    return args


# ---------------------------------------------------------------------------------------------
# Joining a running torch.distributed job

# Saves started by this process, numbered alike on every rank (every rank calls save the same
# number of times), so a second save in the same job gets keys of its own.
_calls = itertools.count()


def _torch_dist():
    """``torch.distributed`` when this process is a rank of an initialized process group
    of more than one rank; never imports torch."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist
    except Exception:  # noqa: BLE001 (an odd torch build: behave as if there were no group)
        return None
    return None


def _default_store(dist):
    """The store of the job's default process group (keys set there are seen by every rank)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001, S110 (a private torch API: fall back to MASTER_ADDR/PORT)
        pass
    host = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not host or not port:
        raise AxsaveError(
            "cannot find the process group's store to agree on a rendezvous port "
            "(no default store and no MASTER_ADDR/MASTER_PORT)"
        )
    return dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=60))


def _store_host(store) -> str | None:
    s = store
    for _ in range(8):
        host = getattr(s, "host", None)
        if host:
            return host
        s = getattr(s, "underlying_store", None)
        if s is None:
            break
    return os.environ.get("MASTER_ADDR")


def _reachable_ip(toward: str | None) -> str:
    """This host's address as seen on the route to ``toward`` (no packet is sent)."""
    if os.environ.get("AXSAVE_ADDR"):
        return os.environ["AXSAVE_ADDR"]
    if toward:
        try:
            family, _, _, _, addr = socket.getaddrinfo(toward, 1, proto=socket.IPPROTO_UDP)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(addr)
                ip = s.getsockname()[0]
                if ip and ip not in ("0.0.0.0", "::"):
                    return ip
        except OSError:
            pass
    return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


_LAUNCHER_VARS = (
    "TORCHELASTIC_RUN_ID",
    "SLURM_STEP_ID",
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
    "MV2_COMM_WORLD_RANK",
    "PMI_RANK",
    "RANK",
)


def _child_env(rendezvous_timeout: float) -> dict:
    """The binary's environment: this process's, with the rendezvous adjusted so the save's
    ranks meet without touching the training's own store keys or port."""
    env = dict(os.environ)
    n = next(_calls)
    run_id = env.get("TORCHELASTIC_RUN_ID")
    agent_store = run_id and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_store:
        # torchrun's agent hosts a store every rank reaches at MASTER_ADDR:MASTER_PORT; axsave
        # keeps its keys under axsave/<run id>/<restart>, so a run id of this save's own
        # keeps a second save in the same job from reading the first one's keys.
        env["TORCHELASTIC_RUN_ID"] = f"{run_id}.axsave-py{n}"
        return env
    dist = _torch_dist()
    if dist is None:
        # One process, or ranks started by a launcher with no process group of their own:
        # they meet as axsave processes would.
        return env
    # The training's rank 0 (or its store) holds MASTER_PORT: rank 0 picks a free port and
    # publishes it through the job's store (a key, no collective on the process group).
    store = _default_store(dist)
    key = f"axsave/py/{n}/endpoint"
    if dist.get_rank() == 0:
        endpoint = f"{_reachable_ip(_store_host(store))} {_free_port()} {secrets.token_hex(6)}"
        store.set(key, endpoint)
    else:
        try:
            store.wait([key], datetime.timedelta(seconds=rendezvous_timeout))
        except Exception as e:  # noqa: BLE001 (DistStoreError / RuntimeError on timeout)
            raise AxsaveError(
                f"rank 0 did not start its save within {rendezvous_timeout:g} s "
                f"(every rank must call axsave.save): {e}"
            ) from None
        endpoint = store.get(key).decode()
    addr, port, token = endpoint.split()
    env["MASTER_ADDR"] = addr
    env["MASTER_PORT"] = port
    if run_id:
        env["TORCHELASTIC_RUN_ID"] = f"{run_id}.axsave-py{n}"
    if not any(env.get(v) for v in _LAUNCHER_VARS):
        # e.g. torch.multiprocessing.spawn with init_method tcp://: the ranks are torch's.
        env["RANK"] = str(dist.get_rank())
        env["WORLD_SIZE"] = str(dist.get_world_size())
    env["AXSAVE_RUN_ID"] = f"py{n}-{token}"
    return env


# ---------------------------------------------------------------------------------------------
# Running the binary

_ERROR_LINE = re.compile(r"^\s*ERROR\s+(?:[\w-]+\{[^}]*\}:\s*)*(?P<msg>.*)$")
_FLAG_IN_TEXT = re.compile(r"--([a-z][a-z-]*)")


def _last_error(lines) -> str | None:
    for line in reversed(lines):
        m = _ERROR_LINE.match(line)
        if m and m.group("msg").strip():
            return m.group("msg").strip()
    return None


def _as_keywords(text: str) -> str:
    """``--max-shard-size: ...`` → ``max_shard_size: ...`` for the options ``save`` takes."""

    def sub(m):
        name = m.group(1).replace("-", "_")
        return name if name in OPTIONS or name in ("source", "output") else m.group(0)

    return _FLAG_IN_TEXT.sub(sub, text)


def run_binary(args: list, env: dict | None = None, stream: bool = True):
    """Runs ``axsave ARGS``; returns ``(returncode, stdout, last stderr lines)``.

    stderr is copied line by line to ``sys.stderr`` as it comes (``stream``). If this
    process is interrupted (KeyboardInterrupt, SystemExit), the binary gets SIGTERM (it then
    removes its temporaries) and is waited for before the exception goes on. If this process
    dies, even by SIGKILL, the binary gets SIGTERM too (``AXSAVE_PARENT_PID``, Linux), so a
    killed training job leaves no save running behind it.
    """
    env = dict(os.environ if env is None else env)
    env["AXSAVE_PARENT_PID"] = str(os.getpid())
    proc = subprocess.Popen(
        [binary_path(), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    tail: collections.deque = collections.deque(maxlen=200)

    def pump():
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            tail.append(line.rstrip("\r\n"))
            if stream:
                try:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                except Exception:  # noqa: BLE001, S110 (a closed sys.stderr must not break the save)
                    pass

    reader = threading.Thread(target=pump, name="axsave-stderr", daemon=True)
    reader.start()
    try:
        out = proc.stdout.read()
        code = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    return code, out.decode("utf-8", "replace"), list(tail)


def save(source: Any = None, output: Any = None, **options: Any) -> dict | None:
    """Save a checkpoint as Hugging Face safetensors, as ``axsave --source S --output O`` does.

    ``source`` and ``output`` are paths (``source`` may hold ``{rank}``, ``{local_rank}``,
    ``{node_rank}``); both may be left out when ``config`` (an Axolotl YAML) is given. The
    other keywords are the command line's options: ``config``, ``dtype`` ("keep", "bf16",
    "fp16", "fp32"; "bfloat16" and torch dtypes too), ``max_shard_size`` and
    ``memory_budget`` (``"2GB"``, ``"512MiB"`` or bytes), ``mode`` ("gather", "sharded"),
    ``transport`` ("auto", "nccl", "mpi", "tcp"), ``device``, ``workers``, ``timeout`` and
    ``rendezvous_timeout`` (seconds), ``force``, ``cleanup``, ``dry_run``, ``quiet``.

    Returns the ``--json`` summary (files with sizes and SHA-256, tensors, dtypes, seconds,
    world size, launcher) on rank 0, and ``None`` on every other rank, which writes its part
    (``mode="sharded"``) or sends the pieces only it can read but gets no summary. With
    ``dry_run=True`` rank 0 gets ``{"dry_run": True, "plan": <the printed plan>}``.

    Called in one process, it saves alone. Called on **every** rank of a running job, the
    ranks save together as ``axsave`` processes started by the same launcher would:

    * under torchrun, through the agent's store (a run id of this save's own keeps a
      second save in the same job apart from the first);
    * when a ``torch.distributed`` process group is initialized otherwise (srun, mpirun,
      ``torch.multiprocessing.spawn``), rank 0 picks a free port and publishes it with one
      key in the group's store; the other ranks wait for that key for at most
      ``rendezvous_timeout`` seconds. No collective runs on the process group, so a rank
      that never calls ``save`` cannot hang the training's group; it makes the others raise
      after ``rendezvous_timeout``.
    * with a launcher but no process group, through the launcher's variables and
      ``MASTER_ADDR``/``MASTER_PORT``, exactly like the binary.

    A failure on any rank makes ``save`` raise :class:`AxsaveError` on every rank within
    ``timeout`` seconds (default 60) once the ranks have met. Every rank must call ``save``
    the same number of times with the same arguments. Logs go to ``sys.stderr`` as they come.

    Raises TypeError for an unknown keyword, ValueError for a bad value (naming it), and
    AxsaveError when the save fails (with axsave's one-line error, e.g. the damaged file
    and byte offset; nothing final-named is left in ``output`` then).
    """
    args = build_args(source, output, **options)
    rendezvous = options.get("rendezvous_timeout")
    rendezvous_s = float(_check_seconds("rendezvous_timeout", rendezvous)) if rendezvous else 300.0
    env = _child_env(rendezvous_s) if not options.get("dry_run") else dict(os.environ)
    code, out, tail = run_binary(args, env)
    if code == 0:
        text = out.strip()
        if not text:
            return None
        if options.get("dry_run"):
            return {"dry_run": True, "plan": out}
        try:
            return json.loads(text)
        except ValueError:
            raise AxsaveError(
                f"axsave printed no JSON summary: {text[:200]!r}", code, "\n".join(tail)
            ) from None
    message = _last_error(tail)
    if code == 2:
        raise ValueError(_as_keywords(message or "axsave rejected its arguments"))
    if message is None:
        if code < 0:
            message = f"axsave was killed by signal {-code}"
        else:
            message = f"axsave exited with code {code}"
            if tail:
                message += f": {tail[-1]}"
    raise AxsaveError(message, code, "\n".join(tail))
