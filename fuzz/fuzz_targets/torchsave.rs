//! `TorchSave::parse` and `.tensor()` of every reachable value that `is_tensor`.
//!
//! An input starting with a zip local header is read as a whole archive (the zip reader's
//! paths); one starting with a 0 byte is a compact tensor description from which
//! `axsave_fuzz::tensor_pickle` generates the `data.pkl` (every extreme size, stride and offset
//! one mutation away); any other input is taken as the `data.pkl` itself. Both are read in an
//! archive built around them (the tensor reader's paths, which byte mutations of a whole zip
//! rarely reach). Archives are also
//! read through a [`HeadTail`] window, as DCP reads zstd-compressed items.
#![no_main]

use axsave_formats::torchsave::TorchSave;
use axsave_formats::zip::HeadTail;
use libfuzzer_sys::{fuzz_mutator, fuzz_target};

fuzz_target!(|data: &[u8]| {
    let wrapped;
    let archive = if axsave_fuzz::is_zip(data) {
        data
    } else if let Some((0, spec)) = data.split_first() {
        wrapped = axsave_fuzz::rewrap_pickle(&[], &axsave_fuzz::tensor_pickle(spec));
        &wrapped[..]
    } else {
        wrapped = axsave_fuzz::rewrap_pickle(&[], data);
        &wrapped[..]
    };
    match TorchSave::parse(archive) {
        Ok(save) => axsave_fuzz::use_torchsave(&save),
        Err(e) => {
            let msg = e.to_string();
            if axsave_fuzz::debug() {
                eprintln!("{msg}");
            }
        }
    }
    // Only the first half and the last quarter of the archive at hand.
    let n = archive.len();
    let ht = HeadTail {
        head: archive[..n / 2].to_vec(),
        tail: archive[n - n / 4..].to_vec(),
        len: n as u64,
    };
    match TorchSave::parse(&ht) {
        Ok(save) => axsave_fuzz::use_torchsave(&save),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});

// Integers are rewritten only in the pickle mode (a whole zip keeps libFuzzer's mutations).
fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let pickle = !axsave_fuzz::is_zip(&data[..size]) && data.first() != Some(&0);
    axsave_fuzz::mutate(data, size, max_size, seed, pickle.then_some(0))
});
