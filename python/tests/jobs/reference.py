"""torch's own consolidation of a DCP checkpoint: dcp_to_torch_save, then safetensors'
save_file of the ``model`` entry (contiguous tensors, metadata {"format": "pt"}).

Usage: python reference.py DCP_DIR OUT.safetensors
"""

import os
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ckpt, out = sys.argv[1:3]
dcp_to_torch_save(ckpt, out + ".pt")
sd = torch.load(out + ".pt", weights_only=False)["model"]
os.unlink(out + ".pt")
save_file({k: v.contiguous() for k, v in sd.items()}, out, metadata={"format": "pt"})
