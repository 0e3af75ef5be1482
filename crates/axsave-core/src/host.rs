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

/// Which machine this is, as the ranks compare it to tell whether bytes cross nodes: the host
/// name and the kernel's boot id. Ranks in one operating system but separate network and UTS
/// namespaces (containers, the multi-node tests) have different names, so they count as
/// different nodes, as their network makes them.
pub fn node_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}/{}", hostname(), boot.trim())
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

    #[test]
    fn the_node_id_is_stable_and_names_the_host() {
        let n = super::node_id();
        assert_eq!(n, super::node_id());
        assert!(n.starts_with(&format!("{}/", super::hostname())), "{n}");
        assert!(!n.contains('\n'));
    }
}
