//! Which bytes move in which order: the part of the GPU executor that every rank computes
//! identically, so that each NCCL send meets a receive of the same size.
//!
//! * A **unit** is one sub-box of one piece (as [`crate::geometry::split`] cuts it with the agreed
//!   chunk size): read by the piece's reader, converted, and written by the file's writer. The
//!   units of a list of assignments come in *canonical order*: assignments in plan order, each
//!   piece's sub-boxes in split order.
//! * The remote units (reader ≠ writer) are packed into **rounds** ([`exchange_rounds`]): each
//!   round fits every rank's buffers (what it sends, and what it receives, at most
//!   [`Sizing::round_bytes`] each) and keeps each reader's units in canonical order, so a
//!   forward-only zstd decoder and NCCL's in-order matching both hold. All of a rank's
//!   transfers in a round are posted as one NCCL group.
//! * Within a round, a rank's units **to or from one peer** travel as one message (a
//!   *bundle*): the units back to back in canonical order, each starting at a 16-byte aligned
//!   offset ([`ALIGN`]). Sender and receiver compute the same offsets from the same units
//!   ([`RoundWork::for_rank`]).
//! * Local units that need a conversion (reader = writer = this rank) are packed into rounds of
//!   their own ([`local_rounds`]), which only this rank runs.
//!
//! Nothing here touches a device; the tests check the invariants the protocol relies on.

use axsave_formats::{Catalog, DType};

use crate::execute::Task;
use crate::geometry::{Geometry, SubBox, split};
use crate::layout::Layout;
use crate::plan::Assignment;

/// Offsets inside staging buffers and bundles are multiples of this: every element is aligned
/// for the kernels whatever dtypes share a buffer.
pub const ALIGN: usize = 16;

/// Rounds `n` up to [`ALIGN`].
pub fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// The sizes every rank must agree on (rank 0 picks them and sends them with the NCCL id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sizing {
    /// Largest sub-box, in bytes of the wider of its stored and output dtypes.
    pub chunk_bytes: u64,
    /// What one round may put in each of a rank's buffers (sent, received).
    pub round_bytes: u64,
}

impl Sizing {
    /// Sizes for a host memory budget: two rounds in flight, each with a send and a receive
    /// staging buffer of `round_bytes` in pinned memory, take half the budget.
    pub fn for_budget(budget: u64) -> Sizing {
        let round = (budget / 8).clamp(1 << 20, 256 << 20);
        let chunk = (round / 4).clamp(64 << 10, 64 << 20);
        Sizing {
            chunk_bytes: chunk,
            round_bytes: round.max(chunk + 2 * ALIGN as u64),
        }
    }
}

/// One sub-box of one piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// The piece.
    pub task: Task,
    /// Index of the sub-box in the piece's split.
    pub sub: usize,
    /// The sub-box.
    pub sub_box: SubBox,
    /// Who reads it.
    pub reader: usize,
    /// Who writes it.
    pub writer: usize,
    /// Stored dtype.
    pub from: DType,
    /// Output dtype.
    pub to: DType,
    /// Elements.
    pub elems: u64,
    /// How many sub-boxes its piece has.
    pub subs: usize,
}

impl Unit {
    /// Row-major stored bytes (what the reader stages).
    pub fn in_bytes(&self) -> usize {
        (self.elems as usize) * self.from.size()
    }

    /// Output bytes (what travels and what is written).
    pub fn out_bytes(&self) -> usize {
        (self.elems as usize) * self.to.size()
    }

    /// Whether the dtype changes.
    pub fn converts(&self) -> bool {
        self.from != self.to
    }
}

/// The geometry of a task's piece.
pub fn geometry(catalog: &Catalog, layout: &Layout, t: &Task) -> Geometry {
    let src = &catalog.tensors[layout.tensors[t.out].source];
    Geometry::of(&src.pieces[t.piece], &src.shape)
}

/// The units of `assignments`, in canonical order. `chunk_bytes` bounds each sub-box as the
/// CPU executor does: its stored span in elements of the wider dtype.
pub fn units(
    catalog: &Catalog,
    layout: &Layout,
    assignments: &[Assignment],
    chunk_bytes: u64,
) -> Vec<Unit> {
    let mut out = Vec::new();
    for a in assignments {
        let t = a.task;
        let ot = &layout.tensors[t.out];
        let piece = &catalog.tensors[ot.source].pieces[t.piece];
        let g = geometry(catalog, layout, &t);
        let es = piece.stored_dtype.size().max(ot.dtype.size()).max(1) as u64;
        let boxes = split(&g, (chunk_bytes / es).max(1));
        let subs = boxes.len();
        for (k, b) in boxes.into_iter().enumerate() {
            out.push(Unit {
                subs,
                task: t,
                sub: k,
                elems: b.numel(),
                sub_box: b,
                reader: a.reader,
                writer: a.writer,
                from: piece.stored_dtype,
                to: ot.dtype,
            });
        }
    }
    out
}

/// Space a unit takes on the sending side of a round (its staged input and its converted
/// output live in different buffers; the larger one bounds both).
fn send_cost(u: &Unit) -> u64 {
    align(u.in_bytes().max(u.out_bytes())) as u64
}

fn recv_cost(u: &Unit) -> u64 {
    align(u.out_bytes()) as u64
}

/// How far back an earlier round is searched for room (bounds the packing's cost).
const WINDOW: usize = 16;

#[derive(Default)]
struct Load {
    units: Vec<usize>,
    /// (rank, bytes sent, bytes received), few entries per round.
    ranks: Vec<(usize, u64, u64)>,
}

impl Load {
    fn get(&self, r: usize) -> (u64, u64) {
        self.ranks
            .iter()
            .find(|(x, ..)| *x == r)
            .map(|&(_, s, v)| (s, v))
            .unwrap_or((0, 0))
    }
    fn add(&mut self, r: usize, s: u64, v: u64) {
        match self.ranks.iter_mut().find(|(x, ..)| *x == r) {
            Some(e) => {
                e.1 += s;
                e.2 += v;
            }
            None => self.ranks.push((r, s, v)),
        }
    }
}

/// Packs the remote units (reader ≠ writer; others are skipped) into rounds: first fit from the
/// round of the reader's previous unit onwards, so each reader's units stay in canonical
/// order. Deterministic: the same units give the same rounds on every rank.
pub fn exchange_rounds(units: &[Unit], round_bytes: u64) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Load> = Vec::new();
    let mut floor: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for (i, u) in units.iter().enumerate() {
        if u.reader == u.writer {
            continue;
        }
        let (s, v) = (send_cost(u), recv_cost(u));
        let start = floor.get(&u.reader).copied().unwrap_or(0);
        let fits =
            |l: &Load| l.get(u.reader).0 + s <= round_bytes && l.get(u.writer).1 + v <= round_bytes;
        let at = (start..rounds.len().min(start + WINDOW))
            .find(|&r| fits(&rounds[r]))
            .unwrap_or_else(|| {
                rounds.push(Load::default());
                rounds.len() - 1
            });
        rounds[at].units.push(i);
        rounds[at].add(u.reader, s, 0);
        rounds[at].add(u.writer, 0, v);
        floor.insert(u.reader, at);
    }
    rounds.into_iter().map(|l| l.units).collect()
}

/// Packs this rank's local units (given as indices) into rounds of at most `round_bytes` on
/// each side, in order.
pub fn local_rounds(units: &[Unit], local: &[usize], round_bytes: u64) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let (mut s, mut v) = (0u64, 0u64);
    for &i in local {
        let u = &units[i];
        let (cs, cv) = (send_cost(u), recv_cost(u));
        if rounds.is_empty() || s + cs > round_bytes || v + cv > round_bytes {
            rounds.push(Vec::new());
            (s, v) = (0, 0);
        }
        if let Some(r) = rounds.last_mut() {
            r.push(i);
        }
        s += cs;
        v += cv;
    }
    rounds
}

/// One unit's place in a round's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Index into the unit list.
    pub unit: usize,
    /// Offset and length of its staged bytes in the staging buffer.
    pub in_off: usize,
    /// Staged length.
    pub in_len: usize,
    /// Offset of its output bytes (in the device's output buffer for a send, in the landing
    /// buffer for a local unit or a receive).
    pub out_off: usize,
    /// Output length.
    pub out_len: usize,
    /// Dtype of the staged bytes.
    pub from: DType,
    /// Dtype of the output bytes.
    pub to: DType,
}

/// The units one rank sends to, or receives from, one peer in a round: one NCCL message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The other rank.
    pub peer: usize,
    /// Where the message starts (device output buffer for a send, landing buffer for a
    /// receive).
    pub off: usize,
    /// Its length, the same on both sides.
    pub len: usize,
    /// The units in it, in canonical order.
    pub segs: Vec<Seg>,
}

/// Everything one rank does in one round, with every offset decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundWork {
    /// Bundles this rank sends, by peer.
    pub sends: Vec<Bundle>,
    /// Bundles this rank receives, by peer.
    pub recvs: Vec<Bundle>,
    /// Local units: staged, converted, landed, written here.
    pub locals: Vec<Seg>,
    /// Bytes of the staging buffer used.
    pub in_len: usize,
    /// Bytes of the device output buffer used (sends).
    pub out_len: usize,
    /// Bytes of the landing buffer used (receives, then locals).
    pub land_len: usize,
}

impl RoundWork {
    /// Rank `me`'s part of the round made of `round` (unit indices, canonical order).
    /// `device_converts` says whether the device converts: when it does not, the reader stages
    /// converted bytes, so its segments go from the output dtype to itself (the bundles do not
    /// change: they carry output bytes either way).
    pub fn for_rank(
        units: &[Unit],
        round: &[usize],
        me: usize,
        device_converts: bool,
    ) -> RoundWork {
        let mut w = RoundWork::default();
        let staged = |u: &Unit| if device_converts { u.from } else { u.to };
        // Sends, by writer; receives, by reader; each bundle's units in canonical order.
        let mut peers_out: Vec<usize> = round
            .iter()
            .map(|&i| &units[i])
            .filter(|u| u.reader == me && u.writer != me)
            .map(|u| u.writer)
            .collect();
        peers_out.sort_unstable();
        peers_out.dedup();
        for peer in peers_out {
            let mut b = Bundle {
                peer,
                off: w.out_len,
                len: 0,
                segs: Vec::new(),
            };
            for &i in round {
                let u = &units[i];
                if u.reader != me || u.writer != peer {
                    continue;
                }
                let from = staged(u);
                let in_len = u.elems as usize * from.size();
                b.segs.push(Seg {
                    unit: i,
                    in_off: w.in_len,
                    in_len,
                    out_off: b.off + b.len,
                    out_len: u.out_bytes(),
                    from,
                    to: u.to,
                });
                w.in_len += align(in_len);
                b.len += align(u.out_bytes());
            }
            w.out_len += b.len;
            w.sends.push(b);
        }
        let mut peers_in: Vec<usize> = round
            .iter()
            .map(|&i| &units[i])
            .filter(|u| u.writer == me && u.reader != me)
            .map(|u| u.reader)
            .collect();
        peers_in.sort_unstable();
        peers_in.dedup();
        for peer in peers_in {
            let mut b = Bundle {
                peer,
                off: w.land_len,
                len: 0,
                segs: Vec::new(),
            };
            for &i in round {
                let u = &units[i];
                if u.writer != me || u.reader != peer {
                    continue;
                }
                b.segs.push(Seg {
                    unit: i,
                    in_off: 0,
                    in_len: 0,
                    out_off: b.off + b.len,
                    out_len: u.out_bytes(),
                    from: u.to,
                    to: u.to,
                });
                b.len += align(u.out_bytes());
            }
            w.land_len += b.len;
            w.recvs.push(b);
        }
        for &i in round {
            let u = &units[i];
            if u.reader != me || u.writer != me {
                continue;
            }
            let from = staged(u);
            let in_len = u.elems as usize * from.size();
            w.locals.push(Seg {
                unit: i,
                in_off: w.in_len,
                in_len,
                out_off: w.land_len,
                out_len: u.out_bytes(),
                from,
                to: u.to,
            });
            w.in_len += align(in_len);
            w.land_len += align(u.out_bytes());
        }
        w
    }

    /// Whether this rank has nothing to do in the round.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.recvs.is_empty() && self.locals.is_empty()
    }

    /// Every segment this rank stages (sends, then locals).
    pub fn staged(&self) -> impl Iterator<Item = &Seg> {
        self.sends.iter().flat_map(|b| &b.segs).chain(&self.locals)
    }

    /// Every segment that lands here (receives, then locals).
    pub fn landing(&self) -> impl Iterator<Item = &Seg> {
        self.recvs.iter().flat_map(|b| &b.segs).chain(&self.locals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{LayoutOptions, plan_layout};
    use crate::plan::tests::row_blocks;
    use crate::plan::{Mode, make_plan};

    fn setup(w: usize, mode: Mode) -> (Catalog, Layout, crate::plan::Plan) {
        let c = row_blocks(7, [50, 6], w, DType::F32);
        let l = plan_layout(
            &c,
            &LayoutOptions {
                dtype: crate::layout::DtypeChoice::Bf16,
                min_files: if mode == Mode::Sharded { w } else { 1 },
                ..LayoutOptions::default()
            },
        )
        .unwrap();
        let own: Vec<Vec<usize>> = (0..w).map(|r| vec![r]).collect();
        let p = make_plan(&c, &l, &own, w, mode).unwrap();
        (c, l, p)
    }

    #[test]
    fn sizing_keeps_two_rounds_within_half_the_budget() {
        for budget in [1u64 << 20, 64 << 20, 256 << 20, 4 << 30, 1 << 40] {
            let s = Sizing::for_budget(budget);
            assert!(s.round_bytes >= s.chunk_bytes + 2 * ALIGN as u64, "{s:?}");
            if budget >= 8 << 20 {
                assert!(4 * s.round_bytes <= budget / 2 + 1, "{budget}: {s:?}");
            }
        }
    }

    #[test]
    fn units_cover_each_piece_in_split_order() {
        let (c, l, p) = setup(3, Mode::Gather);
        let u = units(&c, &l, &p.assignments, 64);
        // 64-byte chunks of f32 rows of 6: two rows (48 bytes) per sub-box at most.
        assert!(u.iter().all(|x| x.in_bytes() <= 64 && x.elems > 0));
        let mut per: std::collections::HashMap<Task, Vec<usize>> = Default::default();
        for x in &u {
            per.entry(x.task).or_default().push(x.sub);
        }
        for (t, subs) in per {
            let g = geometry(&c, &l, &t);
            assert_eq!(subs, (0..split(&g, 16).len()).collect::<Vec<_>>());
        }
        assert_eq!(u, units(&c, &l, &p.assignments, 64), "deterministic");
    }

    /// The invariants the NCCL protocol relies on: every remote unit in exactly one round,
    /// each reader's units in canonical order across and within rounds, every rank's load per
    /// round within the limit.
    #[test]
    fn rounds_respect_order_and_capacity() {
        for (w, mode) in [
            (2, Mode::Gather),
            (4, Mode::Gather),
            (4, Mode::Sharded),
            (3, Mode::Sharded),
        ] {
            let (c, l, p) = setup(w, mode);
            let u = units(&c, &l, &p.assignments, 96);
            let cap = 3 * 112;
            let rounds = exchange_rounds(&u, cap);
            let mut seen = vec![0; u.len()];
            let mut last: std::collections::HashMap<usize, usize> = Default::default();
            for r in &rounds {
                let mut send = vec![0u64; w];
                let mut recv = vec![0u64; w];
                for &i in r {
                    seen[i] += 1;
                    let x = &u[i];
                    if let Some(&prev) = last.get(&x.reader) {
                        assert!(prev < i, "reader {} out of canonical order", x.reader);
                    }
                    last.insert(x.reader, i);
                    send[x.reader] += send_cost(x);
                    recv[x.writer] += recv_cost(x);
                }
                assert!(
                    send.iter().chain(&recv).all(|&b| b <= cap),
                    "{send:?} {recv:?}"
                );
            }
            for (i, x) in u.iter().enumerate() {
                assert_eq!(seen[i], (x.reader != x.writer) as usize, "unit {i}");
            }
            assert_eq!(rounds, exchange_rounds(&u, cap), "deterministic");
            if mode == Mode::Gather {
                assert!(rounds.len() > 2, "the test should need several rounds");
            }
        }
    }

    /// What a reader sends and what the writer expects agree exactly: same units, same
    /// offsets, same lengths, for every pair of ranks in every round.
    #[test]
    fn both_ends_of_every_bundle_agree() {
        for mode in [Mode::Gather, Mode::Sharded] {
            let (c, l, p) = setup(4, mode);
            let u = units(&c, &l, &p.assignments, 80);
            for round in exchange_rounds(&u, 400) {
                for converts in [true, false] {
                    let works: Vec<RoundWork> = (0..4)
                        .map(|r| RoundWork::for_rank(&u, &round, r, converts))
                        .collect();
                    for (me, w) in works.iter().enumerate() {
                        assert!(w.locals.is_empty());
                        for b in &w.sends {
                            let other = works[b.peer]
                                .recvs
                                .iter()
                                .find(|x| x.peer == me)
                                .expect("a receive for every send");
                            assert_eq!(b.len, other.len);
                            let a: Vec<(usize, usize, usize)> = b
                                .segs
                                .iter()
                                .map(|s| (s.unit, s.out_off - b.off, s.out_len))
                                .collect();
                            let z: Vec<(usize, usize, usize)> = other
                                .segs
                                .iter()
                                .map(|s| (s.unit, s.out_off - other.off, s.out_len))
                                .collect();
                            assert_eq!(a, z);
                        }
                        for s in w.staged() {
                            assert_eq!(s.in_off % ALIGN, 0);
                            assert_eq!(s.out_off % ALIGN, 0);
                            assert!(s.in_off + s.in_len <= w.in_len);
                            if converts {
                                assert_eq!(s.from, DType::F32);
                            } else {
                                assert_eq!((s.from, s.in_len), (s.to, s.out_len));
                            }
                        }
                        assert!(w.out_len <= 400 && w.land_len <= 400 && w.in_len <= 400);
                    }
                }
            }
        }
    }

    #[test]
    fn local_rounds_pack_in_order_within_capacity() {
        let (c, l, p) = setup(1, Mode::Gather);
        let u = units(&c, &l, &p.assignments, 64);
        let all: Vec<usize> = (0..u.len()).collect();
        let rounds = local_rounds(&u, &all, 200);
        assert_eq!(rounds.concat(), all);
        for r in &rounds {
            let w = RoundWork::for_rank(&u, r, 0, true);
            assert!(w.sends.is_empty() && w.recvs.is_empty());
            assert_eq!(w.locals.len(), r.len());
            assert!(w.in_len <= 200 && w.land_len <= 200, "{w:?}");
        }
    }
}
