"""A tiny FSDP2 training job on CPU (gloo) that writes its DCP checkpoint and then calls
``axsave.save`` on every rank, as a training script would at its end.

Usage: python dcp_job.py PKGDIR WORKDIR MODE [torchrun|env|spawn]
MODE: ``ok`` (two saves in the same job, compared by rank 0 with torch's own consolidation)
or ``fail`` (node-local sources, rank 1's file truncated: every rank's save must raise).
Each rank writes WORKDIR/result<rank>.json. ``torchrun``: started by torchrun (agent store);
``env``: started with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as srun scripts do (the training's
rank 0 hosts its store on MASTER_PORT); ``spawn``: torch.multiprocessing.spawn with a tcp://
init method (no launcher variables at all).
"""

import json
import os
import shutil
import sys
import time


def build_model(torch):
    torch.manual_seed(0)
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(16, 16)
            self.mlp = nn.Linear(16, 10, bias=False)  # 10 rows: uneven over 3 ranks
            self.norm = nn.LayerNorm(10)

        def forward(self, x):
            return self.norm(self.mlp(torch.relu(self.attn(x))))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 16)  # 7 rows: uneven over 3 ranks
            self.layers = nn.ModuleList([Block(), Block()])
            self.layers[1].attn = nn.Linear(16, 16)
            self.head = nn.Linear(10, 5)
            self.register_buffer("position_ids", torch.arange(12))

        def forward(self, idx):
            h = self.embed(idx)
            out = self.layers[0](h)
            return self.head(out)

    return Tiny()


def train_and_checkpoint(torch, dist, ckpt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_model(torch)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        idx = torch.randint(0, 7, (4, 3), generator=gen)
        loss = model(idx).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    sd = get_model_state_dict(model)
    dcp.save({"model": sd}, checkpoint_id=ckpt)


def reference(torch, ckpt, out_file, dtype=None):
    """torch's own consolidation: dcp_to_torch_save, then safetensors' save_file."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    pt = out_file + ".pt"
    dcp_to_torch_save(ckpt, pt)
    sd = torch.load(pt, weights_only=False)["model"]
    os.unlink(pt)
    tensors = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    save_file(tensors, out_file, metadata={"format": "pt"})


def job(pkgdir, work, mode):
    sys.path.insert(0, pkgdir)
    import axsave
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    ckpt = os.path.join(work, "ckpt")
    train_and_checkpoint(torch, dist, ckpt)
    result = {"rank": rank, "world_size": dist.get_world_size()}
    if mode == "ok":
        t0 = time.monotonic()
        result["summary"] = axsave.save(ckpt, os.path.join(work, "out"), timeout=30)
        # A second save in the same job: its rendezvous keys must not meet the first one's.
        result["summary_bf16"] = axsave.save(
            ckpt,
            os.path.join(work, "out_bf16"),
            dtype=torch.bfloat16,
            mode="sharded",
            max_shard_size=600,
            timeout=30,
        )
        result["seconds"] = time.monotonic() - t0
        if rank == 0:
            reference(torch, ckpt, os.path.join(work, "reference.safetensors"))
            reference(torch, ckpt, os.path.join(work, "reference_bf16.safetensors"), torch.bfloat16)
        # The training's own process group still works after the saves.
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        result["all_reduce"] = t.item()
    else:
        # Node-local disks: each rank sees the metadata and its own data file; rank 1's is cut.
        node = os.path.join(work, f"node{rank}")
        os.makedirs(node)
        shutil.copy(os.path.join(ckpt, ".metadata"), node)
        mine = os.path.join(ckpt, f"__{rank}_0.distcp")
        shutil.copy(mine, node)
        if rank == 1:
            victim = os.path.join(node, f"__{rank}_0.distcp")
            with open(victim, "r+b") as f:
                f.truncate(os.path.getsize(victim) // 2)
        dist.barrier()
        t0 = time.monotonic()
        try:
            axsave.save(os.path.join(work, "node{rank}"), os.path.join(work, "out"), timeout=10)
            result["raised"] = None
        except axsave.AxsaveError as e:
            result["raised"] = str(e)
            result["code"] = e.returncode
        result["seconds"] = time.monotonic() - t0
        t = torch.tensor([1.0])
        dist.all_reduce(t)
        result["all_reduce"] = t.item()
    with open(os.path.join(work, f"result{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def spawned(rank, world, port, pkgdir, work, mode):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    job(pkgdir, work, mode)


def main():
    pkgdir, work, mode = sys.argv[1:4]
    how = sys.argv[4] if len(sys.argv) > 4 else "torchrun"
    if how in ("torchrun", "env"):  # env: RANK, WORLD_SIZE, MASTER_ADDR/PORT set by hand
        import torch.distributed as dist

        dist.init_process_group("gloo")
        job(pkgdir, work, mode)
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(spawned, args=(3, port, pkgdir, work, mode), nprocs=3)


if __name__ == "__main__":
    main()
