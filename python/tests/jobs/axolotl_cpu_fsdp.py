"""Runs ``axolotl.cli.train CFG`` as one rank of a CPU FSDP2 job under torchrun (gloo).

Axolotl 0.21 and accelerate 1.15 assume CUDA for FSDP; this wrapper patches around exactly
four of those assumptions and nothing else (training, checkpointing and saving stay stock):

1. the peer-access check ``torch.cuda.can_device_access_peer`` (axolotl/utils/environment.py);
2. accelerate's backend choice: a CPU-only multi-process run becomes MULTI_CPU with gloo
   (what ``PartialState(cpu=True)`` gives);
3. MULTI_CPU with an FSDP plugin is promoted to ``DistributedType.FSDP`` (accelerate only does
   that for GPU types);
4. ``ParallelismConfig.build_device_mesh("cuda")``, hard-coded in axolotl/utils/distributed.py,
   builds its mesh on "cpu".

Usage: torchrun --nproc-per-node 2 axolotl_cpu_fsdp.py CFG
"""

import runpy
import sys

import torch


def patch():
    # 1. no GPUs, so no peer access question
    torch.cuda.can_device_access_peer = lambda *a, **k: True

    # 2. CPU-only processes under torchrun: MULTI_CPU over gloo
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_prepare = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return original_prepare(self, True, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend

    # 3. MULTI_CPU + an FSDP plugin → FSDP
    original_init = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init

    # 4. the device mesh on the CPU
    from accelerate.parallelism_config import ParallelismConfig

    original_mesh = ParallelismConfig.build_device_mesh

    def build_device_mesh(self, device_type):
        return original_mesh(self, "cpu")

    ParallelismConfig.build_device_mesh = build_device_mesh


if __name__ == "__main__":
    patch()
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)
