#!/usr/bin/env python3
"""What people run to merge a LoRA adapter: load the base, PeftModel.from_pretrained,
merge_and_unload(), save_pretrained. Usage: peft_merge.py BASE ADAPTER OUT"""
import sys

import torch
import transformers
import peft

base, adapter, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
