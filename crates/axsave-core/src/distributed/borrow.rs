//! Files a rank reads by another rank's path: when ranks of one node see the checkpoint through
//! different directories (`--source /scratch/{rank}/ckpt`, one directory per GPU), a rank that
//! can open the file another rank of its node listed, and finds the same file there (same
//! device, inode and size), reads it itself instead of having the bytes sent to it.

use std::path::{Path, PathBuf};

use super::inventory::Inventory;

/// A file's identity as [`borrowable`] compares it: device, inode, size.
pub(super) type Stat = (u64, u64, u64);

/// What `path` is, by the file system's account (`None` where it cannot be stat'ed or is not a
/// regular file).
pub(super) fn stat(path: &Path) -> Option<Stat> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    m.is_file().then(|| (m.dev(), m.ino(), m.len()))
}

/// The files rank `me` does not see in its own view but can read through the path another rank
/// of its node listed: `(name in the checkpoint, path to open)`, sorted by name, each once.
///
/// Rule: for every other rank on the same node (equal, non-empty `node`) that gave its root and
/// file identities, every file of its view missing from `me`'s is taken when `stat` of the
/// other rank's `root/name` gives exactly the device, inode and size that rank saw. Ranks of
/// other nodes are never asked: a path there names another machine's file.
pub(super) fn borrowable(
    me: usize,
    invs: &[Inventory],
    stat: &dyn Fn(&Path) -> Option<Stat>,
) -> Vec<(String, PathBuf)> {
    let Some(mine) = invs.get(me) else {
        return Vec::new();
    };
    if mine.node.is_empty() {
        return Vec::new();
    }
    let mut got: Vec<(String, PathBuf)> = Vec::new();
    for (r, inv) in invs.iter().enumerate() {
        if r == me
            || inv.node != mine.node
            || inv.root.is_empty()
            || inv.ids.len() != inv.files.len()
        {
            continue;
        }
        for (f, &(dev, ino)) in inv.files.iter().zip(&inv.ids) {
            let seen = mine.files.iter().any(|m| m.name == f.name)
                || got.iter().any(|(n, _)| *n == f.name);
            if seen {
                continue;
            }
            let path = Path::new(&inv.root).join(&f.name);
            if stat(&path) == Some((dev, ino, f.size)) {
                got.push((f.name.clone(), path));
            }
        }
    }
    got.sort();
    got
}

/// Adds to `readers` (per catalog file, sorted) the ranks that can read a file by another's path:
/// `borrowed[r]` lists the names rank r took, `names[f]` is catalog file f's path.
pub(super) fn add_readers(readers: &mut [Vec<usize>], names: &[String], borrowed: &[Vec<String>]) {
    for (f, name) in names.iter().enumerate() {
        let Some(list) = readers.get_mut(f) else {
            continue;
        };
        for (r, taken) in borrowed.iter().enumerate() {
            if taken.iter().any(|t| t == name) && !list.contains(&r) {
                list.push(r);
            }
        }
        list.sort_unstable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::inventory::FileId;

    fn inv(node: &str, root: &str, files: &[(&str, u64, u64)]) -> Inventory {
        Inventory {
            files: files
                .iter()
                .map(|&(name, _, size)| FileId {
                    name: name.into(),
                    size,
                    mtime_ns: 1,
                })
                .collect(),
            ids: files.iter().map(|&(_, ino, _)| (7, ino)).collect(),
            detected: None,
            metadata: Vec::new(),
            identity: Default::default(),
            node: node.into(),
            root: root.into(),
        }
    }

    /// A file system where `/r1/b` and `/r2/c` exist with device 7.
    fn fs(p: &Path) -> Option<Stat> {
        match p.to_str()? {
            "/r0/a" => Some((7, 1, 10)),
            "/r1/b" => Some((7, 2, 20)),
            "/r2/c" => Some((7, 3, 30)),
            _ => None,
        }
    }

    #[test]
    fn a_rank_takes_the_files_of_its_node_that_it_can_open_as_the_same_file() {
        let invs = [
            inv("n", "/r0", &[("a", 1, 10)]),
            inv("n", "/r1", &[("b", 2, 20)]),
            inv("n", "/r2", &[("c", 3, 30)]),
        ];
        assert_eq!(
            borrowable(0, &invs, &fs),
            [
                ("b".to_string(), PathBuf::from("/r1/b")),
                ("c".to_string(), PathBuf::from("/r2/c"))
            ]
        );
        // Rank 1 takes rank 0's and rank 2's.
        assert_eq!(borrowable(1, &invs, &fs).len(), 2);
    }

    #[test]
    fn other_nodes_other_files_and_unknown_roots_are_left_alone() {
        let invs = [
            inv("n", "/r0", &[("a", 1, 10)]),
            // Another node: its path would name a file of another machine.
            inv("m", "/r1", &[("b", 2, 20)]),
            // Same node, but what is at the path now is another file (inode, then size).
            inv("n", "/r2", &[("c", 4, 30)]),
        ];
        assert!(borrowable(0, &invs, &fs).is_empty());
        let invs = [
            inv("n", "/r0", &[("a", 1, 10)]),
            inv("n", "/r2", &[("c", 3, 31)]),
            // No root told (an older peer): nothing to open.
            inv("n", "", &[("b", 2, 20)]),
        ];
        assert!(borrowable(0, &invs, &fs).is_empty());
        // A rank with no node id borrows nothing; nor does a rank out of range.
        let invs = [inv("", "/r0", &[]), inv("", "/r1", &[("b", 2, 20)])];
        assert!(borrowable(0, &invs, &fs).is_empty());
        assert!(borrowable(5, &invs, &fs).is_empty());
    }

    #[test]
    fn files_a_rank_sees_itself_are_not_taken_again() {
        let invs = [
            inv("n", "/r0", &[("a", 1, 10), ("b", 2, 20)]),
            inv("n", "/r1", &[("b", 2, 20)]),
        ];
        assert!(borrowable(0, &invs, &fs).is_empty());
    }

    #[test]
    fn borrowers_join_the_readers_of_a_file() {
        let mut readers = vec![vec![0], vec![1], vec![2]];
        let names = ["a", "b", "c"].map(String::from);
        let borrowed = vec![vec!["b".to_string()], vec![], vec!["a".into(), "b".into()]];
        add_readers(&mut readers, &names, &borrowed);
        assert_eq!(readers, [vec![0, 2], vec![0, 1, 2], vec![2]]);
    }
}
