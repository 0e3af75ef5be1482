//! JSON written as Python's `json` module writes it, so the files axsave writes beside the
//! weights compare equal, byte for byte, with the ones transformers and PEFT write.

use serde_json::Value;

/// JSON as Python writes it with `json.dumps(v, indent=2, sort_keys=True)`, plus a newline (the
/// form of transformers' `config.json` and PEFT's `adapter_config.json`).
pub fn json_sorted(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    let mut s = serde_json::to_string_pretty(&sort(v)).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_json_like_python() {
        let v: Value = serde_json::from_str(r#"{"b": 1, "a": {"d": [1, 2], "c": null}}"#).unwrap();
        assert_eq!(
            json_sorted(&v),
            "{\n  \"a\": {\n    \"c\": null,\n    \"d\": [\n      1,\n      2\n    ]\n  },\n  \"b\": 1\n}\n"
        );
    }
}
