//! Axolotl's YAML config: the keys axsave needs, read with the same meaning Axolotl gives them,
//! and axsave's own `axsave:` section. Unknown keys are ignored (a training config has hundreds).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{CoreError, Result};

/// `true`, `false` or `auto` (Axolotl's `bf16` and `fp16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BoolOrAuto {
    /// Off (or absent).
    #[default]
    False,
    /// On.
    True,
    /// Decided by the hardware at training time; for saving, Axolotl's merge treats it as on.
    Auto,
}

impl<'de> Deserialize<'de> for BoolOrAuto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = BoolOrAuto;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or auto")
            }
            fn visit_bool<E: serde::de::Error>(
                self,
                b: bool,
            ) -> std::result::Result<BoolOrAuto, E> {
                Ok(if b {
                    BoolOrAuto::True
                } else {
                    BoolOrAuto::False
                })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<BoolOrAuto, E> {
                match s.to_ascii_lowercase().as_str() {
                    "auto" => Ok(BoolOrAuto::Auto),
                    "true" => Ok(BoolOrAuto::True),
                    "false" => Ok(BoolOrAuto::False),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<BoolOrAuto, E> {
                Ok(BoolOrAuto::False)
            }
        }
        d.deserialize_any(V)
    }
}

/// A value that may be one string or a list of strings (`lora_target_modules`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single string (PEFT treats it as a regular expression).
    One(String),
    /// A list of names.
    Many(Vec<String>),
}

impl OneOrMany {
    /// As JSON, the way `adapter_config.json` stores it.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            OneOrMany::One(s) => serde_json::Value::from(s.clone()),
            OneOrMany::Many(v) => serde_json::Value::from(v.clone()),
        }
    }
}

/// `fsdp_config`, in both spellings Axolotl accepts (`state_dict_type` and the legacy
/// `fsdp_state_dict_type`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct FsdpConfig {
    /// The checkpoint type used during training.
    pub state_dict_type: Option<String>,
    /// Legacy spelling of `state_dict_type`.
    pub fsdp_state_dict_type: Option<String>,
    /// The type of the final save.
    pub final_state_dict_type: Option<String>,
    /// Legacy spelling of `final_state_dict_type`.
    pub fsdp_final_state_dict_type: Option<String>,
    /// FSDP version given inside the section (Axolotl hoists it).
    pub fsdp_version: Option<serde_norway::Value>,
    /// Another spelling of the version.
    pub version: Option<serde_norway::Value>,
}

impl FsdpConfig {
    /// The state dict type the final save used: `final_state_dict_type`, else `state_dict_type`.
    pub fn final_type(&self) -> Option<&str> {
        self.final_state_dict_type
            .as_deref()
            .or(self.fsdp_final_state_dict_type.as_deref())
            .or(self.state_dict_type.as_deref())
            .or(self.fsdp_state_dict_type.as_deref())
    }
}

/// axsave's own keys, under `axsave:`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxsaveSection {
    /// The checkpoint to read (default: found from `output_dir`).
    pub source: Option<String>,
    /// Where to write (default: `output_dir`).
    pub output: Option<String>,
    /// `gather` or `sharded`.
    pub mode: Option<String>,
    /// `keep`, `bf16`, `fp16`, `fp32`.
    pub dtype: Option<String>,
    /// e.g. `5GB`.
    pub max_shard_size: Option<String>,
    /// `auto`, `tcp`, ...
    pub transport: Option<String>,
    /// e.g. `256MiB`.
    pub memory_budget: Option<String>,
    /// Seconds.
    pub timeout: Option<u64>,
    /// Remove the consumed checkpoint after success.
    pub cleanup: Option<bool>,
    /// Name globs: only tensors whose output name matches one are written.
    pub include: Option<Vec<String>>,
    /// Name globs: tensors whose output name matches one are left out.
    pub exclude: Option<Vec<String>>,
}

/// The keys of an Axolotl config that matter for saving.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AxolotlConfig {
    /// Where training wrote its checkpoints and where the model goes.
    pub output_dir: Option<String>,
    /// The base model: a hub id or a local path.
    pub base_model: Option<String>,
    /// Where the model config comes from, when not `base_model`.
    pub base_model_config: Option<String>,
    /// Where the tokenizer comes from, when not `base_model`.
    pub tokenizer_config: Option<String>,
    /// `lora`, `qlora`, or none.
    pub adapter: Option<String>,
    /// Where an adapter was loaded from / saved to.
    pub lora_model_dir: Option<String>,
    /// LoRA rank.
    pub lora_r: Option<u32>,
    /// LoRA alpha.
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    pub lora_dropout: Option<f64>,
    /// Target modules.
    pub lora_target_modules: Option<OneOrMany>,
    /// Target every linear layer.
    pub lora_target_linear: Option<bool>,
    /// Modules trained and saved in full.
    pub lora_modules_to_save: Option<Vec<String>>,
    /// DoRA.
    pub peft_use_dora: Option<bool>,
    /// bf16 training.
    pub bf16: Option<BoolOrAuto>,
    /// fp16 training.
    pub fp16: Option<BoolOrAuto>,
    /// Legacy FSDP list (`[full_shard, auto_wrap]`) or a string.
    pub fsdp: Option<serde_norway::Value>,
    /// FSDP version (1 or 2).
    pub fsdp_version: Option<serde_norway::Value>,
    /// FSDP settings.
    pub fsdp_config: Option<FsdpConfig>,
    /// A DeepSpeed JSON config path, or an inline one.
    pub deepspeed: Option<serde_norway::Value>,
    /// Whether weights were saved as safetensors.
    pub save_safetensors: Option<bool>,
    /// The chat template name or text.
    pub chat_template: Option<serde_norway::Value>,
    /// Whether the tokenizer writes `chat_template.jinja`.
    pub tokenizer_save_jinja_files: Option<bool>,
    /// axsave's own section.
    pub axsave: Option<AxsaveSection>,
}

impl AxolotlConfig {
    /// Parses a config file. Errors name the file, the key and the line.
    pub fn load(path: &Path) -> Result<AxolotlConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        Self::parse(&text).map_err(|e| CoreError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses config text.
    pub fn parse(text: &str) -> std::result::Result<AxolotlConfig, String> {
        if text.trim().is_empty() {
            return Ok(AxolotlConfig::default());
        }
        serde_norway::from_str(text).map_err(|e| e.to_string())
    }

    /// Whether an adapter (LoRA / QLoRA) was trained.
    pub fn is_adapter(&self) -> bool {
        matches!(self.adapter.as_deref(), Some(a) if !a.is_empty() && a != "none")
    }

    /// Whether FSDP was used.
    pub fn uses_fsdp(&self) -> bool {
        let listed = match &self.fsdp {
            None | Some(serde_norway::Value::Null) => false,
            Some(serde_norway::Value::Bool(b)) => *b,
            Some(serde_norway::Value::Sequence(s)) => !s.is_empty(),
            Some(serde_norway::Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        listed || self.fsdp_config.is_some() || self.fsdp_version.is_some()
    }

    /// The DeepSpeed ZeRO stage, read from the `deepspeed` JSON (a path, relative to `cwd`, or
    /// an inline mapping). `Ok(None)` when DeepSpeed is not used.
    pub fn zero_stage(&self, cwd: &Path) -> Result<Option<u8>> {
        let json: serde_json::Value = match &self.deepspeed {
            None | Some(serde_norway::Value::Null) => return Ok(None),
            Some(serde_norway::Value::String(p)) => {
                let path = resolve(cwd, p);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    CoreError::Config(format!("deepspeed: cannot read {}: {e}", path.display()))
                })?;
                serde_json::from_str(&text).map_err(|e| {
                    CoreError::Config(format!("deepspeed: {}: not JSON: {e}", path.display()))
                })?
            }
            Some(v) => {
                serde_json::to_value(v).map_err(|e| CoreError::Config(format!("deepspeed: {e}")))?
            }
        };
        let stage = json
            .get("zero_optimization")
            .and_then(|z| z.get("stage"))
            .and_then(|s| s.as_u64())
            .unwrap_or(0);
        Ok(Some(stage as u8))
    }

    /// The dtype Axolotl's own save gives full weights: bf16 for `bf16: true|auto` (as its
    /// merge does), fp16 for `fp16: true`, else the checkpoint's.
    pub fn full_weight_dtype(&self) -> Option<&'static str> {
        match (self.bf16.unwrap_or_default(), self.fp16.unwrap_or_default()) {
            (BoolOrAuto::True | BoolOrAuto::Auto, _) => Some("bf16"),
            (_, BoolOrAuto::True) => Some("fp16"),
            _ => None,
        }
    }
}

/// A path from the config, relative to the current directory as Axolotl resolves it.
pub fn resolve(cwd: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_key_and_line() {
        let e = AxolotlConfig::parse("base_model: x\nlora_r: eight\n").unwrap_err();
        assert!(e.contains("lora_r") && e.contains("line 2"), "{e}");
        let e = AxolotlConfig::parse("fsdp_config:\n  state_dict_type: [1]\n").unwrap_err();
        assert!(
            e.contains("fsdp_config.state_dict_type") && e.contains("line 2"),
            "{e}"
        );
        let e = AxolotlConfig::parse("bf16: maybe\n").unwrap_err();
        assert!(e.contains("bf16"), "{e}");
        let e = AxolotlConfig::parse("axsave:\n  dtyp: bf16\n").unwrap_err();
        assert!(e.contains("dtyp"), "{e}");
    }

    #[test]
    fn values_as_axolotl_reads_them() {
        let c = AxolotlConfig::parse(
            "bf16: auto\nfp16: false\nadapter: qlora\nlora_target_modules: q_proj\nfsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n  fsdp_state_dict_type: SHARDED_STATE_DICT\nunknown_key: {a: 1}\n",
        )
        .unwrap();
        assert_eq!(c.bf16, Some(BoolOrAuto::Auto));
        assert_eq!(c.full_weight_dtype(), Some("bf16"));
        assert!(c.is_adapter() && c.uses_fsdp());
        assert_eq!(c.lora_target_modules, Some(OneOrMany::One("q_proj".into())));
        assert_eq!(
            c.fsdp_config.unwrap().final_type(),
            Some("SHARDED_STATE_DICT")
        );
        let c = AxolotlConfig::parse("adapter:\nfp16: true\n").unwrap();
        assert!(!c.is_adapter());
        assert_eq!(c.full_weight_dtype(), Some("fp16"));
        assert_eq!(AxolotlConfig::parse("").unwrap().full_weight_dtype(), None);
    }

    #[test]
    fn zero_stage_from_a_path_or_inline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("z3.json"),
            r#"{"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}"#,
        )
        .unwrap();
        let c = AxolotlConfig::parse("deepspeed: z3.json\n").unwrap();
        assert_eq!(c.zero_stage(dir.path()).unwrap(), Some(3));
        let c = AxolotlConfig::parse("deepspeed:\n  zero_optimization:\n    stage: 2\n").unwrap();
        assert_eq!(c.zero_stage(dir.path()).unwrap(), Some(2));
        let c = AxolotlConfig::parse("deepspeed: missing.json\n").unwrap();
        assert!(c.zero_stage(dir.path()).is_err());
    }
}
