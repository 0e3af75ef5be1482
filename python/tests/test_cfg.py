"""How ``save_trained_model`` hands the run's config to the binary (needs PyYAML, not torch)."""

from __future__ import annotations

import enum
import os
import pathlib

import axsave
import pytest
from axsave import trained
from conftest import FIXTURES, all_names

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install pyyaml)")


class Kind(enum.Enum):
    FULL = "full"


class FakeDtype:
    def __str__(self):
        return "torch.bfloat16"


def test_a_dict_cfg_becomes_a_temporary_yaml_of_plain_values(tmp_path):
    cfg = {
        "output_dir": pathlib.Path("out"),
        "bf16": True,
        "torch_dtype": FakeDtype(),
        "kind": Kind.FULL,
        "axsave": {"max_shard_size": "5GB"},
        "datasets": [{"path": "d.jsonl", "type": "completion"}],
    }
    with trained.config_file(cfg) as (path, data):
        assert data["bf16"] is True
        written = yaml.safe_load(pathlib.Path(path).read_text())
        assert written == {
            "output_dir": "out",
            "bf16": True,
            "torch_dtype": "torch.bfloat16",
            "kind": "full",
            "axsave": {"max_shard_size": "5GB"},
            "datasets": [{"path": "d.jsonl", "type": "completion"}],
        }
    assert not os.path.exists(path)


def test_a_path_cfg_is_used_as_it_is(tmp_path):
    p = tmp_path / "cfg.yml"
    p.write_text("output_dir: ./o\nbf16: false\n")
    with trained.config_file(str(p)) as (path, data):
        assert path == str(p) and data == {"output_dir": "./o", "bf16": False}


def test_a_bad_cfg_is_refused(tmp_path):
    p = tmp_path / "cfg.yml"
    p.write_text("- a list\n")
    with pytest.raises(ValueError, match="does not hold a YAML mapping"):
        trained.load_cfg(p)
    with pytest.raises(TypeError, match="cfg: expected a dict"):
        trained.load_cfg(42)


def test_save_with_a_config_written_from_a_dict(tmp_path, monkeypatch):
    # The Axolotl fixture's FSDP2 full fine-tune: cfg as a dict (what a DictDefault is), bf16.
    import shutil

    root = tmp_path / "axolotl"
    shutil.copytree(FIXTURES / "axolotl", root)
    monkeypatch.chdir(root)
    cfg = yaml.safe_load((root / "cfg_fft.yml").read_text())
    with trained.config_file(cfg) as (path, _):
        summary = axsave.save(config=path)
    assert summary["dtype"] == {"BF16": 21}
    out = root / "fft_fsdp"
    ref = root / "reference" / "fft_fsdp" / "model.safetensors"
    assert (out / "model.safetensors").read_bytes() == ref.read_bytes()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert name in all_names(out)
