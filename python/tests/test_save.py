"""``axsave.save`` without torch: one process, several processes started like a launcher
would, bad options and damaged checkpoints. Runs in CI (needs only pytest and the binary)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import axsave
import pytest
from axsave import api
from conftest import FIXTURES, ROOT, all_names, clean_env, final_named, free_port

DCP = FIXTURES / "dcp"


def test_import_axsave_imports_no_torch():
    code = (
        "import sys, axsave; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("fixture", ["fsdp_w2", "fsdp_w4", "hf_w2"])
def test_one_process_save_is_byte_identical_to_torch(tmp_path, fixture):
    out = tmp_path / "out"
    summary = axsave.save(DCP / fixture / "checkpoint", out)
    ref = (DCP / fixture / "reference.safetensors").read_bytes()
    got = (out / "model.safetensors").read_bytes()
    assert got == ref
    assert all_names(out) == ["model.safetensors"]
    assert summary["world_size"] == 1 and summary["launcher"] == "single"
    [f] = summary["files"]
    assert f["size"] == len(ref)
    assert f["sha256"] == hashlib.sha256(ref).hexdigest()
    expected = json.loads((DCP / fixture / "expected.json").read_text())
    assert summary["tensors"] == len(expected["tensors"])


def test_options_reach_the_binary(tmp_path):
    out = tmp_path / "out"
    summary = axsave.save(
        source=str(DCP / "fsdp_w2" / "checkpoint"),
        output=out,
        dtype="bfloat16",
        max_shard_size=1000,
        memory_budget="1MiB",
        workers=2,
        timeout=datetime.timedelta(seconds=30),
        quiet=True,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(n.startswith("model-0000") for n in shards)
    assert sorted(f["path"].rsplit("/", 1)[1] for f in summary["files"]) == sorted(
        shards + ["model.safetensors.index.json"]
    )
    # Floats became bf16; integers and bools kept theirs.
    assert "F32" not in summary["dtype"] and "F16" not in summary["dtype"]
    assert summary["dtype"]["BF16"] == 11 and summary["dtype"]["I64"] == 2
    # An existing model needs force=True.
    with pytest.raises(axsave.AxsaveError) as e:
        axsave.save(DCP / "fsdp_w2" / "checkpoint", out)
    assert e.value.returncode == 1 and "force" in str(e.value)
    again = axsave.save(DCP / "fsdp_w2" / "checkpoint", out, force=True)
    assert [f["path"].rsplit("/", 1)[1] for f in again["files"]] == ["model.safetensors"]
    assert final_named(out) == ["model.safetensors"]


def test_dry_run_returns_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = axsave.save(DCP / "fsdp_w2" / "checkpoint", out, dry_run=True)
    assert result["dry_run"] is True
    assert "would write model.safetensors (3402 bytes, 21 tensors)" in result["plan"]
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_shard_sze": "2GB"}, "max_shard_sze"),
        ({"json": True}, "json"),
        ({"output_dir": "x"}, "output_dir"),
    ],
)
def test_unknown_option_is_a_type_error_naming_it(tmp_path, kwargs, name):
    with pytest.raises(TypeError, match=repr(name)):
        axsave.save(DCP / "fsdp_w2" / "checkpoint", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"dtype": "bf17"}, "dtype"),
        ({"mode": "scatter"}, "mode"),
        ({"transport": "ib"}, "transport"),
        ({"max_shard_size": "2XB"}, "max_shard_size"),
        ({"max_shard_size": -1}, "max_shard_size"),
        ({"memory_budget": "1.2.3MB"}, "memory_budget"),
        ({"workers": 0}, "workers"),
        ({"workers": "4"}, "workers"),
        ({"device": -1}, "device"),
        ({"timeout": 0}, "timeout"),
        ({"rendezvous_timeout": "soon"}, "rendezvous_timeout"),
        ({"force": "yes"}, "force"),
        ({"dry_run": 1}, "dry_run"),
        ({"config": 5}, "config"),
    ],
)
def test_bad_value_is_a_value_error_naming_it(tmp_path, kwargs, name):
    with pytest.raises(ValueError) as e:
        axsave.save(DCP / "fsdp_w2" / "checkpoint", tmp_path / "out", **kwargs)
    assert str(e.value).startswith(name + ":"), str(e.value)
    assert not (tmp_path / "out").exists()


def test_value_only_the_binary_rejects_is_a_value_error_naming_it(tmp_path):
    # Well-formed, so it passes the Python check; the binary finds it too large (exit 2).
    with pytest.raises(ValueError) as e:
        axsave.save(DCP / "fsdp_w2" / "checkpoint", tmp_path / "out", max_shard_size="99999999999999999999TB")
    assert str(e.value).startswith("max_shard_size: invalid size"), str(e.value)
    assert "too large" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_source_and_output_are_required_without_config(tmp_path):
    with pytest.raises(ValueError, match="^output: required unless config is given"):
        axsave.save(DCP / "fsdp_w2" / "checkpoint")


def test_damaged_checkpoint_raises_with_file_and_offset_and_leaves_nothing(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DCP / "fsdp_w2" / "checkpoint", ckpt)
    victim = ckpt / "__0_0.distcp"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(axsave.AxsaveError) as e:
        axsave.save(ckpt, out)
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert e.value.returncode == 1
    assert "__0_0.distcp" in msg and "bytes" in msg and "past the end of the file" in msg, msg
    assert "\n" not in msg
    assert msg in e.value.stderr
    assert all_names(out) == []  # no final-named file, no temporary either


def test_missing_checkpoint_raises_naming_it(tmp_path):
    with pytest.raises(axsave.AxsaveError, match="nonexistent: no checkpoint found"):
        axsave.save(tmp_path / "nonexistent", tmp_path / "out")
    assert all_names(tmp_path / "out") == []


def test_missing_binary_is_file_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("AXSAVE_BIN", str(tmp_path / "no-such-axsave"))
    with pytest.raises(FileNotFoundError, match="AXSAVE_BIN"):
        axsave.save(DCP / "fsdp_w2" / "checkpoint", tmp_path / "out")


def test_error_line_parsing():
    lines = [
        " INFO rank{r=0}: starting",
        "ERROR rank{r=1}: rank 2 failed: ckpt/__2_0.distcp: truncated at byte 12",
        "   ",
    ]
    assert api._last_error(lines) == "rank 2 failed: ckpt/__2_0.distcp: truncated at byte 12"
    assert api._last_error(["ERROR plain message"]) == "plain message"
    assert api._last_error(["INFO nothing"]) is None
    assert (
        api._as_keywords("--max-shard-size: bad, --unknown-flag stays")
        == "max_shard_size: bad, --unknown-flag stays"
    )


def test_torchrun_saves_get_their_own_store_keys(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    first = api._child_env(300)["TORCHELASTIC_RUN_ID"]
    second = api._child_env(300)["TORCHELASTIC_RUN_ID"]
    assert first.startswith("job7.axsave-py") and second.startswith("job7.axsave-py")
    assert first != second
    assert os.environ["TORCHELASTIC_RUN_ID"] == "job7"  # the training's own env is untouched


RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import axsave
    RENDEZVOUS = float(sys.argv[6])
    source, output, result, skip = sys.argv[2:6]
    if skip == "1":
        sys.exit(3)  # this rank dies before it calls save
    t0 = time.monotonic()
    try:
        r = axsave.save(source, output, timeout=10, rendezvous_timeout=RENDEZVOUS, quiet=True)
        out = {"ok": r}
    except axsave.AxsaveError as e:
        out = {"error": str(e), "code": e.returncode}
    out["seconds"] = time.monotonic() - t0
    open(result, "w").write(json.dumps(out))
    """
)


def _ranks(tmp_path, n, source, output, dead=None, rendezvous=60):
    """n Python processes, each calling axsave.save with the variables a launcher sets (rank
    ``dead`` exits with code 3 instead)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(free_port())
    procs = []
    for r in range(n):
        env = clean_env(dict(os.environ))
        env.update(
            RANK=str(r),
            WORLD_SIZE=str(n),
            LOCAL_RANK=str(r),
            LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            AXSAVE_RUN_ID=f"pytest-{port}",
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(ROOT / "python"),
                    str(source),
                    str(output),
                    str(tmp_path / f"result{r}.json"),
                    "1" if r == dead else "0",
                    str(rendezvous),
                ],
                env=env,
            )
        )
    for r, p in enumerate(procs):
        assert p.wait(timeout=120) == (3 if r == dead else 0)
    return [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(n) if r != dead]


def test_three_ranks_save_together_like_axsave_processes(tmp_path):
    out = tmp_path / "out"
    results = _ranks(tmp_path, 3, DCP / "fsdp_w4" / "checkpoint", out)
    assert "error" not in results[0], results
    assert results[0]["ok"]["world_size"] == 3 and results[0]["ok"]["launcher"] == "env"
    assert results[1]["ok"] is None and results[2]["ok"] is None
    assert (out / "model.safetensors").read_bytes() == (
        DCP / "fsdp_w4" / "reference.safetensors"
    ).read_bytes()


def test_one_rank_failing_makes_every_rank_raise(tmp_path):
    # Node-local disks: rank r sees only the metadata and its own __r_0.distcp (rank 3's
    # file is on rank 2's disk too), and rank 1's file is truncated: only rank 1 meets the
    # damage, the others learn of it from rank 1.
    src = DCP / "fsdp_w4" / "checkpoint"
    for r in range(3):
        node = tmp_path / f"node{r}"
        node.mkdir()
        shutil.copy(src / ".metadata", node)
        for w in [r] if r < 2 else [2, 3]:
            shutil.copy(src / f"__{w}_0.distcp", node)
    victim = tmp_path / "node1" / "__1_0.distcp"
    victim.write_bytes(victim.read_bytes()[:100])
    out = tmp_path / "out"
    started = time.monotonic()
    results = _ranks(tmp_path, 3, str(tmp_path / "node{rank}"), out)
    elapsed = time.monotonic() - started
    for r, res in enumerate(results):
        assert "error" in res, (r, res)
        assert res["code"] == 1
    assert "__1_0.distcp" in results[1]["error"], results
    assert all("__1_0.distcp" in res["error"] for res in results), results
    assert elapsed < 60, elapsed
    assert final_named(out) == [] and all_names(out) == []


def test_a_rank_that_never_calls_save_makes_the_others_raise(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    results = _ranks(tmp_path, 3, DCP / "fsdp_w4" / "checkpoint", out, dead=1, rendezvous=5)
    assert time.monotonic() - started < 60
    for res in results:
        assert "error" in res and res["code"] == 1, res
        assert res["seconds"] < 5 + 10, res
    assert all_names(out) == []


def _processes_with(marker: str) -> list:
    """Pids of live processes whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmd and "python" not in cmd.split(" ")[0]:
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the binary's process")
def test_interrupting_save_stops_the_binary(tmp_path):
    # Rank 0 of 2 waits for a rank 1 that never comes; Ctrl-C (SIGINT) on the Python process
    # must stop the binary (SIGTERM, waited for) before KeyboardInterrupt goes on.
    import signal

    out = tmp_path / "interrupted-out"
    script = tmp_path / "wait.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            sys.path.insert(0, sys.argv[1])
            import axsave
            try:
                axsave.save(sys.argv[2], sys.argv[3], rendezvous_timeout=120, quiet=True)
            except KeyboardInterrupt:
                sys.exit(42)
            """
        )
    )
    env = clean_env(dict(os.environ))
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = subprocess.Popen(
        [sys.executable, str(script), str(ROOT / "python"), str(DCP / "fsdp_w2" / "checkpoint"), str(out)],
        env=env,
    )
    deadline = time.monotonic() + 30
    while not _processes_with(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(str(out)), "the binary did not start"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    try:
        assert p.wait(timeout=30) == 42
        assert _processes_with(str(out)) == []
    finally:
        if p.poll() is None:
            p.kill()
        for pid in _processes_with(str(out)):  # only the binary this test started
            os.kill(pid, signal.SIGKILL)
    assert final_named(out) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_the_python_process_stops_the_binary(tmp_path):
    # SIGKILL leaves Python no chance to stop the binary itself: the binary must notice its
    # parent's death (AXSAVE_PARENT_PID → PR_SET_PDEATHSIG) and cancel as on SIGTERM.
    import signal

    out = tmp_path / "killed-out"
    script = tmp_path / "wait.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            sys.path.insert(0, sys.argv[1])
            import axsave
            axsave.save(sys.argv[2], sys.argv[3], rendezvous_timeout=120, quiet=True)
            """
        )
    )
    env = clean_env(dict(os.environ))
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = subprocess.Popen(
        [sys.executable, str(script), str(ROOT / "python"), str(DCP / "fsdp_w2" / "checkpoint"), str(out)],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not _processes_with(str(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_with(str(out)), "the binary did not start"
        time.sleep(0.5)
        p.kill()
        p.wait(timeout=10)
        # The binary cancels within its grace period (a rank stuck joining: about 4 s).
        deadline = time.monotonic() + 20
        while _processes_with(str(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_with(str(out)) == [], "the binary outlived the Python process that started it"
    finally:
        if p.poll() is None:
            p.kill()
        for pid in _processes_with(str(out)):  # only the binary this test started
            os.kill(pid, signal.SIGKILL)
    assert final_named(out) == []
    left = sorted(os.listdir(out)) if out.exists() else []
    assert [n for n in left if ".tmp" in n or n.startswith(".axsave-")] == [], left
