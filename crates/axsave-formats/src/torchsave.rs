//! `torch.save` archives: `data.pkl` plus one `data/<key>` record per storage.
//!
//! [`TorchSave::parse`] reads an archive held in a byte slice (a whole `.pt` file, or one DCP
//! item inside a `.distcp`), and [`TorchSave::tensor`] turns a pickled tensor into a
//! [`TensorRef`]: where its storage lies, its dtype, storage offset, shape and strides. No
//! tensor data is copied.

use std::path::Path;

use crate::dtype::DType;
use crate::error::FormatError;
use crate::pickle::{self, Pickle, Value};
use crate::zip::{ZipBytes, ZipEntry, ZipError, ZipIndex};

/// Where a pickled tensor's elements lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage key (`"0"` for `data/0`).
    pub storage_key: String,
    /// The element type.
    pub dtype: DType,
    /// Offset of the first element within the storage, in elements.
    pub storage_offset: u64,
    /// The tensor's shape.
    pub shape: Vec<u64>,
    /// Element strides, one per dimension.
    pub strides: Vec<i64>,
    /// The number of bytes the storage holds, as the pickle declares it.
    pub storage_nbytes: u64,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Whether the elements are laid out row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        // The expected stride of the next dimension out. `parse` only bounds the product of the
        // sizes by u64 (in bytes), so it may not fit an i64 (found by fuzzing: shape
        // [2, 2^62] of bytes). An expected stride no i64 can hold matches no stored stride;
        // `None` says so, instead of overflowing.
        let mut expected = Some(1i64);
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && Some(s) != expected {
                return false;
            }
            expected = expected.and_then(|e| e.checked_mul(i64::try_from(n).ok()?));
        }
        true
    }

    /// Bytes `[first, last + 1)` of the storage that the tensor's elements touch, relative to
    /// the storage start (empty for a tensor with no elements).
    pub fn byte_extent(&self) -> (u64, u64) {
        let es = self.dtype.size() as u64;
        if self.shape.contains(&0) {
            return (self.storage_offset * es, self.storage_offset * es);
        }
        let last: u64 = self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n - 1) * s as u64)
            .sum();
        (
            self.storage_offset * es,
            (self.storage_offset + last + 1) * es,
        )
    }
}

/// Why a pickled value is not a tensor axsave can read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The value is a tensor kind axsave does not read (sparse, quantized, nested, ...).
    #[error("unsupported tensor kind {0}")]
    Unsupported(String),
    /// The value looks like a tensor but its arguments are malformed.
    #[error("malformed tensor: {0}")]
    Malformed(String),
}

/// Archive-level errors of [`TorchSave::parse`].
#[derive(Debug, thiserror::Error)]
pub enum TorchSaveError {
    /// The zip structure is damaged.
    #[error("damaged zip at byte {}: {}", .0.offset, .0.msg)]
    Zip(ZipError),
    /// `data.pkl` is missing.
    #[error("no data.pkl record: not a torch.save archive")]
    NoDataPkl,
    /// `data.pkl` could not be read; `base` is its offset in the archive.
    #[error("data.pkl at byte {base}: {source}")]
    Pickle {
        /// Offset of `data.pkl` within the archive.
        base: u64,
        /// The pickle error.
        source: pickle::PickleError,
    },
    /// A small record (`data.pkl`, `byteorder`) does not match the CRC-32 the zip directory
    /// gives for it: the file was damaged after torch.save wrote it. The pickle holds the
    /// names and shapes, so a damaged byte there could otherwise rename or drop a tensor.
    #[error(
        "record {name} at byte {offset}: CRC-32 {actual:08x} does not match the zip directory's {expected:08x} (the file is damaged)"
    )]
    Crc {
        /// The record's name within the archive.
        name: String,
        /// Offset of the record's data within the archive.
        offset: u64,
        /// The CRC-32 the central directory gives.
        expected: u32,
        /// The CRC-32 of the bytes read.
        actual: u32,
    },
    /// The archive says its data is big-endian.
    #[error("byteorder record says {0:?}; only little-endian archives are supported")]
    ByteOrder(String),
}

/// A parsed `torch.save` archive.
#[derive(Debug)]
pub struct TorchSave {
    /// The archive's records.
    pub zip: ZipIndex,
    /// The unpickled `data.pkl`.
    pub pickle: Pickle,
}

impl TorchSaveError {
    /// This error as a [`FormatError`] of the file at `path`, in which the archive starts at
    /// byte `base`; `item` names the archive when it is one of several in the file (a DCP
    /// item), `None` when it is the whole file.
    pub(crate) fn into_format_error(
        self,
        path: &Path,
        base: u64,
        item: Option<&str>,
    ) -> FormatError {
        match self {
            TorchSaveError::Zip(z) => FormatError::Zip {
                path: path.to_path_buf(),
                offset: base + z.offset,
                msg: match item {
                    Some(item) => format!("{item}: {}", z.msg),
                    None => z.msg,
                },
            },
            TorchSaveError::Pickle { base: b, source } => FormatError::Pickle {
                path: path.to_path_buf(),
                base: base + b,
                source,
            },
            other => FormatError::invalid(
                path,
                match item {
                    Some(item) => format!("{item} at byte {base}: {other}"),
                    None => other.to_string(),
                },
            ),
        }
    }
}

/// A `torch.Size` (REDUCE(Size, (tuple,))), or a plain tuple/list of non-negative ints.
pub(crate) fn size_of(p: &Pickle, v: &Value) -> Option<Vec<u64>> {
    let items = match p.as_sequence(v) {
        Some(items) => items,
        None => p.as_sequence(p.call_args(v)?.first()?)?,
    };
    items
        .iter()
        .map(|x| p.as_int(x).and_then(|i| u64::try_from(i).ok()))
        .collect()
}

impl TorchSave {
    /// Parses the archive in `data` (its central directory and `data.pkl`).
    pub fn parse<D: ZipBytes + ?Sized>(data: &D) -> Result<TorchSave, TorchSaveError> {
        let zip = ZipIndex::parse(data).map_err(TorchSaveError::Zip)?;
        let pkl = zip
            .get("data.pkl")
            .ok_or(TorchSaveError::NoDataPkl)?
            .clone();
        let unavailable = |e: &ZipEntry| {
            TorchSaveError::Zip(ZipError {
                offset: e.data_offset,
                msg: format!("record {} is not available", e.name),
            })
        };
        // The small records are checked whole here; the storages' CRCs are checked as they
        // are copied (`Catalog::records`).
        let checked = |e: &ZipEntry, bytes: &[u8]| {
            let actual = crc32fast::hash(bytes);
            if actual == e.crc32 {
                Ok(())
            } else {
                Err(TorchSaveError::Crc {
                    name: e.name.clone(),
                    offset: e.data_offset,
                    expected: e.crc32,
                    actual,
                })
            }
        };
        if let Some(bo) = zip.get("byteorder") {
            let bytes = zip.bytes(data, bo).ok_or_else(|| unavailable(bo))?;
            checked(bo, bytes)?;
            let v = String::from_utf8_lossy(bytes).trim().to_string();
            if v != "little" {
                return Err(TorchSaveError::ByteOrder(v));
            }
        }
        let bytes = zip.bytes(data, &pkl).ok_or_else(|| unavailable(&pkl))?;
        checked(&pkl, bytes)?;
        let pickle = pickle::parse(bytes).map_err(|source| TorchSaveError::Pickle {
            base: pkl.data_offset,
            source,
        })?;
        Ok(TorchSave { zip, pickle })
    }

    /// The record holding storage `key`.
    pub fn storage(&self, key: &str) -> Option<&ZipEntry> {
        self.zip.get(&format!("data/{key}"))
    }

    /// Whether `v` is a pickled tensor (of any kind, readable or not).
    pub fn is_tensor(&self, v: &Value) -> bool {
        matches!(self.pickle.class_of(v), Some(("torch._utils", name)) if name.starts_with("_rebuild_"))
            || matches!(
                self.pickle.class_of(v),
                Some(("torch._tensor", "_rebuild_from_type_v2"))
            )
    }

    /// Reads a pickled tensor. Returns `None` when `v` is not a tensor at all.
    pub fn tensor(&self, v: &Value) -> Option<Result<TensorRef, TensorError>> {
        let p = &self.pickle;
        let (module, name) = p.class_of(v)?;
        let args = p.call_args(v).unwrap_or(&[]);
        Some(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => self.rebuild(args, None),
            ("torch._utils", "_rebuild_tensor_v3") => {
                let dtype = args
                    .get(6)
                    .and_then(|d| p.global(d))
                    .and_then(|(m, n)| (m == "torch").then(|| DType::from_torch_name(n)).flatten());
                match dtype {
                    Some(d) => self.rebuild(args, Some(d)),
                    None => Err(TensorError::Malformed(
                        "_rebuild_tensor_v3 without a known dtype".into(),
                    )),
                }
            }
            // A tensor subclass or a tensor with Python attributes (DeepSpeed's `ds_id`):
            // `_rebuild_from_type_v2(func, type, args, state)` calls `func(*args)`.
            ("torch._tensor", "_rebuild_from_type_v2") => {
                let (Some(func), Some(inner)) =
                    (args.first(), args.get(2).and_then(|a| p.as_tuple(a)))
                else {
                    return Some(Err(TensorError::Malformed(
                        "_rebuild_from_type_v2 arguments".into(),
                    )));
                };
                match p.global(func) {
                    Some(("torch._utils", "_rebuild_tensor_v2")) => self.rebuild(inner, None),
                    Some(("torch._utils", "_rebuild_tensor_v3")) => {
                        let dtype = inner
                            .get(6)
                            .and_then(|d| p.global(d))
                            .and_then(|(_, n)| DType::from_torch_name(n));
                        match dtype {
                            Some(d) => self.rebuild(inner, Some(d)),
                            None => Err(TensorError::Malformed("_rebuild_tensor_v3 dtype".into())),
                        }
                    }
                    Some((m, n)) => Err(TensorError::Unsupported(format!("{m}.{n}"))),
                    None => Err(TensorError::Malformed(
                        "_rebuild_from_type_v2 function".into(),
                    )),
                }
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.first().and_then(|d| self.tensor(d)) {
                    Some(r) => r,
                    None => Err(TensorError::Malformed(
                        "parameter without tensor data".into(),
                    )),
                }
            }
            ("torch._utils", other) if other.starts_with("_rebuild_") => {
                Err(TensorError::Unsupported(format!("torch._utils.{other}")))
            }
            _ => return None,
        })
    }

    /// `_rebuild_tensor_v2/v3(storage, storage_offset, size, stride, ...)`.
    fn rebuild(&self, args: &[Value], explicit: Option<DType>) -> Result<TensorRef, TensorError> {
        let p = &self.pickle;
        let bad = |what: &str| TensorError::Malformed(what.to_string());
        if args.len() < 4 {
            return Err(bad("fewer than 4 arguments"));
        }
        // ('storage', storage_type, key, location, numel)
        let pid = p
            .as_persid(&args[0])
            .ok_or_else(|| bad("storage is not a persistent id"))?;
        let pid = p
            .as_tuple(pid)
            .ok_or_else(|| bad("persistent id is not a tuple"))?;
        if pid.len() < 5 || p.as_str(&pid[0]) != Some("storage") {
            return Err(bad("persistent id is not a storage"));
        }
        let (smod, sname) = p.global(&pid[1]).ok_or_else(|| bad("storage type"))?;
        let key = match &pid[2] {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return Err(bad("storage key")),
        };
        let numel = p
            .as_int(&pid[4])
            .filter(|n| *n >= 0)
            .ok_or_else(|| bad("storage size"))? as u64;
        let (dtype, storage_nbytes) = match (smod, sname, explicit) {
            (_, _, Some(d)) if sname == "UntypedStorage" => (d, numel),
            ("torch", s, explicit) => {
                let d = DType::from_storage_class(s)
                    .or(explicit)
                    .ok_or_else(|| TensorError::Unsupported(format!("storage type torch.{s}")))?;
                (d, numel.saturating_mul(d.size() as u64))
            }
            (m, s, _) => return Err(TensorError::Unsupported(format!("storage type {m}.{s}"))),
        };
        let dtype = explicit.unwrap_or(dtype);
        let storage_offset = p
            .as_int(&args[1])
            .filter(|n| *n >= 0)
            .ok_or_else(|| bad("storage offset"))? as u64;
        let shape = self.int_tuple(&args[2]).ok_or_else(|| bad("size"))?;
        let strides = self.int_tuple(&args[3]).ok_or_else(|| bad("stride"))?;
        if shape.len() != strides.len() {
            return Err(bad("size and stride differ in length"));
        }
        if shape.iter().any(|&n| n < 0) || strides.iter().any(|&s| s < 0) {
            return Err(bad("negative size or stride"));
        }
        let t = TensorRef {
            storage_key: key,
            dtype,
            storage_offset,
            shape: shape.iter().map(|&n| n as u64).collect(),
            strides,
            storage_nbytes,
        };
        // Sizes come from the file: make sure every later product and sum fits in 64 bits.
        let es = dtype.size() as u64;
        let extent = t.shape.iter().zip(&t.strides).try_fold(
            t.storage_offset.checked_add(1),
            |acc, (&n, &s)| {
                Some(acc.and_then(|a| a.checked_add(n.saturating_sub(1).checked_mul(s as u64)?)))
            },
        );
        let fits = t
            .shape
            .iter()
            .try_fold(es, |acc, &n| acc.checked_mul(n))
            .is_some()
            && extent.flatten().and_then(|e| e.checked_mul(es)).is_some();
        if !fits {
            return Err(bad("size overflows 64 bits"));
        }
        Ok(t)
    }

    /// A tuple of ints, or a `torch.Size` wrapping one.
    fn int_tuple(&self, v: &Value) -> Option<Vec<i64>> {
        let p = &self.pickle;
        let items = match p.as_sequence(v) {
            Some(items) => items,
            None => {
                // torch.Size((...)) pickled by REDUCE.
                let args = p.call_args(v)?;
                p.as_sequence(args.first()?)?
            }
        };
        items.iter().map(|x| p.as_int(x)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[u64], strides: &[i64]) -> TensorRef {
        TensorRef {
            storage_key: "0".into(),
            dtype: DType::U8,
            storage_offset: 0,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            storage_nbytes: 0,
        }
    }

    /// Fuzz regression (torchsave): sizes whose product fits in u64 but not in i64 overflowed
    /// the expected stride.
    #[test]
    fn contiguity_of_sizes_past_i64() {
        assert!(t(&[2, 1 << 62], &[1 << 62, 1]).is_contiguous());
        assert!(!t(&[2, 1 << 62], &[0, 1]).is_contiguous());
        assert!(!t(&[3, 2, 1 << 62], &[i64::MAX, 1 << 62, 1]).is_contiguous());
        assert!(t(&[1, 2, 1 << 62], &[7, 1 << 62, 1]).is_contiguous());
        assert!(t(&[u64::MAX], &[1]).is_contiguous());
        assert!(t(&[2, 3], &[3, 1]).is_contiguous());
    }
}
