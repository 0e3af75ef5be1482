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

/// Top-level entries that training frameworks save next to the model in one checkpoint and
/// that are not part of it: torchtitan's `optimizer`, `lr_scheduler`, `dataloader` and
/// `train_state` (its model's keys sit at the top level beside them); Lightning's
/// `optimizer_states`, `lr_schedulers`, `loops` and `callbacks` (and `optimizer_0`,
/// `optimizer_1`, ... of its sharded saves, see [`is_non_model_entry`]); the common spellings
/// `optimizers`, `optim`, `scheduler`, `lr_schedulers`, `data_loader`, `trainer_state`.
pub const NON_MODEL_ENTRIES: [&str; 14] = [
    "optimizer",
    "optimizers",
    "optim",
    "optimizer_states",
    "lr_scheduler",
    "lr_schedulers",
    "scheduler",
    "schedulers",
    "dataloader",
    "data_loader",
    "train_state",
    "trainer_state",
    "loops",
    "callbacks",
];

/// Whether a top-level entry of a nested checkpoint is one of [`NON_MODEL_ENTRIES`] or
/// Lightning's `optimizer_<n>`.
pub fn is_non_model_entry(key: &str) -> bool {
    NON_MODEL_ENTRIES.contains(&key)
        || key
            .strip_prefix("optimizer_")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The name each catalog tensor gets in the output, or `None` for tensors left out.
///
/// Accelerate (and Lightning's sharded saves) nest the model as `{"model": state_dict, ...}`,
/// so DCP's nested paths start with `model`: when some tensors sit under a top-level `model`
/// entry, only those are kept (whatever else the checkpoint holds, such as optimizer state, is
/// left out) and the entry is unwrapped. Otherwise (torchtitan puts the model's keys at the top
/// level) tensors nested under a known non-model entry ([`is_non_model_entry`]) are left out.
/// Names then lose their wrapper segments. The nested path is only known where the format
/// records it (DCP's `planner_data`; a top-level key holding dots is one path element); names
/// of other formats are kept as they are, so a Hugging Face model's own `model.` prefix stays.
pub fn output_names(catalog: &Catalog) -> Vec<Option<String>> {
    let under_model = |path: &[String]| path.len() >= 2 && path[0] == "model";
    let unwrap = catalog.tensors.iter().any(|t| under_model(&t.path));
    catalog
        .tensors
        .iter()
        .map(|t| {
            if unwrap {
                under_model(&t.path).then(|| strip_wrappers(&t.path[1..].join(".")))
            } else if t.path.len() >= 2 && is_non_model_entry(&t.path[0]) {
                None
            } else {
                Some(strip_wrappers(&t.name))
            }
        })
        .collect()
}

/// `--include` / `--exclude`: shell-style globs (`*`, `?`, `[...]`) over whole output names.
#[derive(Debug, Default)]
pub struct NameFilter {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

impl NameFilter {
    /// Compiles the globs; a malformed one is an error naming it.
    pub fn new(include: &[String], exclude: &[String]) -> crate::error::Result<NameFilter> {
        let compile = |flag: &str, globs: &[String]| {
            globs
                .iter()
                .map(|g| {
                    glob::Pattern::new(g)
                        .map_err(|e| crate::error::CoreError::Layout(format!("{flag} {g:?}: {e}")))
                })
                .collect::<crate::error::Result<Vec<_>>>()
        };
        Ok(NameFilter {
            include: compile("--include", include)?,
            exclude: compile("--exclude", exclude)?,
        })
    }

    /// Whether the tensor of output name `name` is written.
    pub fn keeps(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| p.matches(name)))
            && !self.exclude.iter().any(|p| p.matches(name))
    }
}

/// One line for the log about the tensors left out: how many, grouped by the first segment of
/// their checkpoint name (the top-level entry they sat under), largest groups first.
pub fn left_out_summary(names: &[String]) -> String {
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for n in names {
        let top = n.split('.').next().unwrap_or(n);
        match groups.iter_mut().find(|(k, _)| *k == top) {
            Some((_, c)) => *c += 1,
            None => groups.push((top, 1)),
        }
    }
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let shown: Vec<String> = groups
        .iter()
        .take(8)
        .map(|(k, c)| format!("{k} ({c})"))
        .collect();
    let more = if groups.len() > 8 {
        format!(" and {} more", groups.len() - 8)
    } else {
        String::new()
    };
    format!(
        "left out {} tensor{} that are not the model's or that --include/--exclude filtered: {}{more}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(paths: &[&[&str]]) -> Catalog {
        Catalog {
            format: axsave_formats::Format::Dcp,
            root: ".".into(),
            files: Vec::new(),
            tensors: paths
                .iter()
                .map(|p| axsave_formats::TensorEntry {
                    name: p.join("."),
                    path: p.iter().map(|s| s.to_string()).collect(),
                    dtype: axsave_formats::DType::F32,
                    shape: vec![1],
                    pieces: Vec::new(),
                })
                .collect(),
            writer_ranks: None,
            skipped: Vec::new(),
            notes: Vec::new(),
            records: Vec::new(),
        }
    }

    #[test]
    fn torchtitan_entries_beside_top_level_model_keys_are_left_out() {
        let c = catalog(&[
            &["layers.0.wq.weight"],
            &["optimizer", "state.layers.0.wq.weight.exp_avg"],
            &["train_state", "step"],
            &["lr_scheduler", "last_epoch"],
            // A module named like an entry, at the top level: one path element, kept.
            &["optimizer.proj.weight"],
            &["optimizer_0", "state"],
            &["optimizer_x", "w"],
        ]);
        let names = output_names(&c);
        assert_eq!(
            names,
            [
                Some("layers.0.wq.weight".to_string()),
                None,
                None,
                None,
                Some("optimizer.proj.weight".to_string()),
                None,
                Some("optimizer_x.w".to_string()),
            ]
        );
        // With a `model` entry, only what is under it.
        let c = catalog(&[&["model", "w"], &["optimizer_0", "state"], &["extra", "x"]]);
        assert_eq!(output_names(&c), [Some("w".to_string()), None, None]);
    }

    #[test]
    fn include_and_exclude_globs() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let f = NameFilter::new(&s(&["layers.*", "norm.weight"]), &s(&["*.bias"])).unwrap();
        assert!(f.keeps("layers.0.wq.weight"));
        assert!(f.keeps("norm.weight"));
        assert!(!f.keeps("layers.0.w1.bias"));
        assert!(!f.keeps("output.weight"));
        let f = NameFilter::new(&[], &s(&["ema.*"])).unwrap();
        assert!(f.keeps("output.weight") && !f.keeps("ema.output.weight"));
        let e = NameFilter::new(&s(&["[a"]), &[]).unwrap_err().to_string();
        assert!(e.contains("--include \"[a\""), "{e}");
    }

    #[test]
    fn left_out_summary_groups_by_top_level_entry() {
        let names: Vec<String> = ["optimizer.a", "optimizer.b", "train_state.step", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            left_out_summary(&names),
            "left out 4 tensors that are not the model's or that --include/--exclude filtered: optimizer (2), train_state (1), x (1)"
        );
    }

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
