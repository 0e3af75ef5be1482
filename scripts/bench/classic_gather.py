#!/usr/bin/env python3
"""The classic gather, as FSDP's FULL_STATE_DICT save does it on CPU: every rank loads its
DTensor shards with DCP, then for each tensor every rank calls full_tensor() (an all-gather) and
rank 0 keeps the full copy; rank 0 finally writes everything with safetensors' save_file.

Run under torchrun with gloo:  torchrun --nproc-per-node 4 classic_gather.py CKPT_DIR OUT_FILE
"""
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor import empty as dtensor_empty


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    meta = dcp.FileSystemReader(ckpt).read_metadata()
    sd = {}
    for fqn, m in meta.state_dict_metadata.items():
        if not hasattr(m, "size"):
            continue  # non-tensor items
        key = fqn.removeprefix("model.")
        sd[key] = dtensor_empty(*m.size, dtype=m.properties.dtype, device_mesh=mesh, placements=[Shard(0)])
    dcp.load({"model": sd}, storage_reader=dcp.FileSystemReader(ckpt))
    full = {}
    for key, t in sd.items():
        f = t.full_tensor()
        if dist.get_rank() == 0:
            full[key] = f
    if dist.get_rank() == 0:
        save_file(full, out, metadata={"format": "pt"})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
