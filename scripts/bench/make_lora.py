#!/usr/bin/env python3
"""Writes a Llama-shaped bf16 base (config.json + model.safetensors) and a LoRA adapter for it
(adapter_config.json by PEFT's LoraConfig, adapter_model.safetensors with random fp32 A and B on
every projection), for the merge-lora row of scripts/bench.sh.

Usage: make_lora.py DIR --layers N --hidden H [--rank R]
Writes DIR/base and DIR/adapter. Values are random (torch.manual_seed(0)); the names and shapes
are what LlamaForCausalLM and get_peft_model give.
"""
import argparse
from pathlib import Path

import torch
import transformers
import peft
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 256,
        tie_word_embeddings=False, dtype="bfloat16",
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    base = a.dir / "base"
    base.mkdir(parents=True, exist_ok=True)
    sd = {k: (torch.randn(v.shape) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lcfg = peft.LoraConfig(task_type="CAUSAL_LM", r=a.rank, lora_alpha=2 * a.rank, target_modules=targets)
    adapter = a.dir / "adapter"
    lcfg.save_pretrained(adapter)
    ad = {}
    for k, v in model.state_dict().items():
        mod = k.removesuffix(".weight")
        if mod.split(".")[-1] in targets:
            out_f, in_f = v.shape
            ad[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(a.rank, in_f) * 0.02
            ad[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(out_f, a.rank) * 0.02
    save_file(ad, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in sd.values())
    print(f"base {size / 1e9:.2f} GB, adapter {len(ad)} tensors (r {a.rank})")


if __name__ == "__main__":
    main()
