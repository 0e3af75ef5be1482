"""``AxsaveCallback``: the Trainer's newest sharded checkpoint becomes the final model.

```python
from axsave.integrations.transformers import AxsaveCallback
trainer = Trainer(..., callbacks=[AxsaveCallback(dtype="bf16")])
trainer.train()      # at the end, output_dir holds model.safetensors (or shards + index)
```

Every rank runs the callback (the Trainer calls callbacks on every process), so every rank
runs :func:`axsave.save`, and they save together (see its doc). transformers is imported
when this module is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from transformers import TrainerCallback

from ..api import save

__all__ = ["AxsaveCallback", "checkpoint_source", "newest_checkpoint"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Small files of a checkpoint that belong with the final model.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def checkpoint_source(checkpoint: str) -> str | None:
    """What axsave reads in a Trainer checkpoint directory: FSDP's ``pytorch_model_fsdp_0``
    (DCP), the directory itself when it holds DeepSpeed's ``latest`` or a safetensors model,
    else ``None``."""
    fsdp = os.path.join(checkpoint, "pytorch_model_fsdp_0")
    if os.path.isfile(os.path.join(fsdp, ".metadata")):
        return fsdp
    for name in ("latest", "model.safetensors", "model.safetensors.index.json"):
        if os.path.isfile(os.path.join(checkpoint, name)):
            return checkpoint
    return None


def newest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-N`` with the highest N that holds something axsave reads."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return None
    found = sorted(((int(m.group(1)), n) for n in names if (m := _CHECKPOINT.match(n))), reverse=True)
    for _, name in found:
        path = os.path.join(output_dir, name)
        if checkpoint_source(path):
            return path
    return None


class AxsaveCallback(TrainerCallback):
    """At the end of training (and, with ``on_save=True``, after every checkpoint), turn the
    newest sharded checkpoint into the final model with axsave.

    * ``output``: where the model goes (default: the run's ``output_dir``);
    * ``on_save``: also convert after every checkpoint save (the latest one replaces the
      model in ``output``);
    * ``save_final_checkpoint`` (default True): ask the Trainer to save a checkpoint at the
      last step, so the model converted at the end is the final one, not the last one
      ``save_steps`` happened to hit;
    * any other keyword is :func:`axsave.save`'s (``dtype="bf16"``, ``max_shard_size="5GB"``,
      ``mode="sharded"``, ...); ``force`` defaults to True.

    FSDP checkpoints (``pytorch_model_fsdp_0``, from ``SHARDED_STATE_DICT``), DeepSpeed ZeRO
    checkpoints and safetensors checkpoints are read. The checkpoint's ``config.json``,
    generation config and tokenizer files are copied next to the model by rank 0 (with the
    ``FSDP`` class-name prefix removed from ``architectures``). ``self.summary`` holds the last
    summary (rank 0) and ``self.source`` the checkpoint it read.
    """

    def __init__(
        self,
        output: str | None = None,
        on_save: bool = False,
        save_final_checkpoint: bool = True,
        **options: Any,
    ):
        from ..api import build_args

        build_args("-", "-", **options)  # unknown or bad options fail now, not after training
        self.output = output
        self.convert_on_save = on_save
        self.save_final_checkpoint = save_final_checkpoint
        self.options = options
        self.options.setdefault("force", True)
        self.summary: dict | None = None
        self.source: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.save_final_checkpoint and state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.convert_on_save:
            self._convert(args, state, kwargs.get("model"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if (
            self.convert_on_save
            and self.source
            and self.source.startswith(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        ):
            return control  # on_save converted the final checkpoint already
        self._convert(args, state, kwargs.get("model"))
        return control

    def _convert(self, args, state, model=None) -> None:
        checkpoint = newest_checkpoint(args.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(
                f"axsave: no checkpoint in {args.output_dir} that axsave reads "
                "(checkpoint-N/pytorch_model_fsdp_0, DeepSpeed's latest, or model.safetensors)"
            )
        source = checkpoint_source(checkpoint)
        output = self.output or args.output_dir
        self.source = source
        self.summary = save(source, output, **self.options)
        if state.is_world_process_zero:
            _copy_model_files(checkpoint, output)
            config = getattr(model, "config", None)
            if not os.path.exists(os.path.join(output, "config.json")) and hasattr(config, "to_dict"):
                # FSDP's sharded checkpoints hold no config.json: write the model's.
                data = config.to_dict()
                if not data.get("architectures"):  # as save_pretrained sets it
                    data["architectures"] = [type(getattr(model, "module", model)).__name__]
                _write_config(data, os.path.join(output, "config.json"))

    def __repr__(self) -> str:
        return f"AxsaveCallback(output={self.output!r}, on_save={self.convert_on_save}, {self.options})"


def _copy_model_files(checkpoint: str, output: str) -> None:
    for name in _MODEL_FILES:
        src = os.path.join(checkpoint, name)
        if not os.path.isfile(src):
            continue
        dst = os.path.join(output, name)
        if name == "config.json":
            with open(src, encoding="utf-8") as f:
                _write_config(json.load(f), dst)
        else:
            shutil.copyfile(src, dst)


def _write_config(config: dict, dst: str) -> None:
    """Writes a model config, with the ``FSDP`` class-name prefix FSDP2 adds removed."""
    archs = config.get("architectures")
    if isinstance(archs, list):
        config["architectures"] = [a[4:] if isinstance(a, str) and a.startswith("FSDP") else a for a in archs]
    tmp = dst + ".axsave-tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, dst)
