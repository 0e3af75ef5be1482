//! The files of a ZeRO save directory: the tag (`latest`, or the only tag directory), the rank
//! files in natural order, and the mapped `torch.save` archives with the tensors in them.

use std::path::{Component, Path, PathBuf};

use crate::catalog::{Checksum, Encoding, Piece, Region};
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::mapped::{self, Mapped};
use crate::pickle::{Pickle, Value};
use crate::torchsave::{TensorRef, TorchSave};
use crate::zip::ZipEntry;

/// The file naming the newest tag in a save directory.
pub const LATEST: &str = "latest";
/// Suffix of the model-state files (`mp_rank_00_model_states.pt`, `zero_pp_rank_0_mp_rank_00_model_states.pt`).
pub const MODEL_SUFFIX: &str = "_model_states.pt";
/// Suffix of the optimizer-state files, one per data-parallel rank.
pub const OPTIM_SUFFIX: &str = "_optim_states.pt";

/// Largest `latest` file accepted (it holds a short tag).
pub(super) const LATEST_LIMIT: u64 = 4096;

/// Reads the tag from `dir/latest` (surrounding whitespace removed, as zero_to_fp32 does).
pub(super) fn read_latest(dir: &Path) -> Result<String> {
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
pub(super) fn safe_tag(tag: &str) -> Option<PathBuf> {
    let p = PathBuf::from(tag);
    (!tag.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))).then_some(p)
}

/// The one subdirectory of `dir` holding optimizer files, if there is exactly one.
pub(super) fn only_tag(dir: &Path) -> Option<PathBuf> {
    let found = tag_dirs(dir);
    (found.len() == 1).then(|| dir.join(&found[0]))
}

/// Subdirectories of `dir` that hold `*_optim_states.pt` files, by name.
pub(super) fn tag_dirs(dir: &Path) -> Vec<String> {
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
pub(super) fn tag_hint(dir: &Path) -> String {
    let found = tag_dirs(dir);
    if found.is_empty() {
        String::new()
    } else {
        format!("; tag directories here: {}", found.join(", "))
    }
}

/// File names in `dir` ending with `suffix`, in zero_to_fp32's natural order (`rank_2` before
/// `rank_10`). Like Python's glob `*`, names starting with a dot are left out.
pub(super) fn ckpt_files(dir: &Path, suffix: &str) -> Result<Vec<String>> {
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
pub(super) enum KeyPart {
    Text(String),
    /// A digit run as (length without leading zeros, digits): compares as the number does.
    Num(usize, String),
}

pub(super) fn natural_key(name: &str) -> Vec<KeyPart> {
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
pub(super) fn rank_in_name(name: &str) -> Option<usize> {
    let rest = &name[name.find("zero_pp_rank_")? + "zero_pp_rank_".len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Archives and the tensors in them.

/// A mapped `torch.save` file with its parsed directory and pickle.
pub(super) struct Archive {
    pub(super) path: PathBuf,
    /// The file's name in its directory.
    pub(super) name: String,
    /// Index into the catalog's files.
    pub(super) file: usize,
    pub(super) map: Mapped,
    pub(super) save: TorchSave,
}

impl Archive {
    pub(super) fn open(path: PathBuf, name: String, file: usize) -> Result<Archive> {
        let map = mapped::map(&path)?;
        let save = TorchSave::parse(&*map).map_err(|e| e.into_format_error(&path, 0, None))?;
        Ok(Archive {
            path,
            name,
            file,
            map,
            save,
        })
    }

    pub(super) fn p(&self) -> &Pickle {
        &self.save.pickle
    }

    pub(super) fn bad(&self, msg: impl Into<String>) -> FormatError {
        FormatError::invalid(&self.path, msg)
    }

    /// A key that `parent` (a dict) must hold; the error lists the keys it does hold.
    pub(super) fn key(&self, parent: &Value, key: &str, what: &str) -> Result<&Value> {
        self.p().dict_get(parent, key).ok_or_else(|| {
            self.bad(format!(
                "no {key:?} in {what}: {}",
                self.describe_keys(parent)
            ))
        })
    }

    /// `it holds a, b, c` for a dict, else what the value is.
    pub(super) fn describe_keys(&self, v: &Value) -> String {
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
    pub(super) fn locate(&self, v: &Value, what: &str) -> Result<Located> {
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
    pub(super) fn flat(&self, v: &Value, what: &str) -> Result<FlatSrc> {
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
    pub(super) fn whole(&self, v: &Value, what: &str) -> Result<(TensorRef, Option<Piece>)> {
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
pub(super) struct Located {
    pub(super) t: TensorRef,
    pub(super) record: ZipEntry,
}

/// A contiguous run of elements in a file.
#[derive(Clone, Debug)]
pub(super) struct FlatSrc {
    pub(super) file: usize,
    /// Byte offset of element 0.
    pub(super) offset: u64,
    /// Number of elements.
    pub(super) len: u64,
    pub(super) dtype: DType,
    pub(super) record: ZipEntry,
}

impl FlatSrc {
    /// The piece holding elements `[at, at + len)` of this run, which are elements
    /// `[start, start + len)` of the tensor.
    pub(super) fn piece(&self, at: u64, start: u64, len: u64) -> Piece {
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
pub(super) fn record_checksum(record: &ZipEntry, offset: u64, len: u64) -> Option<Checksum> {
    (offset == record.data_offset && len == record.size && len > 0).then_some(Checksum {
        offset,
        len,
        crc32: record.crc32,
    })
}

/// The dtype zero_to_fp32.py writes for a tensor stored as `stored`: floats become fp32.
pub(super) fn output_dtype(stored: DType) -> DType {
    if stored.is_convertible_float() {
        DType::F32
    } else {
        stored
    }
}
