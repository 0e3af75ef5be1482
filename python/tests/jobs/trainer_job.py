"""A tiny transformers Trainer run (CPU, one process) with AxsaveCallback.

Usage: python trainer_job.py PKGDIR WORKDIR
Trains a 2-layer Llama for 5 steps with save_steps=2 (the Trainer itself would checkpoint at
steps 2 and 4 only), then checks in WORKDIR/result.json what the callback left in output_dir.
"""

import json
import os
import sys


def main():
    pkgdir, work = sys.argv[1:3]
    sys.path.insert(0, pkgdir)
    import torch
    from axsave.integrations.transformers import AxsaveCallback
    from safetensors.torch import load_file, save_file
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
        save_only_model=True,
        learning_rate=1e-2,
    )
    callback = AxsaveCallback(dtype="bf16")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

    result = {
        "source": callback.source,
        "summary": callback.summary,
        "files": sorted(os.listdir(out)),
    }
    # torch's reference: the final checkpoint's tensors (and the live model's) cast to bf16.
    final = load_file(os.path.join(callback.source, "model.safetensors"))
    ref = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in final.items()}
    save_file(ref, os.path.join(work, "reference.safetensors"), metadata={"format": "pt"})
    live = {k: v.detach().to(torch.bfloat16) for k, v in trainer.model.state_dict().items()}
    got = load_file(os.path.join(out, "model.safetensors"))
    result["matches_live_model"] = sorted(got) == sorted(live) and all(
        torch.equal(got[k], live[k]) for k in live
    )
    with open(os.path.join(out, "config.json")) as f:
        result["config_architectures"] = json.load(f).get("architectures")
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
