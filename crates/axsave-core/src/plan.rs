//! The plan: who writes each output file, who reads each piece, and so which bytes cross the
//! network. A pure, deterministic function of the layout, who can read what, and the world.

use axsave_formats::Catalog;

use crate::execute::Task;
use crate::layout::Layout;

/// How the output is spread over ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Mode {
    /// Rank 0 writes every file.
    // (As the classic save does; pieces only other ranks can read are sent to it.)
    Gather,
    /// Every rank writes some files, in parallel, into a shared directory.
    Sharded,
}

impl Mode {
    /// The name as `--mode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Gather => "gather",
            Mode::Sharded => "sharded",
        }
    }
}

/// One piece with the rank that reads it and the rank that writes where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// The piece.
    pub task: Task,
    /// The rank that reads (and converts) it.
    pub reader: usize,
    /// The rank that writes its output file.
    pub writer: usize,
    /// Bytes it becomes in the output.
    pub bytes: u64,
}

/// Who does what.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// The mode planned for.
    pub mode: Mode,
    /// Number of ranks.
    pub world_size: usize,
    /// The writer of each output file.
    pub file_writers: Vec<usize>,
    /// Every piece, in layout order.
    pub assignments: Vec<Assignment>,
}

impl Plan {
    /// The pieces `rank` reads.
    pub fn tasks_read_by(&self, rank: usize) -> Vec<Task> {
        self.assignments
            .iter()
            .filter(|a| a.reader == rank)
            .map(|a| a.task)
            .collect()
    }

    /// Bytes `rank` will receive from other ranks (as a writer).
    pub fn bytes_received_by(&self, rank: usize) -> u64 {
        self.assignments
            .iter()
            .filter(|a| a.writer == rank && a.reader != rank)
            .map(|a| a.bytes)
            .sum()
    }

    /// Bytes that cross between ranks in total.
    pub fn network_bytes(&self) -> u64 {
        self.assignments
            .iter()
            .filter(|a| a.writer != a.reader)
            .map(|a| a.bytes)
            .sum()
    }

    /// Whether `rank` writes any file.
    pub fn is_writer(&self, rank: usize) -> bool {
        self.file_writers.contains(&rank)
    }
}

pub use crate::error::PlanError;

/// Makes the plan. `readers[f]` lists the ranks that can read catalog file `f` (sorted).
///
/// Writers: rank 0 for every file in gather mode; in sharded mode files go, largest first, to
/// the rank with the fewest bytes so far (ties to the lower rank). Readers: the writer itself
/// when it can read the piece's file (no network), else the rank that can read it with the
/// fewest bytes read so far (ties to the lower rank).
pub fn make_plan(
    catalog: &Catalog,
    layout: &Layout,
    readers: &[Vec<usize>],
    world_size: usize,
    mode: Mode,
) -> Result<Plan, PlanError> {
    let world_size = world_size.max(1);
    let file_writers = match mode {
        Mode::Gather => vec![0; layout.files.len()],
        Mode::Sharded => {
            let mut order: Vec<usize> = (0..layout.files.len()).collect();
            order.sort_by(|&a, &b| {
                layout.files[b]
                    .size
                    .cmp(&layout.files[a].size)
                    .then(a.cmp(&b))
            });
            let mut load = vec![0u64; world_size];
            let mut writers = vec![0; layout.files.len()];
            for f in order {
                let r = (0..world_size).min_by_key(|&r| (load[r], r)).unwrap_or(0);
                writers[f] = r;
                load[r] += layout.files[f].size;
            }
            writers
        }
    };
    let mut read_load = vec![0u64; world_size];
    let mut assignments = Vec::new();
    for (oi, t) in layout.tensors.iter().enumerate() {
        let src = &catalog.tensors[t.source];
        let writer = file_writers[t.file];
        for (pi, p) in src.pieces.iter().enumerate() {
            let bytes = p.region.numel() * t.dtype.size() as u64;
            let can = readers.get(p.file).map(Vec::as_slice).unwrap_or(&[]);
            let reader = if can.contains(&writer) {
                writer
            } else {
                *can.iter()
                    .filter(|&&r| r < world_size)
                    .min_by_key(|&&r| (read_load[r], r))
                    .ok_or_else(|| PlanError::Unreadable {
                        file: catalog.files[p.file].path.display().to_string(),
                        tensor: src.name.clone(),
                    })?
            };
            read_load[reader] += bytes;
            assignments.push(Assignment {
                task: Task { out: oi, piece: pi },
                reader,
                writer,
                bytes,
            });
        }
    }
    Ok(Plan {
        mode,
        world_size,
        file_writers,
        assignments,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::geometry::{Geometry, runs, split};
    use crate::layout::{LayoutOptions, plan_layout};
    use axsave_formats::{DType, Encoding, Piece, Region, SourceFile, TensorEntry};

    /// A catalog of `n` tensors of `rows x 4` f32, each split in `w` row blocks, block `r` in
    /// file `r` (as `w` ranks of FSDP would save it).
    fn catalog(n: usize, rows: u64, w: usize) -> Catalog {
        row_blocks(n, [rows, 4], w, DType::F32)
    }

    /// `n` tensors of `shape` (rows x columns) `dtype`, each split in `w` row blocks, block `r`
    /// in file `r`: the catalog `w` FSDP ranks would save.
    pub(crate) fn row_blocks(n: usize, shape: [u64; 2], w: usize, dtype: DType) -> Catalog {
        let [rows, cols] = shape;
        let files = (0..w)
            .map(|r| SourceFile {
                path: format!("__{r}_0.distcp").into(),
                size: 1 << 20,
            })
            .collect();
        let tensors = (0..n)
            .map(|i| {
                let per = rows.div_ceil(w as u64);
                let pieces = (0..w)
                    .filter_map(|r| {
                        let start = r as u64 * per;
                        let len = per.min(rows.saturating_sub(start));
                        (len > 0).then(|| Piece {
                            region: Region::Box {
                                offsets: vec![start, 0],
                                sizes: vec![len, cols],
                            },
                            file: r,
                            offset: 0,
                            strides: vec![cols as i64, 1],
                            stored_dtype: dtype,
                            encoding: Encoding::Raw,
                            checksum: None,
                        })
                    })
                    .collect();
                TensorEntry {
                    name: format!("t{i}"),
                    path: vec![format!("t{i}")],
                    dtype,
                    shape: vec![rows, cols],
                    pieces,
                }
            })
            .collect();
        Catalog {
            format: axsave_formats::Format::Dcp,
            root: ".".into(),
            files,
            tensors,
            writer_ranks: Some(w),
            skipped: vec![],
            notes: vec![],
            records: vec![],
        }
    }

    /// Every output byte is covered by exactly one piece, and every piece is read once.
    fn check_exactly_once(c: &Catalog, l: &Layout, p: &Plan) {
        let mut hits: Vec<Vec<u8>> = l.files.iter().map(|f| vec![0u8; f.size as usize]).collect();
        for (f, file) in l.files.iter().enumerate() {
            for b in &mut hits[f][..file.header.len()] {
                *b = 1;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for a in &p.assignments {
            assert!(seen.insert((a.task.out, a.task.piece)), "piece read twice");
            let t = &l.tensors[a.task.out];
            assert_eq!(a.writer, p.file_writers[t.file]);
            let src = &c.tensors[t.source];
            let g = Geometry::of(&src.pieces[a.task.piece], &src.shape);
            let es = t.dtype.size() as u64;
            for b in split(&g, u64::MAX) {
                for (e, n) in runs(&g, &b) {
                    let start = (t.offset + e * es) as usize;
                    for x in &mut hits[t.file][start..start + (n * es) as usize] {
                        *x += 1;
                    }
                }
            }
        }
        let total: usize = c.tensors.iter().map(|t| t.pieces.len()).sum();
        assert_eq!(seen.len(), total, "a piece has no reader");
        for (f, h) in hits.iter().enumerate() {
            assert!(
                h.iter().all(|&x| x == 1),
                "file {f}: a byte written 0 or 2+ times"
            );
        }
    }

    #[test]
    fn gather_writes_everything_on_rank_0_and_reads_locally_when_it_can() {
        let c = catalog(5, 10, 4);
        let l = plan_layout(&c, &LayoutOptions::default()).unwrap();
        // Shared filesystem: rank 0 reads everything, nothing crosses the network.
        let all: Vec<Vec<usize>> = (0..4).map(|_| vec![0, 1, 2, 3]).collect();
        let p = make_plan(&c, &l, &all, 4, Mode::Gather).unwrap();
        assert!(p.file_writers.iter().all(|&w| w == 0));
        assert!(p.assignments.iter().all(|a| a.reader == 0));
        assert_eq!(p.network_bytes(), 0);
        check_exactly_once(&c, &l, &p);
        // Node-local: each rank sees its own file; only rank 0's pieces stay local.
        let own: Vec<Vec<usize>> = (0..4).map(|r| vec![r]).collect();
        let p = make_plan(&c, &l, &own, 4, Mode::Gather).unwrap();
        for a in &p.assignments {
            let file = c.tensors[l.tensors[a.task.out].source].pieces[a.task.piece].file;
            assert_eq!(a.reader, file);
        }
        assert_eq!(p.network_bytes(), p.bytes_received_by(0));
        assert!(p.network_bytes() > 0);
        check_exactly_once(&c, &l, &p);
    }

    #[test]
    fn sharded_balances_files_and_is_deterministic() {
        let c = catalog(16, 10, 4);
        let l = plan_layout(
            &c,
            &LayoutOptions {
                min_files: 4,
                max_shard_size: 2000,
                ..LayoutOptions::default()
            },
        )
        .unwrap();
        assert!(l.files.len() >= 4);
        let all: Vec<Vec<usize>> = (0..4).map(|_| vec![0, 1, 2, 3]).collect();
        let p = make_plan(&c, &l, &all, 4, Mode::Sharded).unwrap();
        let mut load = [0u64; 4];
        for (f, &w) in p.file_writers.iter().enumerate() {
            load[w] += l.files[f].size;
        }
        let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
        assert!(*min > 0, "a rank writes nothing: {load:?}");
        let biggest = l.files.iter().map(|f| f.size).max().unwrap();
        assert!(max - min <= biggest, "unbalanced: {load:?}");
        // Readers are the writers when everyone sees everything.
        assert!(p.assignments.iter().all(|a| a.reader == a.writer));
        check_exactly_once(&c, &l, &p);
        assert_eq!(p, make_plan(&c, &l, &all, 4, Mode::Sharded).unwrap());
    }

    #[test]
    fn node_local_sharded_balances_reads() {
        let c = catalog(8, 12, 3);
        let l = plan_layout(
            &c,
            &LayoutOptions {
                min_files: 3,
                ..LayoutOptions::default()
            },
        )
        .unwrap();
        let own: Vec<Vec<usize>> = (0..3).map(|r| vec![r]).collect();
        let p = make_plan(&c, &l, &own, 3, Mode::Sharded).unwrap();
        check_exactly_once(&c, &l, &p);
        for a in &p.assignments {
            let file = c.tensors[l.tensors[a.task.out].source].pieces[a.task.piece].file;
            assert_eq!(a.reader, file, "a piece read by a rank that cannot see it");
        }
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let c = catalog(2, 8, 2);
        let l = plan_layout(&c, &LayoutOptions::default()).unwrap();
        let readers = vec![vec![0], vec![]];
        let e = make_plan(&c, &l, &readers, 2, Mode::Gather).unwrap_err();
        assert!(e.to_string().contains("__1_0.distcp"), "{e}");
    }
}
