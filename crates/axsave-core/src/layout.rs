//! The output layout: which files, which tensors in each, and the exact byte range of every
//! tensor, headers included. Known in full before any data moves, and identical on every rank.

use std::collections::{BTreeMap, HashMap};

use axsave_formats::st_header::{
    BuiltHeader, HeaderTensor, MAX_HEADER_SIZE, METADATA_KEY, build_header,
};
use axsave_formats::{Catalog, DType};

use crate::error::{CoreError, Result};
use crate::naming::{NameFilter, output_names};
use crate::scales::is_quantization_scale;

/// What `--dtype` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DtypeChoice {
    /// Keep every tensor's dtype.
    #[default]
    Keep,
    /// bfloat16.
    Bf16,
    /// float16.
    Fp16,
    /// float32.
    Fp32,
}

impl DtypeChoice {
    /// The dtype a tensor of `dtype` is written in.
    pub fn apply(self, dtype: DType) -> DType {
        if !dtype.is_convertible_float() {
            return dtype;
        }
        match self {
            DtypeChoice::Keep => dtype,
            DtypeChoice::Bf16 => DType::BF16,
            DtypeChoice::Fp16 => DType::F16,
            DtypeChoice::Fp32 => DType::F32,
        }
    }

    /// The name as `--dtype` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            DtypeChoice::Keep => "keep",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::Fp16 => "fp16",
            DtypeChoice::Fp32 => "fp32",
        }
    }
}

/// Options that shape the output.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayoutOptions {
    /// Output dtype rule.
    pub dtype: DtypeChoice,
    /// Largest file size before splitting (transformers' `max_shard_size`).
    pub max_shard_size: u64,
    /// At least this many files (sharded mode asks for one per rank); 1 otherwise.
    pub min_files: usize,
    /// File name stem: `model` gives `model.safetensors` / `model-00001-of-00002.safetensors`.
    pub stem: String,
    /// Write only a PEFT adapter, under the names PEFT's `save_pretrained` gives it.
    pub adapter: bool,
    /// Name globs (`--include`): when any is given, only tensors whose output name matches one
    /// are written.
    pub include: Vec<String>,
    /// Name globs (`--exclude`): tensors whose output name matches one are left out.
    pub exclude: Vec<String>,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        LayoutOptions {
            dtype: DtypeChoice::Keep,
            max_shard_size: 5_000_000_000,
            min_files: 1,
            stem: "model".into(),
            adapter: false,
            include: Vec::new(),
            exclude: Vec::new(),
        }
    }
}

/// A tensor of the output.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutTensor {
    /// Its name in the output.
    pub name: String,
    /// Index of the catalog tensor it comes from.
    pub source: usize,
    /// The dtype it is written in.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Index of the output file holding it.
    pub file: usize,
    /// Absolute byte offset of its data in that file.
    pub offset: u64,
    /// Size of its data in bytes.
    pub nbytes: u64,
}

/// An output file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutFile {
    /// File name in the output directory.
    pub name: String,
    /// The header bytes (8-byte length + padded JSON).
    pub header: Vec<u8>,
    /// Total size of the file.
    pub size: u64,
    /// Indices into [`Layout::tensors`] of the tensors it holds, in data order.
    pub tensors: Vec<usize>,
}

/// The whole output.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// The files, in name order.
    pub files: Vec<OutFile>,
    /// The tensors, in the order of the checkpoint.
    pub tensors: Vec<OutTensor>,
    /// Sum of the tensors' data sizes (the index's `metadata.total_size`).
    pub total_size: u64,
    /// Catalog tensors left out (not the model's, or filtered by `--include`/`--exclude`), by
    /// name.
    pub left_out: Vec<String>,
}

impl Layout {
    /// The file name of the index, when there is more than one file.
    pub fn index_name(&self) -> Option<String> {
        (self.files.len() > 1).then(|| {
            let stem = self.files[0]
                .name
                .split('-')
                .next()
                .unwrap_or("model")
                .to_string();
            format!("{stem}.safetensors.index.json")
        })
    }

    /// The index JSON as transformers writes it (`indent=2, sort_keys=True`, newline at the end),
    /// when there is more than one file.
    pub fn index_json(&self) -> Option<String> {
        self.index_name()?;
        let weight_map: BTreeMap<&str, &str> = self
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), self.files[t.file].name.as_str()))
            .collect();
        let index = serde_json::json!({
            "metadata": { "total_size": self.total_size },
            "weight_map": weight_map,
        });
        let mut s = serde_json::to_string_pretty(&index).ok()?;
        s.push('\n');
        Some(s)
    }

    /// Every final file name this layout writes (data files and index).
    pub fn final_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.iter().map(|f| f.name.clone()).collect();
        names.extend(self.index_name());
        names
    }
}

/// Splits sizes into groups the way huggingface_hub's `split_state_dict_into_shards_factory`
/// does: greedily in order; a tensor larger than the limit gets a file of its own (placed
/// before the file being filled); otherwise a new file starts when the next tensor would
/// push the current one over the limit.
pub fn split_greedy(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Computes the output layout of a catalog.
pub fn plan_layout(catalog: &Catalog, opts: &LayoutOptions) -> Result<Layout> {
    let mut names = output_names(catalog);
    if opts.adapter {
        names = crate::axolotl::peft::adapter_names(&names).ok_or_else(|| {
            CoreError::Layout(
                "the checkpoint holds no LoRA tensors (lora_A / lora_B / lora_embedding_*): the adapter has no tensors"
                    .into(),
            )
        })?;
    }
    let filter = NameFilter::new(&opts.include, &opts.exclude)?;
    let mut left_out = Vec::new();
    let mut chosen: Vec<(usize, String)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, (t, name)) in catalog.tensors.iter().zip(names).enumerate() {
        let Some(name) = name.filter(|n| filter.keeps(n)) else {
            if !opts.adapter {
                left_out.push(t.name.clone());
            }
            continue;
        };
        if name == METADATA_KEY {
            return Err(CoreError::Layout(format!(
                "tensor {} would be written as {METADATA_KEY:?}, the key safetensors reserves for the file's metadata: no reader accepts such a file (leave it out with --exclude, or rename it)",
                t.name
            )));
        }
        if let Some(&j) = seen.get(&name) {
            return Err(CoreError::Layout(format!(
                "tensors {} and {} both become {name} once wrapper prefixes are removed",
                catalog.tensors[j].name, t.name
            )));
        }
        seen.insert(name.clone(), i);
        chosen.push((i, name));
    }
    // Scales of fp8/fp4 weights keep their dtype whatever --dtype says (see `scales`).
    let source_dtype: HashMap<&str, DType> = chosen
        .iter()
        .map(|(i, n)| (n.as_str(), catalog.tensors[*i].dtype))
        .collect();
    let mut tensors = Vec::with_capacity(chosen.len());
    for (i, name) in &chosen {
        let t = &catalog.tensors[*i];
        let scale = opts.dtype != DtypeChoice::Keep
            && is_quantization_scale(name, |w| source_dtype.get(w).copied());
        let dtype = if scale {
            t.dtype
        } else {
            opts.dtype.apply(t.dtype)
        };
        let nbytes = t
            .shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &n| a.checked_mul(n))
            .ok_or_else(|| CoreError::Layout(format!("tensor {} is too large", t.name)))?;
        tensors.push(OutTensor {
            name: name.clone(),
            source: *i,
            dtype,
            shape: t.shape.clone(),
            file: 0,
            offset: 0,
            nbytes,
        });
    }
    if tensors.is_empty() {
        return Err(CoreError::Layout(if opts.adapter {
            "the adapter has no tensors: nothing to write".into()
        } else if !left_out.is_empty() {
            format!(
                "nothing to write: {} (an optimizer-only checkpoint? --include chooses tensors by name)",
                crate::naming::left_out_summary(&left_out)
            )
        } else {
            "the checkpoint holds no tensors to write".into()
        }));
    }
    let sizes: Vec<u64> = tensors.iter().map(|t| t.nbytes).collect();
    // Each size fits in 64 bits (checked above); their sum must too, or every offset after
    // it would overflow (a damaged or hostile catalog: sizes come from the source's metadata).
    let total_size = sizes
        .iter()
        .try_fold(0u64, |a, &b| a.checked_add(b))
        .ok_or_else(|| CoreError::Layout("the tensors' total size overflows 64 bits".into()))?;
    let mut groups = split_greedy(&sizes, opts.max_shard_size.max(1));
    // Sharded mode wants at least one file per rank: take the largest limit that gives enough
    // files (the count only grows as the limit shrinks), so files stay as even as greedy allows.
    let want = opts.min_files.min(tensors.len());
    if groups.len() < want {
        let (mut lo, mut hi) = (1u64, opts.max_shard_size.max(1));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if split_greedy(&sizes, mid).len() >= want {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        groups = split_greedy(&sizes, lo);
    }
    let n = groups.len();
    let mut files = Vec::with_capacity(n);
    for (fi, group) in groups.iter().enumerate() {
        let name = if n == 1 {
            format!("{}.safetensors", opts.stem)
        } else {
            format!("{}-{:05}-of-{:05}.safetensors", opts.stem, fi + 1, n)
        };
        let header_tensors: Vec<HeaderTensor> = group
            .iter()
            .map(|&ti| HeaderTensor {
                name: tensors[ti].name.clone(),
                dtype: tensors[ti].dtype,
                shape: tensors[ti].shape.clone(),
            })
            .collect();
        let BuiltHeader {
            bytes,
            ranges,
            file_size,
        } = build_header(&header_tensors, &[("format", "pt")])
            .map_err(|e| CoreError::Layout(e.to_string()))?;
        check_header_size(&name, bytes.len() as u64 - 8, &header_tensors)?;
        let mut order: Vec<(u64, usize)> = Vec::with_capacity(group.len());
        for (k, &ti) in group.iter().enumerate() {
            tensors[ti].file = fi;
            tensors[ti].offset = ranges[k].0;
            order.push((ranges[k].0, ti));
        }
        order.sort_unstable();
        files.push(OutFile {
            name,
            header: bytes,
            size: file_size,
            tensors: order.into_iter().map(|(_, ti)| ti).collect(),
        });
    }
    Ok(Layout {
        files,
        tensors,
        total_size,
        left_out,
    })
}

/// Refuses a header longer than safetensors readers accept ([`MAX_HEADER_SIZE`]), naming the
/// longest tensor names, which are what makes a header that large.
fn check_header_size(file: &str, json_len: u64, tensors: &[HeaderTensor]) -> Result<()> {
    if json_len <= MAX_HEADER_SIZE {
        return Ok(());
    }
    let mut longest: Vec<&HeaderTensor> = tensors.iter().collect();
    longest.sort_by_key(|t| std::cmp::Reverse(t.name.len()));
    let names: Vec<String> = longest
        .iter()
        .take(3)
        .map(|t| {
            let shown: String = t.name.chars().take(60).collect();
            format!("{shown}... ({} bytes)", t.name.len())
        })
        .collect();
    Err(CoreError::Layout(format!(
        "the header of {file} would be {json_len} bytes, more than the {MAX_HEADER_SIZE} safetensors readers accept ({} tensors; the longest names: {})",
        tensors.len(),
        names.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog_of(tensors: Vec<axsave_formats::TensorEntry>) -> Catalog {
        Catalog {
            format: axsave_formats::Format::Dcp,
            root: ".".into(),
            files: Vec::new(),
            tensors,
            writer_ranks: None,
            skipped: Vec::new(),
            notes: Vec::new(),
            records: Vec::new(),
        }
    }

    fn entry(name: &str, dtype: DType, shape: &[u64]) -> axsave_formats::TensorEntry {
        axsave_formats::TensorEntry {
            name: name.into(),
            path: vec![name.into()],
            dtype,
            shape: shape.to_vec(),
            pieces: Vec::new(),
        }
    }

    /// A header over safetensors' 100 MB limit is refused before anything is written, naming
    /// the tensor whose name makes it so; one at the limit is accepted. (plan_layout calls this
    /// with each file's built header; a real 100 MB name takes half a minute to serialize in a
    /// debug build.)
    #[test]
    fn header_over_the_safetensors_limit_is_refused() {
        let t = |name: &str| HeaderTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![2],
        };
        let long = format!("layers.{}", "x".repeat(1000));
        let tensors = [t("b"), t(&long), t("c")];
        let err = check_header_size("model.safetensors", MAX_HEADER_SIZE + 1, &tensors)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors")
                && err.contains("100000001 bytes, more than the 100000000")
                && err.contains("layers.xxx")
                && err.contains(&format!("({} bytes)", long.len())),
            "{err}"
        );
        check_header_size("model.safetensors", MAX_HEADER_SIZE, &tensors).unwrap();
    }

    /// Accelerate's `optimizer_0` directory holds only `{"optimizer": ...}`: nothing is the
    /// model's, and the error says what was left out.
    #[test]
    fn optimizer_only_checkpoint_says_what_was_left_out() {
        let mut t = entry("optimizer.state.w.exp_avg", DType::F32, &[2]);
        t.path = vec!["optimizer".into(), "state.w.exp_avg".into()];
        let err = plan_layout(&catalog_of(vec![t]), &LayoutOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nothing to write: left out 1 tensor") && err.contains("optimizer (1)"),
            "{err}"
        );
    }

    #[test]
    fn reserved_metadata_name_is_refused() {
        let catalog = catalog_of(vec![
            entry("__metadata__", DType::F32, &[2]),
            entry("b", DType::F32, &[1]),
        ]);
        let err = plan_layout(&catalog, &LayoutOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("__metadata__") && err.contains("reserves"),
            "{err}"
        );
    }

    /// Fuzz regression (dcp_metadata): tensors whose sizes each fit in 64 bits but whose sum
    /// does not are refused, not summed into an overflow.
    #[test]
    fn total_size_past_64_bits_is_refused() {
        let big = |name: &str| axsave_formats::TensorEntry {
            name: name.into(),
            path: vec![name.into()],
            dtype: axsave_formats::DType::U8,
            shape: vec![1 << 63],
            pieces: Vec::new(),
        };
        let catalog = Catalog {
            format: axsave_formats::Format::Dcp,
            root: ".".into(),
            files: Vec::new(),
            tensors: vec![big("a"), big("b")],
            writer_ranks: None,
            skipped: Vec::new(),
            notes: Vec::new(),
            records: Vec::new(),
        };
        assert_eq!(catalog.total_bytes(), u64::MAX);
        let err = plan_layout(&catalog, &LayoutOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("overflows 64 bits"), "{err}");
    }

    #[test]
    fn greedy_split_matches_huggingface_hub() {
        // A tensor over the limit gets its own shard, placed before the one being filled.
        assert_eq!(
            split_greedy(&[3, 3, 10, 3, 3], 7),
            vec![vec![2], vec![0, 1], vec![3, 4]]
        );
        assert_eq!(split_greedy(&[4, 4, 4], 8), vec![vec![0, 1], vec![2]]);
        assert_eq!(split_greedy(&[0, 0], 8), vec![vec![0, 1]]);
        assert_eq!(split_greedy(&[8], 8), vec![vec![0]]);
    }
}
