//! Partial blocks: the bytes of an aligned block that no single write covers whole (the ends of
//! tensors and of the runs of a sharded tensor), gathered until the block is whole.
//!
//! Written through the page cache as they come, these small writes cost more than their size: on
//! ext4 a buffered write takes the file's lock exclusively, so it waits for every direct write in
//! flight on that file and the writers' queue stalls behind it (measured: the copy threads spent
//! half their time in such writes). Gathered here instead, a block whose bytes have all arrived
//! goes to the writers like any other; what never becomes whole (the block the header shares, the
//! file's last block, bytes beyond the cap) is written through the page cache once the direct
//! writes are done, or at once when the cap is reached.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Mutex, MutexGuard};

use super::staging::{ALIGN, Staging};

/// A block being gathered.
pub(super) struct Partial {
    /// The block's bytes, at their offsets within it.
    pub(super) data: Staging,
    /// The byte ranges within the block that have arrived (each byte once).
    pub(super) ranges: Vec<(usize, usize)>,
    filled: usize,
}

/// What became of bytes handed to [`Stitcher::add`].
pub(super) enum Added {
    /// Kept: their block is not whole yet.
    Kept,
    /// Their block is whole: its bytes, ready for a direct write of [`ALIGN`] bytes.
    Whole(Staging),
    /// Not kept, because as many blocks as the cap allows are being gathered: the caller writes
    /// them itself.
    Refused,
}

/// The partial blocks of every output file, at most `cap` of them at a time.
pub(super) struct Stitcher {
    blocks: Mutex<HashMap<(usize, u64), Partial>>,
    cap: usize,
}

impl Stitcher {
    /// A stitcher gathering at most `cap_bytes` of memory's worth of blocks (each takes two
    /// [`ALIGN`]s: the block and its alignment slack).
    pub(super) fn new(cap_bytes: usize) -> Self {
        Stitcher {
            blocks: Mutex::new(HashMap::new()),
            cap: cap_bytes / (2 * ALIGN),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(usize, u64), Partial>> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `bytes`, which start at byte `offset` of file `file` and lie inside one block. Every
    /// byte of a file must be added at most once.
    pub(super) fn add(&self, file: usize, offset: u64, bytes: &[u8]) -> Added {
        let block = offset / ALIGN as u64 * ALIGN as u64;
        let at = (offset - block) as usize;
        debug_assert!(at + bytes.len() <= ALIGN, "bytes across a block boundary");
        let mut blocks = self.lock();
        let full = blocks.len() >= self.cap;
        let p = match blocks.entry((file, block)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if full => return Added::Refused,
            Entry::Vacant(e) => e.insert(Partial {
                data: Staging::new(ALIGN),
                ranges: Vec::new(),
                filled: 0,
            }),
        };
        p.data.bytes_mut(ALIGN)[at..at + bytes.len()].copy_from_slice(bytes);
        p.ranges.push((at, at + bytes.len()));
        p.filled += bytes.len();
        if p.filled < ALIGN {
            return Added::Kept;
        }
        match blocks.remove(&(file, block)) {
            Some(p) => Added::Whole(p.data),
            None => Added::Kept,
        }
    }

    /// Takes every block still being gathered, as `(file, block offset, partial)`, in file
    /// order.
    pub(super) fn take(&self) -> Vec<(usize, u64, Partial)> {
        let mut left: Vec<_> = self
            .lock()
            .drain()
            .map(|((file, block), p)| (file, block, p))
            .collect();
        left.sort_by_key(|&(file, block, _)| (file, block));
        left
    }
}

/// Splits `len` bytes at `offset` at the block boundaries: `(offset, start, end)` of each part,
/// `start..end` being its place within the `len` bytes.
pub(super) fn parts(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let room = ALIGN - (pos % ALIGN as u64) as usize;
        let n = room.min(len - at);
        let part = (pos, at, at + n);
        at += n;
        Some(part)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_end_at_block_boundaries() {
        let got: Vec<_> = parts(4000, 5000).collect();
        assert_eq!(
            got,
            vec![(4000, 0, 96), (4096, 96, 4192), (8192, 4192, 5000)]
        );
        assert_eq!(parts(8192, 0).count(), 0);
        assert_eq!(parts(100, 10).collect::<Vec<_>>(), vec![(100, 0, 10)]);
    }

    #[test]
    fn a_block_is_whole_when_its_last_byte_arrives_in_any_order() {
        let s = Stitcher::new(1 << 20);
        let block: Vec<u8> = (0..ALIGN).map(|i| (i % 251) as u8).collect();
        let base = 3 * ALIGN as u64;
        for (lo, hi) in [(3000, ALIGN), (0, 1000)] {
            assert!(matches!(
                s.add(7, base + lo as u64, &block[lo..hi]),
                Added::Kept
            ));
        }
        match s.add(7, base + 1000, &block[1000..3000]) {
            Added::Whole(data) => assert_eq!(data.bytes(ALIGN), &block[..]),
            _ => panic!("the block is whole"),
        }
        assert!(s.take().is_empty(), "a whole block is no longer kept");
    }

    #[test]
    fn blocks_left_over_keep_the_ranges_that_arrived() {
        let s = Stitcher::new(1 << 20);
        assert!(matches!(s.add(1, 8192 + 10, &[5; 20]), Added::Kept));
        assert!(matches!(s.add(0, 100, &[6; 50]), Added::Kept));
        assert!(matches!(s.add(1, 8192 + 40, &[7; 2]), Added::Kept));
        let left = s.take();
        let summary: Vec<_> = left
            .iter()
            .map(|(f, b, p)| (*f, *b, p.ranges.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, 0, vec![(100, 150)]),
                (1, 8192, vec![(10, 30), (40, 42)])
            ]
        );
        assert_eq!(left[1].2.data.bytes(ALIGN)[10..30], [5; 20]);
        assert_eq!(left[1].2.data.bytes(ALIGN)[40..42], [7; 2]);
    }

    #[test]
    fn past_the_cap_new_blocks_are_refused_but_kept_ones_still_fill() {
        let s = Stitcher::new(2 * 2 * ALIGN);
        assert!(matches!(s.add(0, 0, &[1; 10]), Added::Kept));
        assert!(matches!(s.add(0, 4096, &[1; 10]), Added::Kept));
        assert!(matches!(s.add(0, 8192, &[1; 10]), Added::Refused));
        assert!(matches!(s.add(0, 10, &[1; 4086]), Added::Whole(_)));
        assert!(matches!(s.add(0, 8192, &[1; 10]), Added::Kept));
        assert!(matches!(Stitcher::new(0).add(0, 0, &[1]), Added::Refused));
    }
}
