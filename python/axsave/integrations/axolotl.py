"""``AxsavePlugin``: an Axolotl plugin that makes the run's final save go through axsave.

In the training YAML:

```yaml
plugins:
  - axsave.integrations.axolotl.AxsavePlugin
fsdp_config:
  final_state_dict_type: SHARDED_STATE_DICT   # or any FSDP / DeepSpeed ZeRO-3 setup
axsave:                                       # optional: axsave's own keys
  max_shard_size: 5GB
```

Axolotl's ``train()`` calls ``axolotl.train.save_trained_model(cfg, trainer, model)`` at the end
of training on every rank. When the trainer is created (``post_trainer_create``), the plugin
replaces that function with :func:`axsave.save_trained_model`: the trainer writes the live
model's sharded checkpoint and every rank runs axsave with the run's config, instead of
gathering a full state dict (FSDP ``FULL_STATE_DICT``, DeepSpeed's 16-bit gather) or merging
the last ``checkpoint-N`` in rank 0's memory in bf16. Runs that need Axolotl's own steps
(QAT, ReLoRA, expert or tensor parallel adapters, llm-compressor, modules with
``_post_training``) and runs that are not sharded keep Axolotl's function.

The plugin also declares the ``axsave:`` key, so Axolotl's config validation keeps it.
"""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, Field

from .. import trained

__all__ = ["AxsaveArgs", "AxsavePlugin"]

LOG = logging.getLogger("axsave")


class AxsaveArgs(BaseModel):
    """The config keys the plugin adds: ``axsave:``, axsave's own section."""

    axsave: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "description": "axsave's options for the final save: source, output, mode, dtype, "
            "max_shard_size, transport, memory_budget, timeout, cleanup"
        },
    )


class AxsavePlugin(BasePlugin):
    """Routes Axolotl's final ``save_trained_model`` through axsave (see the module doc)."""

    def get_input_args(self) -> str:
        return "axsave.integrations.axolotl.AxsaveArgs"

    def post_trainer_create(self, cfg, trainer) -> None:
        install()


def install() -> None:
    """Replace ``axolotl.train.save_trained_model`` with axsave's (idempotent)."""
    import axolotl.train as axolotl_train

    current = axolotl_train.save_trained_model
    if getattr(current, "__axsave__", False):
        return
    trained.AXOLOTL_ORIGINAL = current
    axolotl_train.save_trained_model = _save_trained_model
    LOG.info("axsave: the final save goes through axsave (AxsavePlugin)")


def uninstall() -> None:
    """Put Axolotl's own ``save_trained_model`` back."""
    import axolotl.train as axolotl_train

    if trained.AXOLOTL_ORIGINAL is not None:
        axolotl_train.save_trained_model = trained.AXOLOTL_ORIGINAL


def _save_trained_model(cfg, trainer, model):
    return trained.save_trained_model(cfg, trainer, model)


_save_trained_model.__axsave__ = True  # type: ignore[attr-defined]
