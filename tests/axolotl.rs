//! `axsave --config cfg.yml` on Axolotl-shaped runs written by transformers, PEFT and
//! Accelerate's FSDP save (tests/fixtures/axolotl), compared with what the producers' own
//! `save_pretrained` writes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A writable copy of the Axolotl fixtures (configs use paths relative to it).
fn workdir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let w = t.path().join("ax");
    copy_dir(&fixture("axolotl"), &w);
    (t, w)
}

/// Runs axsave in `cwd` with `args` (and `n` ranks through `axsave launch` when n > 1).
fn run_in(cwd: &Path, n: usize, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(bin());
    clean_env(&mut c);
    c.current_dir(cwd);
    if n > 1 {
        c.args(["launch", "-n", &n.to_string(), "--"]);
    }
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn full_fine_tune_matches_save_pretrained_with_1_and_3_ranks() {
    for n in [1, 3] {
        let (_t, w) = workdir();
        let o = run_in(&w, n, &["--config", "cfg_fft.yml"], &[]);
        let err = stderr(&o);
        assert!(o.status.success(), "{n} ranks: {err}");
        // checkpoint-20 is newer than checkpoint-9; checkpoint-30 is incomplete.
        assert!(err.contains("checkpoint-20/pytorch_model_fsdp_0"), "{err}");
        assert!(
            err.contains("checkpoint-30") && err.contains("incomplete"),
            "{err}"
        );
        let out = w.join("fft_fsdp");
        let reference = w.join("reference/fft_fsdp");
        // Weights (bf16, as `bf16: true` asks), config.json (FSDP prefix gone, dtype set),
        // generation_config.json and the tokenizer: what transformers' save_pretrained writes.
        for name in listing(&reference) {
            assert!(
                same_file(&out.join(&name), &reference.join(&name)),
                "{n} ranks: {name} differs from the reference"
            );
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(cfg["dtype"], "bfloat16");
        assert!(!listing(&out).iter().any(|f| f.contains("axsave")));
    }
}

#[test]
fn lora_adapter_matches_peft_save_pretrained() {
    for n in [1, 2] {
        let (_t, w) = workdir();
        let o = run_in(&w, n, &["--config", "cfg_lora.yml"], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = w.join("lora_fsdp");
        let reference = w.join("reference/lora_fsdp");
        for name in listing(&reference) {
            assert!(
                same_file(&out.join(&name), &reference.join(&name)),
                "{n} ranks: {name} differs from PEFT's"
            );
        }
        assert!(
            !out.join("model.safetensors").exists(),
            "an adapter run wrote full weights"
        );
    }
}

#[test]
fn dora_adapter_from_a_full_state_dict_with_a_built_config() {
    let (_t, w) = workdir();
    let o = run_in(&w, 1, &["--config", "cfg_dora.yml"], &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("adapter_config.json built from the config"),
        "{err}"
    );
    let out = w.join("dora_fsdp");
    let reference = w.join("reference/dora_fsdp");
    // The weights: PEFT's names (adapter name gone, DoRA magnitudes, no frozen base weights).
    assert!(same_file(
        &out.join("adapter_model.safetensors"),
        &reference.join("adapter_model.safetensors")
    ));
    // The built config carries what PEFT needs to load it, agreeing with PEFT's own.
    let got: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("adapter_config.json")).unwrap())
            .unwrap();
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_dora",
        "bias",
        "modules_to_save",
    ] {
        assert_eq!(got[key], want[key], "{key}");
    }
    let set = |v: &serde_json::Value| {
        let mut s: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        s.sort();
        s
    };
    assert_eq!(set(&got["target_modules"]), set(&want["target_modules"]));
}

#[test]
fn tokenizer_from_the_local_hub_cache() {
    let (_t, w) = workdir();
    let cache = w.join("hf_cache/hub");
    let o = run_in(
        &w,
        1,
        &["--config", "cfg_hub.yml"],
        &[("HF_HUB_CACHE", s(&cache))],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("models--tiny-org--tiny-llama/snapshots/"),
        "{err}"
    );
    let out = w.join("hub_lora");
    let snapshot = std::fs::read_dir(cache.join("models--tiny-org--tiny-llama/snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(same_file(&out.join(f), &snapshot.join(f)), "{f}");
    }
    assert!(same_file(
        &out.join("adapter_model.safetensors"),
        &w.join("reference/hub_lora/adapter_model.safetensors")
    ));
    // Without the cache nothing is downloaded: the save still succeeds and says so.
    let (_t2, w2) = workdir();
    let o = run_in(
        &w2,
        1,
        &["--config", "cfg_hub.yml"],
        &[("HF_HUB_CACHE", "/nonexistent"), ("HOME", "/nonexistent")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("no tokenizer found"), "{}", stderr(&o));
}

#[test]
fn dry_run_writes_nothing_and_cleanup_removes_only_the_checkpoint() {
    let (_t, w) = workdir();
    let before = listing(&w.join("fft_fsdp"));
    let o = run_in(
        &w,
        1,
        &["--config", "cfg_fft.yml", "--dry-run", "--cleanup"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("would write model.safetensors"), "{text}");
    assert!(text.contains("would write config.json"), "{text}");
    assert!(
        text.contains("would remove") && text.contains("checkpoint-20/pytorch_model_fsdp_0"),
        "{text}"
    );
    assert_eq!(
        listing(&w.join("fft_fsdp")),
        before,
        "dry run wrote something"
    );

    let o = run_in(&w, 1, &["--config", "cfg_fft.yml", "--cleanup", "-q"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !w.join("fft_fsdp/checkpoint-20/pytorch_model_fsdp_0")
            .exists()
    );
    // Everything else stays: other checkpoints, the trainer state, the new model.
    assert!(w.join("fft_fsdp/checkpoint-20/trainer_state.json").exists());
    assert!(
        w.join("fft_fsdp/checkpoint-9/pytorch_model_fsdp_0/.metadata")
            .exists()
    );
    assert!(w.join("fft_fsdp/model.safetensors").exists());
}

#[test]
fn flags_override_the_config_and_its_axsave_section() {
    let (_t, w) = workdir();
    let mut cfg = std::fs::read_to_string(w.join("cfg_fft.yml")).unwrap();
    cfg.push_str("\naxsave:\n  output: ./final\n  dtype: fp16\n  max_shard_size: 10KB\n");
    std::fs::write(w.join("cfg_custom.yml"), &cfg).unwrap();
    // The section: output elsewhere, fp16, sharded at 10 KB.
    let o = run_in(&w, 1, &["--config", "cfg_custom.yml", "-q"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(w.join("final/model.safetensors.index.json").exists());
    let t = tensors(&w.join("final"));
    assert!(
        t.values()
            .filter(|(d, _, _)| d.starts_with('F'))
            .all(|(d, _, _)| d == "F16")
    );
    // A flag beats the section.
    let o = run_in(
        &w,
        1,
        &[
            "--config",
            "cfg_custom.yml",
            "-q",
            "--dtype",
            "keep",
            "--output",
            "flagged",
            "--max-shard-size",
            "5GB",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let t = tensors(&w.join("flagged/model.safetensors"));
    assert!(
        t.values()
            .filter(|(d, _, _)| d.starts_with('F'))
            .all(|(d, _, _)| d == "F32")
    );
}

#[test]
fn config_errors_name_the_key_and_line() {
    let (_t, w) = workdir();
    std::fs::write(
        w.join("bad.yml"),
        "base_model: ./base\noutput_dir: ./fft_fsdp\nadapter: lora\nlora_r: eight\n",
    )
    .unwrap();
    let o = run_in(&w, 1, &["--config", "bad.yml"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("bad.yml") && err.contains("lora_r") && err.contains("line 4"),
        "{err}"
    );
    // An adapter run whose checkpoint holds no adapter tensors.
    std::fs::write(
        w.join("noadapter.yml"),
        "base_model: ./base\noutput_dir: ./fft_fsdp\nadapter: lora\n",
    )
    .unwrap();
    let o = run_in(&w, 1, &["--config", "noadapter.yml"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no LoRA tensors"), "{}", stderr(&o));
    assert!(!w.join("fft_fsdp/adapter_model.safetensors").exists());
}
