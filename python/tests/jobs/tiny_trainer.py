"""The tiny Trainer run both Trainer jobs share: a seeded 2-layer Llama, 20 training rows and
TrainingArguments for 5 CPU steps with save_steps=2 into WORKDIR/run.

Imported by trainer_job.py and trainer_fsdp_job.py (after any patching: torch and
transformers are imported when ``tiny_run`` is called).
"""

import os


def tiny_run(work, **overrides):
    """(model, data, TrainingArguments); ``overrides`` adds or replaces TrainingArguments keys."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

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
    args = {
        "output_dir": os.path.join(work, "run"),
        "max_steps": 5,
        "save_steps": 2,
        "per_device_train_batch_size": 2,
        "report_to": [],
        "use_cpu": True,
        "logging_steps": 1,
        "learning_rate": 1e-2,
        **overrides,
    }
    return model, data, TrainingArguments(**args)
