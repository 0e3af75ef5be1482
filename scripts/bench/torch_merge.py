#!/usr/bin/env python3
"""The peer: torch's own consolidation, as `accelerate merge-weights` does it: load the whole
DCP checkpoint into memory with _EmptyStateDictLoadPlanner, unwrap the single "model" key, and
write it with safetensors.torch.save_file.

Usage: torch_merge.py CKPT_DIR OUT_FILE
"""
import sys

import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

sd: dict = {}
_load_state_dict(sd, storage_reader=dcp.FileSystemReader(sys.argv[1]), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
if len(sd) == 1:
    sd = next(iter(sd.values()))
save_file(sd, sys.argv[2], metadata={"format": "pt"})
