//! Facts about the host this process runs on.

/// This host's name (for messages and the output lock's record); "?" where the kernel does not
/// say.
pub fn hostname() -> String {
    known_hostname().unwrap_or_else(|| "?".into())
}

/// This host's name as the kernel gives it, trimmed; `None` when it cannot be read or is empty.
pub fn known_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_hostname_is_one_trimmed_line() {
        let h = super::hostname();
        assert!(!h.is_empty());
        assert_eq!(h, h.trim());
        assert!(!h.contains('\n'));
    }
}
