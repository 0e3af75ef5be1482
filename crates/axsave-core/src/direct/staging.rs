//! Aligned staging buffers: the memory a direct write is made from.

/// Alignment of direct writes, in memory and in the file: a page, which is also a multiple of
/// every common logical block size.
pub const ALIGN: usize = 4096;

/// A staging buffer whose usable part starts at an [`ALIGN`]-aligned address.
pub(super) struct Staging {
    raw: Vec<u8>,
    start: usize,
}

impl Staging {
    pub(super) fn new(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Staging { raw, start }
    }
    pub(super) fn bytes(&self, len: usize) -> &[u8] {
        &self.raw[self.start..self.start + len]
    }
    pub(super) fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }
}
