//! PEFT adapters: which tensors of a `PeftModel` state dict form the adapter, under the names
//! PEFT's `save_pretrained` gives them, and the `adapter_config.json` beside them.

use serde_json::{Map, Value};

use super::config::AxolotlConfig;

/// The adapter name a state dict uses (`default` unless the run named it), read from the first
/// LoRA tensor (`...q_proj.lora_A.default.weight`).
pub fn adapter_name<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<String> {
    for n in names {
        let segs: Vec<&str> = n.split('.').collect();
        for (i, s) in segs.iter().enumerate() {
            if matches!(
                *s,
                "lora_A"
                    | "lora_B"
                    | "lora_embedding_A"
                    | "lora_embedding_B"
                    | "lora_magnitude_vector"
            ) && let Some(next) = segs.get(i + 1)
                && *next != "weight"
                && *next != "bias"
            {
                return Some((*next).to_string());
            }
        }
    }
    None
}

/// The adapter's tensors of a state dict, under the names PEFT's `save_pretrained` gives them;
/// `None` for tensors that are not part of the adapter.
///
/// Two inputs occur. A full `PeftModel` state dict (what `Accelerator.save_state` and raw FSDP
/// saves hold) has names with the adapter name (`...lora_A.default.weight`) and every frozen base
/// weight; it is filtered as `get_peft_model_state_dict` does. A Trainer checkpoint was already
/// saved through that function (`adapter_only=True`): no adapter name, nothing to filter, and
/// the names are kept. `None` overall when there is no LoRA tensor at all.
pub fn adapter_names(names: &[Option<String>]) -> Option<Vec<Option<String>>> {
    let all = || names.iter().flatten().map(String::as_str);
    if let Some(adapter) = adapter_name(all()) {
        // Embedding layers that are LoRA targets are saved whole too (PEFT's
        // `save_embedding_layers="auto"`): their base weight goes along.
        let embedding_bases: Vec<String> = all()
            .filter_map(|n| {
                n.split_once(".lora_embedding_A")
                    .map(|(p, _)| format!("{p}.base_layer.weight"))
            })
            .collect();
        return Some(
            names
                .iter()
                .map(|n| {
                    let n = n.as_deref()?;
                    if embedding_bases.iter().any(|b| b == n) {
                        return Some(n.to_string());
                    }
                    saved_name(n, &adapter)
                })
                .collect(),
        );
    }
    all().any(|n| n.contains("lora_")).then(|| names.to_vec())
}

/// PEFT's saved name for one tensor of a full `PeftModel` state dict, or `None` when it is not
/// part of the adapter (a frozen base weight, another adapter's tensor, a `modules_to_save`
/// original).
///
/// This follows `get_peft_model_state_dict` (bias `none`): keep LoRA tensors of this adapter and
/// the `modules_to_save` copies (without their `modules_to_save.` segment), drop DoRA's
/// `.weight` after `lora_magnitude_vector.<adapter>`, then remove `.<adapter>` from the name.
/// The `base_model.model.` prefix stays.
pub fn saved_name(name: &str, adapter: &str) -> Option<String> {
    let tag = format!(".{adapter}");
    let dora = format!("lora_magnitude_vector.{adapter}.weight");
    let kept = if name.contains(&format!(".modules_to_save.{adapter}")) {
        name.replacen("modules_to_save.", "", 1)
    } else if name.ends_with(&dora) {
        name[..name.len() - ".weight".len()].to_string()
    } else if name.contains("lora_") && name.contains(adapter) && !name.contains("original_module")
    {
        name.to_string()
    } else {
        return None;
    };
    Some(kept.replace(&tag, ""))
}

/// JSON as PEFT writes `adapter_config.json`: sorted keys, indent 2, no final newline.
fn peft_json(v: &Value) -> String {
    super::json::json_sorted(v).trim_end().to_string()
}

/// The run's own `adapter_config.json` as PEFT's `save_pretrained` writes it: the config Axolotl
/// wrote before training has `inference_mode: false`; a saved adapter has `true`.
pub fn saved_adapter_config(bytes: &[u8]) -> Option<String> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    v.as_object_mut()?
        .insert("inference_mode".into(), Value::from(true));
    Some(peft_json(&v))
}

/// An `adapter_config.json` built from the Axolotl config, with the keys PEFT needs to load the
/// adapter; serialized as PEFT does (`indent=2, sort_keys=True`).
pub fn build_adapter_config(cfg: &AxolotlConfig) -> String {
    let mut m = Map::new();
    let num = |x: f64| {
        if x.fract() == 0.0 && x.abs() < 1e15 {
            Value::from(x as i64)
        } else {
            Value::from(x)
        }
    };
    m.insert("peft_type".into(), "LORA".into());
    m.insert("task_type".into(), "CAUSAL_LM".into());
    m.insert("r".into(), Value::from(cfg.lora_r.unwrap_or(8)));
    m.insert("lora_alpha".into(), num(cfg.lora_alpha.unwrap_or(8.0)));
    m.insert("lora_dropout".into(), num(cfg.lora_dropout.unwrap_or(0.0)));
    let targets = match (&cfg.lora_target_modules, cfg.lora_target_linear) {
        (Some(t), _) => t.to_json(),
        (None, Some(true)) => Value::from("all-linear"),
        (None, _) => Value::Null,
    };
    m.insert("target_modules".into(), targets);
    m.insert(
        "base_model_name_or_path".into(),
        cfg.base_model.clone().map_or(Value::Null, Value::from),
    );
    m.insert("bias".into(), "none".into());
    m.insert(
        "modules_to_save".into(),
        cfg.lora_modules_to_save
            .clone()
            .map_or(Value::Null, Value::from),
    );
    m.insert(
        "use_dora".into(),
        Value::from(cfg.peft_use_dora.unwrap_or(false)),
    );
    m.insert("fan_in_fan_out".into(), Value::from(false));
    m.insert("inference_mode".into(), Value::from(true));
    peft_json(&Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_peft_saves_them() {
        let a = "default";
        assert_eq!(
            saved_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                a
            )
            .as_deref(),
            Some("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        );
        assert_eq!(
            saved_name(
                "base_model.model.model.embed_tokens.lora_embedding_A.default",
                a
            )
            .as_deref(),
            Some("base_model.model.model.embed_tokens.lora_embedding_A")
        );
        assert_eq!(
            saved_name("base_model.model.lm_head.modules_to_save.default.weight", a).as_deref(),
            Some("base_model.model.lm_head.weight")
        );
        assert_eq!(
            saved_name("base_model.model.lm_head.original_module.weight", a),
            None
        );
        assert_eq!(
            saved_name(
                "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
                a
            ),
            None
        );
        assert_eq!(
            saved_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight",
                a
            )
            .as_deref(),
            Some("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector")
        );
        assert_eq!(
            adapter_name(["x.weight", "m.q_proj.lora_B.mine.weight"]).as_deref(),
            Some("mine")
        );
        // A Trainer checkpoint: already PEFT's names, kept whole.
        let saved = vec![
            Some("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()),
            Some("base_model.model.lm_head.weight".to_string()),
        ];
        assert_eq!(adapter_names(&saved), Some(saved.clone()));
        assert_eq!(adapter_names(&[Some("model.w".to_string())]), None);
        // Embedding targets take their base weight along.
        let full = vec![
            Some("base_model.model.model.embed_tokens.base_layer.weight".to_string()),
            Some("base_model.model.model.embed_tokens.lora_embedding_A.default".to_string()),
            Some("base_model.model.model.norm.weight".to_string()),
        ];
        assert_eq!(
            adapter_names(&full).unwrap(),
            vec![
                Some("base_model.model.model.embed_tokens.base_layer.weight".to_string()),
                Some("base_model.model.model.embed_tokens.lora_embedding_A".to_string()),
                None
            ]
        );
    }

    #[test]
    fn config_built_from_axolotl_keys() {
        let cfg = AxolotlConfig::parse(
            "base_model: org/m\nadapter: lora\nlora_r: 16\nlora_alpha: 32\nlora_dropout: 0.05\nlora_target_modules: [q_proj, v_proj]\nlora_modules_to_save: [lm_head]\n",
        )
        .unwrap();
        let v: Value = serde_json::from_str(&build_adapter_config(&cfg)).unwrap();
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["r"], 16);
        assert_eq!(v["lora_alpha"], 32);
        assert_eq!(v["lora_dropout"], 0.05);
        assert_eq!(v["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
        assert_eq!(v["modules_to_save"], serde_json::json!(["lm_head"]));
        assert_eq!(v["base_model_name_or_path"], "org/m");
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["bias"], "none");
    }
}
