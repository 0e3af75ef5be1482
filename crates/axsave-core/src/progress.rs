//! What a save tells its progress display: output bytes written against the output bytes to
//! write (one quantity on both sides, whatever `--dtype` does to the sizes), and the phase, so
//! the display can say "syncing to disk" rather than sit at 100 % while the files are fsynced.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::layout::Layout;

/// The bytes a save writes for `layout`, the total its progress counts towards: the tensors'
/// data in the output dtypes (the index's `total_size`), which is what the executors count as
/// written, not the source's size (an fp32 output of a bf16 checkpoint is twice the source).
pub fn total_bytes(layout: &Layout) -> u64 {
    layout.total_size
}

/// Where a save is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading, converting and writing the tensors.
    Copying,
    /// Making the written files durable (fsync).
    Syncing {
        /// Files this process syncs.
        files: u64,
    },
    /// Renaming the files into place (and, with several ranks, waiting for the others first).
    Committing,
}

/// Progress of a save as this process sees it (with several ranks, rank 0 sees all of them).
#[derive(Default, Debug)]
pub struct Progress {
    /// Output bytes to write ([`total_bytes`]; 0 until the layout is known).
    pub total: AtomicU64,
    /// Output bytes written so far.
    pub done: AtomicU64,
    phase: AtomicU8,
    sync_files: AtomicU64,
}

impl Progress {
    /// Sets the phase.
    pub fn set_phase(&self, phase: Phase) {
        let code = match phase {
            Phase::Copying => 0,
            Phase::Syncing { files } => {
                self.sync_files.store(files, Ordering::Relaxed);
                1
            }
            Phase::Committing => 2,
        };
        self.phase.store(code, Ordering::Release);
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Copying,
            1 => Phase::Syncing {
                files: self.sync_files.load(Ordering::Relaxed),
            },
            _ => Phase::Committing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DtypeChoice, LayoutOptions};
    use crate::save::{SaveOptions, save_local};

    #[test]
    fn phases_round_trip() {
        let p = Progress::default();
        assert_eq!(p.phase(), Phase::Copying);
        p.set_phase(Phase::Syncing { files: 3 });
        assert_eq!(p.phase(), Phase::Syncing { files: 3 });
        p.set_phase(Phase::Committing);
        assert_eq!(p.phase(), Phase::Committing);
    }

    /// `--dtype fp32` of a bf16 model: the total is the bytes written (twice the source's),
    /// and the count ends exactly there.
    #[test]
    fn total_with_fp32_of_a_bf16_source_is_the_bytes_written() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/lora/base_bf16/model.safetensors");
        let catalog = axsave_formats::detect::open(&src).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = SaveOptions {
            output: dir.path().to_path_buf(),
            layout: LayoutOptions {
                dtype: DtypeChoice::Fp32,
                ..Default::default()
            },
            memory_budget: 64 << 20,
            force: false,
            workers: 2,
            tag: "progress".into(),
            extras: Default::default(),
            gpu: None,
        };
        let progress = Progress::default();
        let (layout, report) = save_local(&catalog, &opts, &progress).unwrap();
        let total = progress.total.load(Ordering::Relaxed);
        assert_eq!(total, total_bytes(&layout));
        assert_eq!(progress.done.load(Ordering::Relaxed), total);
        assert_eq!(total, report.bytes);
        assert_eq!(total, 2 * catalog.total_bytes());
        // The data bytes in the file: its size less the 8-byte length and the header.
        let f = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let header = u64::from_le_bytes(f[..8].try_into().unwrap());
        assert_eq!(f.len() as u64 - 8 - header, total);
        assert_eq!(progress.phase(), Phase::Committing);
    }
}
