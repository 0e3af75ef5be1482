//! safetensors headers: reading those of input files, building those of output files.
//!
//! Output headers are made exactly as the safetensors library makes them (the crate's own
//! `Metadata` serialized with serde_json, tensors sorted by dtype alignment then name, padded
//! with spaces to a multiple of 8 bytes), so a file written by axsave is byte-identical to
//! `safetensors.torch.save_file` of the same tensors with the same metadata.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};

use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// The largest header (JSON length) safetensors readers accept: the crate's `MAX_HEADER_SIZE`,
/// which the Python library and transformers use through it.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// The key safetensors reserves for a file's own metadata: no tensor may carry it.
pub const METADATA_KEY: &str = "__metadata__";

/// A tensor to place in an output file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderTensor {
    /// Its name in the file.
    pub name: String,
    /// Its dtype in the file.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<u64>,
}

impl HeaderTensor {
    /// Size of its data in bytes.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }
}

/// An output file's header and where each tensor's data goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltHeader {
    /// The bytes to write at the start of the file: the 8-byte length, then the JSON padded
    /// with spaces to a multiple of 8.
    pub bytes: Vec<u8>,
    /// For each input tensor (same order as given), its data's byte range in the file
    /// (absolute: header included).
    pub ranges: Vec<(u64, u64)>,
    /// Total file size.
    pub file_size: u64,
}

/// Builds the header of a file holding `tensors` with `__metadata__` = `metadata`.
pub fn build_header(tensors: &[HeaderTensor], metadata: &[(&str, &str)]) -> Result<BuiltHeader> {
    // The library orders by descending dtype (its enum order is by alignment), then by name.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (ta, tb) = (&tensors[a], &tensors[b]);
        tb.dtype
            .to_safetensors()
            .cmp(&ta.dtype.to_safetensors())
            .then_with(|| ta.name.cmp(&tb.name))
    });
    let mut infos = Vec::with_capacity(tensors.len());
    let mut rel = vec![(0u64, 0u64); tensors.len()];
    let mut offset = 0u64;
    for &i in &order {
        let t = &tensors[i];
        let n = t.nbytes();
        rel[i] = (offset, offset + n);
        let header_shape = t.dtype.header_shape(&t.shape).ok_or_else(|| {
            FormatError::unsupported(
                &t.name,
                "a 0-d float4_e2m1fn_x2 tensor (safetensors cannot describe half a byte)",
            )
        })?;
        let shape = header_shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| FormatError::invalid(&t.name, "shape does not fit this machine"))?;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: t.dtype.to_safetensors(),
                shape,
                data_offsets: (offset as usize, (offset + n) as usize),
            },
        ));
        offset += n;
    }
    let meta = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>()
    });
    let header = Metadata::new(meta, infos)
        .map_err(|e| FormatError::invalid("<output header>", e.to_string()))?;
    let mut json = serde_json::to_string(&header)
        .map_err(|e| FormatError::invalid("<output header>", e.to_string()))?
        .into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + json.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    let base = bytes.len() as u64;
    Ok(BuiltHeader {
        ranges: rel.into_iter().map(|(a, b)| (a + base, b + base)).collect(),
        file_size: base + offset,
        bytes,
    })
}

/// A tensor of an input file: name, dtype, shape and the absolute offset of its data.
pub type InputTensor = (String, DType, Vec<u64>, u64);

/// A parsed input header.
pub struct InputHeader {
    /// Offset of the data buffer in the file (8 + header length).
    pub data_start: u64,
    /// The header as the safetensors crate parsed and validated it.
    pub metadata: Metadata,
}

impl InputHeader {
    /// Tensors in data-offset order: name, dtype, shape, absolute byte range in the file.
    pub fn tensors(&self, path: &Path) -> Result<Vec<InputTensor>> {
        let mut out = Vec::new();
        for name in self.metadata.offset_keys() {
            let Some(info) = self.metadata.info(&name) else {
                continue;
            };
            let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
                FormatError::unsupported(path, format!("dtype {:?} of tensor {name}", info.dtype))
            })?;
            let st_shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
            let shape = dtype.torch_shape(&st_shape).ok_or_else(|| {
                FormatError::unsupported(
                    path,
                    format!(
                        "F4 tensor {name} of shape {st_shape:?} (torch packs fp4 in pairs along the last dimension, which must be even)"
                    ),
                )
            })?;
            out.push((
                name,
                dtype,
                shape,
                self.data_start + info.data_offsets.0 as u64,
            ));
        }
        Ok(out)
    }

    /// The `__metadata__` map, if any.
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }
}

/// Parses and validates the header of a whole safetensors file held in `data` (a map of the
/// file: only the header's pages are touched).
pub fn read_header(path: &Path, data: &[u8]) -> Result<InputHeader> {
    let (n, metadata) = safetensors::SafeTensors::read_metadata(data).map_err(|e| {
        let msg = match e {
            safetensors::SafeTensorError::HeaderTooLarge => {
                "the header is larger than 100 MB: not a safetensors file, or damaged".to_string()
            }
            safetensors::SafeTensorError::MetadataIncompleteBuffer => format!(
                "the header's offsets do not match the file's length ({} bytes): truncated or damaged",
                data.len()
            ),
            other => format!("bad safetensors header: {other}"),
        };
        // The crate's errors do not always say which tensor: find it.
        match which_tensor(data) {
            Some(t) => FormatError::invalid(path, format!("{msg}: {t}")),
            None => FormatError::invalid(path, msg),
        }
    })?;
    Ok(InputHeader {
        data_start: 8 + n as u64,
        metadata,
    })
}

/// The first tensor whose header entry cannot be right (its size disagrees with its shape and
/// dtype, or its data runs past the file), described for an error message.
fn which_tensor(data: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
    let json = data.get(8..8usize.checked_add(n)?)?;
    let map: HashMap<String, serde_json::Value> = serde_json::from_slice(json).ok()?;
    let buffer = (data.len() - 8 - n) as u64;
    let mut entries: Vec<(String, u64, u64, String, Vec<u64>)> = Vec::new();
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let offsets: Vec<u64> = serde_json::from_value(v.get("data_offsets")?.clone()).ok()?;
        let shape: Vec<u64> = serde_json::from_value(v.get("shape")?.clone()).ok()?;
        let dtype = v.get("dtype")?.as_str()?.to_string();
        entries.push((name, *offsets.first()?, *offsets.get(1)?, dtype, shape));
    }
    entries.sort_by_key(|e| (e.1, e.2));
    for (name, begin, end, dtype, shape) in &entries {
        let bits =
            serde_json::from_value::<safetensors::Dtype>(serde_json::Value::from(dtype.as_str()))
                .ok()
                .map(|d| d.bitsize() as u64);
        let need = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| bits.and_then(|b| n.checked_mul(b)));
        let span = end.checked_sub(*begin);
        let what =
            format!("tensor `{name}` ({dtype}, shape {shape:?}, data_offsets [{begin}, {end}])");
        match (need, span) {
            (_, None) => return Some(format!("{what} ends before it begins")),
            (None, _) => return Some(format!("{what}: its size overflows")),
            (Some(bits), Some(span)) if bits % 8 != 0 || bits / 8 != span => {
                return Some(format!(
                    "{what} needs {} bytes{}",
                    bits.div_ceil(8),
                    if bits % 8 != 0 {
                        " (not a whole number)"
                    } else {
                        ""
                    }
                ));
            }
            _ => {}
        }
        if *end > buffer {
            return Some(format!(
                "{what} ends past the data, which holds {buffer} bytes"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.resize(f.len() + data_len, 0);
        f
    }

    /// Header errors name the tensor at fault, which the safetensors crate does not always do.
    #[test]
    fn header_errors_name_the_tensor() {
        let p = Path::new("m.safetensors");
        let err = |h: &str, len: usize| match read_header(p, &file(h, len)) {
            Ok(_) => panic!("accepted {h}"),
            Err(e) => e.to_string(),
        };
        // Shape and offsets disagree.
        let e = err(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,16]}}"#,
            16,
        );
        assert!(
            e.contains("tensor `b` (F32, shape [3]") && e.contains("needs 12 bytes"),
            "{e}"
        );
        // The data is shorter than the offsets say.
        let e = err(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"BF16","shape":[4],"data_offsets":[8,16]}}"#,
            12,
        );
        assert!(
            e.contains("tensor `w`") && e.contains("holds 12 bytes"),
            "{e}"
        );
        // A size that overflows.
        let e = err(
            r#"{"big":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(e.contains("tensor `big`") && e.contains("overflows"), "{e}");
    }

    #[test]
    fn header_orders_by_dtype_then_name_and_pads() {
        let t = |name: &str, dtype, shape: &[u64]| HeaderTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        };
        let tensors = vec![
            t("b", DType::BF16, &[3]),
            t("a", DType::BF16, &[1]),
            t("c", DType::I64, &[2]),
            t("flag", DType::Bool, &[5]),
        ];
        let h = build_header(&tensors, &[("format", "pt")]).unwrap();
        assert_eq!(h.bytes.len() % 8, 0);
        let n = u64::from_le_bytes(h.bytes[..8].try_into().unwrap()) as usize;
        let json = std::str::from_utf8(&h.bytes[8..8 + n]).unwrap();
        assert!(
            json.starts_with(r#"{"__metadata__":{"format":"pt"},"c":"#),
            "{json}"
        );
        let base = h.bytes.len() as u64;
        // I64 first (largest alignment), then BF16 by name, then BOOL.
        assert_eq!(h.ranges[2], (base, base + 16));
        assert_eq!(h.ranges[1], (base + 16, base + 18));
        assert_eq!(h.ranges[0], (base + 18, base + 24));
        assert_eq!(h.ranges[3], (base + 24, base + 29));
        assert_eq!(h.file_size, base + 29);
    }
}
