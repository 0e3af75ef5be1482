//! Output tensor names: from the names training left behind to the names `from_pretrained`
//! expects.

use axsave_formats::Catalog;

/// Path segments that wrappers insert into parameter names and that loaders do not expect:
/// `torch.compile`'s `_orig_mod`, FSDP1's `_fsdp_wrapped_module`, activation checkpointing's
/// `_checkpoint_wrapped_module`.
pub const WRAPPER_SEGMENTS: [&str; 3] = [
    "_orig_mod",
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
];

/// Removes wrapper segments from a dotted name.
pub fn strip_wrappers(name: &str) -> String {
    name.split('.')
        .filter(|seg| !WRAPPER_SEGMENTS.contains(seg))
        .collect::<Vec<_>>()
        .join(".")
}

/// The name each catalog tensor gets in the output, or `None` for tensors left out.
///
/// Accelerate saves `{"model": state_dict}`, so DCP's nested paths start with `model`: when
/// some tensors sit under a top-level `model` entry, only those are kept (whatever else the
/// checkpoint holds, such as optimizer state, is left out) and the entry is unwrapped. Names
/// then lose their wrapper segments. The nested path is only known where the format records
/// it (DCP's `planner_data`); names of other formats are kept as they are, so a Hugging Face
/// model's own `model.` prefix stays.
pub fn output_names(catalog: &Catalog) -> Vec<Option<String>> {
    let under_model = |path: &[String]| path.len() >= 2 && path[0] == "model";
    let unwrap = catalog.tensors.iter().any(|t| under_model(&t.path));
    catalog
        .tensors
        .iter()
        .map(|t| {
            if unwrap {
                under_model(&t.path).then(|| strip_wrappers(&t.path[1..].join(".")))
            } else {
                Some(strip_wrappers(&t.name))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_segments_only_whole() {
        assert_eq!(
            strip_wrappers(
                "_orig_mod.layers.0._fsdp_wrapped_module.attn._checkpoint_wrapped_module.q.weight"
            ),
            "layers.0.attn.q.weight"
        );
        // Only whole segments go; lookalikes stay.
        assert_eq!(strip_wrappers("my_orig_mod.x"), "my_orig_mod.x");
        assert_eq!(strip_wrappers("model.layers.0.w"), "model.layers.0.w");
    }
}
