"""``axsave.save_trained_model(cfg, trainer, model)``: a drop-in for Axolotl's.

Axolotl's own function gathers the full state dict (FSDP ``FULL_STATE_DICT``, or DeepSpeed's
16-bit gather) or, with ``SHARDED_STATE_DICT``, merges the newest ``checkpoint-N`` in rank 0's
memory in bf16. This one has the trainer write the sharded checkpoint of the *live* model the
way the run is configured, then runs axsave on every rank with ``--config`` semantics.
torch, transformers and accelerate are imported only here, inside the functions.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import logging
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

from .api import save

__all__ = ["load_cfg", "save_trained_model"]

LOG = logging.getLogger("axsave")

#: Axolotl's own ``save_trained_model``, kept by the plugin when it replaces it, so the
#: fallback below never calls the replacement.
AXOLOTL_ORIGINAL = None


def _plain(value: Any) -> Any:
    """``value`` as plain YAML data: Axolotl's normalized cfg holds torch dtypes, Paths, enums."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (pathlib.PurePath, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return str(value)


def load_cfg(cfg: Any) -> tuple:
    """``(mapping, path or None)`` for a cfg given as a dict, an Axolotl ``DictDefault`` or a
    path to the YAML."""
    if isinstance(cfg, (str, os.PathLike)):
        import yaml

        path = os.fspath(cfg)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"cfg: {path} does not hold a YAML mapping")  # noqa: TRY004
        return dict(data), path
    if isinstance(cfg, Mapping):
        return dict(cfg), None
    raise TypeError(f"cfg: expected a dict, a DictDefault or a YAML path, got {type(cfg).__name__}")


@contextlib.contextmanager
def config_file(cfg: Any):
    """A YAML path for ``cfg``: its own path, or a temporary file holding it (removed after)."""
    data, path = load_cfg(cfg)
    if path is not None:
        yield path, data
        return
    import yaml

    fd, tmp = tempfile.mkstemp(prefix="axsave-cfg-", suffix=".yml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(_plain(data), f, sort_keys=False)
        yield tmp, data
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    inner = getattr(model, "module", model)
    return isinstance(model, PeftModel) or isinstance(inner, PeftModel)


def write_sharded_checkpoint(trainer: Any, output_dir: str, model: Any = None) -> str | None:
    """Has the trainer write the live model's sharded checkpoint into ``output_dir`` (every
    rank must call this: the writes are collective). Returns what was written
    (``"fsdp"``: ``output_dir/pytorch_model_fsdp_0``; ``"deepspeed"``: ``output_dir/latest``
    + ``global_stepN``), or ``None`` when the run is not sharded (nothing written)."""
    accelerator = trainer.accelerator
    if getattr(trainer, "is_fsdp_enabled", False):
        from accelerate.utils import save_fsdp_model

        plugin = accelerator.state.fsdp_plugin
        previous = plugin.state_dict_type
        plugin.set_state_dict_type("SHARDED_STATE_DICT")
        try:
            save_fsdp_model(
                plugin,
                accelerator,
                trainer.model,
                output_dir,
                adapter_only=_is_peft(model if model is not None else trainer.model),
            )
        finally:
            plugin.set_state_dict_type(previous)
        accelerator.wait_for_everyone()
        return "fsdp"
    if getattr(trainer, "is_deepspeed_enabled", False) and _zero3():
        import inspect

        engine = trainer.model_wrapped
        kwargs = {}
        if (
            _is_peft(trainer.model)
            and "exclude_frozen_parameters" in inspect.signature(engine.save_checkpoint).parameters
        ):
            kwargs["exclude_frozen_parameters"] = True
        engine.save_checkpoint(output_dir, **kwargs)
        accelerator.wait_for_everyone()
        return "deepspeed"
    return None


def _zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _needs_axolotl(data: Mapping, model: Any) -> str | None:
    """Why Axolotl's own function must save this run, or None."""
    if data.get("qat"):
        return "qat"
    if data.get("relora"):
        return "relora"
    if data.get("llmcompressor"):
        return "llmcompressor"
    if data.get("adapter") and (data.get("expert_parallel_size") or 1) > 1:
        return "expert_parallel_size"
    if data.get("adapter") and (data.get("tensor_parallel_size") or 1) > 1:
        return "tensor_parallel_size"
    if model is not None and any(hasattr(m, "_post_training") for _, m in model.named_modules()):
        return "a module with _post_training"
    return None


def _axolotl_save(cfg: Any, data: dict, trainer: Any, model: Any) -> None:
    original = AXOLOTL_ORIGINAL
    if original is None:
        try:
            from axolotl.train import save_trained_model as original
        except ImportError:
            trainer.save_model(data.get("output_dir") or trainer.args.output_dir)
            return
        if getattr(original, "__axsave__", False):  # replaced, but the original was lost
            raise RuntimeError("axsave: Axolotl's save_trained_model is not available")
    if isinstance(cfg, (str, os.PathLike)):
        from axolotl.utils.dict import DictDefault

        cfg = DictDefault(data)
    original(cfg, trainer, model)


def save_trained_model(cfg: Any, trainer: Any, model: Any, **options: Any) -> dict | None:
    """Save the trained model the way Axolotl's ``save_trained_model`` promises, through axsave.

    ``cfg`` is the run's config: a dict, an Axolotl ``DictDefault`` or the YAML's path (a
    dict is written to a temporary YAML for the binary). Call it on **every** rank, as Axolotl
    does:

    1. the trainer writes the live model's sharded checkpoint into ``output_dir`` the way the
       run is configured: FSDP (1 or 2) ``SHARDED_STATE_DICT`` DCP into
       ``output_dir/pytorch_model_fsdp_0`` (adapter weights only for PEFT models, as the
       Trainer's own checkpoints), or DeepSpeed's ``save_checkpoint`` (``global_stepN`` +
       ``latest``);
    2. every rank runs axsave with ``--config`` semantics (adapter vs full weights, dtype from
       ``bf16``/``fp16``, ``config.json`` and tokenizer files, the ``axsave:`` section,
       ``cleanup``) and ``force=True`` (the final save replaces an older model in
       ``output_dir``, as Axolotl's does). ``options`` are :func:`axsave.save`'s and override
       the config.

    Runs that are not sharded (one process, DDP, DeepSpeed ZeRO-1/2) hold the whole model on
    every rank: there is nothing to consolidate, and Axolotl's own ``save_trained_model``
    (else ``trainer.save_model``) saves it; so do runs with QAT, ReLoRA, llm-compressor,
    expert- or tensor-parallel adapters, or modules with ``_post_training`` hooks.

    Returns axsave's summary on rank 0, ``None`` elsewhere (and when Axolotl saved). Raises
    :class:`axsave.AxsaveError` on every rank when the save fails on any.
    """
    data, _ = load_cfg(cfg)
    why = _needs_axolotl(data, model)
    if why is not None:
        LOG.info("axsave: %s is set; Axolotl saves this run itself", why)
        _axolotl_save(cfg, data, trainer, model)
        return None
    output_dir = data.get("output_dir") or trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    written = write_sharded_checkpoint(trainer, output_dir, model)
    if written is None:
        LOG.info("axsave: the run is not sharded (nothing to consolidate); Axolotl saves it")
        _axolotl_save(cfg, data, trainer, model)
        return None
    options.setdefault("force", True)
    with config_file(cfg) as (path, _):
        return save(config=path, **options)
