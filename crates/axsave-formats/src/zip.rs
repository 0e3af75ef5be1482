//! Just enough of the zip format to read `torch.save` archives in place.
//!
//! PyTorch writes STORED (uncompressed) records with data descriptors, so the local headers
//! carry no sizes: records are found through the central directory (ZIP64 when present, which
//! torch always writes). Everything works on a byte slice, so an archive embedded at an offset
//! of a larger mapped file (a DCP item inside a `.distcp`) is read without copying.

/// A record of the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipEntry {
    /// The full name, prefix included (`archive/data/0`).
    pub name: String,
    /// Offset of the record's data from the start of the archive.
    pub data_offset: u64,
    /// Size of the record's data.
    pub size: u64,
    /// The CRC-32 the central directory records.
    pub crc32: u32,
}

/// A damaged archive: what was wrong and where, relative to the archive's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipError {
    /// Offset from the start of the archive.
    pub offset: u64,
    /// What was wrong.
    pub msg: String,
}

/// The central directory of an archive.
#[derive(Clone, Debug, Default)]
pub struct ZipIndex {
    entries: Vec<ZipEntry>,
    prefix: String,
}

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

fn err<T>(offset: u64, msg: impl Into<String>) -> Result<T, ZipError> {
    Err(ZipError {
        offset,
        msg: msg.into(),
    })
}

/// Random access to the bytes of an archive.
///
/// A plain slice is the usual case. [`HeadTail`] serves an archive of which only the first and
/// last bytes are at hand (a zstd-compressed DCP item, streamed once to keep both ends): the
/// records torch.save puts first (`data.pkl`, small metadata, the first storages' headers) and
/// the central directory at the end are all a catalog needs.
pub trait ZipBytes {
    /// Total length of the archive.
    fn len(&self) -> u64;
    /// Whether the archive is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes `[at, at + n)`, or `None` when they are not available.
    fn get(&self, at: u64, n: u64) -> Option<&[u8]>;
}

impl ZipBytes for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn get(&self, at: u64, n: u64) -> Option<&[u8]> {
        let end = at.checked_add(n)?;
        <[u8]>::get(self, usize::try_from(at).ok()?..usize::try_from(end).ok()?)
    }
}

/// The first and the last bytes of an archive of known length; see [`ZipBytes`].
#[derive(Clone, Debug, Default)]
pub struct HeadTail {
    /// Bytes `[0, head.len())`.
    pub head: Vec<u8>,
    /// Bytes `[len - tail.len(), len)`.
    pub tail: Vec<u8>,
    /// Length of the whole archive.
    pub len: u64,
}

impl ZipBytes for HeadTail {
    fn len(&self) -> u64 {
        self.len
    }
    fn get(&self, at: u64, n: u64) -> Option<&[u8]> {
        let end = at.checked_add(n)?;
        if end <= self.head.len() as u64 {
            return self.head.get(at as usize..end as usize);
        }
        let tail_start = self.len.checked_sub(self.tail.len() as u64)?;
        if at >= tail_start && end <= self.len {
            return self
                .tail
                .get((at - tail_start) as usize..(end - tail_start) as usize);
        }
        None
    }
}

fn rd<const N: usize, D: ZipBytes + ?Sized>(d: &D, at: u64) -> Result<[u8; N], ZipError> {
    match d
        .get(at, N as u64)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
    {
        Some(b) => Ok(b),
        None if at.saturating_add(N as u64) > d.len() => err(at, "truncated"),
        None => err(
            at,
            "bytes needed here were not kept (record outside the retained window)",
        ),
    }
}

fn rd_u16<D: ZipBytes + ?Sized>(d: &D, at: u64) -> Result<u16, ZipError> {
    rd::<2, D>(d, at).map(u16::from_le_bytes)
}

fn rd_u32<D: ZipBytes + ?Sized>(d: &D, at: u64) -> Result<u32, ZipError> {
    rd::<4, D>(d, at).map(u32::from_le_bytes)
}

fn rd_u64<D: ZipBytes + ?Sized>(d: &D, at: u64) -> Result<u64, ZipError> {
    rd::<8, D>(d, at).map(u64::from_le_bytes)
}

impl ZipIndex {
    /// Reads the central directory of the archive that `data` holds exactly (from its first byte
    /// to the end of its end-of-central-directory record).
    pub fn parse<D: ZipBytes + ?Sized>(data: &D) -> Result<ZipIndex, ZipError> {
        let len = data.len();
        if len < 22 {
            return err(0, format!("{len} bytes is too short for a zip archive"));
        }
        // The end record is 22 bytes plus a comment of up to 65535 bytes.
        let lowest = len.saturating_sub(22 + 65_535);
        let mut eocd = None;
        let mut at = len - 22;
        loop {
            if rd_u32(data, at)? == EOCD_SIG {
                let comment = rd_u16(data, at + 20)? as u64;
                if at + 22 + comment == len {
                    eocd = Some(at);
                    break;
                }
            }
            if at == lowest {
                break;
            }
            at -= 1;
        }
        let Some(eocd) = eocd else {
            return err(
                len.saturating_sub(22),
                "no end-of-central-directory record (the archive is truncated or not a zip)",
            );
        };
        let mut count = rd_u16(data, eocd + 10)? as u64;
        let mut cd_size = rd_u32(data, eocd + 12)? as u64;
        let mut cd_offset = rd_u32(data, eocd + 16)? as u64;
        if eocd >= 20 && rd_u32(data, eocd - 20)? == ZIP64_LOCATOR_SIG {
            let z64 = rd_u64(data, eocd - 20 + 8)?;
            if z64 >= len || rd_u32(data, z64)? != ZIP64_EOCD_SIG {
                return err(eocd - 20, "ZIP64 locator points to no ZIP64 end record");
            }
            count = rd_u64(data, z64 + 32)?;
            cd_size = rd_u64(data, z64 + 40)?;
            cd_offset = rd_u64(data, z64 + 48)?;
        }
        if cd_offset.checked_add(cd_size).is_none_or(|e| e > len) {
            return err(
                eocd,
                format!("central directory at {cd_offset}+{cd_size} lies past the end ({len})"),
            );
        }
        // Each central record is at least 46 bytes, which bounds a lying count.
        if count > cd_size / 46 + 1 {
            return err(
                eocd,
                format!("{count} records cannot fit in {cd_size} bytes"),
            );
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut p = cd_offset;
        for _ in 0..count {
            if rd_u32(data, p)? != CDH_SIG {
                return err(p, "bad central directory record signature");
            }
            let method = rd_u16(data, p + 10)?;
            let crc32 = rd_u32(data, p + 16)?;
            let mut csize = rd_u32(data, p + 20)? as u64;
            let mut usize_ = rd_u32(data, p + 24)? as u64;
            let name_len = rd_u16(data, p + 28)? as u64;
            let extra_len = rd_u16(data, p + 30)? as u64;
            let comment_len = rd_u16(data, p + 32)? as u64;
            let mut local = rd_u32(data, p + 42)? as u64;
            let name_at = p + 46;
            let name_bytes = data
                .get(name_at, name_len)
                .map_or_else(|| err(name_at, "truncated record name"), Ok)?;
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            // ZIP64 extra field: the 64-bit values of the fields saturated at 0xffffffff.
            let mut e = name_at + name_len;
            let extra_end = e + extra_len;
            while e + 4 <= extra_end {
                let id = rd_u16(data, e)?;
                let sz = rd_u16(data, e + 2)? as u64;
                if id == 0x0001 {
                    let mut q = e + 4;
                    if usize_ == 0xffff_ffff {
                        usize_ = rd_u64(data, q)?;
                        q += 8;
                    }
                    if csize == 0xffff_ffff {
                        csize = rd_u64(data, q)?;
                        q += 8;
                    }
                    if local == 0xffff_ffff {
                        local = rd_u64(data, q)?;
                    }
                }
                e += 4 + sz;
            }
            if method != 0 {
                return err(
                    p,
                    format!(
                        "record {name} is compressed (method {method}); torch.save writes only stored records"
                    ),
                );
            }
            if csize != usize_ {
                return err(
                    p,
                    format!("record {name}: stored sizes differ ({csize} vs {usize_})"),
                );
            }
            if rd_u32(data, local)? != LOCAL_SIG {
                return err(local, format!("record {name}: bad local header signature"));
            }
            let lname = rd_u16(data, local + 26)? as u64;
            let lextra = rd_u16(data, local + 28)? as u64;
            let data_offset = local + 30 + lname + lextra;
            if data_offset.checked_add(csize).is_none_or(|end| end > len) {
                return err(
                    local,
                    format!("record {name} lies past the end of the archive"),
                );
            }
            entries.push(ZipEntry {
                name,
                data_offset,
                size: csize,
                crc32,
            });
            p = extra_end + comment_len;
        }
        let prefix = entries
            .first()
            .and_then(|e| e.name.split_once('/'))
            .map(|(p, _)| format!("{p}/"))
            .unwrap_or_default();
        Ok(ZipIndex { entries, prefix })
    }

    /// Every record, in central-directory order.
    pub fn entries(&self) -> &[ZipEntry] {
        &self.entries
    }

    /// The archive's folder prefix (`archive/`, or the file stem for `torch.save(path)`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The record named `name` under the archive's prefix (`data.pkl`, `data/0`, `byteorder`).
    pub fn get(&self, name: &str) -> Option<&ZipEntry> {
        self.entries
            .iter()
            .find(|e| e.name.strip_prefix(&self.prefix) == Some(name))
    }

    /// The bytes of a record, from the archive this index was parsed from (`None` when they
    /// are not available, e.g. outside a [`HeadTail`]'s windows).
    pub fn bytes<'a, D: ZipBytes + ?Sized>(
        &self,
        data: &'a D,
        entry: &ZipEntry,
    ) -> Option<&'a [u8]> {
        data.get(entry.data_offset, entry.size)
    }
}
