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
use crate::dtype::DType;
use crate::error::{FormatError, Result};
use crate::mapped::{self, Mapped};
use crate::pickle::{self, Pickle, Value};
use crate::torchsave::{TensorRef, TorchSave, TorchSaveError};
use crate::zip::HeadTail;

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

/// One tensor's description in `.metadata`.
#[derive(Debug, Clone)]
struct TensorMeta {
    dtype: DType,
    size: Vec<u64>,
    chunks: Vec<(Vec<u64>, Vec<u64>)>,
}

/// Where one chunk was stored.
#[derive(Debug, Clone)]
struct StorageInfo {
    relative_path: String,
    offset: u64,
    length: u64,
    transforms: Vec<String>,
}

/// What one metadata file holds.
#[derive(Default)]
struct Metadata {
    /// Flat names in save order, with `None` for non-tensor items.
    entries: Vec<(String, Option<TensorMeta>)>,
    storage: HashMap<(String, Vec<u64>), StorageInfo>,
    planner: HashMap<String, Vec<String>>,
    /// Whether `planner_data` was a dict (DefaultSavePlanner's name → path map).
    has_planner: bool,
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

/// Parses a metadata pickle, building at most `max_objects` objects.
fn parse_metadata_pickle(path: &Path, bytes: &[u8], max_objects: usize) -> Result<Pickle> {
    let limits = pickle::Limits {
        max_nodes: max_objects,
        ..pickle::Limits::default()
    };
    pickle::parse_with_limits(bytes, limits).map_err(|source| {
        if matches!(source.kind, pickle::PickleErrorKind::Limit(_)) {
            FormatError::invalid(
                path,
                format!(
                    "{source}: more than a DCP checkpoint of some 400,000 chunks needs; refused"
                ),
            )
        } else {
            FormatError::Pickle {
                path: path.to_path_buf(),
                base: 0,
                source,
            }
        }
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
    let zip_err = |e: TorchSaveError, base: u64| match e {
        TorchSaveError::Zip(z) => FormatError::Zip {
            path: path.to_path_buf(),
            offset: base + z.offset,
            msg: format!("item of tensor {name}: {}", z.msg),
        },
        TorchSaveError::Pickle { base: b, source } => FormatError::Pickle {
            path: path.to_path_buf(),
            base: base + b,
            source,
        },
        other => FormatError::invalid(
            path,
            format!("item of tensor {name} at byte {base}: {other}"),
        ),
    };
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

// ---------------------------------------------------------------------------------------------
// Typed reading of the metadata pickle.

fn parse_metadata(p: &Pickle, path: &Path) -> Result<Metadata> {
    let bad = |msg: String| FormatError::invalid(path, msg);
    let root = p.root();
    match p.class_of(root) {
        Some((_, "Metadata")) => {}
        _ => {
            return Err(bad(format!(
                "expected a torch.distributed.checkpoint Metadata object, found {}",
                p.describe(root)
            )));
        }
    }
    let state = state_of(p, root).ok_or_else(|| bad("Metadata has no state".into()))?;
    let sdm = p
        .dict_get(state, "state_dict_metadata")
        .and_then(|v| p.as_dict(v))
        .ok_or_else(|| bad("Metadata.state_dict_metadata is missing".into()))?;
    let mut out = Metadata::default();
    let mut names = std::collections::HashSet::with_capacity(sdm.len());
    for (k, v) in sdm {
        let name = p
            .as_str(k)
            .ok_or_else(|| bad(format!("a state_dict_metadata key is {}", p.describe(k))))?
            .to_string();
        if !names.insert(name.clone()) {
            return Err(bad(format!("state_dict_metadata names {name:?} twice")));
        }
        match p.class_of(v) {
            Some((_, "TensorStorageMetadata")) => {
                let t = tensor_meta(p, v).map_err(|m| bad(format!("tensor {name}: {m}")))?;
                out.entries.push((name, Some(t)));
            }
            Some((_, "BytesStorageMetadata")) => out.entries.push((name, None)),
            _ => {
                return Err(bad(format!(
                    "entry {name}: unknown storage metadata {}",
                    p.describe(v)
                )));
            }
        }
    }
    if let Some(sd) = p.dict_get(state, "storage_data").and_then(|v| p.as_dict(v)) {
        for (k, v) in sd {
            let (fqn, offset) = metadata_index(p, k).map_err(bad)?;
            let info = storage_info(p, v).map_err(|m| bad(format!("storage of {fqn}: {m}")))?;
            let key = (fqn, offset);
            if out.storage.contains_key(&key) {
                return Err(bad(format!(
                    "storage_data holds the chunk of {} at {:?} twice",
                    key.0, key.1
                )));
            }
            out.storage.insert(key, info);
        }
    } else {
        return Err(bad("Metadata.storage_data is missing".into()));
    }
    // DefaultSavePlanner records `{flat name: object path}` here; a custom planner may record
    // anything (or None), which is then not used.
    if let Some(pd) = p.dict_get(state, "planner_data").and_then(|v| p.as_dict(v)) {
        for (k, v) in pd {
            let fqn = p
                .as_str(k)
                .ok_or_else(|| bad(format!("a planner_data key is {}", p.describe(k))))?;
            let path: Option<Vec<String>> = p.as_sequence(v).and_then(|items| {
                items
                    .iter()
                    .map(|x| match x {
                        Value::Str(s) => Some(s.to_string()),
                        Value::Int(i) => Some(i.to_string()),
                        _ => None,
                    })
                    .collect()
            });
            let path = path.ok_or_else(|| {
                bad(format!(
                    "planner_data entry {fqn:?} is {}, not an object path",
                    p.describe(v)
                ))
            })?;
            if out.planner.insert(fqn.to_string(), path).is_some() {
                return Err(bad(format!("planner_data names {fqn:?} twice")));
            }
        }
        out.has_planner = true;
    }
    Ok(out)
}

/// Checks that the three parts of (merged) metadata describe the same items: every name has
/// one entry; every `storage_data` key names an entry (and, for a tensor, one of its chunks);
/// every chunk and every bytes item has storage; and, where `planner_data` was recorded, it
/// maps exactly the entries' names, each to the object path whose dotted form is the name (as
/// torch's `flatten_state_dict` makes it). A damaged byte in any of them would otherwise drop
/// or misplace a tensor silently.
fn check_consistency(m: &Metadata, path: &Path) -> Result<()> {
    let bad = |msg: String| Err(FormatError::invalid(path, msg));
    let mut entries: HashMap<&str, Option<&TensorMeta>> = HashMap::with_capacity(m.entries.len());
    for (name, t) in &m.entries {
        if entries.insert(name.as_str(), t.as_ref()).is_some() {
            return bad(format!("state_dict_metadata names {name:?} twice"));
        }
    }
    for (fqn, offset) in m.storage.keys() {
        match entries.get(fqn.as_str()) {
            None => {
                return bad(format!(
                    "storage_data names {fqn:?}, which state_dict_metadata does not hold: the metadata is damaged"
                ));
            }
            Some(Some(t)) => {
                if !t.chunks.iter().any(|(o, _)| o == offset) {
                    return bad(format!(
                        "storage_data of tensor {fqn}: no chunk at {offset:?} in state_dict_metadata: the metadata is damaged"
                    ));
                }
            }
            Some(None) => {
                if !offset.is_empty() {
                    return bad(format!(
                        "storage_data of item {fqn}: an offset {offset:?} for a non-tensor item: the metadata is damaged"
                    ));
                }
            }
        }
    }
    for (name, t) in &m.entries {
        let missing = match t {
            // Ranks holding an empty shard save nothing for it.
            Some(t) => t
                .chunks
                .iter()
                .find(|(o, s)| {
                    !s.contains(&0) && !m.storage.contains_key(&(name.clone(), o.clone()))
                })
                .map(|(o, _)| format!("tensor {name}: no storage entry for the chunk at {o:?}")),
            None => (!m.storage.contains_key(&(name.clone(), Vec::new())))
                .then(|| format!("item {name}: no storage entry")),
        };
        if let Some(msg) = missing {
            return bad(format!("{msg}: the metadata is damaged"));
        }
    }
    if m.has_planner {
        for (fqn, obj_path) in &m.planner {
            if !entries.contains_key(fqn.as_str()) {
                return bad(format!(
                    "planner_data names {fqn:?}, which state_dict_metadata does not hold: the metadata is damaged"
                ));
            }
            if obj_path.join(".") != *fqn {
                return bad(format!(
                    "planner_data maps {fqn:?} to the path {obj_path:?}, whose name differs: the metadata is damaged"
                ));
            }
        }
        if let Some((name, _)) = m.entries.iter().find(|(n, _)| !m.planner.contains_key(n)) {
            return bad(format!(
                "tensor or item {name:?} of state_dict_metadata has no planner_data entry: the metadata is damaged"
            ));
        }
    }
    Ok(())
}

/// The `BUILD` state of an object (its `__dict__` or `__getstate__` result).
fn state_of<'a>(p: &'a Pickle, v: &Value) -> Option<&'a Value> {
    p.as_object(v)?.state.as_ref()
}

/// A field of a dataclass pickled with a dict state.
fn field<'a>(p: &'a Pickle, v: &Value, name: &str) -> Option<&'a Value> {
    p.dict_get(state_of(p, v)?, name)
}

/// A `torch.Size` (REDUCE(Size, (tuple,))) or a plain tuple of non-negative ints.
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

fn tensor_meta(p: &Pickle, v: &Value) -> std::result::Result<TensorMeta, String> {
    let props = field(p, v, "properties").ok_or("no properties")?;
    // TensorProperties pickles its state as a tuple (dtype, layout, requires_grad,
    // memory_format, pin_memory[, strides]) through __getstate__; older releases as a dict.
    let pstate = state_of(p, props).ok_or("properties without state")?;
    let dtype_v = match p.as_tuple(pstate) {
        Some(t) => t.first(),
        None => p.dict_get(pstate, "dtype"),
    }
    .ok_or("properties without dtype")?;
    let dtype = match p.global(dtype_v) {
        Some(("torch", n)) => {
            DType::from_torch_name(n).ok_or(format!("unsupported dtype torch.{n}"))?
        }
        _ => return Err(format!("dtype is {}", p.describe(dtype_v))),
    };
    let size = field(p, v, "size")
        .and_then(|s| size_of(p, s))
        .ok_or("size is not a torch.Size")?;
    // The size comes from the file. A tensor whose byte size does not fit in 64 bits is damage,
    // and would make every later numel()/nbytes() overflow: a partial read checks no coverage
    // that would catch it (found by fuzzing).
    if size
        .iter()
        .try_fold(dtype.size() as u64, |a, &n| a.checked_mul(n))
        .is_none()
    {
        return Err(format!("size {size:?} overflows 64 bits"));
    }
    let chunks_v = field(p, v, "chunks")
        .and_then(|c| p.as_sequence(c))
        .ok_or("chunks is not a list")?;
    let mut chunks = Vec::with_capacity(chunks_v.len());
    for c in chunks_v {
        let offsets = field(p, c, "offsets").and_then(|o| size_of(p, o));
        let sizes = field(p, c, "sizes").and_then(|o| size_of(p, o));
        match (offsets, sizes) {
            (Some(o), Some(s)) if o.len() == size.len() && s.len() == size.len() => {
                chunks.push((o, s))
            }
            _ => return Err("a chunk without offsets/sizes matching the tensor's rank".into()),
        }
    }
    Ok(TensorMeta {
        dtype,
        size,
        chunks,
    })
}

fn metadata_index(p: &Pickle, v: &Value) -> std::result::Result<(String, Vec<u64>), String> {
    let fqn = field(p, v, "fqn")
        .and_then(|f| p.as_str(f))
        .ok_or_else(|| format!("a storage_data key is {}", p.describe(v)))?;
    // `offset` is absent (or None) for bytes items.
    let offset = match field(p, v, "offset") {
        None | Some(Value::None) => Vec::new(),
        Some(o) => size_of(p, o).ok_or_else(|| format!("storage_data key {fqn}: bad offset"))?,
    };
    Ok((fqn.to_string(), offset))
}

fn storage_info(p: &Pickle, v: &Value) -> std::result::Result<StorageInfo, String> {
    let relative_path = field(p, v, "relative_path")
        .and_then(|f| p.as_str(f))
        .ok_or("no relative_path")?
        .to_string();
    let int = |n: &str| {
        field(p, v, n)
            .and_then(|x| p.as_int(x))
            .and_then(|i| u64::try_from(i).ok())
            .ok_or(format!("no {n}"))
    };
    let transforms = match field(p, v, "transform_descriptors") {
        None | Some(Value::None) => Vec::new(),
        Some(t) => p
            .as_sequence(t)
            .ok_or("transform_descriptors is not a list")?
            .iter()
            .map(|x| p.as_str(x).map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("transform_descriptors holds a non-string")?,
    };
    Ok(StorageInfo {
        relative_path,
        offset: int("offset")?,
        length: int("length")?,
        transforms,
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
