//! Facts about the host this process runs on.

/// This host's name (for messages and the output lock's record); "?" where the kernel does not
/// say.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
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
