//! The executor: reads pieces, puts them in row-major order, converts their dtype and hands
//! the resulting runs to a [`Sink`] (a local output file, or a connection to the rank that
//! writes it). Memory is bounded: each worker owns three buffers of one chunk. A piece whose
//! stored bytes are its output bytes in one run is read straight into the sink instead
//! ([`Sink::write_from`]: the local files' staging buffers), without the worker's buffers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use axsave_formats::convert;
use axsave_formats::{Catalog, Checksum, Encoding, FormatError, Piece, RecordCheck};

use crate::error::{CoreError, Result};
use crate::geometry::{Geometry, SubBox, gather, runs, split};
use crate::layout::Layout;
use crate::sources::{SourceFiles, ZstdCursor};

/// One piece to copy: piece `piece` of the catalog tensor behind output tensor `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Task {
    /// Index into [`Layout::tensors`].
    pub out: usize,
    /// Index into that catalog tensor's pieces.
    pub piece: usize,
}

/// Produces output bytes for [`Sink::write_from`]: `fill(at, buf)` fills `buf` with the bytes
/// that start `at` bytes into the run being written.
pub type Fill<'a> = dyn FnMut(u64, &mut [u8]) -> Result<()> + 'a;

/// Where converted bytes go. Each worker owns its sinks.
pub trait Sink {
    /// Writes `data` at byte `offset` of output file `file`.
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) -> Result<()>;
    /// Writes `len` bytes at byte `offset` of output file `file` that `fill(at, buf)`
    /// produces, `at` being where `buf` starts within the `len` bytes (ascending, each byte
    /// once). A sink that stages its writes has them produced in place, saving a copy (the
    /// local files' direct-I/O writers); by default they are produced into `scratch` and
    /// handed to [`Sink::write`].
    fn write_from(
        &mut self,
        file: usize,
        offset: u64,
        len: usize,
        scratch: &mut Vec<u8>,
        fill: &mut Fill<'_>,
    ) -> Result<()> {
        scratch.resize(len, 0);
        fill(0, scratch)?;
        self.write(file, offset, scratch)
    }
    /// Called once when the worker is done with this sink: sends whatever is buffered and,
    /// for a remote writer, waits until it confirms every byte.
    fn finish(&mut self) -> Result<()>;
}

impl<S: Sink + ?Sized> Sink for Box<S> {
    fn write(&mut self, file: usize, offset: u64, data: &[u8]) -> Result<()> {
        (**self).write(file, offset, data)
    }
    fn write_from(
        &mut self,
        file: usize,
        offset: u64,
        len: usize,
        scratch: &mut Vec<u8>,
        fill: &mut Fill<'_>,
    ) -> Result<()> {
        (**self).write_from(file, offset, len, scratch, fill)
    }
    fn finish(&mut self) -> Result<()> {
        (**self).finish()
    }
}

/// Tuning of the executor.
#[derive(Clone, Copy, Debug)]
pub struct ExecOptions {
    /// Bytes per buffer; a sub-box's stored span and its converted size both fit.
    pub chunk_bytes: usize,
    /// Worker threads.
    pub workers: usize,
}

impl ExecOptions {
    /// Options that keep the executor's buffers within `budget` bytes: each worker holds three
    /// chunk-sized buffers, and a quarter of the budget is left for everything else.
    pub fn for_budget(budget: u64, workers: usize) -> Self {
        let workers = workers.max(1);
        let chunk = (budget as usize * 3 / 4) / (workers * 3);
        ExecOptions {
            chunk_bytes: chunk.clamp(64 * 1024, 64 << 20),
            workers,
        }
    }
}

/// One unit of work: a sub-box of a piece, or a whole compressed piece (decoded in order), or
/// a record to check whole.
struct Job {
    task: usize,
    /// The sub-boxes, processed in order by one worker.
    subs: Vec<SubBox>,
    /// Position of the first sub-box in the piece's sequence (for checksum assembly).
    seq: usize,
    /// A record of the catalog to read whole and check instead.
    check: Option<RecordCheck>,
    /// Read the checksummed bytes of this task's piece whole and check them instead: its
    /// copy reads them out of order (a strided piece, e.g. a transposed tensor), so the CRC
    /// cannot be assembled from the copy's reads.
    check_piece: bool,
}

/// What to copy: the pieces (`tasks`) of a catalog into a layout, read from `sources`.
#[derive(Clone, Copy)]
pub struct CopyJob<'a> {
    /// The source checkpoint.
    pub catalog: &'a Catalog,
    /// The output.
    pub layout: &'a Layout,
    /// The source files as this rank sees them.
    pub sources: &'a SourceFiles,
    /// The pieces this rank reads.
    pub tasks: &'a [Task],
    /// Buffer sizes and threads.
    pub opts: ExecOptions,
}

/// Copies every task's piece into its sink. `sink_for(task)` says which sink (by key) a task's
/// bytes go to; `make_sink(key)` makes a worker's sink for that key. `written` counts bytes
/// handed to sinks; `cancel` stops the workers early (another part failed).
pub fn run<S: Sink>(
    job: CopyJob<'_>,
    sink_for: &(dyn Fn(&Task) -> usize + Sync),
    make_sink: &(dyn Fn(usize) -> Result<S> + Sync),
    written: &AtomicU64,
    cancel: &AtomicBool,
) -> Result<()> {
    let CopyJob {
        catalog,
        layout,
        sources,
        tasks,
        opts,
    } = job;
    let chunk = opts.chunk_bytes.max(64);
    let mut jobs = Vec::new();
    // Checksummed pieces: the CRC of each sub-box's stored span, assembled in order at the end.
    let mut checked: HashMap<usize, usize> = HashMap::new();
    for (ti, t) in tasks.iter().enumerate() {
        let out = &layout.tensors[t.out];
        let src = &catalog.tensors[out.source];
        let piece = &src.pieces[t.piece];
        let g = Geometry::of(piece, &src.shape);
        let es = piece.stored_dtype.size().max(out.dtype.size()) as u64;
        let subs = split(&g, (chunk as u64 / es).max(1));
        if subs.is_empty() {
            continue;
        }
        // A checksum can be verified when the sub-boxes read the covered bytes back to back.
        if let Some(c) = &piece.checksum {
            let contiguous = subs.iter().all(|b| b.is_contiguous(&g.strides));
            let (off, len) = piece.byte_span();
            if contiguous && off == c.offset && len == c.len {
                checked.insert(ti, subs.len());
            } else {
                jobs.push(Job {
                    task: ti,
                    subs: Vec::new(),
                    seq: 0,
                    check: None,
                    check_piece: true,
                });
            }
        }
        match piece.encoding {
            Encoding::Zstd { .. } => jobs.push(Job {
                task: ti,
                subs,
                seq: 0,
                check: None,
                check_piece: false,
            }),
            Encoding::Raw => {
                for (k, b) in subs.into_iter().enumerate() {
                    jobs.push(Job {
                        task: ti,
                        subs: vec![b],
                        seq: k,
                        check: None,
                        check_piece: false,
                    });
                }
            }
        }
    }
    // Records that pieces read only in part: whole-record checks, for the files this rank reads.
    let read_files: std::collections::HashSet<usize> = tasks
        .iter()
        .map(|t| piece_of(catalog, layout, t).file)
        .collect();
    for r in catalog
        .records
        .iter()
        .filter(|r| read_files.contains(&r.file))
    {
        jobs.push(Job {
            task: 0,
            subs: Vec::new(),
            seq: 0,
            check: Some(*r),
            check_piece: false,
        });
    }
    let crcs: Mutex<HashMap<usize, Vec<(usize, crc32fast::Hasher)>>> = Mutex::new(HashMap::new());
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<CoreError>> = Mutex::new(None);
    let workers = opts.workers.clamp(1, jobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut w = Worker {
                    catalog,
                    layout,
                    sources,
                    tasks,
                    inbuf: Vec::new(),
                    gbuf: Vec::new(),
                    obuf: Vec::new(),
                    sinks: HashMap::new(),
                };
                let result = (|| -> Result<()> {
                    loop {
                        if cancel.load(Ordering::Relaxed) {
                            return Err(CoreError::Cancelled);
                        }
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(j) else {
                            break;
                        };
                        if let Some(r) = &job.check {
                            w.check_record(r, chunk)?;
                            continue;
                        }
                        if job.check_piece {
                            let piece = piece_of(catalog, layout, &tasks[job.task]);
                            check_piece(sources, piece, chunk, &mut w.inbuf)?;
                            continue;
                        }
                        let key = sink_for(&tasks[job.task]);
                        let want_crc = checked.contains_key(&job.task);
                        let hashes = w.job(job, key, make_sink, want_crc, written)?;
                        if want_crc {
                            let mut m = crcs.lock().unwrap_or_else(|e| e.into_inner());
                            let v = m.entry(job.task).or_default();
                            for (k, h) in hashes.into_iter().enumerate() {
                                v.push((job.seq + k, h));
                            }
                        }
                    }
                    for s in w.sinks.values_mut() {
                        s.finish()?;
                    }
                    Ok(())
                })();
                if let Err(e) = result {
                    cancel.store(true, Ordering::Relaxed);
                    let mut slot = first_error.lock().unwrap_or_else(|e| e.into_inner());
                    // Keep the root cause, not the cancellations it caused.
                    if slot.is_none() || matches!(*slot, Some(CoreError::Cancelled)) {
                        *slot = Some(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    sources.check_unchanged()?;
    // Every checksummed piece: combine the parts in order and compare.
    let crcs = crcs.into_inner().unwrap_or_else(|e| e.into_inner());
    for (ti, parts) in crcs {
        if parts.len() == checked[&ti] {
            check_assembled(sources, piece_of(catalog, layout, &tasks[ti]), parts)?;
        }
    }
    Ok(())
}

/// Combines the CRC-32s of every part of a piece read in parts (`(position, hasher)`, in any
/// order) and compares the result with the piece's recorded checksum. The caller passes only
/// complete sets of parts. (Also used by the GPU executor.)
pub(crate) fn check_assembled(
    sources: &SourceFiles,
    piece: &Piece,
    mut parts: Vec<(usize, crc32fast::Hasher)>,
) -> Result<()> {
    parts.sort_by_key(|(k, _)| *k);
    let mut it = parts.into_iter();
    let (Some(c), Some((_, mut h))) = (&piece.checksum, it.next()) else {
        return Ok(());
    };
    for (_, p) in it {
        h.combine(&p);
    }
    let found = h.finalize();
    if found != c.crc32 {
        return Err(CoreError::Format(FormatError::Checksum {
            path: sources.path(piece.file),
            offset: c.offset,
            end: c.offset + c.len,
            expected: c.crc32,
            found,
        }));
    }
    Ok(())
}

/// Reads record `r` whole, `chunk` bytes at a time through `buf`, and compares its CRC with the
/// one recorded. (Also used by the GPU executor for the files it reads.)
pub(crate) fn check_record(
    sources: &SourceFiles,
    r: &RecordCheck,
    chunk: usize,
    buf: &mut Vec<u8>,
) -> Result<()> {
    verify_crc(sources, r.file, &r.checksum, chunk, buf, |at, b| {
        sources.read_at(r.file, at, b)
    })
}

/// Reads the bytes a piece's checksum covers whole, `chunk` bytes at a time through `buf`
/// (decompressed, for a zstd item), and compares their CRC with the one recorded. For pieces
/// whose copy reads their bytes out of order. (Also used by the GPU executor.)
pub(crate) fn check_piece(
    sources: &SourceFiles,
    piece: &Piece,
    chunk: usize,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let Some(c) = piece.checksum else {
        return Ok(());
    };
    match piece.encoding {
        Encoding::Raw => verify_crc(sources, piece.file, &c, chunk, buf, |at, b| {
            sources.read_at(piece.file, at, b)
        }),
        // The checksum's offsets are in the decompressed stream.
        Encoding::Zstd {
            stream_offset,
            stream_len,
        } => {
            let mut z = ZstdCursor::new(sources, piece.file, stream_offset, stream_len);
            verify_crc(sources, piece.file, &c, chunk, buf, |at, b| {
                z.read_at(at, b)
            })
        }
    }
}

/// Computes the CRC-32 of the bytes `c` covers, read in order by `read_at` `chunk` bytes at a
/// time through `buf`, and compares it with `c.crc32`; a mismatch names file `file`.
fn verify_crc(
    sources: &SourceFiles,
    file: usize,
    c: &Checksum,
    chunk: usize,
    buf: &mut Vec<u8>,
    mut read_at: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut h = crc32fast::Hasher::new();
    let (mut at, end) = (c.offset, c.offset + c.len);
    while at < end {
        let n = (end - at).min(chunk.max(1) as u64) as usize;
        buf.resize(n, 0);
        read_at(at, buf)?;
        h.update(buf);
        at += n as u64;
    }
    let found = h.finalize();
    if found != c.crc32 {
        return Err(CoreError::Format(FormatError::Checksum {
            path: sources.path(file),
            offset: c.offset,
            end,
            expected: c.crc32,
            found,
        }));
    }
    Ok(())
}

fn piece_of<'a>(catalog: &'a Catalog, layout: &Layout, t: &Task) -> &'a Piece {
    &catalog.tensors[layout.tensors[t.out].source].pieces[t.piece]
}

struct Worker<'a, S> {
    catalog: &'a Catalog,
    layout: &'a Layout,
    sources: &'a SourceFiles,
    tasks: &'a [Task],
    inbuf: Vec<u8>,
    gbuf: Vec<u8>,
    obuf: Vec<u8>,
    sinks: HashMap<usize, S>,
}

impl<S: Sink> Worker<'_, S> {
    /// Reads a record whole, in chunks, and compares its CRC with the one recorded.
    fn check_record(&mut self, r: &RecordCheck, chunk: usize) -> Result<()> {
        check_record(self.sources, r, chunk, &mut self.inbuf)
    }

    /// Runs one job; returns the CRC of each sub-box's stored span when asked.
    fn job(
        &mut self,
        job: &Job,
        key: usize,
        make_sink: &(dyn Fn(usize) -> Result<S> + Sync),
        want_crc: bool,
        written: &AtomicU64,
    ) -> Result<Vec<crc32fast::Hasher>> {
        let t = self.tasks[job.task];
        let out = &self.layout.tensors[t.out];
        let src = &self.catalog.tensors[out.source];
        let piece = &src.pieces[t.piece];
        let g = Geometry::of(piece, &src.shape);
        let (ies, oes) = (piece.stored_dtype.size(), out.dtype.size());
        if !convert::can_convert(piece.stored_dtype, out.dtype) {
            return Err(CoreError::Convert {
                tensor: src.name.clone(),
                from: piece.stored_dtype.to_string(),
                to: out.dtype.to_string(),
            });
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = self.sinks.entry(key) {
            slot.insert(make_sink(key)?);
        }
        let mut zstd = match piece.encoding {
            Encoding::Zstd {
                stream_offset,
                stream_len,
            } => Some(ZstdCursor::new(
                self.sources,
                piece.file,
                stream_offset,
                stream_len,
            )),
            Encoding::Raw => None,
        };
        let mut hashes = Vec::new();
        for b in &job.subs {
            let (first, count) = b.span(&g.strides);
            let span = (count as usize) * ies;
            let at = piece.offset + first * ies as u64;
            let numel = b.numel() as usize;
            let contiguous = b.is_contiguous(&g.strides);
            let runs = runs(&g, b);
            let sink = self
                .sinks
                .get_mut(&key)
                .ok_or_else(|| CoreError::Internal("sink vanished".into()))?;
            // Stored bytes that are the output's, in one run: read straight into the sink
            // (into the direct-I/O writers' staging buffers for a local file).
            if let [(elem, len)] = runs[..]
                && zstd.is_none()
                && contiguous
                && piece.stored_dtype == out.dtype
                && len as usize * oes == span
            {
                let mut h = want_crc.then(crc32fast::Hasher::new);
                let (sources, file) = (self.sources, piece.file);
                sink.write_from(
                    out.file,
                    out.offset + elem * oes as u64,
                    span,
                    &mut self.inbuf,
                    &mut |pos, buf| {
                        sources.read_at(file, at + pos, buf)?;
                        if let Some(h) = h.as_mut() {
                            h.update(buf);
                        }
                        Ok(())
                    },
                )?;
                hashes.extend(h);
                written.fetch_add(span as u64, Ordering::Relaxed);
                continue;
            }
            self.inbuf.resize(span, 0);
            match zstd.as_mut() {
                Some(z) => z.read_at(at, &mut self.inbuf)?,
                None => self.sources.read_at(piece.file, at, &mut self.inbuf)?,
            }
            if want_crc {
                let mut h = crc32fast::Hasher::new();
                h.update(&self.inbuf);
                hashes.push(h);
            }
            // Row-major order.
            let ordered: &[u8] = if contiguous {
                &self.inbuf[..numel * ies]
            } else {
                self.gbuf.resize(numel * ies, 0);
                gather(b, &g.strides, ies, &self.inbuf, &mut self.gbuf);
                &self.gbuf
            };
            // Output dtype.
            let data: &[u8] = if piece.stored_dtype == out.dtype {
                ordered
            } else {
                self.obuf.resize(numel * oes, 0);
                convert::convert(piece.stored_dtype, out.dtype, ordered, &mut self.obuf).map_err(
                    |e| CoreError::Convert {
                        tensor: src.name.clone(),
                        from: piece.stored_dtype.to_string(),
                        to: format!("{} ({e})", out.dtype),
                    },
                )?;
                &self.obuf
            };
            let mut pos = 0usize;
            for (elem, len) in runs {
                let n = len as usize * oes;
                sink.write(
                    out.file,
                    out.offset + elem * oes as u64,
                    &data[pos..pos + n],
                )?;
                pos += n;
            }
            written.fetch_add(pos as u64, Ordering::Relaxed);
        }
        Ok(hashes)
    }
}
