#!/usr/bin/env python3
"""Writes a large benchmark checkpoint quickly: a Llama-shaped model saved with
torch.distributed.checkpoint from N gloo ranks as FSDP2 DTensors sharded on dim 0, nested as
Accelerate does ({"model": state_dict}).

Unlike make_checkpoint.py, no rank ever builds the full model: each rank draws only its own rows
(seeded by tensor name and rank), so a checkpoint of many GB needs about 1/N of it per rank.
Sizes: every layer holds 16 * hidden^2 elements, the embedding and lm_head 32000 * hidden each. With
the defaults (hidden 4096, 15 layers, bf16) that is 8.6 GB.

Usage: make_large_checkpoint.py OUT_DIR [--layers 15] [--hidden 4096] [--ranks 8] [--dtype bf16|fp32]
"""
import argparse
import os
import sys
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def shapes(layers: int, hidden: int) -> dict:
    out = {"model.embed_tokens.weight": (32000, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{n}.weight"] = (hidden, hidden)
        for n in ("gate_proj", "up_proj"):
            out[f"{p}.mlp.{n}.weight"] = (4 * hidden, hidden)
        out[f"{p}.mlp.down_proj.weight"] = (hidden, 4 * hidden)
        out[f"{p}.input_layernorm.weight"] = (hidden,)
        out[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (32000, hidden)
    return out


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(args.port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    dtype = DTYPES[args.dtype]
    sd = {}
    for name, shape in shapes(args.layers, args.hidden).items():
        rows = shape[0]
        per = -(-rows // world)
        lo, hi = min(rank * per, rows), min((rank + 1) * per, rows)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 64 + rank)
        local = torch.randn((hi - lo,) + tuple(shape[1:]), generator=g).to(dtype)
        sd[name] = DTensor.from_local(
            local,
            mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size(shape),
            stride=torch.empty(shape, device="meta").stride(),
        )
    dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(args.out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--port", type=int, default=29563)
    args = ap.parse_args()
    mp.start_processes(worker, args=(args.ranks, args), nprocs=args.ranks, start_method="spawn")
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {total / 1e9:.2f} GB in {len(os.listdir(args.out))} files", file=sys.stderr)


if __name__ == "__main__":
    main()
