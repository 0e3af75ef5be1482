//! `adapter_config.json`: the LoRA settings that change the merged weights, read as PEFT's
//! `LoraConfig` holds them, and the settings axsave refuses because merging them is not the
//! plain LoRA arithmetic.

use std::collections::BTreeMap;
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use crate::error::{CoreError, Result};

/// The LoRA settings that decide how each module is merged.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    /// Default rank (`r`).
    pub r: u64,
    /// Default `lora_alpha`.
    pub lora_alpha: f64,
    /// `use_rslora`: scaling is `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `use_dora`: weight-decomposed LoRA (a magnitude vector per output row).
    pub use_dora: bool,
    /// `fan_in_fan_out`: the targeted weights are stored `(in, out)` (GPT-2's `Conv1D`).
    pub fan_in_fan_out: bool,
    /// `lora_bias`: `lora_B` has a bias that is added to the base layer's bias.
    pub lora_bias: bool,
    /// `rank_pattern`: per-module ranks, keyed by a regular expression of the module name.
    pub rank_pattern: Vec<(String, u64)>,
    /// `alpha_pattern`: per-module alphas, keyed likewise.
    pub alpha_pattern: Vec<(String, f64)>,
    /// `modules_to_save`: modules whose whole weights the adapter holds.
    pub modules_to_save: Vec<String>,
    /// Compiled `(.*\.)?(key)$` matchers of both patterns, by key.
    matchers: BTreeMap<String, Regex>,
}

/// Keys of `LoraConfig` (PEFT 0.18) that do not change what a merge computes, or that only
/// describe how the adapter was trained or found.
const HARMLESS: &[&str] = &[
    "alpha_pattern",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "runtime_config",
    "target_modules",
    "task_type",
    "use_dora",
    "use_rslora",
    "ensure_weight_tying",
];

/// Keys whose non-default value means something a LoRA merge cannot reproduce, with the
/// reason given when they are refused.
const REFUSED: &[(&str, &str)] = &[
    (
        "layer_replication",
        "the adapter was trained on a model with replicated layers",
    ),
    (
        "target_parameters",
        "LoRA on bare parameters (MoE experts) is merged differently",
    ),
    (
        "trainable_token_indices",
        "trainable tokens are not LoRA weights",
    ),
    ("use_qalora", "QALoRA is merged differently"),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA) cannot be merged",
    ),
    ("arrow_config", "Arrow routing cannot be merged"),
    ("lora_ga_config", "LoRA-GA changes the base weights"),
];

/// A value is "set" when it is not `null`, `false`, `0`, `""`, `[]` or `{}`.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

impl AdapterConfig {
    /// Reads `adapter_config.json`; refuses, by name, a PEFT type other than LORA and any
    /// setting a LoRA merge cannot reproduce.
    pub fn load(path: &Path) -> Result<AdapterConfig> {
        let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
        Self::parse(&bytes).map_err(|e| CoreError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses the JSON text of an `adapter_config.json`.
    pub fn parse(bytes: &[u8]) -> std::result::Result<AdapterConfig, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        match obj.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(format!(
                    "peft_type {other} is not supported: merge-lora merges LORA adapters only"
                ));
            }
            None => return Err("no peft_type: not a PEFT adapter config".into()),
        }
        for (key, why) in REFUSED {
            if obj.get(*key).is_some_and(is_set) {
                return Err(format!("{key} is set: not supported ({why})"));
            }
        }
        for (key, value) in obj {
            if !HARMLESS.contains(&key.as_str())
                && !REFUSED.iter().any(|(k, _)| k == key)
                && is_set(value)
            {
                return Err(format!(
                    "{key} = {value} is a setting axsave does not know: not merged, rather than merged wrongly"
                ));
            }
        }
        if let Some(bias) = obj.get("bias").and_then(Value::as_str)
            && bias != "none"
        {
            return Err(format!(
                "bias = {bias:?}: trained base biases are not supported (only \"none\")"
            ));
        }
        let bool_key = |k: &str| -> std::result::Result<bool, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(format!("{k} is {other}, not true or false")),
            }
        };
        let r = match obj.get("r") {
            Some(n) => n
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| format!("r is {n}, not a positive integer"))?,
            None => 8,
        };
        let lora_alpha = match obj.get("lora_alpha") {
            Some(n) => n
                .as_f64()
                .ok_or_else(|| format!("lora_alpha is {n}, not a number"))?,
            None => 8.0,
        };
        let mut rank_pattern = Vec::new();
        if let Some(m) = obj.get("rank_pattern").and_then(Value::as_object) {
            for (k, n) in m {
                let r = n
                    .as_u64()
                    .filter(|&r| r > 0)
                    .ok_or_else(|| format!("rank_pattern[{k:?}] is {n}, not a positive integer"))?;
                rank_pattern.push((k.clone(), r));
            }
        }
        let mut alpha_pattern = Vec::new();
        if let Some(m) = obj.get("alpha_pattern").and_then(Value::as_object) {
            for (k, n) in m {
                let a = n
                    .as_f64()
                    .ok_or_else(|| format!("alpha_pattern[{k:?}] is {n}, not a number"))?;
                alpha_pattern.push((k.clone(), a));
            }
        }
        let mut matchers = BTreeMap::new();
        for key in rank_pattern
            .iter()
            .map(|(k, _)| k)
            .chain(alpha_pattern.iter().map(|(k, _)| k))
        {
            let re = Regex::new(&format!(r"^(.*\.)?({key})$"))
                .map_err(|e| format!("pattern {key:?} is not a regular expression: {e}"))?;
            matchers.insert(key.clone(), re);
        }
        let modules_to_save = match obj.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("modules_to_save holds {x}, not a name"))
                })
                .collect::<std::result::Result<_, _>>()?,
            Some(other) => return Err(format!("modules_to_save is {other}, not a list")),
        };
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: bool_key("use_rslora")?,
            use_dora: bool_key("use_dora")?,
            fan_in_fan_out: bool_key("fan_in_fan_out")?,
            lora_bias: bool_key("lora_bias")?,
            rank_pattern,
            alpha_pattern,
            modules_to_save,
            matchers,
        })
    }

    /// The first pattern key that matches `module` (PEFT's `get_pattern_key`: keys in the
    /// order the config lists them, each matched as `(.*\.)?(key)$` from the start).
    fn pattern<'a, T>(&self, pattern: &'a [(String, T)], module: &str) -> Option<&'a T> {
        pattern
            .iter()
            .find(|(k, _)| self.matchers.get(k).is_some_and(|re| re.is_match(module)))
            .map(|(_, v)| v)
    }

    /// The rank of `module` (its name in the model, without `base_model.model.`).
    pub fn rank_of(&self, module: &str) -> u64 {
        self.pattern(&self.rank_pattern, module)
            .copied()
            .unwrap_or(self.r)
    }

    /// The alpha of `module`.
    pub fn alpha_of(&self, module: &str) -> f64 {
        self.pattern(&self.alpha_pattern, module)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// PEFT's `scaling[adapter]` of `module`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA,
    /// computed in double precision as Python does.
    pub fn scaling_of(&self, module: &str) -> f64 {
        let r = self.rank_of(module) as f64;
        let alpha = self.alpha_of(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<AdapterConfig, String> {
        AdapterConfig::parse(s.as_bytes())
    }

    #[test]
    fn scaling_and_patterns() {
        let c = parse(
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4, "layers.1.mlp.up_proj": 2},
                "alpha_pattern": {"v_proj": 3}, "use_rslora": false, "task_type": "CAUSAL_LM"}"#,
        )
        .unwrap();
        assert_eq!(c.rank_of("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.rank_of("model.layers.0.self_attn.k_proj"), 8);
        assert_eq!(c.rank_of("model.layers.1.mlp.up_proj"), 2);
        assert_eq!(c.rank_of("model.layers.0.mlp.up_proj"), 8);
        // A whole segment only: `xq_proj` is not `q_proj`.
        assert_eq!(c.rank_of("model.layers.0.self_attn.xq_proj"), 8);
        assert_eq!(c.scaling_of("model.layers.0.self_attn.q_proj"), 4.0);
        assert_eq!(c.scaling_of("model.layers.0.self_attn.v_proj"), 3.0 / 8.0);
        let c = parse(r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": true}"#)
            .unwrap();
        assert_eq!(c.scaling_of("x"), 2.0);
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let e = parse(r#"{"peft_type": "IA3"}"#).unwrap_err();
        assert!(e.contains("peft_type IA3"), "{e}");
        let e = parse(r#"{"peft_type": "LORA", "layer_replication": [[0, 2]]}"#).unwrap_err();
        assert!(e.contains("layer_replication"), "{e}");
        let e = parse(r#"{"peft_type": "LORA", "target_parameters": ["experts.w"]}"#).unwrap_err();
        assert!(e.contains("target_parameters"), "{e}");
        let e = parse(r#"{"peft_type": "LORA", "bias": "all"}"#).unwrap_err();
        assert!(e.contains("bias"), "{e}");
        let e = parse(r#"{"peft_type": "LORA", "use_fancy_thing": true}"#).unwrap_err();
        assert!(e.contains("use_fancy_thing"), "{e}");
        // Defaults of refused or unknown keys are fine.
        parse(r#"{"peft_type": "LORA", "layer_replication": null, "use_fancy_thing": false}"#)
            .unwrap();
        assert!(parse("[1]").is_err());
        assert!(parse(r#"{"r": 8}"#).unwrap_err().contains("peft_type"));
    }
}
