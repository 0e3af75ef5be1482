#!/usr/bin/env python3
"""Writes the benchmark checkpoint: a Llama-shaped model (8 layers, hidden 2048, bf16) saved
with torch.distributed.checkpoint from 4 gloo ranks as FSDP2 DTensors sharded on dim 0, nested
as Accelerate does ({"model": state_dict}). About 0.8 GB.

Usage: make_checkpoint.py OUT_DIR [--layers 8] [--hidden 2048] [--ranks 4]
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor


def full_state_dict(layers: int, hidden: int) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(8192, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}.self_attn.{n}.weight"] = torch.randn(hidden, hidden, generator=g)
        sd[f"{p}.mlp.up_proj.weight"] = torch.randn(4 * hidden, hidden, generator=g)
        sd[f"{p}.mlp.down_proj.weight"] = torch.randn(hidden, 4 * hidden, generator=g)
        sd[f"{p}.input_layernorm.weight"] = torch.ones(hidden)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


def worker(rank: int, world: int, out: str, layers: int, hidden: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full_state_dict(layers, hidden).items()}
    dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--port", type=int, default=29561)
    a = ap.parse_args()
    mp.spawn(worker, args=(a.ranks, a.out, a.layers, a.hidden, a.port), nprocs=a.ranks)
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"wrote {a.out}: {total / 1e9:.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
