"""``axsave.save`` inside real torch.distributed jobs, the Trainer callback and the Axolotl
plugin. They need a python with torch, transformers and Axolotl: AXSAVE_TEST_PYTHON
(CI has none; every test here then skips, saying why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import (
    ROOT,
    all_names,
    clean_env,
    final_named,
    free_port,
    read_safetensors,
)

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
    r = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-6000:] + r.stderr[-6000:])
    return r


def _results(work, n=3):
    return [json.loads((work / f"result{r}.json").read_text()) for r in range(n)]


def _torchrun(py, work, mode):
    port = str(free_port())
    return _run(
        [
            py,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "3",
            "--master-port",
            port,
            str(JOBS / "dcp_job.py"),
            str(ROOT / "python"),
            str(work),
            mode,
        ]
    )


def _env_launched(py, work, mode):
    """Three ranks with the variables an srun script exports (the training's rank 0 hosts
    its own store on MASTER_PORT, so axsave must not take that port)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [py, str(JOBS / "dcp_job.py"), str(ROOT / "python"), str(work), mode, "env"],
            env=_env(
                RANK=str(r),
                WORLD_SIZE="3",
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE="3",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
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


def test_callback_turns_the_final_checkpoint_into_the_model(py, tmp_path):
    r = _run([py, str(JOBS / "trainer_job.py"), str(ROOT / "python"), str(tmp_path)])
    assert r.returncode == 0
    res = json.loads((tmp_path / "result.json").read_text())
    # save_steps=2 of 5 steps: the callback had the Trainer save the last step too.
    assert res["source"] == str(tmp_path / "run" / "checkpoint-5")
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-5", "model.safetensors", "config.json"} <= set(
        res["files"]
    )
    s = res["summary"]
    assert s["dtype"] == {"BF16": 21} and s["world_size"] == 1
    got = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert got == (tmp_path / "reference.safetensors").read_bytes()
    assert res["matches_live_model"] is True
    assert res["config_architectures"] == ["LlamaForCausalLM"]


AXOLOTL_CFG = """\
base_model: ./base
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
plugins:
  - axsave.integrations.axolotl.AxsavePlugin
datasets:
  - path: ./data.jsonl
    type: completion
dataset_prepared_path: ./prepared
val_set_size: 0.0
output_dir: ./out
sequence_len: 32
sample_packing: false
micro_batch_size: 1
gradient_accumulation_steps: 1
max_steps: 3
save_steps: 2
optimizer: adamw_torch
lr_scheduler: constant
learning_rate: 1e-3
bf16: false
fp16: false
tf32: false
logging_steps: 1
special_tokens:
  bos_token: "<s>"
  eos_token: "</s>"
  pad_token: "<pad>"
axsave:
  max_shard_size: 5GB
fsdp_version: 2
fsdp_config:
  offload_params: false
  cpu_ram_efficient_loading: false
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  state_dict_type: SHARDED_STATE_DICT
  final_state_dict_type: SHARDED_STATE_DICT
  reshard_after_forward: true
"""


def test_axolotl_plugin_saves_a_two_rank_fsdp2_run_through_axsave(py, tmp_path):
    import random
    import shutil

    from conftest import FIXTURES

    shutil.copytree(FIXTURES / "axolotl" / "base", tmp_path / "base")
    rnd = random.Random(0)
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "then",
        "ran",
        "to",
        "the",
        "dog",
        "who",
        "was",
        "very",
        "happy",
        "about",
        "it",
    ]
    (tmp_path / "data.jsonl").write_text(
        "".join(
            json.dumps({"text": " ".join(rnd.choice(words) for _ in range(12))}) + "\n" for _ in range(40)
        )
    )
    (tmp_path / "cfg.yml").write_text(AXOLOTL_CFG)
    env = _env(
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT / "python"),
        PATH=os.path.dirname(py) + os.pathsep + os.environ.get("PATH", ""),
    )
    port = str(free_port())
    r = subprocess.run(
        [
            py,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            str(JOBS / "axolotl_cpu_fsdp.py"),
            "cfg.yml",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-8000:]
    out = tmp_path / "out"
    assert "Plugin loaded successfully: axsave.integrations.axolotl.AxsavePlugin" in log
    # The save went through axsave, on both ranks, from the DCP the trainer wrote of the live model.
    assert "2 ranks (torchrun), gather mode" in log
    assert f"reading {out}/pytorch_model_fsdp_0 (the final save)" in log.replace("/./", "/")
    assert not (out / "merged").exists()  # Axolotl's own in-memory merge did not run
    ref = tmp_path / "reference.safetensors"
    assert _run([py, str(JOBS / "reference.py"), str(out / "pytorch_model_fsdp_0"), str(ref)]).returncode == 0
    assert (out / "model.safetensors").read_bytes() == ref.read_bytes()
    # The last checkpoint holds the same weights (the run ended on a save step).
    ref3 = tmp_path / "reference3.safetensors"
    assert (
        _run(
            [py, str(JOBS / "reference.py"), str(out / "checkpoint-3" / "pytorch_model_fsdp_0"), str(ref3)]
        ).returncode
        == 0
    )
    assert ref3.read_bytes() == ref.read_bytes()
    # bf16: false → fp32 kept (Axolotl 0.21's merge would have written bf16).
    assert {v[0] for v in read_safetensors(out / "model.safetensors").values()} == {"F32"}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").exists()


def test_callback_under_a_two_rank_fsdp2_trainer_run(py, tmp_path):
    port = str(free_port())
    r = _run(
        [
            py,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            str(JOBS / "trainer_fsdp_job.py"),
            str(ROOT / "python"),
            str(tmp_path),
        ]
    )
    assert r.returncode == 0
    res = json.loads((tmp_path / "result.json").read_text())
    run = tmp_path / "run"
    assert res["fsdp"] is True
    assert res["source"] == str(run / "checkpoint-5" / "pytorch_model_fsdp_0")
    s = res["summary"]
    assert s["world_size"] == 2 and s["launcher"] == "torchrun" and s["dtype"] == {"F32": 21}
    ref = tmp_path / "reference.safetensors"
    assert _run([py, str(JOBS / "reference.py"), res["source"], str(ref)]).returncode == 0
    assert (run / "model.safetensors").read_bytes() == ref.read_bytes()
    assert json.loads((run / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
