"""A tiny transformers Trainer run under torchrun with Accelerate FSDP2 on CPU (gloo), with
AxsaveCallback. The CUDA assumptions of accelerate are patched around as in
axolotl_cpu_fsdp.py (training and checkpointing stay stock).

Usage: torchrun --nproc-per-node 2 trainer_fsdp_job.py PKGDIR WORKDIR
Rank 0 writes WORKDIR/result.json; torch's reference is made afterwards by reference.py.
"""

import json
import os
import sys


def main():
    pkgdir, work = sys.argv[1:3]
    sys.path.insert(0, pkgdir)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from axolotl_cpu_fsdp import patch

    patch()
    import torch
    from axsave.integrations.transformers import AxsaveCallback
    from tiny_trainer import tiny_run
    from transformers import Trainer

    model, data, args = tiny_run(
        work,
        save_only_model=False,
        fsdp="full_shard",
        fsdp_config={
            "fsdp_version": 2,
            "state_dict_type": "SHARDED_STATE_DICT",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
        },
    )
    out = args.output_dir
    callback = AxsaveCallback(timeout=30)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    if trainer.is_world_process_zero():
        result = {
            "source": callback.source,
            "summary": callback.summary,
            "files": sorted(os.listdir(out)),
            "fsdp": trainer.is_fsdp_enabled,
        }
        with open(os.path.join(work, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
