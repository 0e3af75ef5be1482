//! safetensors inputs: finished models (one file or an index of shards), and DCP's Hugging Face
//! mode, whose `shard-*-model-*.safetensors` files hold chunks placed by `DCP_SHARDING_INFO`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, Encoding, Format, Piece, Region, SourceFile, TensorEntry};
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::mapped;
use crate::st_header::read_header;

/// Whether a file name is one of DCP's Hugging Face mode shards
/// (`shard-00001-model-00001-of-00001.safetensors`).
pub fn is_hf_shard_name(name: &str) -> bool {
    let b = name.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    b.len() == "shard-00001-model-00001-of-00001.safetensors".len()
        && name.starts_with("shard-")
        && digits(6..11)
        && &name[11..18] == "-model-"
        && digits(18..23)
        && &name[23..27] == "-of-"
        && digits(27..32)
        && name.ends_with(".safetensors")
}

/// The HF-mode shard files in `dir`, sorted by name.
pub fn hf_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| FormatError::io(dir, e))?;
        if is_hf_shard_name(&e.file_name().to_string_lossy()) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Reads DCP's Hugging Face mode: every `shard-*` file of `dir`.
pub fn read_hf(dir: &Path) -> Result<Catalog> {
    read_hf_with(dir, false)
}

/// Reads the `shard-*` files one rank can see; tiling is checked after every rank's part is
/// merged (global shapes are only known then).
pub fn read_hf_partial(dir: &Path) -> Result<Catalog> {
    read_hf_with(dir, true)
}

fn read_hf_with(dir: &Path, partial: bool) -> Result<Catalog> {
    let shards = hf_shards(dir)?;
    if shards.is_empty() && !partial {
        return Err(FormatError::NotACheckpoint {
            path: dir.to_path_buf(),
            why: "no shard-NNNNN-model-NNNNN-of-NNNNN.safetensors files".into(),
        });
    }
    let mut files = Vec::new();
    let mut tensors: Vec<TensorEntry> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (fi, path) in shards.iter().enumerate() {
        let map = mapped::map(path)?;
        let header = read_header(path, &map)?;
        let info_json = header
            .user_metadata()
            .and_then(|m| m.get("DCP_SHARDING_INFO"))
            .ok_or_else(|| {
                FormatError::invalid(
                    path,
                    "no DCP_SHARDING_INFO in __metadata__: not a DCP shard",
                )
            })?;
        let info: serde_json::Map<String, serde_json::Value> = serde_json::from_str(info_json)
            .map_err(|e| FormatError::invalid(path, format!("DCP_SHARDING_INFO: {e}")))?;
        let stored: HashMap<String, (DType, Vec<u64>, u64)> = header
            .tensors(path)?
            .into_iter()
            .map(|(n, d, s, o)| (n, (d, s, o)))
            .collect();
        for (fqn, v) in &info {
            let offsets: Vec<u64> = v
                .get("saved_offsets")
                .and_then(|o| o.as_array())
                .and_then(|a| a.iter().map(|x| x.as_u64()).collect())
                .ok_or_else(|| {
                    FormatError::invalid(
                        path,
                        format!("DCP_SHARDING_INFO of {fqn}: no saved_offsets"),
                    )
                })?;
            let (dtype, sizes, offset) = stored.get(fqn).cloned().ok_or_else(|| {
                FormatError::invalid(
                    path,
                    format!("DCP_SHARDING_INFO names {fqn}, which the file lacks"),
                )
            })?;
            if offsets.len() != sizes.len() {
                return Err(FormatError::invalid(
                    path,
                    format!("{fqn}: saved_offsets {offsets:?} do not match shape {sizes:?}"),
                ));
            }
            let i = *index.entry(fqn.clone()).or_insert_with(|| {
                tensors.push(TensorEntry {
                    name: fqn.clone(),
                    path: vec![fqn.clone()],
                    dtype,
                    shape: vec![0; sizes.len()],
                    pieces: Vec::new(),
                });
                tensors.len() - 1
            });
            let t = &mut tensors[i];
            if t.dtype != dtype || t.shape.len() != sizes.len() {
                return Err(FormatError::invalid(
                    path,
                    format!("{fqn}: chunks disagree on dtype or rank across shards"),
                ));
            }
            // The global shape is implied: per dimension, the furthest chunk end.
            for d in 0..sizes.len() {
                let end = offsets[d].checked_add(sizes[d]).ok_or_else(|| {
                    FormatError::invalid(path, format!("{fqn}: offsets overflow"))
                })?;
                t.shape[d] = t.shape[d].max(end);
            }
            if sizes.contains(&0) {
                continue;
            }
            t.pieces.push(Piece {
                region: Region::Box {
                    offsets,
                    sizes: sizes.clone(),
                },
                file: fi,
                offset,
                strides: Piece::contiguous_strides(&sizes),
                stored_dtype: dtype,
                encoding: Encoding::Raw,
                checksum: None,
            });
        }
        files.push(SourceFile {
            path: PathBuf::from(path.file_name().unwrap_or_default()),
            size: map.len() as u64,
        });
    }
    if !partial {
        for t in &tensors {
            t.check_coverage()
                .map_err(|m| FormatError::invalid(dir, format!("tensor {}: {m}", t.name)))?;
        }
    }
    Ok(Catalog {
        format: Format::DcpHf,
        root: dir.to_path_buf(),
        writer_ranks: Some(shards.len()),
        files,
        tensors,
        skipped: Vec::new(),
        notes: Vec::new(),
        records: Vec::new(),
    })
}

/// The files of a finished safetensors model: `path` may be one `.safetensors` file, an
/// `*.safetensors.index.json`, or a directory holding either (an index wins).
pub fn model_files(path: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    if path.is_file() {
        let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if path.to_string_lossy().ends_with(".index.json") {
            return Ok((root.clone(), index_files(path, &root)?));
        }
        return Ok((root, vec![path.to_path_buf()]));
    }
    let mut indexes = Vec::new();
    let mut singles = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|e| FormatError::io(path, e))?;
    for e in entries {
        let e = e.map_err(|e| FormatError::io(path, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(e.path());
        } else if name.ends_with(".safetensors") && !is_hf_shard_name(&name) {
            singles.push(e.path());
        }
    }
    indexes.sort();
    singles.sort();
    // As transformers looks: the standard names first, then whatever single file there is.
    let standard_index = path.join("model.safetensors.index.json");
    let standard = path.join("model.safetensors");
    if indexes.contains(&standard_index) {
        return Ok((path.to_path_buf(), index_files(&standard_index, path)?));
    }
    if singles.contains(&standard) {
        return Ok((path.to_path_buf(), vec![standard]));
    }
    match (indexes.as_slice(), singles.as_slice()) {
        ([index], _) => Ok((path.to_path_buf(), index_files(index, path)?)),
        ([], [one]) => Ok((path.to_path_buf(), vec![one.clone()])),
        ([], []) => Err(FormatError::NotACheckpoint {
            path: path.to_path_buf(),
            why: "no .safetensors file".into(),
        }),
        ([], _) => Err(FormatError::NotACheckpoint {
            path: path.to_path_buf(),
            why: format!(
                "{} .safetensors files and no index: name one file, or add the index",
                singles.len()
            ),
        }),
        _ => Err(FormatError::NotACheckpoint {
            path: path.to_path_buf(),
            why: format!("{} index files: name the one to read", indexes.len()),
        }),
    }
}

/// The shard files an index names, in the order they first appear in its `weight_map`
/// sorted by file name (`model-00001-of-00003`, ...).
fn index_files(index: &Path, root: &Path) -> Result<Vec<PathBuf>> {
    let bytes = mapped::read_small(index, 256 << 20)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| FormatError::invalid(index, format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| FormatError::invalid(index, "no weight_map object"))?;
    let mut names: Vec<&str> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            FormatError::invalid(
                index,
                format!("weight_map entry {tensor} is not a file name"),
            )
        })?;
        if !names.contains(&file) {
            names.push(file);
        }
    }
    names.sort_unstable();
    names
        .into_iter()
        .map(|n| {
            let p = PathBuf::from(n);
            if p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                Ok(root.join(p))
            } else {
                Err(FormatError::invalid(
                    index,
                    format!("unsafe file name {n:?}"),
                ))
            }
        })
        .collect()
}

/// Reads a finished safetensors model (see [`model_files`]) into a catalog: every tensor is
/// one whole piece. Tensors keep file order, then offset order within each file.
pub fn read_model(path: &Path) -> Result<Catalog> {
    read_model_with(path, false)
}

/// Reads the files of a safetensors model that one rank can see (an index may name shards
/// that live elsewhere).
pub fn read_model_partial(path: &Path) -> Result<Catalog> {
    read_model_with(path, true)
}

fn read_model_with(path: &Path, partial: bool) -> Result<Catalog> {
    let (root, mut paths) = model_files(path)?;
    if partial {
        paths.retain(|p| p.exists());
    }
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for (fi, p) in paths.iter().enumerate() {
        let map = mapped::map(p)?;
        let header = read_header(p, &map)?;
        for (name, dtype, shape, offset) in header.tensors(p)? {
            if let Some(other) = seen.insert(name.clone(), p.clone()) {
                return Err(FormatError::invalid(
                    p,
                    format!("tensor {name} is also in {}", other.display()),
                ));
            }
            let numel: u64 = shape.iter().product();
            let pieces = if numel == 0 {
                Vec::new()
            } else {
                vec![Piece {
                    region: Region::whole(&shape),
                    file: fi,
                    offset,
                    strides: Piece::contiguous_strides(&shape),
                    stored_dtype: dtype,
                    encoding: Encoding::Raw,
                    checksum: None,
                }]
            };
            tensors.push(TensorEntry {
                path: vec![name.clone()],
                name,
                dtype,
                shape,
                pieces,
            });
        }
        let rel = p.strip_prefix(&root).unwrap_or(p).to_path_buf();
        files.push(SourceFile {
            path: rel,
            size: map.len() as u64,
        });
    }
    Ok(Catalog {
        format: Format::Safetensors,
        root,
        files,
        tensors,
        writer_ranks: None,
        skipped: Vec::new(),
        notes: Vec::new(),
        records: Vec::new(),
    })
}
