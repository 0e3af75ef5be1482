//! Byte layout of the MPI transport's messages (described in the
//! [module documentation](super)), the framing of runs into them, and the checks on
//! everything received. Pure functions: no MPI here.

use crate::data_plane::limits::{MAX_FRAME_BYTES, MAX_RUNS_PER_FRAME};
pub(crate) use crate::data_plane::runs::{RUN_ENTRY_LEN, decode_run_table, u32_at, u64_at};

/// Version carried by every message; a receiver refuses any other.
pub const MPI_PROTOCOL_VERSION: u32 = 1;
/// MPI tag of frames.
pub const DATA_TAG: i32 = 0x4158;
/// MPI tag of end messages.
pub const END_TAG: i32 = 0x4159;
/// Largest value [`MpiContext::broadcast`](super::MpiContext::broadcast) carries: it is for
/// small rendezvous data, and must fit one MPI `int` count.
pub const MAX_BROADCAST_BYTES: usize = 1 << 30;

pub(crate) const FRAME_MAGIC: [u8; 4] = *b"AXMF";
pub(crate) const END_MAGIC: [u8; 4] = *b"AXME";
/// Frame header, magic included.
pub(crate) const HEADER_LEN: usize = 40;
/// End message, magic included.
pub(crate) const END_LEN: usize = 40;

// The largest frame must fit an MPI `int` count.
const _: () =
    assert!(HEADER_LEN + MAX_FRAME_BYTES + RUN_ENTRY_LEN * MAX_RUNS_PER_FRAME <= i32::MAX as usize);

/// Most runs a frame of `frame_bytes` can hold (each run has at least one byte).
fn max_runs(frame_bytes: usize) -> usize {
    MAX_RUNS_PER_FRAME.min(frame_bytes)
}

/// Longest frame message for a frame size: header, full payload, fullest run table.
pub(crate) fn max_frame_message(frame_bytes: usize) -> usize {
    HEADER_LEN + frame_bytes + RUN_ENTRY_LEN * max_runs(frame_bytes)
}

/// The pieces a run of `len` bytes at `offset` is cut into when the frame being filled has
/// `room` payload bytes left and every later frame holds `frame_bytes`: `(file offset, start
/// within the run, length)`. No piece exceeds `frame_bytes`, so however long the run (the
/// caller's slice may exceed 2^31 bytes), no message exceeds MPI's `int` count.
pub(crate) fn split_run(
    offset: u64,
    len: u64,
    room: usize,
    frame_bytes: usize,
) -> impl Iterator<Item = (u64, u64, usize)> {
    let frame = frame_bytes.max(1) as u64;
    let mut room = if room == 0 { frame } else { room as u64 };
    let mut start = 0u64;
    std::iter::from_fn(move || {
        if start >= len {
            return None;
        }
        let n = room.min(len - start);
        let piece = (offset + start, start, n as usize);
        start += n;
        room = frame;
        Some(piece)
    })
}

/// Packs runs into frame messages for one stream, in place: each message is built in one
/// buffer (header, payload, then run table) that goes to MPI as is.
pub(crate) struct Framer {
    session: u64,
    stream: u64,
    frame_bytes: usize,
    /// The message being filled: header room and payload so far. Meaningful while `runs` is
    /// not empty.
    buf: Vec<u8>,
    file: u32,
    runs: Vec<(u64, u32)>,
    /// Payload bytes and frames handed to `emit`.
    bytes: u64,
    frames: u64,
}

impl Framer {
    /// A framer that fills `buf` (best with a capacity of
    /// [`max_frame_message`]`(frame_bytes)`, so it never reallocates).
    pub fn new(session: u64, stream: u64, frame_bytes: usize, buf: Vec<u8>) -> Framer {
        Framer {
            session,
            stream,
            frame_bytes,
            buf,
            file: 0,
            runs: Vec::new(),
            bytes: 0,
            frames: 0,
        }
    }

    /// Payload bytes in messages handed to `emit` so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Payload bytes of the frame being filled.
    fn filled(&self) -> usize {
        if self.runs.is_empty() {
            0
        } else {
            self.buf.len() - HEADER_LEN
        }
    }

    /// Payload bytes the frame being filled can still take.
    fn room(&self) -> usize {
        if self.runs.len() >= max_runs(self.frame_bytes) {
            0
        } else {
            self.frame_bytes - self.filled()
        }
    }

    /// Adds a run, splitting it over frames and merging it with the previous run when it
    /// continues it. Each full frame goes to `emit`, which returns an empty buffer for the
    /// next one. Empty runs are ignored.
    pub fn push<E>(
        &mut self,
        file: u32,
        offset: u64,
        data: &[u8],
        emit: &mut dyn FnMut(Vec<u8>) -> Result<Vec<u8>, E>,
    ) -> Result<(), E> {
        if data.is_empty() {
            return Ok(());
        }
        if !self.runs.is_empty() && self.file != file {
            self.close(emit)?;
        }
        for (at, start, n) in split_run(offset, data.len() as u64, self.room(), self.frame_bytes) {
            if self.room() < n {
                self.close(emit)?;
            }
            // `start + n` ≤ data.len(), a usize.
            let start = start as usize;
            self.append(file, at, &data[start..start + n]);
            if self.room() == 0 {
                self.close(emit)?;
            }
        }
        Ok(())
    }

    /// Emits the frame being filled, if any.
    pub fn close<E>(
        &mut self,
        emit: &mut dyn FnMut(Vec<u8>) -> Result<Vec<u8>, E>,
    ) -> Result<(), E> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let payload = self.filled() as u64;
        let h = &mut self.buf[..HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC);
        h[4..8].copy_from_slice(&MPI_PROTOCOL_VERSION.to_le_bytes());
        h[8..16].copy_from_slice(&self.session.to_le_bytes());
        h[16..24].copy_from_slice(&self.stream.to_le_bytes());
        h[24..28].copy_from_slice(&self.file.to_le_bytes());
        // At most max_runs ≤ MAX_RUNS_PER_FRAME runs.
        h[28..32].copy_from_slice(&(self.runs.len() as u32).to_le_bytes());
        h[32..40].copy_from_slice(&payload.to_le_bytes());
        for &(offset, len) in &self.runs {
            self.buf.extend_from_slice(&offset.to_le_bytes());
            self.buf.extend_from_slice(&len.to_le_bytes());
        }
        self.runs.clear();
        let message = std::mem::take(&mut self.buf);
        self.buf = emit(message)?;
        self.bytes += payload;
        self.frames += 1;
        Ok(())
    }

    /// The end message for everything emitted so far.
    pub fn end_message(&self) -> Vec<u8> {
        encode_end(self.session, self.stream, self.bytes, self.frames)
    }

    /// The buffer, for reuse.
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }

    /// Adds a piece that fits.
    fn append(&mut self, file: u32, offset: u64, piece: &[u8]) {
        if self.runs.is_empty() {
            self.buf.clear();
            self.buf.resize(HEADER_LEN, 0);
            self.file = file;
        }
        // Fits: a piece is at most frame_bytes ≤ MAX_FRAME_BYTES < 2^32, and so is the frame.
        let n = piece.len() as u32;
        match self.runs.last_mut() {
            Some((o, l)) if o.checked_add(u64::from(*l)) == Some(offset) => *l += n,
            _ => self.runs.push((offset, n)),
        }
        self.buf.extend_from_slice(piece);
    }
}

/// A checked frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FrameView<'a> {
    pub stream: u64,
    pub file: u32,
    /// The payload; the runs are in the `runs` vector passed to [`decode_frame`].
    pub payload: &'a [u8],
}

/// What a message turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<T> {
    /// A valid message of this session.
    Ours(T),
    /// A well-formed message of another session: a stray to drop.
    Stray,
}

/// Checks the prefix every message starts with (its magic, the protocol version) and says
/// whether it belongs to `session`; `msg` holds at least 16 bytes (checked by the caller).
fn of_session(
    msg: &[u8],
    magic: [u8; 4],
    what: &str,
    magic_name: &str,
    session: u64,
) -> Result<bool, String> {
    if msg[0..4] != magic {
        return Err(format!(
            "{what} starts with {:02x?}, not the {magic_name} magic",
            &msg[0..4]
        ));
    }
    let version = u32_at(msg, 4);
    if version != MPI_PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version} (this receiver speaks {MPI_PROTOCOL_VERSION})"
        ));
    }
    Ok(u64_at(msg, 8) == session)
}

/// Checks a frame message against the limits and parses its run table into `runs`.
pub(crate) fn decode_frame<'a>(
    msg: &'a [u8],
    session: u64,
    max_payload: usize,
    runs: &mut Vec<(u64, u32)>,
) -> Result<Decoded<FrameView<'a>>, String> {
    runs.clear();
    if msg.len() < HEADER_LEN {
        return Err(format!(
            "a frame of {} bytes is shorter than its {HEADER_LEN}-byte header",
            msg.len()
        ));
    }
    if !of_session(msg, FRAME_MAGIC, "frame", "frame", session)? {
        return Ok(Decoded::Stray);
    }
    let stream = u64_at(msg, 16);
    let file = u32_at(msg, 24);
    let n = u32_at(msg, 28) as usize;
    let payload = u64_at(msg, 32);
    if n == 0 || n > MAX_RUNS_PER_FRAME {
        return Err(format!(
            "frame with {n} runs (1 ..= {MAX_RUNS_PER_FRAME} allowed)"
        ));
    }
    if payload == 0 || payload > max_payload as u64 {
        return Err(format!(
            "frame payload of {payload} bytes (1 ..= {max_payload} allowed)"
        ));
    }
    // Both bounded above: no overflow.
    let p = payload as usize;
    let want = HEADER_LEN + p + n * RUN_ENTRY_LEN;
    if msg.len() != want {
        return Err(format!(
            "frame of {} bytes, but its header ({n} runs, {p} payload bytes) makes {want}",
            msg.len()
        ));
    }
    decode_run_table(&msg[HEADER_LEN + p..], payload, runs)?;
    Ok(Decoded::Ours(FrameView {
        stream,
        file,
        payload: &msg[HEADER_LEN..HEADER_LEN + p],
    }))
}

/// A checked end message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct End {
    pub stream: u64,
    pub bytes: u64,
    pub frames: u64,
}

pub(crate) fn encode_end(session: u64, stream: u64, bytes: u64, frames: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(END_LEN);
    b.extend_from_slice(&END_MAGIC);
    b.extend_from_slice(&MPI_PROTOCOL_VERSION.to_le_bytes());
    b.extend_from_slice(&session.to_le_bytes());
    b.extend_from_slice(&stream.to_le_bytes());
    b.extend_from_slice(&bytes.to_le_bytes());
    b.extend_from_slice(&frames.to_le_bytes());
    b
}

pub(crate) fn decode_end(msg: &[u8], session: u64) -> Result<Decoded<End>, String> {
    if msg.len() != END_LEN {
        return Err(format!(
            "end message of {} bytes (it has {END_LEN})",
            msg.len()
        ));
    }
    if !of_session(msg, END_MAGIC, "end message", "end", session)? {
        return Ok(Decoded::Stray);
    }
    Ok(Decoded::Ours(End {
        stream: u64_at(msg, 16),
        bytes: u64_at(msg, 24),
        frames: u64_at(msg, 32),
    }))
}

/// Why a message of `len` bytes with `tag` cannot be received, checked from the probe
/// before any buffer is allocated for it.
pub(crate) fn check_probed(tag: i32, len: usize, frame_bytes: usize) -> Result<(), String> {
    match tag {
        DATA_TAG => {
            let max = max_frame_message(frame_bytes);
            if len < HEADER_LEN || len > max {
                return Err(format!(
                    "a frame message of {len} bytes ({HEADER_LEN} ..= {max} allowed)"
                ));
            }
        }
        END_TAG => {
            if len != END_LEN {
                return Err(format!("an end message of {len} bytes (it has {END_LEN})"));
            }
        }
        _ => return Err(format!("a message with unknown tag {tag}")),
    }
    Ok(())
}

/// A broadcast's length prefix: the length, or [`REFUSED`] when the root has nothing
/// valid to send.
pub(crate) const REFUSED: u64 = u64::MAX;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const GIB: u64 = 1 << 30;

    #[test]
    fn runs_longer_than_2_pow_31_split_into_pieces_mpi_can_count() {
        for (len, room, frame) in [
            (5 * GIB + 12_345, 100usize, GIB as usize),
            (5 * GIB, 0, GIB as usize),
            (3 * GIB, (GIB / 2) as usize, MAX_FRAME_BYTES),
            ((1 << 32) + 1, 7, 1 << 20),
            (10, 3, 4),
            (1, 0, 1),
        ] {
            let offset = 1_000_000u64;
            let pieces: Vec<_> = split_run(offset, len, room, frame).collect();
            let mut next = 0u64;
            for (i, &(at, start, n)) in pieces.iter().enumerate() {
                assert_eq!(start, next, "pieces are contiguous");
                assert_eq!(at, offset + start);
                assert!(n >= 1 && n <= frame, "piece {i} of {n} bytes");
                let limit = if i == 0 && room > 0 { room } else { frame };
                assert!(n <= limit);
                // Every piece, framed, fits an MPI count.
                assert!(max_frame_message(n) <= i32::MAX as usize);
                next += n as u64;
            }
            assert_eq!(next, len, "pieces cover the run");
            let first = if room > 0 { (room as u64).min(len) } else { 0 };
            let expect = if room > 0 {
                1 + (len - first).div_ceil(frame as u64)
            } else {
                len.div_ceil(frame as u64)
            };
            assert_eq!(pieces.len() as u64, expect);
        }
        assert_eq!(split_run(0, 0, 5, 8).count(), 0);
        assert!(max_frame_message(MAX_FRAME_BYTES) <= i32::MAX as usize);
    }

    fn collect(frame_bytes: usize, runs: &[(u32, u64, Vec<u8>)]) -> (Vec<Vec<u8>>, Framer) {
        let mut out = Vec::new();
        let mut f = Framer::new(9, 4, frame_bytes, Vec::new());
        let mut emit = |m: Vec<u8>| -> Result<Vec<u8>, ()> {
            out.push(m);
            Ok(Vec::new())
        };
        for (file, offset, data) in runs {
            f.push(*file, *offset, data, &mut emit).unwrap();
        }
        f.close(&mut emit).unwrap();
        (out, f)
    }

    #[test]
    fn framed_runs_decode_back_to_the_same_bytes() {
        let data = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
        };
        let runs = vec![
            (0u32, 0u64, data(10, 1)),
            (0, 10, data(5, 2)),      // continues the previous run: merged
            (0, 100, data(3000, 3)),  // larger than a frame: split
            (1, 0, data(1, 4)),       // another file: new frame
            (1, 5, vec![]),           // empty: ignored
            (0, 5000, data(1024, 5)), // exactly one frame
        ];
        let frame = 1024;
        let (messages, f) = collect(frame, &runs);
        let mut got: BTreeMap<(u32, u64), u8> = BTreeMap::new();
        let mut table = Vec::new();
        let mut payload_total = 0u64;
        for m in &messages {
            assert!(m.len() <= max_frame_message(frame));
            let Decoded::Ours(v) = decode_frame(m, 9, frame, &mut table).unwrap() else {
                panic!("not ours");
            };
            assert_eq!(v.stream, 4);
            let mut at = 0;
            for &(o, l) in &table {
                for k in 0..l as usize {
                    assert!(
                        got.insert((v.file, o + k as u64), v.payload[at + k])
                            .is_none()
                    );
                }
                at += l as usize;
            }
            payload_total += v.payload.len() as u64;
        }
        let mut want = BTreeMap::new();
        for (file, offset, d) in &runs {
            for (k, b) in d.iter().enumerate() {
                want.insert((*file, offset + k as u64), *b);
            }
        }
        assert_eq!(got, want);
        assert_eq!(f.bytes(), payload_total);
        // 15 merged bytes + 1009 of the big run; 1024; 967; file 1; the exact frame.
        assert_eq!(messages.len(), 5);
        let first = &messages[0];
        assert_eq!(u32_at(first, 28), 2, "the merged run and the first piece");
        let end = f.end_message();
        assert_eq!(
            decode_end(&end, 9).unwrap(),
            Decoded::Ours(End {
                stream: 4,
                bytes: payload_total,
                frames: 5
            })
        );
    }

    #[test]
    fn a_frame_closes_when_its_run_table_is_full() {
        let frame = 1 << 20;
        let runs: Vec<_> = (0..MAX_RUNS_PER_FRAME as u64 + 10)
            .map(|i| (0u32, i * 2, vec![1u8]))
            .collect();
        let (messages, _) = collect(frame, &runs);
        assert_eq!(messages.len(), 2);
        assert_eq!(u32_at(&messages[0], 28) as usize, MAX_RUNS_PER_FRAME);
        assert_eq!(u32_at(&messages[1], 28), 10);
        let mut table = Vec::new();
        for m in &messages {
            assert!(matches!(
                decode_frame(m, 9, frame, &mut table),
                Ok(Decoded::Ours(_))
            ));
        }
    }

    fn frame(
        runs: &[(u64, u32)],
        payload: &[u8],
        n_field: Option<u32>,
        p_field: Option<u64>,
    ) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(b"AXMF");
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&9u64.to_le_bytes());
        m.extend_from_slice(&4u64.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&n_field.unwrap_or(runs.len() as u32).to_le_bytes());
        m.extend_from_slice(&p_field.unwrap_or(payload.len() as u64).to_le_bytes());
        m.extend_from_slice(payload);
        for &(o, l) in runs {
            m.extend_from_slice(&o.to_le_bytes());
            m.extend_from_slice(&l.to_le_bytes());
        }
        m
    }

    #[test]
    fn malformed_frames_are_refused_and_other_sessions_are_strays() {
        let mut t = Vec::new();
        let ok = frame(&[(0, 5)], b"hello", None, None);
        assert!(matches!(
            decode_frame(&ok, 9, 16, &mut t),
            Ok(Decoded::Ours(_))
        ));
        assert_eq!(decode_frame(&ok, 8, 16, &mut t), Ok(Decoded::Stray));

        let err = |m: &[u8]| decode_frame(m, 9, 16, &mut Vec::new()).unwrap_err();
        assert!(err(&ok[..20]).contains("shorter"));
        let mut bad = ok.clone();
        bad[0] = b'x';
        assert!(err(&bad).contains("magic"));
        let mut bad = ok.clone();
        bad[4] = 2;
        assert!(err(&bad).contains("version 2"));
        assert!(err(&frame(&[(0, 5)], b"hello", Some(0), None)).contains("0 runs"));
        assert!(err(&frame(&[(0, 5)], b"hello", Some(u32::MAX), None)).contains("runs"));
        assert!(err(&frame(&[(0, 5)], b"hello", None, Some(u64::MAX))).contains("payload"));
        assert!(err(&frame(&[(0, 5)], b"hello", None, Some(4))).contains("makes"));
        assert!(err(&frame(&[(0, 4)], b"hello", None, None)).contains("add up to 4"));
        assert!(err(&frame(&[(0, 0), (0, 5)], b"hello", None, None)).contains("empty run"));
        assert!(err(&frame(&[(u64::MAX - 1, 5)], b"hello", None, None)).contains("2^64"));
        let big = vec![0u8; 17];
        assert!(err(&frame(&[(0, 17)], &big, None, None)).contains("payload of 17"));
    }

    #[test]
    fn end_messages_round_trip_and_are_checked() {
        let e = encode_end(9, 3, 100, 2);
        assert_eq!(e.len(), END_LEN);
        assert_eq!(&e[..4], b"AXME");
        assert_eq!(
            decode_end(&e, 9),
            Ok(Decoded::Ours(End {
                stream: 3,
                bytes: 100,
                frames: 2
            }))
        );
        assert_eq!(decode_end(&e, 1), Ok(Decoded::Stray));
        assert!(decode_end(&e[..39], 9).is_err());
        let mut bad = e.clone();
        bad[1] = 0;
        assert!(decode_end(&bad, 9).is_err());
        let mut bad = e;
        bad[4] = 7;
        assert!(decode_end(&bad, 9).unwrap_err().contains("version 7"));
    }

    #[test]
    fn probed_sizes_are_checked_before_allocation() {
        assert!(check_probed(DATA_TAG, HEADER_LEN + 13, 1).is_ok());
        assert!(check_probed(DATA_TAG, max_frame_message(1 << 20), 1 << 20).is_ok());
        assert!(check_probed(DATA_TAG, max_frame_message(1 << 20) + 1, 1 << 20).is_err());
        assert!(check_probed(DATA_TAG, 39, 1 << 20).is_err());
        assert!(check_probed(END_TAG, END_LEN, 1).is_ok());
        assert!(check_probed(END_TAG, END_LEN + 1, 1).is_err());
        assert!(check_probed(7, 40, 1).unwrap_err().contains("tag 7"));
    }
}
