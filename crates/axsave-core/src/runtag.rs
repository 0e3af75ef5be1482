//! The tag that names one save's temporary files (`.model.safetensors.axsave-TAG.tmp`).
//!
//! A tag says who made the files, so that a later save into the same directory can tell the
//! leftovers of a run that was killed (SIGKILL, a node crash) from the files of a run still
//! going: `HOST-BOOT-PID-START-RANDOM` in hex, where `HOST` is a hash of the host name and the
//! pid namespace, `BOOT` a hash of the kernel's boot id, `PID` the process that owns the run
//! (rank 0 for a multi-rank save, whose death ends the run: only it commits), `START` that
//! process's start time (clock ticks since boot, so a reused pid is not mistaken for it) and
//! `RANDOM` 48 random bits (two runs started in the same tick by processes with the same pid in
//! different containers still get different names).

use std::fmt;

/// Who made a run's temporaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunTag {
    /// Hash of the host name and pid namespace.
    pub host: u32,
    /// Hash of the boot id.
    pub boot: u32,
    /// The owning process.
    pub pid: u32,
    /// Its start time in clock ticks since boot (0 where unknown).
    pub start: u64,
    /// Random bits.
    pub random: u64,
}

/// Whether the run that owns a tag can still be running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Its process is gone (same host, and the pid is free or now another process), or the
    /// host was rebooted since: the run can never finish.
    Dead,
    /// Its process is running on this host.
    Alive,
    /// It ran on another host (or in another pid namespace), or the tag is not one of ours:
    /// nothing can be proven.
    Unknown,
}

impl RunTag {
    /// A fresh tag owned by this process.
    pub fn new() -> RunTag {
        let me = Host::current();
        let mut random = [0u8; 8];
        // No random source (never seen on Linux): the clock's nanoseconds still make the name
        // unlikely to collide, and creation is exclusive anyway.
        if getrandom::fill(&mut random).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            random = nanos.to_le_bytes();
        }
        RunTag {
            host: me.host,
            boot: me.boot,
            pid: std::process::id(),
            start: start_time(std::process::id()).unwrap_or(0),
            random: u64::from_le_bytes(random) & 0xffff_ffff_ffff,
        }
    }

    /// Reads a tag written by [`fmt::Display`]; `None` for anything else (an older axsave's
    /// tags among them).
    pub fn parse(s: &str) -> Option<RunTag> {
        let mut it = s.split('-');
        let mut field = |max: usize| {
            it.next()
                .filter(|f| !f.is_empty() && f.len() <= max)
                .and_then(|f| u64::from_str_radix(f, 16).ok())
        };
        let tag = RunTag {
            host: u32::try_from(field(8)?).ok()?,
            boot: u32::try_from(field(8)?).ok()?,
            pid: u32::try_from(field(8)?).ok()?,
            start: field(16)?,
            random: field(12)?,
        };
        it.next().is_none().then_some(tag)
    }

    /// Whether the run that owns this tag can still be running, as far as this host can tell.
    pub fn liveness(&self) -> Liveness {
        let me = Host::current();
        if self.host != me.host {
            return Liveness::Unknown;
        }
        if self.boot != me.boot {
            return Liveness::Dead;
        }
        match start_time(self.pid) {
            None => Liveness::Dead,
            Some(t) if self.start != 0 && t != self.start => Liveness::Dead,
            Some(_) => Liveness::Alive,
        }
    }
}

impl Default for RunTag {
    fn default() -> Self {
        RunTag::new()
    }
}

impl fmt::Display for RunTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:08x}-{:08x}-{:x}-{:x}-{:012x}",
            self.host, self.boot, self.pid, self.start, self.random
        )
    }
}

/// This host as tags record it.
struct Host {
    host: u32,
    boot: u32,
}

impl Host {
    fn current() -> Host {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut h = crc32fast::Hasher::new();
        h.update(read("/proc/sys/kernel/hostname").trim().as_bytes());
        h.update(b"\0");
        h.update(pidns.as_bytes());
        Host {
            host: h.finalize(),
            boot: crc32fast::hash(read("/proc/sys/kernel/random/boot_id").trim().as_bytes()),
        }
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), `None` when there is no
/// such process.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_liveness() {
        let t = RunTag::new();
        let s = t.to_string();
        assert_eq!(RunTag::parse(&s), Some(t));
        assert_eq!(t.liveness(), Liveness::Alive);
        assert_ne!(RunTag::new().random, t.random);
        // A pid that is free (pid_max is below 2^22 on Linux).
        let dead = RunTag {
            pid: 0x7fff_fff0,
            ..t
        };
        assert_eq!(dead.liveness(), Liveness::Dead);
        // This pid, but a process started at another time: the pid was reused.
        let reused = RunTag {
            start: t.start + 1,
            ..t
        };
        assert_eq!(reused.liveness(), Liveness::Dead);
        let rebooted = RunTag {
            boot: t.boot ^ 1,
            ..t
        };
        assert_eq!(rebooted.liveness(), Liveness::Dead);
        let elsewhere = RunTag {
            host: t.host ^ 1,
            pid: 0x7fff_fff0,
            ..t
        };
        assert_eq!(elsewhere.liveness(), Liveness::Unknown);
    }

    #[test]
    fn other_strings_are_not_tags() {
        for s in [
            "",
            "1a2b",
            "3f2a1234",
            "a-b-c-d",
            "1-2-3-4-5-6",
            "x-2-3-4-5",
            "1-2-3-4-",
        ] {
            assert_eq!(RunTag::parse(s), None, "{s}");
        }
    }
}
