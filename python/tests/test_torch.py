"""``axsave.save`` inside real torch.distributed jobs, the Trainer callback and the Axolotl
plugin. They need a python with torch, transformers and Axolotl: AXSAVE_TEST_PYTHON
(CI has none; every test here then skips, saying why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, all_names, clean_env, final_named, free_port, read_safetensors

JOBS = ROOT / "python" / "tests" / "jobs"
PYTHON = os.environ.get("AXSAVE_TEST_PYTHON")


@pytest.fixture
def py():
    if not PYTHON:
        pytest.skip("AXSAVE_TEST_PYTHON is not set (a python with torch, transformers and axolotl)")
    return PYTHON


def _env(**extra):
    env = clean_env(dict(os.environ))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(cmd, timeout=600, env=None):
    r = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-6000:] + r.stderr[-6000:])
    return r


def _results(work, n=3):
    return [json.loads((work / f"result{r}.json").read_text()) for r in range(n)]


def _torchrun(py, work, mode):
    port = str(free_port())
    return _run([py, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", port,
                 str(JOBS / "dcp_job.py"), str(ROOT / "python"), str(work), mode])


def _env_launched(py, work, mode):
    """Three ranks with the variables an srun script exports (the training's rank 0 hosts
    its own store on MASTER_PORT, so axsave must not take that port)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [py, str(JOBS / "dcp_job.py"), str(ROOT / "python"), str(work), mode, "env"],
            env=_env(RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="3",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(3)
    ]
    return [p.wait(timeout=600) for p in procs]


def _check_ok(work, launcher):
    res = _results(work)
    for r in res:
        assert r["all_reduce"] == 6.0  # the job's own process group still works
    s = res[0]["summary"]
    assert s["world_size"] == 3 and s["launcher"] == launcher and s["mode"] == "gather"
    assert res[1]["summary"] is None and res[2]["summary"] is None
    # gather mode: byte for byte what torch's own consolidation + save_file give
    assert (work / "out" / "model.safetensors").read_bytes() == (work / "reference.safetensors").read_bytes()
    assert all_names(work / "out") == ["model.safetensors"]
    # the second save of the job: sharded over the ranks, bf16, split at 600 bytes
    sb = res[0]["summary_bf16"]
    assert sb["mode"] == "sharded" and sb["dtype"].get("BF16") == 13 and "F32" not in sb["dtype"]
    assert len(sb["files"]) >= 4
    got = read_safetensors(work / "out_bf16")
    want = read_safetensors(work / "reference_bf16.safetensors")
    assert got == want


def test_torchrun_job_saves_on_every_rank(py, tmp_path):
    r = _torchrun(py, tmp_path, "ok")
    assert r.returncode == 0
    _check_ok(tmp_path, "torchrun")


def test_env_launched_job_saves_on_a_port_of_its_own(py, tmp_path):
    assert _env_launched(py, tmp_path, "ok") == [0, 0, 0]
    _check_ok(tmp_path, "env")


def test_spawned_job_saves_without_launcher_variables(py, tmp_path):
    r = _run([py, str(JOBS / "dcp_job.py"), str(ROOT / "python"), str(tmp_path), "ok", "spawn"])
    assert r.returncode == 0
    _check_ok(tmp_path, "env")


def _check_failed(work):
    res = _results(work)
    for r in res:
        assert r["raised"] is not None, r
        assert "node1/__1_0.distcp" in r["raised"] and "past the end of the file" in r["raised"], r
        assert r["code"] == 1
        assert r["seconds"] < 10 + 5, r  # within --timeout (10 s) of the failure
        assert r["all_reduce"] == 3.0
    assert res[1]["raised"].startswith("/") and res[0]["raised"].startswith("rank 1 failed: ")
    assert final_named(work / "out") == [] and all_names(work / "out") == []


def test_torchrun_one_rank_failing_makes_every_rank_raise(py, tmp_path):
    r = _torchrun(py, tmp_path, "fail")
    assert r.returncode == 0
    _check_failed(tmp_path)


def test_env_launched_one_rank_failing_makes_every_rank_raise(py, tmp_path):
    assert _env_launched(py, tmp_path, "fail") == [0, 0, 0]
    _check_failed(tmp_path)
