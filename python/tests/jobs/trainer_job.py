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
    from tiny_trainer import tiny_run
    from transformers import Trainer

    model, data, args = tiny_run(work, save_only_model=True)
    out = args.output_dir
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
