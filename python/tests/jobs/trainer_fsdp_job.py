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
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (20, 8), generator=gen)]
    out = os.path.join(work, "run")
    args = TrainingArguments(
        output_dir=out,
        max_steps=5,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_only_model=False,
        learning_rate=1e-2,
        fsdp="full_shard",
        fsdp_config={
            "fsdp_version": 2,
            "state_dict_type": "SHARDED_STATE_DICT",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
        },
    )
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
