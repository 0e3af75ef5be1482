//! Reading the bytes of source pieces: positioned reads of raw files, and forward-only decoding
//! of zstd-compressed DCP items.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use axsave_formats::Catalog;

use crate::error::{CoreError, Result};

/// What identifies a file's content cheaply: if any of these change, the file was rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }
}

/// The source files a rank reads, opened on first use. Each file's identity (device, inode,
/// size, modification time) is recorded when it is opened and checked again by
/// [`SourceFiles::check_unchanged`], so a checkpoint rewritten during the save is refused rather
/// than turned into a model that mixes two versions.
pub struct SourceFiles {
    root: PathBuf,
    paths: Vec<PathBuf>,
    sizes: Vec<u64>,
    /// Identities when the save started (`None` for files this rank cannot see).
    at_start: Vec<Option<Identity>>,
    files: Vec<std::sync::OnceLock<std::result::Result<(File, Identity), String>>>,
}

impl SourceFiles {
    /// Prepares to read the files of `catalog`, found under `root` (the catalog's own root, or
    /// this rank's view of it), noting each visible file's identity now, just after the catalog
    /// was read.
    pub fn new(catalog: &Catalog, root: &Path) -> Self {
        Self::with_paths(catalog, root, &[])
    }

    /// Like [`SourceFiles::new`], with some files found elsewhere: `(catalog path, where to open
    /// it)` (a file another rank of this node listed, see `distributed::borrow`).
    pub fn with_paths(catalog: &Catalog, root: &Path, elsewhere: &[(String, PathBuf)]) -> Self {
        let path_of = |p: &Path| -> PathBuf {
            elsewhere
                .iter()
                .find(|(name, _)| Path::new(name) == p)
                .map_or_else(|| p.to_path_buf(), |(_, at)| at.clone())
        };
        SourceFiles {
            root: root.to_path_buf(),
            paths: catalog.files.iter().map(|f| path_of(&f.path)).collect(),
            sizes: catalog.files.iter().map(|f| f.size).collect(),
            at_start: catalog
                .files
                .iter()
                .map(|f| {
                    std::fs::metadata(root.join(path_of(&f.path)))
                        .ok()
                        .map(|m| Identity::of(&m))
                })
                .collect(),
            files: catalog
                .files
                .iter()
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        }
    }

    /// The full path of source file `i`.
    pub fn path(&self, i: usize) -> PathBuf {
        self.root.join(&self.paths[i])
    }

    fn file(&self, i: usize) -> Result<&File> {
        let cell = self
            .files
            .get(i)
            .ok_or_else(|| CoreError::Internal(format!("no source file {i}")))?;
        let path = self.path(i);
        let expected = self.sizes.get(i).copied().unwrap_or(0);
        let at_start = self.at_start.get(i).copied().flatten();
        cell.get_or_init(|| {
            let f = File::open(&path).map_err(|e| e.to_string())?;
            let id = Identity::of(&f.metadata().map_err(|e| e.to_string())?);
            if (expected > 0 && id.size != expected) || at_start.is_some_and(|s| s != id) {
                return Err(format!(
                    "changed while it was being read ({} bytes, was {expected}; rewritten or replaced since the save started): refusing to write a model that may mix two versions",
                    id.size
                ));
            }
            Ok((f, id))
        })
        .as_ref()
        .map(|(f, _)| f)
        .map_err(|e| CoreError::io(&path, std::io::Error::other(e.clone())))
    }

    /// Checks that every file read so far is still the one that was opened (same inode, size
    /// and modification time).
    pub fn check_unchanged(&self) -> Result<()> {
        for (i, cell) in self.files.iter().enumerate() {
            let Some(Ok((_, before))) = cell.get() else {
                continue;
            };
            let path = self.path(i);
            let now = std::fs::metadata(&path)
                .map(|m| Identity::of(&m))
                .map_err(|e| CoreError::io(&path, e))?;
            if now != *before {
                return Err(CoreError::io(
                    &path,
                    std::io::Error::other(
                        "changed while it was being read (rewritten, replaced or appended to): refusing to write a model that may mix two versions",
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset` of file `i`.
    pub fn read_at(&self, i: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file(i)?;
        f.read_exact_at(buf, offset).map_err(|e| {
            let e = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::other(format!(
                    "file ends before bytes {offset}..{}: truncated since it was catalogued",
                    offset + buf.len() as u64
                ))
            } else {
                e
            };
            CoreError::io(self.path(i), e)
        })
    }

    /// A reader of the bytes `[offset, offset + len)` of file `i`.
    pub fn range(&self, i: usize, offset: u64, len: u64) -> Result<RangeReader<'_>> {
        Ok(RangeReader {
            file: self.file(i)?,
            pos: offset,
            end: offset + len,
        })
    }
}

/// `Read` over a byte range of a file, with positioned reads (no shared cursor).
pub struct RangeReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file ends inside a compressed item",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A zstd stream read forward: bytes are asked for at increasing decompressed offsets; asking
/// for an earlier offset restarts the decoder.
pub struct ZstdCursor<'a> {
    sources: &'a SourceFiles,
    file: usize,
    stream_offset: u64,
    stream_len: u64,
    decoder: Option<Box<dyn Read + 'a>>,
    pos: u64,
}

impl<'a> ZstdCursor<'a> {
    /// A cursor over the compressed stream at `[stream_offset, stream_offset + stream_len)`.
    pub fn new(sources: &'a SourceFiles, file: usize, stream_offset: u64, stream_len: u64) -> Self {
        ZstdCursor {
            sources,
            file,
            stream_offset,
            stream_len,
            decoder: None,
            pos: 0,
        }
    }

    /// Fills `buf` with the decompressed bytes starting at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let path = self.sources.path(self.file);
        let zerr = |e: std::io::Error| {
            CoreError::io(
                &path,
                std::io::Error::other(format!("zstd item at byte {}: {e}", self.stream_offset)),
            )
        };
        if self.decoder.is_none() || offset < self.pos {
            let range = self
                .sources
                .range(self.file, self.stream_offset, self.stream_len)?;
            let dec = zstd::stream::read::Decoder::new(range).map_err(zerr)?;
            self.decoder = Some(Box::new(dec));
            self.pos = 0;
        }
        let Some(dec) = self.decoder.as_mut() else {
            return Ok(());
        };
        let mut skip = offset - self.pos;
        let mut scratch = [0u8; 64 * 1024];
        while skip > 0 {
            let n = skip.min(scratch.len() as u64) as usize;
            dec.read_exact(&mut scratch[..n]).map_err(zerr)?;
            skip -= n as u64;
        }
        dec.read_exact(buf).map_err(zerr)?;
        self.pos = offset + buf.len() as u64;
        Ok(())
    }
}
