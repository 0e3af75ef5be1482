//! PyTorch Distributed Checkpoint (`FileSystemWriter`): `.metadata` + `__{rank}_{i}.distcp`.
//!
//! `.metadata` is a pickle of `torch.distributed.checkpoint.metadata.Metadata`: for every
//! flattened name either a `TensorStorageMetadata` (dtype, global size, the chunks saved) or a
//! `BytesStorageMetadata` (a pickled Python value, skipped here); `storage_data` maps each
//! chunk (a `MetadataIndex` object used as a dict key) to a byte range of a `.distcp` file; and
//! `planner_data` gives the nested path of each flat name. Each tensor chunk in a `.distcp` is a
//! complete `torch.save` archive: its central directory and `data.pkl` say where the storage
//! record lies and with which strides. Since torch 2.9 a save without collectives writes one
//! `__{rank}.metadata` per rank instead of `.metadata`; they are merged.
//!
//! Items compressed with the `stream.zstd/1` extension (torch ≥ 2.7) are streamed once to read
//! their directory; their pieces are then decoded on the fly by the executor.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::catalog::{Catalog, Checksum, Encoding, Format, Piece, Region, SourceFile, TensorEntry};
use crate::error::{FormatError, Result};
use crate::mapped::{self, Mapped};
use crate::torchsave::{TensorRef, TorchSave, TorchSaveError};
use crate::zip::HeadTail;

mod metadata;

use metadata::{
    Metadata, StorageInfo, TensorMeta, check_consistency, parse_metadata, parse_metadata_pickle,
};

/// Largest metadata pickle accepted (a 400B-parameter model's is a few MB).
const METADATA_LIMIT: u64 = 1 << 30;

/// Most objects the metadata pickle may build. torch's metadata takes about 20 per chunk (a
/// `ChunkStorageMetadata` and its two sizes, the chunk's `MetadataIndex` and `_StorageInfo`,
/// its share of the tensor's own entry and planner path: 21 in the 8-rank FSDP fixture), so
/// this admits some 400,000 chunks: a model of 10^5 tensors saved by 4 ranks, or a
/// 1,000-tensor model by 400. Each object costs a few hundred bytes to hold while the file is
/// read; a hostile file describing 10^6 tensors took 5.3 GB before.
pub const METADATA_MAX_OBJECTS: usize = 8_000_000;

/// The one transform a DCP item may carry that axsave decodes.
const ZSTD_DESCRIPTOR: &str = "stream.zstd/1";

/// Bytes kept from each end of a compressed item while streaming it.
const HEAD_TAIL_WINDOW: usize = 1 << 20;

/// How much of each end of an uncompressed item is read to find its records: torch.save puts
/// `data.pkl`, the small records and the storage's local header first and the central
/// directory last, a few KB in all.
const ITEM_WINDOW: u64 = 64 << 10;

/// Whether `dir` looks like a DCP checkpoint (`.metadata`, or torch ≥ 2.9's `__0.metadata`).
pub fn is_dcp(dir: &Path) -> bool {
    dir.join(".metadata").is_file() || dir.join("__0.metadata").is_file()
}

/// Reads a DCP checkpoint directory into a catalog.
pub fn read(dir: &Path) -> Result<Catalog> {
    let metas = load_metadata(dir)?;
    read_with(dir, &metas, false)
}

/// The metadata files of `dir` (`.metadata`, or every `__{rank}.metadata`) with their bytes,
/// named by file name. Another rank that cannot see them is given these bytes.
pub fn load_metadata(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    metadata_files(dir)?
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, mapped::read_small(&p, METADATA_LIMIT)?))
        })
        .collect()
}

/// Whether a file name is a DCP metadata file.
pub fn is_metadata_name(name: &str) -> bool {
    name == ".metadata"
        || name
            .strip_prefix("__")
            .and_then(|n| n.strip_suffix(".metadata"))
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads what one rank can see of a checkpoint: the metadata comes as bytes (it may live on
/// another rank's disk), and only chunks whose data file is present under `dir` get pieces.
/// Tiling is not checked; that happens once every rank's part is merged.
pub fn read_partial(dir: &Path, metas: &[(String, Vec<u8>)]) -> Result<Catalog> {
    read_with(dir, metas, true)
}

fn read_with(dir: &Path, metas: &[(String, Vec<u8>)], partial: bool) -> Result<Catalog> {
    if metas.is_empty() {
        return Err(FormatError::NotACheckpoint {
            path: dir.to_path_buf(),
            why: "no .metadata file".into(),
        });
    }
    let meta_files: Vec<PathBuf> = metas.iter().map(|(n, _)| dir.join(n)).collect();
    let mut merged = Metadata::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (path, (_, bytes)) in meta_files.iter().zip(metas) {
        let pickle = parse_metadata_pickle(path, bytes, METADATA_MAX_OBJECTS)?;
        let m = parse_metadata(&pickle, path)?;
        // Per-rank metadata files (torch ≥ 2.9 without collectives) each describe the chunks
        // that rank saved: concatenate chunk lists, keep the first order of names.
        for (name, t) in m.entries {
            match seen.get(&name) {
                None => {
                    seen.insert(name.clone(), merged.entries.len());
                    merged.entries.push((name, t));
                }
                Some(&i) => {
                    if let (Some(have), Some(t)) = (&mut merged.entries[i].1, t) {
                        for c in t.chunks {
                            if !have.chunks.contains(&c) {
                                have.chunks.push(c);
                            }
                        }
                    }
                }
            }
        }
        merged.storage.extend(m.storage);
        merged.planner.extend(m.planner);
        merged.has_planner |= m.has_planner;
    }
    check_consistency(&merged, &meta_files[0])?;

    let mut files: Vec<SourceFile> = Vec::new();
    let mut file_index: HashMap<String, usize> = HashMap::new();
    let mut data_files: HashMap<usize, DataFile> = HashMap::new();
    let mut missing: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    let mut notes = Vec::new();
    let meta_path = meta_files[0].clone();

    for (name, meta) in merged.entries {
        let Some(meta) = meta else {
            tracing::debug!(name, "skipping non-tensor item");
            skipped.push(name);
            continue;
        };
        let mut pieces = Vec::new();
        for (offsets, sizes) in &meta.chunks {
            if sizes.contains(&0) {
                // Ranks holding an empty shard save nothing worth reading.
                continue;
            }
            let info = merged
                .storage
                .get(&(name.clone(), offsets.clone()))
                .ok_or_else(|| {
                    FormatError::invalid(
                        &meta_path,
                        format!("tensor {name}: no storage entry for the chunk at {offsets:?}"),
                    )
                })?;
            if partial && missing.contains(&info.relative_path) {
                continue;
            }
            let file = match file_index.get(&info.relative_path) {
                Some(&f) => f,
                None => {
                    let rel = safe_relative(&info.relative_path).ok_or_else(|| {
                        FormatError::invalid(
                            &meta_path,
                            format!("tensor {name}: unsafe file name {:?}", info.relative_path),
                        )
                    })?;
                    let path = dir.join(&rel);
                    if partial && !path.exists() {
                        // Another rank holds this file.
                        missing.insert(info.relative_path.clone());
                        continue;
                    }
                    let data = DataFile::open(&path)?;
                    let f = files.len();
                    files.push(SourceFile {
                        path: rel,
                        size: data.len,
                    });
                    file_index.insert(info.relative_path.clone(), f);
                    data_files.insert(f, data);
                    f
                }
            };
            let path = dir.join(&files[file].path);
            let data = data_files
                .get_mut(&file)
                .ok_or_else(|| FormatError::invalid(&path, "data file not opened"))?;
            let piece = read_item(data, &path, file, info, &name, &meta, offsets, sizes)?;
            pieces.push(piece);
        }
        let path = merged
            .planner
            .get(&name)
            .cloned()
            .unwrap_or_else(|| vec![name.clone()]);
        let entry = TensorEntry {
            name: name.clone(),
            path,
            dtype: meta.dtype,
            shape: meta.size.clone(),
            pieces,
        };
        if !partial {
            entry
                .check_coverage()
                .map_err(|msg| FormatError::invalid(&meta_path, format!("tensor {name}: {msg}")))?;
        }
        tensors.push(entry);
    }
    if meta_files.len() > 1 {
        notes.push(format!(
            "merged {} per-rank metadata files (a save without collectives)",
            meta_files.len()
        ));
    }
    let all_files: Vec<&str> = merged
        .storage
        .values()
        .map(|i| i.relative_path.as_str())
        .collect();
    let writer_ranks = count_writer_ranks(&all_files).or(Some(meta_files.len()).filter(|&n| n > 1));
    Ok(Catalog {
        format: Format::Dcp,
        root: dir.to_path_buf(),
        files,
        tensors,
        writer_ranks,
        skipped,
        notes,
        records: Vec::new(),
    })
}

/// `.metadata`, or every `__{rank}.metadata` in rank order.
fn metadata_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let global = dir.join(".metadata");
    if global.is_file() {
        return Ok(vec![global]);
    }
    let mut ranked = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| FormatError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(r) = name
            .strip_prefix("__")
            .and_then(|n| n.strip_suffix(".metadata"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            ranked.push((r, e.path()));
        }
    }
    if ranked.is_empty() {
        return Err(FormatError::NotACheckpoint {
            path: dir.to_path_buf(),
            why: "no .metadata file".into(),
        });
    }
    ranked.sort();
    Ok(ranked.into_iter().map(|(_, p)| p).collect())
}

/// The number of distinct ranks in `__{rank}_{i}.distcp` names.
fn count_writer_ranks(files: &[&str]) -> Option<usize> {
    let mut ranks: Vec<u64> = files
        .iter()
        .filter_map(|f| {
            let name = Path::new(f).file_name()?.to_str()?;
            name.strip_prefix("__")?.split('_').next()?.parse().ok()
        })
        .collect();
    ranks.sort_unstable();
    ranks.dedup();
    (!ranks.is_empty()).then_some(ranks.len())
}

/// A relative path that stays inside the checkpoint directory.
fn safe_relative(p: &str) -> Option<PathBuf> {
    let path = PathBuf::from(p);
    path.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(path)
}

/// A `.distcp` file being catalogued. Items are found with positioned reads of their two ends
/// rather than through a map of the whole file: each touch of a mapped file makes the kernel map
/// a whole large folio of the page cache, and a scan of hundreds of items would show hundreds
/// of MB of resident file pages. The map is made only where an item must be streamed (zstd) or
/// its records lie outside the windows read.
struct DataFile {
    file: std::fs::File,
    len: u64,
    map: Option<Mapped>,
}

impl DataFile {
    fn open(path: &Path) -> Result<DataFile> {
        let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
        let len = file.metadata().map_err(|e| FormatError::io(path, e))?.len();
        Ok(DataFile {
            file,
            len,
            map: None,
        })
    }

    fn map(&mut self, path: &Path) -> Result<&Mapped> {
        if self.map.is_none() {
            self.map = Some(mapped::map(path)?);
        }
        self.map
            .as_ref()
            .ok_or_else(|| FormatError::invalid(path, "map vanished"))
    }

    /// The first and last `ITEM_WINDOW` bytes of the item at `[offset, offset + length)`, which
    /// lies inside the file (checked by the caller).
    fn head_tail(&self, path: &Path, offset: u64, length: u64) -> Result<HeadTail> {
        use std::os::unix::fs::FileExt;
        let read = |at: u64, n: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n as usize];
            self.file
                .read_exact_at(&mut buf, at)
                .map_err(|e| FormatError::io(path, e))?;
            Ok(buf)
        };
        let head_len = length.min(ITEM_WINDOW);
        let tail_len = length.min(ITEM_WINDOW);
        Ok(HeadTail {
            head: read(offset, head_len)?,
            tail: read(offset + length - tail_len, tail_len)?,
            len: length,
        })
    }
}

/// Reads the `torch.save` item of one chunk and returns its piece.
#[allow(clippy::too_many_arguments)]
fn read_item(
    data: &mut DataFile,
    path: &Path,
    file: usize,
    info: &StorageInfo,
    name: &str,
    meta: &TensorMeta,
    offsets: &[u64],
    sizes: &[u64],
) -> Result<Piece> {
    let len = data.len;
    let end = info.offset.saturating_add(info.length);
    if end > len {
        return Err(FormatError::OutOfBounds {
            path: path.to_path_buf(),
            what: format!("the item of tensor {name} (chunk at {offsets:?})"),
            offset: info.offset,
            end,
            len,
        });
    }
    let range = info.offset as usize..end as usize;
    let item = format!("item of tensor {name}");
    let zip_err = |e: TorchSaveError, base: u64| e.into_format_error(path, base, Some(&item));
    let (save, encoding, base) = match info.transforms.as_slice() {
        [] => {
            let ends = data.head_tail(path, info.offset, info.length)?;
            let save = match TorchSave::parse(&ends) {
                Ok(save) => save,
                // Records outside the windows (a layout torch.save does not write), or damage:
                // parse the whole item in place, which also gives errors their exact offsets.
                Err(_) => TorchSave::parse(&data.map(path)?[range])
                    .map_err(|e| zip_err(e, info.offset))?,
            };
            (save, Encoding::Raw, info.offset)
        }
        [t] if t == ZSTD_DESCRIPTOR => {
            let item = &data.map(path)?[range];
            let ht = zstd_head_tail(item, inflated_limit(sizes)).map_err(|e| {
                FormatError::invalid(
                    path,
                    format!(
                        "item of tensor {name} at byte {}: zstd stream: {e}",
                        info.offset
                    ),
                )
            })?;
            // Offsets inside a compressed item are offsets in the decompressed stream.
            let save = TorchSave::parse(&ht).map_err(|e| zip_err(e, 0))?;
            (
                save,
                Encoding::Zstd {
                    stream_offset: info.offset,
                    stream_len: info.length,
                },
                0,
            )
        }
        other => {
            return Err(FormatError::unsupported(
                path,
                format!(
                    "DCP transform {other:?} on tensor {name} (only {ZSTD_DESCRIPTOR} is known)"
                ),
            ));
        }
    };
    let t: TensorRef = match save.tensor(save.pickle.root()) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            return Err(FormatError::unsupported(
                path,
                format!("item of tensor {name}: {e}"),
            ));
        }
        None => {
            return Err(FormatError::invalid(
                path,
                format!(
                    "item of tensor {name} at byte {} holds {}, not a tensor",
                    info.offset,
                    save.pickle.describe(save.pickle.root())
                ),
            ));
        }
    };
    if t.shape != sizes {
        return Err(FormatError::invalid(
            path,
            format!(
                "item of tensor {name}: shape {:?} differs from the chunk size {sizes:?} in .metadata",
                t.shape
            ),
        ));
    }
    let record = save.storage(&t.storage_key).ok_or_else(|| {
        FormatError::invalid(
            path,
            format!("item of tensor {name}: no record data/{}", t.storage_key),
        )
    })?;
    let (first, last) = t.byte_extent();
    if last > record.size || t.storage_nbytes > record.size {
        return Err(FormatError::invalid(
            path,
            format!(
                "item of tensor {name}: the tensor needs {last} bytes of storage data/{} but the record holds {}",
                t.storage_key, record.size
            ),
        ));
    }
    let offset = base + record.data_offset + first;
    // The zip's CRC covers the whole record; it can be checked when the piece reads all of it.
    let checksum = (first == 0 && last == record.size && record.size > 0).then(|| Checksum {
        offset: base + record.data_offset,
        len: record.size,
        crc32: record.crc32,
    });
    if t.dtype != meta.dtype {
        tracing::debug!(name, stored = %t.dtype, declared = %meta.dtype, "chunk stored in another dtype");
    }
    Ok(Piece {
        region: Region::Box {
            offsets: offsets.to_vec(),
            sizes: sizes.to_vec(),
        },
        file,
        offset,
        strides: t.strides.clone(),
        stored_dtype: t.dtype,
        encoding,
        checksum,
    })
}

/// The most bytes a compressed item of a chunk of `sizes` may inflate to: the `torch.save`
/// archive of the chunk holds its elements (the declared dtype, or a wider stored one: at most
/// 8 bytes an element) plus its records, a few KB. A stream inflating past this is hostile or
/// damaged, and is stopped there instead of being inflated to whatever it claims (a 2 MB item
/// can inflate to 64 GB).
fn inflated_limit(sizes: &[u64]) -> u64 {
    sizes
        .iter()
        .try_fold(8u64, |a, &n| a.checked_mul(n))
        .and_then(|n| n.checked_add(ZSTD_ITEM_OVERHEAD))
        .unwrap_or(u64::MAX)
}

/// Room for a compressed item's records beside its tensor bytes (torch.save writes ~1.5 KB).
const ZSTD_ITEM_OVERHEAD: u64 = 1 << 20;

/// Streams a zstd-compressed item once, keeping its first and last bytes; refuses to inflate
/// more than `limit` bytes.
fn zstd_head_tail(compressed: &[u8], limit: u64) -> std::io::Result<HeadTail> {
    let mut dec = zstd::stream::read::Decoder::new(compressed)?;
    let mut head = Vec::new();
    let mut tail: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(std::io::Error::other(format!(
                "inflates past {limit} bytes, more than the chunk's elements and records can take"
            )));
        }
        let chunk = &buf[..n];
        let room = HEAD_TAIL_WINDOW.saturating_sub(head.len());
        head.extend_from_slice(&chunk[..room.min(n)]);
        tail.extend(chunk);
        if tail.len() > HEAD_TAIL_WINDOW {
            tail.drain(..tail.len() - HEAD_TAIL_WINDOW);
        }
    }
    Ok(HeadTail {
        head,
        tail: tail.into(),
        len: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.metadata` as Python's pickle (protocol 2) writes it for one float32 tensor `w`, no
    /// chunks and no storage data; `size` is the pickled items of its size tuple and `tuple_op`
    /// the opcode that makes the tuple (TUPLE1 = 0x85, TUPLE2 = 0x86).
    fn metadata_with_size(size: &[u8], tuple_op: u8) -> Vec<u8> {
        let mut m = b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\nq\x00)\x81q\x01}q\x02(X\x13\x00\x00\x00state_dict_metadataq\x03}q\x04X\x01\x00\x00\x00wq\x05ctorch.distributed.checkpoint.metadata\nTensorStorageMetadata\nq\x06)\x81q\x07}q\x08(X\n\x00\x00\x00propertiesq\tctorch.distributed.checkpoint.metadata\nTensorProperties\nq\n)\x81q\x0b}q\x0cX\x05\x00\x00\x00dtypeq\rctorch\nfloat32\nq\x0esbX\x04\x00\x00\x00sizeq\x0f".to_vec();
        m.extend_from_slice(size);
        m.push(tuple_op);
        m.extend_from_slice(b"q\x10X\x06\x00\x00\x00chunksq\x11]q\x12ubsX\x0c\x00\x00\x00storage_dataq\x13}q\x14ub.");
        m
    }

    fn read_meta(bytes: Vec<u8>) -> Result<Catalog> {
        let dir = tempfile::tempdir().unwrap();
        read_partial(dir.path(), &[(".metadata".to_string(), bytes)])
    }

    /// A metadata pickle building more objects than the cap is refused with the file named
    /// (the real cap, 8,000,000, takes 16 s to reach in a debug build: a smaller one here).
    #[test]
    fn metadata_past_the_object_cap_is_refused() {
        let mut m = b"\x80\x02]".to_vec();
        for _ in 0..1001 {
            m.extend_from_slice(b"}a");
        }
        m.push(b'.');
        let path = Path::new("ckpt/.metadata");
        let err = parse_metadata_pickle(path, &m, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("ckpt/.metadata: ")
                && err.contains("more than 1000 objects")
                && err.contains("400,000 chunks"),
            "{err}"
        );
        assert!(parse_metadata_pickle(path, &m, 1002).is_ok());
        assert_eq!(METADATA_MAX_OBJECTS, 8_000_000);
    }

    #[test]
    fn metadata_sizes_are_read() {
        let cat = read_meta(metadata_with_size(b"K\x04", 0x85)).unwrap();
        assert_eq!(cat.tensors.len(), 1);
        assert_eq!(cat.tensors[0].shape, [4]);
        assert_eq!(cat.tensors[0].nbytes(), 16);
    }

    /// Fuzz regression (dcp_metadata): a size whose element count or byte size overflows u64
    /// came through a partial read, and `numel()` / `nbytes()` of the entry overflowed.
    #[test]
    fn metadata_size_overflowing_u64_is_refused() {
        // (u64::MAX / 3,): the element count fits, its float32 bytes do not.
        let one = metadata_with_size(b"\x8a\x08UUUUUUUU", 0x85);
        // (2^32, 2^32): the element count itself overflows.
        let two = metadata_with_size(
            b"\x8a\x05\x00\x00\x00\x00\x01\x8a\x05\x00\x00\x00\x00\x01",
            0x86,
        );
        for bytes in [one, two] {
            let err = read_meta(bytes).unwrap_err().to_string();
            assert!(err.contains("overflows 64 bits"), "{err}");
        }
    }
}
