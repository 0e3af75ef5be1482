//! The DeepSpeed ZeRO reader on a real checkpoint of tests/fixtures/deepspeed in which one rank
//! file is replaced by the fuzzed one.
//!
//! Input: `[slot, payload...]`. `slot % N` picks one of the N files
//! `tests/fixtures/deepspeed/*/checkpoint/*/*.pt` (sorted by their path under
//! `tests/fixtures/deepspeed`, byte order: scripts/fuzz.sh numbers its seeds the same way). A
//! payload starting with a zip local header replaces that file as is; any other payload is taken
//! as the file's `data.pkl` and put into a copy of the original archive (every storage record
//! kept), so that mutations reach the ZeRO reader's interpretation of the pickle. Each fixture
//! checkpoint is copied once per process to a tmpfs directory; per input only the chosen file
//! is overwritten (and restored afterwards). The checkpoint is read whole (`zero::read`) and as
//! one machine's view (`zero::read_partial`). `AXSAVE_FUZZ_SAVE=FILE` writes the rank file as
//! read to FILE (to turn a crash into a regression test).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use axsave_formats::zero;
use libfuzzer_sys::{fuzz_mutator, fuzz_target};

struct Slot {
    /// The save directory (holding `latest`) of the copy this slot belongs to.
    save_dir: PathBuf,
    /// The file the payload replaces.
    file: PathBuf,
    original: Vec<u8>,
    records: Vec<(String, Vec<u8>)>,
}

fn slots() -> &'static [Slot] {
    static SLOTS: OnceLock<Vec<Slot>> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let root = axsave_fuzz::fixtures().join("deepspeed");
        let scratch = axsave_fuzz::scratch_dir("zero");
        let mut slots = Vec::new();
        let mut copied = std::collections::HashSet::new();
        for f in axsave_fuzz::files_sorted(&root, ".pt") {
            let rel = f.strip_prefix(&root).expect("under root");
            // <fixture>/checkpoint/<tag>/<file>
            let parts: Vec<_> = rel.components().collect();
            if parts.len() != 4 {
                continue;
            }
            let fixture = parts[0].as_os_str().to_owned();
            let save_dir = scratch.join(&fixture);
            if copied.insert(fixture.clone()) {
                axsave_fuzz::copy_tree(&root.join(&fixture).join("checkpoint"), &save_dir);
            }
            let original = std::fs::read(&f).expect("read fixture");
            let records = axsave_fuzz::zip_records(&original).unwrap_or_default();
            slots.push(Slot {
                file: save_dir
                    .join(parts[2].as_os_str())
                    .join(parts[3].as_os_str()),
                save_dir,
                original,
                records,
            });
        }
        assert!(!slots.is_empty(), "no ZeRO fixtures found");
        slots
    })
}

fuzz_target!(|data: &[u8]| {
    let slots = slots();
    let Some((&sel, payload)) = data.split_first() else {
        return;
    };
    let slot = &slots[sel as usize % slots.len()];
    let bytes = if axsave_fuzz::is_zip(payload) {
        payload.to_vec()
    } else {
        axsave_fuzz::rewrap_pickle(&slot.records, payload)
    };
    std::fs::write(&slot.file, &bytes).expect("write rank file");
    if let Some(keep) = std::env::var_os("AXSAVE_FUZZ_SAVE") {
        // For turning a crash into a regression test: the rank file exactly as read.
        std::fs::write(keep, &bytes).expect("write AXSAVE_FUZZ_SAVE");
        eprintln!("replaced {}", slot.file.display());
    }
    for result in [
        zero::read(&slot.save_dir),
        zero::read_partial(&slot.save_dir),
    ] {
        match result {
            Ok(cat) => axsave_fuzz::use_catalog(&cat),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    std::fs::write(&slot.file, &slot.original).expect("restore rank file");
});

// Integers are rewritten only in the pickle mode (after the slot byte).
fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let pickle = size > 1 && !axsave_fuzz::is_zip(&data[1..size]);
    axsave_fuzz::mutate(data, size, max_size, seed, pickle.then_some(1))
});
