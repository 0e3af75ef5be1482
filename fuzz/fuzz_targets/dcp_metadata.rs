//! The DCP metadata reader: the fuzzed bytes are a `.metadata` pickle, given to
//! `dcp::read_partial` (which takes the metadata as bytes), then the catalog is used as the
//! planner and executor use it.
//!
//! The last byte picks the directory the metadata is read against (a pickle ignores what
//! follows its STOP opcode, so a seed is a real `.metadata` with one byte appended):
//! `last % (1 + D)` = 0 is an empty directory (metadata parsing only; every data file is
//! "on another rank"), `k` ≥ 1 the k-th of the D `tests/fixtures/dcp/*/checkpoint` directories in
//! byte order, read in place (mapped read-only), so chunk entries reach the `.distcp` items and
//! the torch.save / zstd readers. An odd `last / (1 + D)` gives the bytes twice, as two per-rank
//! `__{r}.metadata` files (the merge path).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use axsave_formats::dcp;
use libfuzzer_sys::{fuzz_mutator, fuzz_target};

fn dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut dirs = vec![axsave_fuzz::scratch_dir("dcp")];
        let root = axsave_fuzz::fixtures().join("dcp");
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .expect("tests/fixtures/dcp")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let d = root.join(n).join("checkpoint");
            if d.is_dir() {
                dirs.push(d);
            }
        }
        dirs
    })
}

fuzz_target!(|data: &[u8]| {
    let dirs = dirs();
    let last = data.last().copied().unwrap_or(0) as usize;
    let dir = &dirs[last % dirs.len()];
    let metas = if (last / dirs.len()) % 2 == 1 {
        vec![
            ("__0.metadata".to_string(), data.to_vec()),
            ("__1.metadata".to_string(), data.to_vec()),
        ]
    } else {
        vec![(".metadata".to_string(), data.to_vec())]
    };
    match dcp::read_partial(dir, &metas) {
        Ok(cat) => axsave_fuzz::use_catalog(&cat),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    axsave_fuzz::mutate(data, size, max_size, seed, Some(0))
});
