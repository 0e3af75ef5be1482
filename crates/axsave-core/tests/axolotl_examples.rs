//! Axolotl configs shaped like its own examples parse, and mean what Axolotl makes of them.

use std::path::{Path, PathBuf};

use axsave_core::axolotl::config::{AxolotlConfig, BoolOrAuto, OneOrMany};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/axolotl-examples")
}

fn load(name: &str) -> AxolotlConfig {
    AxolotlConfig::load(&dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn fsdp1_full_fine_tune() {
    let c = load("fft-8b-liger-fsdp.yaml");
    assert!(!c.is_adapter());
    assert!(c.uses_fsdp());
    assert_eq!(c.bf16, Some(BoolOrAuto::Auto));
    assert_eq!(c.full_weight_dtype(), Some("bf16"));
    assert_eq!(c.output_dir.as_deref(), Some("./outputs/out"));
    assert_eq!(
        c.fsdp_config.as_ref().unwrap().final_type(),
        Some("FULL_STATE_DICT")
    );
    assert_eq!(c.zero_stage(&dir()).unwrap(), None);
}

#[test]
fn fsdp2_sharded_full_fine_tune() {
    let c = load("gpt-oss-20b-fft-fsdp2.yaml");
    assert!(c.uses_fsdp() && !c.is_adapter());
    assert_eq!(c.bf16, Some(BoolOrAuto::True));
    assert_eq!(
        c.fsdp_config.unwrap().final_type(),
        Some("SHARDED_STATE_DICT")
    );
}

#[test]
fn lora_with_zero3() {
    let c = load("lora-1b-ray.yml");
    assert!(c.is_adapter());
    assert_eq!(c.lora_r, Some(16));
    assert_eq!(c.lora_alpha, Some(32.0));
    assert_eq!(c.lora_model_dir, None);
    match &c.lora_target_modules {
        Some(OneOrMany::Many(v)) => assert_eq!(v.len(), 7),
        other => panic!("{other:?}"),
    }
    // The DeepSpeed JSON path is relative to where Axolotl runs.
    assert_eq!(c.zero_stage(&dir()).unwrap(), Some(3));
    assert!(!c.uses_fsdp());
}

#[test]
fn qlora_with_fsdp() {
    let c = load("qlora-fsdp-70b.yaml");
    assert_eq!(c.adapter.as_deref(), Some("qlora"));
    assert!(c.is_adapter() && c.uses_fsdp());
    assert_eq!(c.lora_target_linear, Some(true));
    assert_eq!(c.lora_target_modules, None);
    assert_eq!(c.fp16, None);
    let cfg: serde_json::Value =
        serde_json::from_str(&axsave_core::axolotl::peft::build_adapter_config(&c)).unwrap();
    assert_eq!(cfg["target_modules"], "all-linear");
    assert_eq!(cfg["r"], 8);
}
