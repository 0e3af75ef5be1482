//! The neutral description of what a checkpoint holds, shared by every format reader.
//!
//! A [`Catalog`] lists every tensor (name, dtype, global shape) and the *pieces* it was saved in:
//! which region of the tensor, in which file, at which byte offset, with which strides and stored
//! dtype. Readers know nothing of ranks or outputs; the layout and the planner work only from
//! this description.

use std::path::PathBuf;

use crate::dtype::DType;

/// The checkpoint formats axsave reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// PyTorch Distributed Checkpoint written by `FileSystemWriter` (`.metadata` + `.distcp`).
    Dcp,
    /// DCP's Hugging Face mode: `shard-*-model-*.safetensors` with `DCP_SHARDING_INFO`.
    DcpHf,
    /// Plain safetensors: one file or an index with shards.
    Safetensors,
    /// DeepSpeed ZeRO stage 1, 2 or 3 (`latest` + `global_stepN/*_optim_states.pt`).
    DeepSpeed {
        /// The ZeRO stage recorded in the optimizer states.
        stage: u8,
    },
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Dcp => f.write_str("PyTorch DCP"),
            Format::DcpHf => f.write_str("PyTorch DCP (Hugging Face safetensors mode)"),
            Format::Safetensors => f.write_str("safetensors"),
            Format::DeepSpeed { stage } => write!(f, "DeepSpeed ZeRO-{stage}"),
        }
    }
}

/// A data file of the checkpoint, relative to the checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceFile {
    /// Path relative to [`Catalog::root`].
    pub path: PathBuf,
    /// Size in bytes when the catalog was built (0 when the file was not visible to this reader).
    pub size: u64,
}

/// Which part of a tensor a piece holds.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Region {
    /// An N-d box: `offsets[i] .. offsets[i] + sizes[i]` along each dimension (DCP chunks).
    /// A 0-d tensor has empty vectors.
    Box {
        /// First index along each dimension.
        offsets: Vec<u64>,
        /// Extent along each dimension.
        sizes: Vec<u64>,
    },
    /// A range of elements of the tensor's row-major flattening (DeepSpeed ZeRO partitions).
    Flat {
        /// First element.
        start: u64,
        /// Number of elements.
        len: u64,
    },
}

impl Region {
    /// The number of elements in the region.
    pub fn numel(&self) -> u64 {
        match self {
            Region::Box { sizes, .. } => sizes.iter().product(),
            Region::Flat { len, .. } => *len,
        }
    }

    /// The region covering a whole tensor of `shape`.
    pub fn whole(shape: &[u64]) -> Region {
        Region::Box {
            offsets: vec![0; shape.len()],
            sizes: shape.to_vec(),
        }
    }
}

/// How a piece's bytes are encoded in its file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Encoding {
    /// Stored as is: the element at region index `i` (row-major within the region) lies at
    /// `offset + Σ i_d · strides[d] · elem_size` bytes into the file.
    Raw,
    /// The piece lies in a zstd stream (DCP's `stream.zstd/1` extension) that starts at
    /// `stream_offset` and is `stream_len` bytes long in the file; [`Piece::offset`] is then the
    /// offset inside the *decompressed* stream.
    Zstd {
        /// Where the compressed stream starts in the file.
        stream_offset: u64,
        /// Length of the compressed stream.
        stream_len: u64,
    },
}

/// A CRC-32 that a reader can check: the bytes `[offset, offset + len)` of the piece's
/// file (or of its decompressed stream) must hash to `crc32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checksum {
    /// First byte covered.
    pub offset: u64,
    /// Number of bytes covered.
    pub len: u64,
    /// The expected CRC-32 (IEEE, as zip records it).
    pub crc32: u32,
}

/// One stored part of a tensor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Piece {
    /// Which part of the tensor this piece holds.
    pub region: Region,
    /// Index into [`Catalog::files`].
    pub file: usize,
    /// Byte offset of the region's first element (storage offset already applied).
    pub offset: u64,
    /// Element strides of the stored data, one per region dimension (a [`Region::Flat`] has
    /// one dimension). Row-major contiguous data has the usual strides.
    pub strides: Vec<i64>,
    /// The dtype the bytes are stored in (may differ from the tensor's, as for ZeRO's fp32
    /// master weights of a bf16 model).
    pub stored_dtype: DType,
    /// How the bytes are encoded.
    pub encoding: Encoding,
    /// A checksum covering exactly the bytes this piece reads, when the format has one.
    pub checksum: Option<Checksum>,
}

impl Piece {
    /// Row-major contiguous strides for a region of `sizes`.
    pub fn contiguous_strides(sizes: &[u64]) -> Vec<i64> {
        let mut strides = vec![1i64; sizes.len()];
        for d in (0..sizes.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * sizes[d + 1].max(1) as i64;
        }
        strides
    }

    /// The sizes of the region as the piece stores it (one dim for a flat region).
    pub fn stored_sizes(&self) -> Vec<u64> {
        match &self.region {
            Region::Box { sizes, .. } => sizes.clone(),
            Region::Flat { len, .. } => vec![*len],
        }
    }

    /// The byte span `[offset, offset + len)` of the file holding every element of the piece
    /// (assuming non-negative strides, which every reader ensures).
    pub fn byte_span(&self) -> (u64, u64) {
        let sizes = self.stored_sizes();
        if sizes.contains(&0) {
            return (self.offset, 0);
        }
        let last: u64 = sizes
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n - 1) * s.max(0) as u64)
            .sum();
        (self.offset, (last + 1) * self.stored_dtype.size() as u64)
    }
}

/// A tensor of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorEntry {
    /// The flat name as the checkpoint spells it (before any renaming by the layout).
    pub name: String,
    /// The nested key path the name came from, when the format records it (DCP's
    /// `planner_data`: `model.layers.0.w` → `["model", "layers.0.w"]`); else `[name]`.
    pub path: Vec<String>,
    /// The tensor's dtype (what a loader of this checkpoint would produce).
    pub dtype: DType,
    /// The global shape.
    pub shape: Vec<u64>,
    /// The stored pieces; together they cover the tensor exactly once.
    pub pieces: Vec<Piece>,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Size in bytes in the tensor's own dtype.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }

    /// Checks that the pieces tile the tensor exactly: each inside the tensor, none
    /// overlapping, and together as many elements as the tensor has. Returns what is wrong.
    pub fn check_coverage(&self) -> std::result::Result<(), String> {
        let numel = self
            .shape
            .iter()
            .try_fold(1u64, |a, &n| a.checked_mul(n))
            .ok_or_else(|| format!("shape {:?} overflows", self.shape))?;
        let mut total = 0u64;
        let mut boxes: Vec<(&[u64], &[u64])> = Vec::new();
        let mut flats: Vec<(u64, u64)> = Vec::new();
        for p in &self.pieces {
            let stored = p.stored_sizes();
            if stored.len() != p.strides.len() {
                return Err("a piece's strides do not match its rank".into());
            }
            match &p.region {
                Region::Box { offsets, sizes } => {
                    if offsets.len() != self.shape.len() || sizes.len() != self.shape.len() {
                        return Err(format!(
                            "a chunk of rank {} in a tensor of rank {}",
                            sizes.len(),
                            self.shape.len()
                        ));
                    }
                    for d in 0..sizes.len() {
                        if offsets[d]
                            .checked_add(sizes[d])
                            .is_none_or(|e| e > self.shape[d])
                        {
                            return Err(format!(
                                "chunk at {offsets:?} of size {sizes:?} lies outside shape {:?}",
                                self.shape
                            ));
                        }
                    }
                    boxes.push((offsets, sizes));
                }
                Region::Flat { start, len } => {
                    if start.checked_add(*len).is_none_or(|e| e > numel) {
                        return Err(format!(
                            "elements {start}..{} lie outside the tensor's {numel}",
                            start.saturating_add(*len)
                        ));
                    }
                    flats.push((*start, *len));
                }
            }
            total = total.saturating_add(p.region.numel());
        }
        if !boxes.is_empty() && !flats.is_empty() {
            return Err("pieces mix boxes and flat ranges".into());
        }
        // Overlaps: sweep along dimension 0 so that only boxes sharing rows are compared.
        boxes.sort_by_key(|(o, _)| o.first().copied().unwrap_or(0));
        let mut active: Vec<(&[u64], &[u64])> = Vec::new();
        for &(o, s) in &boxes {
            if s.contains(&0) {
                continue;
            }
            let start0 = o.first().copied().unwrap_or(0);
            active.retain(|(ao, asz)| ao.first().is_none_or(|&a| a + asz[0] > start0));
            for &(ao, asz) in &active {
                let overlap = (0..o.len()).all(|d| o[d] < ao[d] + asz[d] && ao[d] < o[d] + s[d]);
                if overlap {
                    return Err(format!("chunks at {ao:?} and {o:?} overlap"));
                }
            }
            active.push((o, s));
        }
        flats.sort_unstable();
        for w in flats.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(format!(
                    "element ranges starting at {} and {} overlap",
                    w[0].0, w[1].0
                ));
            }
        }
        if total != numel {
            return Err(format!(
                "the pieces hold {total} elements but the tensor has {numel}: chunks are missing"
            ));
        }
        Ok(())
    }
}

/// Everything a reader learned about a checkpoint.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Catalog {
    /// The format detected.
    pub format: Format,
    /// The checkpoint directory the file paths are relative to.
    pub root: PathBuf,
    /// The data files, indexed by [`Piece::file`].
    pub files: Vec<SourceFile>,
    /// The tensors, in the order the checkpoint lists them (the state dict's order).
    pub tensors: Vec<TensorEntry>,
    /// How many ranks wrote the checkpoint, when the format says.
    pub writer_ranks: Option<usize>,
    /// Non-tensor items that were skipped, by name.
    pub skipped: Vec<String>,
    /// Things the reader did that a user should hear about (one line each).
    pub notes: Vec<String>,
    /// Checksummed records that pieces read only parts of (ZeRO's flat partitions, shared by
    /// many parameters): each must be read whole and checked, so that damaged bytes anywhere in
    /// them are found before the output is committed. Pieces that cover a whole record carry
    /// their own [`Piece::checksum`] instead.
    #[serde(default)]
    pub records: Vec<RecordCheck>,
}

/// A checksummed byte range of a source file to verify as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordCheck {
    /// Index into [`Catalog::files`].
    pub file: usize,
    /// The range and its CRC-32.
    pub checksum: Checksum,
}

impl Catalog {
    /// Total bytes of all tensors in their own dtypes (for display: it saturates at
    /// `u64::MAX` for a damaged catalog whose sizes add up past 64 bits; the layout refuses
    /// such a catalog).
    pub fn total_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |a, t| a.saturating_add(t.nbytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_strides_and_spans() {
        assert_eq!(Piece::contiguous_strides(&[4, 3, 2]), vec![6, 2, 1]);
        assert_eq!(Piece::contiguous_strides(&[]), Vec::<i64>::new());
        let p = Piece {
            region: Region::Box {
                offsets: vec![0, 0],
                sizes: vec![4, 3],
            },
            file: 0,
            offset: 100,
            strides: vec![1, 4],
            stored_dtype: DType::F32,
            encoding: Encoding::Raw,
            checksum: None,
        };
        // A transposed (4, 3) view of a (3, 4) storage still spans 12 elements.
        assert_eq!(p.byte_span(), (100, 48));
    }
}

/// The result of merging what several ranks could each see of one checkpoint.
#[derive(Clone, Debug)]
pub struct Merged {
    /// The whole catalog; its file paths are relative, so each rank resolves them under its own
    /// view of the checkpoint.
    pub catalog: Catalog,
    /// For each file of the merged catalog, the ranks that can read it.
    pub readers: Vec<Vec<usize>>,
}

impl Catalog {
    /// Merges partial catalogs (`(rank, catalog)`, each listing only what that rank can read)
    /// into one, and checks that the pieces now tile every tensor.
    ///
    /// Tensors keep the order of the first part that names them. A file seen by several ranks
    /// must have the same size everywhere; pieces found by several ranks are kept once. For
    /// DCP's Hugging Face mode the global shapes are recomputed from all chunks.
    pub fn merge(parts: Vec<(usize, Catalog)>) -> Result<Merged, String> {
        let Some((_, first)) = parts.first() else {
            return Err("no rank could read any part of the checkpoint".into());
        };
        let format = first.format;
        let root = first.root.clone();
        let mut files: Vec<SourceFile> = Vec::new();
        let mut readers: Vec<Vec<usize>> = Vec::new();
        let mut file_index: std::collections::HashMap<PathBuf, usize> = Default::default();
        let mut tensors: Vec<TensorEntry> = Vec::new();
        let mut tensor_index: std::collections::HashMap<String, usize> = Default::default();
        let mut seen_pieces: std::collections::HashSet<(usize, u64, String)> = Default::default();
        let mut skipped: Vec<String> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let mut writer_ranks = None;
        let mut records: Vec<RecordCheck> = Vec::new();
        for (rank, part) in &parts {
            if part.format != format {
                return Err(format!(
                    "rank {rank} sees a {} checkpoint, others a {format}",
                    part.format
                ));
            }
            writer_ranks = writer_ranks.max(part.writer_ranks);
            let mut remap = Vec::with_capacity(part.files.len());
            for f in &part.files {
                let i = match file_index.get(&f.path) {
                    Some(&i) => {
                        if files[i].size != f.size {
                            return Err(format!(
                                "{} has {} bytes on rank {rank} but {} on rank {}: the ranks see different checkpoints",
                                f.path.display(),
                                f.size,
                                files[i].size,
                                readers[i][0]
                            ));
                        }
                        i
                    }
                    None => {
                        file_index.insert(f.path.clone(), files.len());
                        files.push(f.clone());
                        readers.push(Vec::new());
                        files.len() - 1
                    }
                };
                if !readers[i].contains(rank) {
                    readers[i].push(*rank);
                }
                remap.push(i);
            }
            for t in &part.tensors {
                let ti = match tensor_index.get(&t.name) {
                    Some(&ti) => {
                        let have = &tensors[ti];
                        if have.dtype != t.dtype
                            || (format != Format::DcpHf && have.shape != t.shape)
                        {
                            return Err(format!(
                                "tensor {}: ranks disagree on its dtype or shape",
                                t.name
                            ));
                        }
                        ti
                    }
                    None => {
                        tensor_index.insert(t.name.clone(), tensors.len());
                        let mut fresh = t.clone();
                        fresh.pieces.clear();
                        tensors.push(fresh);
                        tensors.len() - 1
                    }
                };
                for p in &t.pieces {
                    let mut p = p.clone();
                    p.file = remap[p.file];
                    if seen_pieces.insert((p.file, p.offset, t.name.clone())) {
                        tensors[ti].pieces.push(p);
                    }
                }
            }
            for r in &part.records {
                let r = RecordCheck {
                    file: remap[r.file],
                    checksum: r.checksum,
                };
                if !records.contains(&r) {
                    records.push(r);
                }
            }
            for s in &part.skipped {
                if !skipped.contains(s) {
                    skipped.push(s.clone());
                }
            }
            for n in &part.notes {
                if !notes.contains(n) {
                    notes.push(n.clone());
                }
            }
        }
        if format == Format::DcpHf {
            for t in &mut tensors {
                for p in &t.pieces {
                    if let Region::Box { offsets, sizes } = &p.region {
                        for d in 0..t.shape.len().min(sizes.len()) {
                            t.shape[d] = t.shape[d].max(offsets[d] + sizes[d]);
                        }
                    }
                }
            }
            writer_ranks = Some(files.len());
        }
        for t in &tensors {
            t.check_coverage().map_err(|m| {
                format!(
                    "tensor {}: {m} (are the files of every rank readable by some rank?)",
                    t.name
                )
            })?;
        }
        for r in &mut readers {
            r.sort_unstable();
        }
        Ok(Merged {
            catalog: Catalog {
                format,
                root,
                files,
                tensors,
                writer_ranks,
                skipped,
                notes,
                records,
            },
            readers,
        })
    }
}
