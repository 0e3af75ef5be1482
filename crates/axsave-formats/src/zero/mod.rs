//! DeepSpeed ZeRO checkpoints (stages 1, 2 and 3), consolidated exactly as DeepSpeed 0.19.8's
//! `zero_to_fp32.py` does, but as a [`Catalog`] whose pieces point into the checkpoint's own
//! files: no tensor data is read or copied here.
//!
//! A save directory holds `latest` (the tag, e.g. `global_step2`) and `<tag>/`, which holds
//! `*_model_states.pt` (rank 0's only for stages 1/2, one per rank for stage 3) and one
//! `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` per data-parallel rank. Every file is a
//! `torch.save` zip; only its central directory and `data.pkl` are looked at.
//!
//! What comes out, in zero_to_fp32's order:
//! - the persistent buffers (`buffer_names`), from rank 0's `module`, floating ones as F32 (the
//!   pieces keep the stored dtype; the executor converts);
//! - the frozen parameters (`frozen_param_shapes`, stage ≥ 2 only): stage 2 from rank 0's
//!   `frozen_param_fragments` (whole tensors), stage 3 from every rank's fragment;
//! - the trainable parameters (`param_shapes`), from the fp32 master partitions of the optimizer
//!   files: stage 1/2 `single_partition_of_fp32_groups` concatenated over ranks per group, stage 3
//!   `fp32_flat_groups`, each parameter taking `ceil(numel / world)` elements on every rank.
//!
//! Every floating tensor is reported as F32, as the `zero_to_fp32.py` script writes it (its
//! library function `get_fp32_state_dict_from_zero_checkpoint` leaves frozen parameters in the
//! model dtype; bf16/fp16 → fp32 is exact, so only the dtype differs). Tied parameters
//! (`shared_params`, alias → source) are listed once, under the source name: safetensors forbids
//! aliases, and transformers drops the alias (the `lm_head.weight` of tied embeddings) and re-ties
//! it on load. [`Catalog::notes`] says which names were dropped.
//!
//! As in zero_to_fp32, ZeRO-1 checkpoints yield no frozen parameters (DeepSpeed records none
//! below stage 2; a note names what `module` holds but the output lacks), padding elements are
//! never read (stage 3 padding is not always zero), and zero_to_fp32's consistency checks are
//! made (file count against `partition_count`, consumed against available elements), each error
//! naming the file or directory at fault. [`read_partial`] reads what one machine sees of a
//! checkpoint whose rank files are spread over machines, for [`Catalog::merge`].

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use crate::catalog::{
    Catalog, Checksum, Encoding, Format, Piece, RecordCheck, Region, SourceFile, TensorEntry,
};
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::mapped::{self, Mapped};
use crate::pickle::{Pickle, Value};
use crate::torchsave::{TensorRef, TorchSave, TorchSaveError};
use crate::zip::ZipEntry;

/// The file naming the newest tag in a save directory.
pub const LATEST: &str = "latest";
/// Suffix of the model-state files (`mp_rank_00_model_states.pt`, `zero_pp_rank_0_mp_rank_00_model_states.pt`).
pub const MODEL_SUFFIX: &str = "_model_states.pt";
/// Suffix of the optimizer-state files, one per data-parallel rank.
pub const OPTIM_SUFFIX: &str = "_optim_states.pt";

/// Largest `latest` file accepted (it holds a short tag).
const LATEST_LIMIT: u64 = 4096;

/// Whether `dir` holds a ZeRO checkpoint: `*_optim_states.pt` and `*_model_states.pt` files in
/// the tag directory that `latest` names, or in `dir` itself.
pub fn is_zero(dir: &Path) -> bool {
    let holds = |d: &Path| {
        ckpt_files(d, OPTIM_SUFFIX).is_ok_and(|f| !f.is_empty())
            && ckpt_files(d, MODEL_SUFFIX).is_ok_and(|f| !f.is_empty())
    };
    holds(dir) || read_latest(dir).is_ok_and(|tag| holds(&dir.join(tag)))
}

/// The directory that holds the rank files: `dir/<tag>` where `latest` names the tag, or `dir`
/// itself when it holds the files (a `global_stepN` directory given directly).
pub fn tag_dir(dir: &Path) -> Result<PathBuf> {
    let latest = dir.join(LATEST);
    if latest.is_file() {
        let tag = read_latest(dir)?;
        let d = dir.join(&tag);
        if !d.is_dir() {
            return Err(FormatError::invalid(
                &latest,
                format!(
                    "names the tag {tag:?}, but {} does not exist (an interrupted save, or a tag that was deleted)",
                    d.display()
                ),
            ));
        }
        return Ok(d);
    }
    if ckpt_files(dir, OPTIM_SUFFIX).is_ok_and(|f| !f.is_empty()) {
        return Ok(dir.to_path_buf());
    }
    Err(FormatError::NotACheckpoint {
        path: dir.to_path_buf(),
        why: format!(
            "no `latest` file and no *{OPTIM_SUFFIX} files (a DeepSpeed save directory, or one of its global_stepN directories){}",
            tag_hint(dir)
        ),
    })
}

/// Reads the ZeRO checkpoint in `dir` (a save directory with `latest`, or a tag directory).
pub fn read(dir: &Path) -> Result<Catalog> {
    let tdir = tag_dir(dir)?;
    read_in(dir, &tdir, false)
}

/// Reads the checkpoint of tag `tag` in the save directory `dir`, ignoring `latest`
/// (zero_to_fp32's `-t TAG`).
pub fn read_tag(dir: &Path, tag: &str) -> Result<Catalog> {
    let rel = safe_tag(tag)
        .ok_or_else(|| FormatError::invalid(dir, format!("tag {tag:?} is not a directory name")))?;
    let tdir = dir.join(rel);
    if !tdir.is_dir() {
        return Err(FormatError::NotACheckpoint {
            path: tdir,
            why: format!("no tag directory {tag:?}{}", tag_hint(dir)),
        });
    }
    read_in(dir, &tdir, false)
}

/// Reads what this process can see of a ZeRO checkpoint whose rank files may be spread over
/// machines (DeepSpeed's node-local storage): pieces only for the files present, placed by the
/// rank number in each file name. Tiling is not checked here; [`Catalog::merge`] does that once
/// every rank's part is in.
///
/// Placing a stage 1/2 partition needs `param_shapes` from `mp_rank_00_model_states.pt`, so a
/// process that sees optimizer files must also see that file; for stage 3 any rank's model-state
/// file will do. Buffers and stage 2 frozen parameters come from rank 0's model-state file only.
/// A process that sees no rank file at all gets [`FormatError::NotACheckpoint`]: the catalog's
/// format carries the ZeRO stage, which only the rank files record.
pub fn read_partial(dir: &Path) -> Result<Catalog> {
    let tdir = match tag_dir(dir) {
        Ok(t) => t,
        // `latest` is written by global rank 0 only; elsewhere look for the tag directories.
        Err(e @ FormatError::NotACheckpoint { .. }) => only_tag(dir).ok_or(e)?,
        Err(e) => return Err(e),
    };
    read_in(dir, &tdir, true)
}

// ---------------------------------------------------------------------------------------------
// Files.

/// Reads the tag from `dir/latest` (surrounding whitespace removed, as zero_to_fp32 does).
fn read_latest(dir: &Path) -> Result<String> {
    let path = dir.join(LATEST);
    let bytes = mapped::read_small(&path, LATEST_LIMIT)?;
    let tag = String::from_utf8(bytes)
        .map_err(|_| FormatError::invalid(&path, "the tag is not UTF-8 text"))?
        .trim()
        .to_string();
    if safe_tag(&tag).is_none() {
        return Err(FormatError::invalid(
            &path,
            format!(
                "names the tag {tag:?}, which {}: a DeepSpeed tag is the name of a directory inside the checkpoint directory (global_stepN); not followed",
                if tag.is_empty() {
                    "is empty"
                } else {
                    "points outside the checkpoint directory"
                }
            ),
        ));
    }
    Ok(tag)
}

/// A tag as a relative path that stays inside the save directory.
fn safe_tag(tag: &str) -> Option<PathBuf> {
    let p = PathBuf::from(tag);
    (!tag.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))).then_some(p)
}

/// The one subdirectory of `dir` holding optimizer files, if there is exactly one.
fn only_tag(dir: &Path) -> Option<PathBuf> {
    let found = tag_dirs(dir);
    (found.len() == 1).then(|| dir.join(&found[0]))
}

/// Subdirectories of `dir` that hold `*_optim_states.pt` files, by name.
fn tag_dirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter(|e| ckpt_files(&e.path(), OPTIM_SUFFIX).is_ok_and(|f| !f.is_empty()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort_by_key(|n| natural_key(n));
    found
}

/// `"; tag directories here: global_step1, global_step2"` or nothing.
fn tag_hint(dir: &Path) -> String {
    let found = tag_dirs(dir);
    if found.is_empty() {
        String::new()
    } else {
        format!("; tag directories here: {}", found.join(", "))
    }
}

/// File names in `dir` ending with `suffix`, in zero_to_fp32's natural order (`rank_2` before
/// `rank_10`). Like Python's glob `*`, names starting with a dot are left out.
fn ckpt_files(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(|e| FormatError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(suffix) && !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)).then_with(|| a.cmp(b)));
    Ok(names)
}

/// One part of a natural sort key: zero_to_fp32 splits names with `re.split(r'(\d+)')` and turns
/// the digit runs into ints, so text and numbers alternate and compare position by position.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Text(String),
    /// A digit run as (length without leading zeros, digits): compares as the number does.
    Num(usize, String),
}

fn natural_key(name: &str) -> Vec<KeyPart> {
    let mut parts = Vec::new();
    let mut rest = name;
    loop {
        let text_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        parts.push(KeyPart::Text(rest[..text_end].to_string()));
        rest = &rest[text_end..];
        if rest.is_empty() {
            return parts;
        }
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let digits = rest[..num_end].trim_start_matches('0');
        parts.push(KeyPart::Num(digits.len(), digits.to_string()));
        rest = &rest[num_end..];
    }
}

/// The data-parallel rank in a file name (`..._zero_pp_rank_3_mp_rank_00_...` → 3).
fn rank_in_name(name: &str) -> Option<usize> {
    let rest = &name[name.find("zero_pp_rank_")? + "zero_pp_rank_".len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Archives and the tensors in them.

/// A mapped `torch.save` file with its parsed directory and pickle.
struct Archive {
    path: PathBuf,
    /// The file's name in its directory.
    name: String,
    /// Index into the catalog's files.
    file: usize,
    map: Mapped,
    save: TorchSave,
}

impl Archive {
    fn open(path: PathBuf, name: String, file: usize) -> Result<Archive> {
        let map = mapped::map(&path)?;
        let save = TorchSave::parse(&*map).map_err(|e| match e {
            TorchSaveError::Zip(z) => FormatError::Zip {
                path: path.clone(),
                offset: z.offset,
                msg: z.msg,
            },
            TorchSaveError::Pickle { base, source } => FormatError::Pickle {
                path: path.clone(),
                base,
                source,
            },
            other => FormatError::invalid(&path, other.to_string()),
        })?;
        Ok(Archive {
            path,
            name,
            file,
            map,
            save,
        })
    }

    fn p(&self) -> &Pickle {
        &self.save.pickle
    }

    fn bad(&self, msg: impl Into<String>) -> FormatError {
        FormatError::invalid(&self.path, msg)
    }

    /// A key that `parent` (a dict) must hold; the error lists the keys it does hold.
    fn key(&self, parent: &Value, key: &str, what: &str) -> Result<&Value> {
        self.p().dict_get(parent, key).ok_or_else(|| {
            self.bad(format!(
                "no {key:?} in {what}: {}",
                self.describe_keys(parent)
            ))
        })
    }

    /// `it holds a, b, c` for a dict, else what the value is.
    fn describe_keys(&self, v: &Value) -> String {
        match self.p().as_dict(v) {
            Some(items) => {
                let keys: Vec<&str> = items
                    .iter()
                    .filter_map(|(k, _)| self.p().as_str(k))
                    .collect();
                format!("it holds {}", keys.join(", "))
            }
            None => format!("it is {}", self.p().describe(v)),
        }
    }

    /// Where a pickled tensor's elements lie in the file.
    fn locate(&self, v: &Value, what: &str) -> Result<Located> {
        let t = match self.save.tensor(v) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                return Err(FormatError::unsupported(&self.path, format!("{what}: {e}")));
            }
            None => {
                return Err(self.bad(format!("{what} is {}, not a tensor", self.p().describe(v))));
            }
        };
        let record = self
            .save
            .storage(&t.storage_key)
            .ok_or_else(|| self.bad(format!("{what}: no record data/{}", t.storage_key)))?
            .clone();
        let (_, last) = t.byte_extent();
        if last > record.size {
            return Err(self.bad(format!(
                "{what} needs {last} bytes of storage data/{} but the record holds {}",
                t.storage_key, record.size
            )));
        }
        let end = record.data_offset.saturating_add(record.size);
        let len = self.map.len() as u64;
        if end > len {
            return Err(FormatError::OutOfBounds {
                path: self.path.clone(),
                what: format!("storage data/{} of {what}", t.storage_key),
                offset: record.data_offset,
                end,
                len,
            });
        }
        Ok(Located { t, record })
    }

    /// A tensor read as a flat run of elements (fp32 partitions, stage 3 fragments).
    fn flat(&self, v: &Value, what: &str) -> Result<FlatSrc> {
        let loc = self.locate(v, what)?;
        if !loc.t.is_contiguous() {
            return Err(FormatError::unsupported(
                &self.path,
                format!(
                    "{what} with strides {:?} (a flat partition must be contiguous)",
                    loc.t.strides
                ),
            ));
        }
        Ok(FlatSrc {
            file: self.file,
            offset: loc.record.data_offset + loc.t.storage_offset * loc.t.dtype.size() as u64,
            len: loc.t.numel(),
            dtype: loc.t.dtype,
            record: loc.record,
        })
    }

    /// A tensor as a whole (buffers, stage 2 frozen parameters): its shape, dtype and the one
    /// piece covering it (none when it has no elements).
    fn whole(&self, v: &Value, what: &str) -> Result<(TensorRef, Option<Piece>)> {
        let loc = self.locate(v, what)?;
        let t = loc.t;
        if t.numel() == 0 {
            return Ok((t, None));
        }
        let (first, last) = t.byte_extent();
        let piece = Piece {
            region: Region::whole(&t.shape),
            file: self.file,
            offset: loc.record.data_offset + first,
            strides: t.strides.clone(),
            stored_dtype: t.dtype,
            encoding: Encoding::Raw,
            checksum: record_checksum(&loc.record, loc.record.data_offset + first, last - first),
        };
        Ok((t, Some(piece)))
    }
}

/// A tensor and the zip record holding its storage.
struct Located {
    t: TensorRef,
    record: ZipEntry,
}

/// A contiguous run of elements in a file.
#[derive(Clone, Debug)]
struct FlatSrc {
    file: usize,
    /// Byte offset of element 0.
    offset: u64,
    /// Number of elements.
    len: u64,
    dtype: DType,
    record: ZipEntry,
}

impl FlatSrc {
    /// The piece holding elements `[at, at + len)` of this run, which are elements
    /// `[start, start + len)` of the tensor.
    fn piece(&self, at: u64, start: u64, len: u64) -> Piece {
        let es = self.dtype.size() as u64;
        let offset = self.offset + at * es;
        Piece {
            region: Region::Flat { start, len },
            file: self.file,
            offset,
            strides: vec![1],
            stored_dtype: self.dtype,
            encoding: Encoding::Raw,
            checksum: record_checksum(&self.record, offset, len * es),
        }
    }
}

/// The zip CRC, when a piece reads exactly its whole record. Pieces cut from a flat partition
/// that many parameters share read part of a record, so they carry none.
fn record_checksum(record: &ZipEntry, offset: u64, len: u64) -> Option<Checksum> {
    (offset == record.data_offset && len == record.size && len > 0).then_some(Checksum {
        offset,
        len,
        crc32: record.crc32,
    })
}

/// The dtype zero_to_fp32.py writes for a tensor stored as `stored`: floats become fp32.
fn output_dtype(stored: DType) -> DType {
    if stored.is_convertible_float() {
        DType::F32
    } else {
        stored
    }
}

// ---------------------------------------------------------------------------------------------
// Typed reading of the pickles.

/// A `torch.Size` (REDUCE(Size, (tuple,))), or a plain tuple/list of non-negative ints.
fn size_of(p: &Pickle, v: &Value) -> Option<Vec<u64>> {
    let items = match p.as_sequence(v) {
        Some(items) => items,
        None => p.as_sequence(p.call_args(v)?.first()?)?,
    };
    items
        .iter()
        .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
        .collect()
}

/// An int, or an int enum pickled as REDUCE(EnumClass, (int,)) (`ZeroStageEnum.gradients`).
fn int_of(p: &Pickle, v: &Value) -> Option<i64> {
    p.as_int(v).or_else(|| {
        p.call_args(v)
            .and_then(|a| a.first())
            .and_then(|x| p.as_int(x))
    })
}

/// Elements of a shape, failing on overflow.
fn numel_of(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &n| a.checked_mul(n))
}

/// An ordered `name → shape` dict.
fn shape_dict(a: &Archive, v: &Value, what: &str) -> Result<Vec<(String, Vec<u64>)>> {
    let p = a.p();
    let items = p
        .as_dict(v)
        .ok_or_else(|| a.bad(format!("{what} is {}, not a dict", p.describe(v))))?;
    items
        .iter()
        .map(|(k, s)| {
            let name = p
                .as_str(k)
                .ok_or_else(|| a.bad(format!("a key of {what} is {}", p.describe(k))))?;
            let shape = size_of(p, s).ok_or_else(|| {
                a.bad(format!(
                    "{what}[{name:?}] is {}, not a shape",
                    p.describe(s)
                ))
            })?;
            if numel_of(&shape).is_none() {
                return Err(a.bad(format!("{what}[{name:?}]: shape {shape:?} overflows")));
            }
            Ok((name.to_string(), shape))
        })
        .collect()
}

/// An ordered `name → value` dict (`module`, `frozen_param_fragments`).
fn value_dict(a: &Archive, v: &Value, what: &str) -> Result<Vec<(String, Value)>> {
    let p = a.p();
    let items = p
        .as_dict(v)
        .ok_or_else(|| a.bad(format!("{what} is {}, not a dict", p.describe(v))))?;
    items
        .iter()
        .map(|(k, x)| match p.as_str(k) {
            Some(name) => Ok((name.to_string(), x.clone())),
            None => Err(a.bad(format!("a key of {what} is {}", p.describe(k)))),
        })
        .collect()
}

/// What zero_to_fp32 takes from one `*_model_states.pt`.
struct ModelStates {
    arch: Archive,
    buffer_names: HashSet<String>,
    module: Vec<(String, Value)>,
    param_shapes: Vec<Vec<(String, Vec<u64>)>>,
    frozen_shapes: Vec<(String, Vec<u64>)>,
    frozen_fragments: HashMap<String, Value>,
    /// alias → source.
    shared: Vec<(String, String)>,
}

fn model_states(arch: Archive) -> Result<ModelStates> {
    let p = arch.p();
    let root = p.root().clone();
    if p.as_dict(&root).is_none() {
        return Err(arch.bad(format!(
            "holds {}, not a model state dict",
            p.describe(&root)
        )));
    }
    let Some(bn) = p.dict_get(&root, "buffer_names") else {
        return Err(arch.bad(format!(
            "is not a model state checkpoint (no buffer_names; {})",
            arch.describe_keys(&root)
        )));
    };
    let buffer_names = p
        .as_sequence(bn)
        .and_then(|items| {
            items
                .iter()
                .map(|x| p.as_str(x).map(str::to_string))
                .collect()
        })
        .ok_or_else(|| arch.bad(format!("buffer_names is {}", p.describe(bn))))?;
    let module = value_dict(
        &arch,
        arch.key(&root, "module", "the model states")?,
        "module",
    )?;
    let ps = arch.key(&root, "param_shapes", "the model states")?;
    let groups = p.as_sequence(ps).ok_or_else(|| {
        arch.bad(format!(
            "param_shapes is {}: not saved with a ZeRO optimizer",
            p.describe(ps)
        ))
    })?;
    let param_shapes = groups
        .iter()
        .enumerate()
        .map(|(i, g)| shape_dict(&arch, g, &format!("param_shapes[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let frozen_shapes = match p.dict_get(&root, "frozen_param_shapes") {
        None | Some(Value::None) => Vec::new(),
        Some(v) => shape_dict(&arch, v, "frozen_param_shapes")?,
    };
    let frozen_fragments = match p.dict_get(&root, "frozen_param_fragments") {
        None | Some(Value::None) => HashMap::new(),
        Some(v) => value_dict(&arch, v, "frozen_param_fragments")?
            .into_iter()
            .collect(),
    };
    let shared = match p.dict_get(&root, "shared_params") {
        None | Some(Value::None) => Vec::new(),
        Some(v) => value_dict(&arch, v, "shared_params")?
            .into_iter()
            .map(|(alias, src)| match p.as_str(&src) {
                Some(s) => Ok((alias, s.to_string())),
                None => Err(arch.bad(format!("shared_params[{alias:?}] is {}", p.describe(&src)))),
            })
            .collect::<Result<_>>()?,
    };
    Ok(ModelStates {
        arch,
        buffer_names,
        module,
        param_shapes,
        frozen_shapes,
        frozen_fragments,
        shared,
    })
}

/// What zero_to_fp32 takes from one `*_optim_states.pt`.
struct OptimStates {
    arch: Archive,
    /// `zero_stage` (absent in a BF16_Optimizer file).
    stage: Option<i64>,
    /// `partition_count`, or its largest entry when it is a list (one per param group).
    world: Option<u64>,
    /// The fp32 flat partitions, one per param group (stage 1/2) or sub-group (stage 3).
    groups: Vec<FlatSrc>,
    /// `group_paddings`: this rank's tail padding per group (stage 1/2).
    group_paddings: Vec<u64>,
    /// `param_alignment_paddings` (0.19.7+): per group, the padding after each parameter.
    alignment: Option<Vec<Vec<u64>>>,
}

fn optim_states(arch: Archive) -> Result<OptimStates> {
    let p = arch.p();
    let root = p.root().clone();
    let osd = arch
        .key(&root, "optimizer_state_dict", "the optimizer states")?
        .clone();
    let stage = p.dict_get(&osd, "zero_stage").and_then(|v| int_of(p, v));
    let world = match p.dict_get(&osd, "partition_count") {
        None => None,
        Some(v) => Some(
            partition_count(p, v)
                .ok_or_else(|| arch.bad(format!("partition_count is {}", p.describe(v))))?,
        ),
    };
    let group_paddings = match p
        .dict_get(&osd, "group_paddings")
        .and_then(|v| p.as_sequence(v))
    {
        Some(items) => items
            .iter()
            .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| arch.bad("group_paddings holds a non-integer"))?,
        None => Vec::new(),
    };
    let alignment = match p.dict_get(&osd, "param_alignment_paddings") {
        None | Some(Value::None) => None,
        Some(v) => Some(int_lists(p, v).ok_or_else(|| {
            arch.bad(format!(
                "param_alignment_paddings is {}, not a list of integer lists",
                p.describe(v)
            ))
        })?),
    };
    Ok(OptimStates {
        arch,
        stage,
        world,
        groups: Vec::new(),
        group_paddings,
        alignment,
    })
}

/// `partition_count`: an int (stage 3), or a list with one per param group (stage 1/2), of which
/// zero_to_fp32 takes the largest (expert groups may be smaller).
fn partition_count(p: &Pickle, v: &Value) -> Option<u64> {
    match p.as_sequence(v) {
        Some(items) => items
            .iter()
            .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
            .collect::<Option<Vec<u64>>>()?
            .into_iter()
            .max(),
        None => p.as_int(v).and_then(|i| u64::try_from(i).ok()),
    }
}

fn int_lists(p: &Pickle, v: &Value) -> Option<Vec<Vec<u64>>> {
    p.as_sequence(v)?
        .iter()
        .map(|g| {
            p.as_sequence(g)?
                .iter()
                .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
                .collect()
        })
        .collect()
}

/// Reads the flat fp32 groups stored under `key` in an optimizer file.
fn load_groups(o: &mut OptimStates, key: &str) -> Result<()> {
    let a = &o.arch;
    let p = a.p();
    let osd = a.key(p.root(), "optimizer_state_dict", "the optimizer states")?;
    let v = a.key(osd, key, "optimizer_state_dict")?;
    let items = p
        .as_sequence(v)
        .ok_or_else(|| a.bad(format!("{key} is {}, not a list", p.describe(v))))?;
    let groups = items
        .iter()
        .enumerate()
        .map(|(i, t)| a.flat(t, &format!("{key}[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    o.groups = groups;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Building the catalog.

/// Everything read from the rank files, and what the catalog is being built into.
struct Build {
    /// The tag directory.
    tdir: PathBuf,
    /// The tag directory relative to the catalog root.
    rel: PathBuf,
    partial: bool,
    files: Vec<SourceFile>,
    tensors: Vec<TensorEntry>,
    notes: Vec<String>,
}

impl Build {
    fn open(&mut self, name: &str) -> Result<Archive> {
        let path = self.tdir.join(name);
        let a = Archive::open(path, name.to_string(), self.files.len())?;
        self.files.push(SourceFile {
            path: self.rel.join(name),
            size: a.map.len() as u64,
        });
        Ok(a)
    }

    fn bad(&self, msg: impl Into<String>) -> FormatError {
        FormatError::invalid(&self.tdir, msg)
    }

    /// Adds a tensor. Shapes come from the files (`param_shapes`, tensors' sizes) and only
    /// their element count is checked on reading: one whose bytes in the output dtype (fp32
    /// for stored bf16) overflow u64 is refused here, as every later `nbytes()` would overflow
    /// (found by fuzzing: a partial read, which checks no element counts, let one through).
    fn push(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<u64>,
        pieces: Vec<Piece>,
    ) -> Result<()> {
        if numel_of(&shape)
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .is_none()
        {
            return Err(self.bad(format!(
                "tensor {name}: shape {shape:?} of {dtype} overflows 64 bits"
            )));
        }
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            path: vec![name.to_string()],
            dtype,
            shape,
            pieces,
        });
        Ok(())
    }
}

/// Reads the rank files in `tdir`, giving file paths relative to `root`.
fn read_in(root: &Path, tdir: &Path, partial: bool) -> Result<Catalog> {
    let rel = tdir
        .strip_prefix(root)
        .unwrap_or(Path::new(""))
        .to_path_buf();
    let mut b = Build {
        tdir: tdir.to_path_buf(),
        rel,
        partial,
        files: Vec::new(),
        tensors: Vec::new(),
        notes: Vec::new(),
    };
    let (models, mut optims) = open_rank_files(&mut b)?;
    let (stage, world) = stage_and_world(&b, &optims, &models)?;
    let key = if stage <= 2 {
        "single_partition_of_fp32_groups"
    } else {
        "fp32_flat_groups"
    };
    for o in &mut optims {
        load_groups(o, key)?;
    }
    let ranks = rank_order(&b, &optims, world)?;
    let m0 = model_for_metadata(&b, &models, stage)?;

    buffers(&mut b, m0)?;
    if stage <= 2 {
        frozen_stage2(&mut b, m0)?;
        trainable_stage12(&mut b, m0, &optims, &ranks, world)?;
        left_out_stage12(&mut b, m0, stage);
    } else {
        frozen_stage3(&mut b, m0, &models, world)?;
        trainable_stage3(&mut b, m0, &optims, &ranks, world)?;
    }
    drop_aliases(&mut b, m0);
    if !partial {
        for t in &b.tensors {
            t.check_coverage()
                .map_err(|msg| b.bad(format!("tensor {}: {msg}", t.name)))?;
        }
    }
    // The flat partitions are read in slices by many pieces: each whole record is checked.
    let mut records = Vec::new();
    for f in optims.iter().flat_map(|o| o.groups.iter()) {
        let r = RecordCheck {
            file: f.file,
            checksum: Checksum {
                offset: f.record.data_offset,
                len: f.record.size,
                crc32: f.record.crc32,
            },
        };
        if f.record.size > 0 && !records.contains(&r) {
            records.push(r);
        }
    }
    Ok(Catalog {
        format: Format::DeepSpeed { stage },
        root: root.to_path_buf(),
        files: b.files,
        tensors: b.tensors,
        writer_ranks: usize::try_from(world).ok(),
        skipped: Vec::new(),
        notes: b.notes,
        records,
    })
}

/// Opens and parses every rank file of the tag directory: the model states first, then the
/// optimizer states, as zero_to_fp32 does.
fn open_rank_files(b: &mut Build) -> Result<(Vec<ModelStates>, Vec<OptimStates>)> {
    let tdir = b.tdir.clone();
    let model_names = ckpt_files(&tdir, MODEL_SUFFIX)?;
    let optim_names = ckpt_files(&tdir, OPTIM_SUFFIX)?;
    let none_seen = model_names.is_empty() && optim_names.is_empty();
    if none_seen || (!b.partial && (model_names.is_empty() || optim_names.is_empty())) {
        return Err(FormatError::NotACheckpoint {
            path: tdir,
            why: format!(
                "a ZeRO checkpoint needs *{MODEL_SUFFIX} and *{OPTIM_SUFFIX} files; {}found {} and {}",
                if b.partial { "this process " } else { "" },
                model_names.len(),
                optim_names.len()
            ),
        });
    }
    // Mixture-of-experts saves add `[layer_L_]expert_E_mp_rank_XX_model_states.pt`, which the
    // same glob matches; zero_to_fp32 then fails on them (they hold no buffer_names).
    if let Some(moe) = model_names.iter().find(|n| n.contains("expert_")) {
        return Err(FormatError::unsupported(
            tdir.join(moe),
            "a mixture-of-experts ZeRO checkpoint (zero_to_fp32 does not read it either)",
        ));
    }
    let models = model_names
        .iter()
        .map(|n| model_states(b.open(n)?))
        .collect::<Result<Vec<_>>>()?;
    let optims = optim_names
        .iter()
        .map(|n| optim_states(b.open(n)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((models, optims))
}

/// The ZeRO stage and the data-parallel world size, from the first optimizer file (as
/// zero_to_fp32 does), checked against the number of optimizer files.
fn stage_and_world(b: &Build, optims: &[OptimStates], models: &[ModelStates]) -> Result<(u8, u64)> {
    let Some(o0) = optims.first() else {
        return stage_from_model_states(b, models);
    };
    let Some(stage) = o0.stage else {
        let p = o0.arch.p();
        let bf16_optimizer = p
            .dict_get(p.root(), "optimizer_state_dict")
            .and_then(|osd| p.dict_get(osd, "single_partition_of_fp32_groups"))
            .is_some();
        let hint = if bf16_optimizer {
            " (a BF16_Optimizer checkpoint: bf16 with ZeRO-1 and fp32 gradient accumulation, or pipeline parallelism; zero_to_fp32 cannot read it either)"
        } else {
            ""
        };
        return Err(o0
            .arch
            .bad(format!("is not a ZeRO checkpoint: no zero_stage{hint}")));
    };
    let stage = u8::try_from(stage)
        .ok()
        .filter(|s| *s <= 3)
        .ok_or_else(|| o0.arch.bad(format!("unknown zero stage {stage}")))?;
    let world = o0
        .world
        .filter(|w| *w > 0)
        .ok_or_else(|| o0.arch.bad("no usable partition_count"))?;
    if !b.partial && world != optims.len() as u64 {
        return Err(b.bad(format!(
            "expected {world} *{OPTIM_SUFFIX} files (partition_count in {}) but found {}: a rank did not save its file, or an older checkpoint was partly overwritten",
            o0.arch.name,
            optims.len()
        )));
    }
    for o in &optims[1..] {
        if o.stage.is_some_and(|s| s != i64::from(stage)) || o.world.is_some_and(|w| w != world) {
            return Err(o.arch.bad(format!(
                "records ZeRO stage {:?} and partition_count {:?}, but {} says stage {stage} over {world} ranks",
                o.stage, o.world, o0.arch.name
            )));
        }
    }
    Ok((stage, world))
}

/// A partial view with model states but no optimizer file: the stage from the saved config
/// (`ds_config.zero_optimization.stage`) and the world from `dp_world_size`.
fn stage_from_model_states(b: &Build, models: &[ModelStates]) -> Result<(u8, u64)> {
    let Some(m) = models.first() else {
        return Err(b.bad(format!("no *{OPTIM_SUFFIX} file")));
    };
    let p = m.arch.p();
    let root = p.root();
    let stage = p
        .dict_get(root, "ds_config")
        .and_then(|c| p.dict_get(c, "zero_optimization"))
        .and_then(|z| p.dict_get(z, "stage"))
        .and_then(|s| int_of(p, s))
        .and_then(|s| u8::try_from(s).ok())
        .filter(|s| (1..=3).contains(s));
    let world = p
        .dict_get(root, "dp_world_size")
        .and_then(|w| p.as_int(w))
        .and_then(|w| u64::try_from(w).ok())
        .filter(|w| *w > 0);
    match (stage, world) {
        (Some(s), Some(w)) => Ok((s, w)),
        _ => Err(m.arch.bad(format!(
            "no *{OPTIM_SUFFIX} file is visible, and the model states do not record the ZeRO stage (ds_config) and dp_world_size"
        ))),
    }
}

/// The rank of each optimizer file: its position in natural order (zero_to_fp32), or, for a
/// partial view, the rank in its name.
fn rank_order(b: &Build, optims: &[OptimStates], world: u64) -> Result<Vec<usize>> {
    if !b.partial {
        return Ok((0..optims.len()).collect());
    }
    optims
        .iter()
        .map(|o| {
            rank_in_name(&o.arch.name)
                .filter(|&r| (r as u64) < world)
                .ok_or_else(|| {
                    o.arch.bad(format!(
                        "no data-parallel rank below {world} in the name (zero_pp_rank_N)"
                    ))
                })
        })
        .collect()
}

/// The model-state file whose metadata is used: the first in natural order (rank 0's). A
/// partial view uses rank 0's for stage 1/2 (the only one) and any rank's for stage 3, whose
/// files all record the same shapes.
fn model_for_metadata<'a>(
    b: &Build,
    models: &'a [ModelStates],
    stage: u8,
) -> Result<&'a ModelStates> {
    models.first().ok_or_else(|| {
        if stage <= 2 {
            b.bad(format!(
                "sees optimizer files but not mp_rank_00{MODEL_SUFFIX}, whose param_shapes say where each parameter lies in the partitions; make that file visible to this process"
            ))
        } else {
            b.bad(format!(
                "sees optimizer files but no *{MODEL_SUFFIX} file (each rank's records the parameter shapes)"
            ))
        }
    })
}

/// Whether a partial view holds rank 0's model-state file (the source of buffers and stage 2
/// frozen parameters); a full read always uses the first file.
fn is_rank0_model(b: &Build, m: &ModelStates) -> bool {
    !b.partial || m.arch.name.starts_with("mp_rank_") || rank_in_name(&m.arch.name) == Some(0)
}

/// Persistent buffers, in `module` order, floating ones reported as fp32.
fn buffers(b: &mut Build, m0: &ModelStates) -> Result<()> {
    let with_pieces = is_rank0_model(b, m0);
    for (name, v) in &m0.module {
        if !m0.buffer_names.contains(name) {
            continue;
        }
        let (t, piece) = m0.arch.whole(v, &format!("buffer {name}"))?;
        let pieces = if with_pieces {
            piece.into_iter().collect()
        } else {
            Vec::new()
        };
        b.push(name, output_dtype(t.dtype), t.shape, pieces)?;
    }
    Ok(())
}

/// Stage ≤ 2 frozen parameters: whole tensors from rank 0's `frozen_param_fragments`.
fn frozen_stage2(b: &mut Build, m0: &ModelStates) -> Result<()> {
    let with_pieces = is_rank0_model(b, m0);
    for (name, _shape) in &m0.frozen_shapes {
        let v = m0.frozen_fragments.get(name).ok_or_else(|| {
            m0.arch.bad(format!(
                "frozen parameter {name} is in frozen_param_shapes but not in frozen_param_fragments"
            ))
        })?;
        // zero_to_fp32 outputs the fragment itself, so its shape is the one that counts.
        let (t, piece) = m0.arch.whole(v, &format!("frozen parameter {name}"))?;
        let pieces = if with_pieces {
            piece.into_iter().collect()
        } else {
            Vec::new()
        };
        b.push(name, output_dtype(t.dtype), t.shape, pieces)?;
    }
    Ok(())
}

/// Stage 3 frozen parameters: every rank's `frozen_param_fragments[name]` concatenated in rank
/// order, then cut to the parameter's size.
fn frozen_stage3(
    b: &mut Build,
    m0: &ModelStates,
    models: &[ModelStates],
    world: u64,
) -> Result<()> {
    for (name, shape) in &m0.frozen_shapes {
        let numel = numel_of(shape).unwrap_or(0);
        let part = numel.div_ceil(world);
        let mut pieces = Vec::new();
        let mut dtype: Option<DType> = None;
        let mut start = 0u64;
        for m in models {
            let v = m.frozen_fragments.get(name).ok_or_else(|| {
                m.arch
                    .bad(format!("no frozen_param_fragments entry for {name}"))
            })?;
            let f = m.arch.flat(v, &format!("frozen fragment of {name}"))?;
            if dtype.is_some_and(|d| d != f.dtype) {
                return Err(m.arch.bad(format!(
                    "frozen fragment of {name} is {} but another rank's is {}",
                    f.dtype,
                    dtype.unwrap_or(f.dtype)
                )));
            }
            dtype = Some(f.dtype);
            // A full read follows the concatenation; a partial one places a fragment by its
            // rank, each rank holding `ceil(numel / world)` elements.
            let at = if b.partial {
                let r = rank_in_name(&m.arch.name).ok_or_else(|| {
                    m.arch
                        .bad("no data-parallel rank in the name (zero_pp_rank_N)")
                })? as u64;
                // The rank comes from a file name, not checked against the world size: a
                // position past u64 lies past the parameter (skipped below), as it should.
                r.saturating_mul(part)
            } else {
                let s = start;
                start += f.len;
                s
            };
            if at < numel && f.len > 0 {
                let len = f.len.min(numel - at);
                pieces.push(f.piece(0, at, len));
            }
        }
        if !b.partial && start < numel {
            return Err(b.bad(format!(
                "frozen parameter {name} has {numel} elements but the ranks' fragments hold only {start}"
            )));
        }
        let dtype = dtype.unwrap_or(DType::BF16);
        b.push(name, output_dtype(dtype), shape.clone(), pieces)?;
    }
    Ok(())
}

/// Where one rank's flat partitions start in zero_to_fp32's concatenation, per group.
fn stage12_starts(b: &Build, optims: &[OptimStates], ranks: &[usize]) -> Vec<Vec<u64>> {
    if !b.partial {
        // A full read concatenates what the ranks saved, in file order.
        let mut acc: Vec<u64> = vec![0; optims.first().map_or(0, |o| o.groups.len())];
        return optims
            .iter()
            .map(|o| {
                let starts = acc.clone();
                for (a, g) in acc.iter_mut().zip(&o.groups) {
                    *a += g.len;
                }
                starts
            })
            .collect();
    }
    // Partitions are equal-sized (P) before each rank drops the part of it that lies in the
    // group's tail padding (`group_paddings`: 0, some, or all of P), so saved + padding = P and
    // rank r's partition starts at r × P.
    optims
        .iter()
        .zip(ranks)
        .map(|(o, &r)| {
            o.groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    // `group_paddings` comes from the file: a start past u64 (a damaged padding)
                    // is taken as lying past every element, so that it yields no piece (`cut`)
                    // and the merged catalog reports the elements missing.
                    let pad = o.group_paddings.get(i).copied().unwrap_or(0);
                    g.len
                        .checked_add(pad)
                        .and_then(|p| p.checked_mul(r as u64))
                        .unwrap_or(u64::MAX)
                })
                .collect()
        })
        .collect()
}

/// Stage 1/2 trainable parameters: walk `param_shapes[i]` through the concatenation of every
/// rank's partition of group `i`; a parameter may straddle ranks.
fn trainable_stage12(
    b: &mut Build,
    m0: &ModelStates,
    optims: &[OptimStates],
    ranks: &[usize],
    world: u64,
) -> Result<()> {
    let n_groups = optims
        .first()
        .map_or(m0.param_shapes.len(), |o| o.groups.len());
    for o in optims {
        if o.groups.len() != n_groups {
            return Err(o.arch.bad(format!(
                "holds {} fp32 partitions but {} holds {n_groups}",
                o.groups.len(),
                optims[0].arch.name
            )));
        }
    }
    if !optims.is_empty() && m0.param_shapes.len() != n_groups {
        return Err(m0.arch.bad(format!(
            "param_shapes lists {} parameter groups but the optimizer files hold {n_groups} fp32 partitions",
            m0.param_shapes.len()
        )));
    }
    let starts = stage12_starts(b, optims, ranks);
    // zero_to_fp32 reads param_alignment_paddings from the first file; every rank saves the
    // same lists.
    let alignment = optims.first().and_then(|o| o.alignment.as_ref());
    for (i, shapes) in m0.param_shapes.iter().enumerate() {
        let pads = match alignment {
            Some(a) => {
                let g = a.get(i).ok_or_else(|| {
                    optims[0]
                        .arch
                        .bad(format!("param_alignment_paddings has no group {i}"))
                })?;
                if g.len() != shapes.len() {
                    return Err(optims[0].arch.bad(format!(
                        "expected {} parameter alignment paddings for group {i}, but found {}",
                        shapes.len(),
                        g.len()
                    )));
                }
                Some(g)
            }
            None => None,
        };
        let spans: Vec<(u64, &FlatSrc)> = optims
            .iter()
            .enumerate()
            .map(|(k, o)| (starts[k][i], &o.groups[i]))
            .collect();
        let avail: u64 = spans.iter().map(|(_, f)| f.len).sum();
        let mut off = 0u64;
        for (j, (name, shape)) in shapes.iter().enumerate() {
            let numel = numel_of(shape).unwrap_or(0);
            // Sizes and paddings come from the files; offsets past u64 are damage (found by
            // fuzzing: huge param_alignment_paddings overflowed `off` in a partial read, which
            // checks no element counts).
            let overflow = |b: &Build| {
                b.bad(format!(
                    "parameter {name} (group {i}): element offsets overflow 64 bits (param_shapes or param_alignment_paddings are damaged)"
                ))
            };
            let Some(end) = off.checked_add(numel) else {
                return Err(overflow(b));
            };
            if !b.partial && end > avail {
                return Err(b.bad(format!(
                    "parameter {name} (group {i}) needs elements {off}..{end} but the ranks' partitions of that group hold {avail}"
                )));
            }
            let pieces = cut(&spans, off, numel);
            let dtype = spans.first().map_or(DType::F32, |(_, f)| f.dtype);
            b.push(name, output_dtype(dtype), shape.clone(), pieces)?;
            let Some(next) = end.checked_add(pads.map_or(0, |p| p[j])) else {
                return Err(overflow(b));
            };
            off = next;
        }
        // zero_to_fp32's sanity check: both ends agree once rounded up to 2 × world (the
        // nccl_start_alignment_factor of 2 times the data-parallel size). `None` when the
        // paddings pushed `off` so far that rounding it up overflows: no match either.
        let align = |x: u64| x.div_ceil(2 * world).checked_mul(2 * world);
        if !b.partial && align(off) != align(avail) {
            return Err(b.bad(format!(
                "consumed {} numels out of {} in parameter group {i} - something is wrong (param_shapes do not match the fp32 partitions)",
                align(off).unwrap_or(off),
                align(avail).unwrap_or(avail)
            )));
        }
    }
    Ok(())
}

/// The pieces of elements `[off, off + numel)` of a concatenation of runs, each given with
/// its start in the concatenation. Runs not present (a partial view) simply yield nothing.
fn cut(spans: &[(u64, &FlatSrc)], off: u64, numel: u64) -> Vec<Piece> {
    let end = off + numel;
    let mut pieces = Vec::new();
    for &(s, f) in spans {
        let lo = off.max(s);
        // A run's end past u64 is past `end` anyway (starts may be u64::MAX: stage12_starts).
        let hi = end.min(s.saturating_add(f.len));
        if lo < hi {
            pieces.push(f.piece(lo - s, lo - off, hi - lo));
        }
    }
    pieces
}

/// A rank's flat runs, each with its first element's position in the rank's flat space.
type Runs<'a> = Vec<(u64, &'a FlatSrc)>;

/// `groups` end to end.
fn runs(groups: &[FlatSrc]) -> Runs<'_> {
    let mut at = 0;
    groups
        .iter()
        .map(|g| {
            let start = at;
            at += g.len;
            (start, g)
        })
        .collect()
}

/// Elements in a rank's runs.
fn run_total(runs: &[(u64, &FlatSrc)]) -> u64 {
    runs.iter().map(|(_, g)| g.len).sum()
}

/// Stage 3's `param_shapes` groups merged into one dict, as zero_to_fp32 does: a repeated name
/// keeps its first position and its last shape.
fn merged_shapes(m0: &ModelStates) -> Vec<(String, Vec<u64>)> {
    let mut merged: Vec<(String, Vec<u64>)> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (name, shape) in m0.param_shapes.iter().flatten() {
        match at.get(name.as_str()) {
            Some(&k) => merged[k].1 = shape.clone(),
            None => {
                at.insert(name, merged.len());
                merged.push((name.clone(), shape.clone()));
            }
        }
    }
    merged
}

/// Stage 3 trainable parameters: in each rank's flat space (its `fp32_flat_groups` end to end)
/// every parameter takes `ceil(numel / world)` elements at the same running offset; rank r's
/// share is elements `[r × part, (r + 1) × part)` of the parameter, cut to its size.
fn trainable_stage3(
    b: &mut Build,
    m0: &ModelStates,
    optims: &[OptimStates],
    ranks: &[usize],
    world: u64,
) -> Result<()> {
    // zero_to_fp32 takes the group boundaries from rank 0 and uses them on every rank.
    if let Some(o0) = optims.first().filter(|_| !b.partial) {
        let sizes = |o: &OptimStates| o.groups.iter().map(|g| g.len).collect::<Vec<u64>>();
        for o in &optims[1..] {
            if sizes(o) != sizes(o0) {
                return Err(o.arch.bad(format!(
                    "fp32_flat_groups sizes {:?} differ from {}'s {:?}",
                    sizes(o),
                    o0.arch.name,
                    sizes(o0)
                )));
            }
        }
    }
    let rank_runs: Vec<Runs> = optims.iter().map(|o| runs(&o.groups)).collect();
    let mut offset = 0u64;
    for (name, shape) in merged_shapes(m0) {
        let numel = numel_of(&shape).unwrap_or(0);
        let part = numel.div_ceil(world);
        let mut pieces = Vec::new();
        let mut dtype = DType::F32;
        for ((o, &r), spans) in optims.iter().zip(ranks).zip(&rank_runs) {
            let have = run_total(spans);
            // `part` comes from param_shapes: with one rank it is a whole parameter's element
            // count, which may be near u64::MAX in a damaged file.
            if offset.checked_add(part).is_none_or(|e| e > have) {
                return Err(o.arch.bad(format!(
                    "parameter {name} needs elements {offset}..{} of this rank's fp32_flat_groups, which hold {have}",
                    offset.saturating_add(part)
                )));
            }
            dtype = spans.first().map_or(dtype, |(_, g)| g.dtype);
            let Some(lo) = (r as u64).checked_mul(part).filter(|&lo| lo < numel) else {
                continue;
            };
            for mut p in cut(spans, offset, part.min(numel - lo)) {
                if let Region::Flat { start, .. } = &mut p.region {
                    *start += lo;
                }
                pieces.push(p);
            }
        }
        b.push(&name, output_dtype(dtype), shape, pieces)?;
        offset += part;
    }
    if let Some(spans) = rank_runs.first().filter(|_| !b.partial) {
        let avail = run_total(spans);
        if offset != avail {
            return Err(b.bad(format!(
                "consumed {} numels out of {} - something is wrong (param_shapes do not match fp32_flat_groups)",
                offset * world,
                avail * world
            )));
        }
    }
    Ok(())
}

/// Stage ≤ 2: names the model states hold in `module` that zero_to_fp32 leaves out (frozen
/// parameters under ZeRO-1, which records no `frozen_param_shapes`).
fn left_out_stage12(b: &mut Build, m0: &ModelStates, stage: u8) {
    let out: HashSet<&str> = b.tensors.iter().map(|t| t.name.as_str()).collect();
    let aliases: HashSet<&str> = m0.shared.iter().map(|(a, _)| a.as_str()).collect();
    let missing: Vec<&str> = m0
        .module
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !out.contains(k) && !aliases.contains(k) && !m0.buffer_names.contains(*k))
        .collect();
    if !missing.is_empty() {
        b.notes.push(format!(
            "left out {}: the model states hold them (16-bit) but zero_to_fp32 does not output them (frozen parameters under ZeRO-{stage}, which saves no frozen_param_shapes)",
            missing.join(", ")
        ));
    }
}

/// Tied parameters: zero_to_fp32 appends each alias as the source tensor itself; the catalog
/// keeps the source once and says which alias it dropped.
fn drop_aliases(b: &mut Build, m0: &ModelStates) {
    for (alias, source) in &m0.shared {
        if b.tensors.iter().any(|t| &t.name == source) {
            b.notes.push(format!(
                "dropped {alias}: it is tied to {source} (DeepSpeed shared_params); safetensors forbids aliases, and transformers re-ties it on load"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_puts_rank_2_before_rank_10() {
        let mut names = [
            "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        ];
        names.sort_by_key(|n| natural_key(n));
        let ranks: Vec<usize> = names.iter().map(|n| rank_in_name(n).unwrap()).collect();
        assert_eq!(ranks, [0, 1, 2, 10]);
        // Digit runs compare as numbers, text as text, position by position.
        assert!(natural_key("a9b") < natural_key("a10a"));
        assert!(natural_key("a010") == natural_key("a10"));
        assert!(natural_key("mp_rank_00") < natural_key("zero_pp_rank_0"));
        assert_eq!(rank_in_name("mp_rank_00_model_states.pt"), None);
    }

    #[test]
    fn tags_stay_inside_the_save_directory() {
        assert!(safe_tag("global_step12").is_some());
        for bad in ["", "..", "../x", "/abs", "a/../../b"] {
            assert!(safe_tag(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cut_splits_a_range_over_runs() {
        let run = |file: usize, offset: u64, len: u64| FlatSrc {
            file,
            offset,
            len,
            dtype: DType::F32,
            record: ZipEntry {
                name: "data/0".into(),
                data_offset: offset,
                size: len * 4,
                crc32: 7,
            },
        };
        let (a, b) = (run(0, 64, 10), run(1, 128, 9));
        let spans = [(0, &a), (10, &b)];
        let pieces = cut(&spans, 8, 5);
        let got: Vec<(usize, u64, Region)> = pieces
            .iter()
            .map(|p| (p.file, p.offset, p.region.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (0, 64 + 8 * 4, Region::Flat { start: 0, len: 2 }),
                (1, 128, Region::Flat { start: 2, len: 3 })
            ]
        );
        // Only a piece reading its whole record carries the record's CRC.
        assert!(pieces.iter().all(|p| p.checksum.is_none()));
        let whole = cut(&spans, 10, 9);
        assert_eq!(whole[0].checksum.map(|c| c.crc32), Some(7));
        assert!(cut(&spans, 19, 0).is_empty());
    }
}
