//! The run table both data transports put in their frames: per run, its byte offset in the
//! output file (u64) and its length (u32), little-endian; and the little-endian readers the
//! wire formats share.

/// Bytes per run-table entry.
pub(crate) const RUN_ENTRY_LEN: usize = 12;

/// Parses a run table into `out` and checks it against the payload length.
pub(crate) fn decode_run_table(
    table: &[u8],
    payload: u64,
    out: &mut Vec<(u64, u32)>,
) -> Result<(), String> {
    out.clear();
    let mut total: u64 = 0;
    for entry in table.chunks_exact(RUN_ENTRY_LEN) {
        let offset = u64_at(entry, 0);
        let len = u32_at(entry, 8);
        if len == 0 {
            return Err(format!("empty run at offset {offset}"));
        }
        if offset.checked_add(u64::from(len)).is_none() {
            return Err(format!(
                "run of {len} bytes at offset {offset} ends past 2^64"
            ));
        }
        // At most MAX_RUNS_PER_FRAME runs of < 2^32 bytes: no overflow.
        total += u64::from(len);
        out.push((offset, len));
    }
    if total != payload {
        return Err(format!(
            "run lengths add up to {total} bytes but the payload is {payload}"
        ));
    }
    Ok(())
}

/// The little-endian u32 at `b[at..at + 4]` (the caller has checked the length).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The little-endian u64 at `b[at..at + 8]` (the caller has checked the length).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
