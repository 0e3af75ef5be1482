//! Slurm hostlist expansion (`node[01-04,07],gpu-a1` → `node01 … node04, node07, gpu-a1`).
//!
//! Follows Slurm's `src/common/hostlist.c` for the forms Slurm itself writes into
//! `SLURM_JOB_NODELIST` / `SLURM_STEP_NODELIST`:
//!
//! * hosts are separated by comma, space, tab or newline, but a comma inside `[...]` does not
//!   split;
//! * `prefix[ranges]suffix`: `ranges` is a comma list of `N` or `lo-hi`; numbers are zero padded
//!   to the number of digits written for `lo` (`[01-10]` → `01 … 10`, `[1-10]` → `1 … 10`);
//! * several bracket groups in one host expand as a cartesian product, leftmost group outermost
//!   (`a[1-2]b[3-4]` → `a1b3, a1b4, a2b3, a2b4`);
//! * order is preserved, nothing is sorted or de-duplicated;
//! * the expansion is capped at [`MAX_HOSTS`] names so a hostile or mistyped list cannot
//!   exhaust memory.
//!
//! Malformed input (unbalanced or nested brackets, `lo > hi`, non-digits, negative numbers,
//! Slurm's `x` box syntax) is an error, never a panic.

use thiserror::Error;

/// Most host names [`expand`] produces before giving up (Slurm guards its own expansion the
/// same way; no real allocation comes close).
pub const MAX_HOSTS: usize = 1 << 20;

/// Longest number accepted inside brackets: 18 digits always fit in a `u64`.
const MAX_DIGITS: usize = 18;

/// Why a hostlist could not be expanded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostlistError {
    /// A `[` without its `]` or a `]` without its `[`.
    #[error("unbalanced brackets in hostlist {list:?}")]
    Unbalanced {
        /// The whole list as given.
        list: String,
    },
    /// A `[` inside another `[...]`; Slurm does not nest ranges.
    #[error("nested brackets in hostlist {list:?}")]
    Nested {
        /// The whole list as given.
        list: String,
    },
    /// A range item that is not `N` or `lo-hi` with decimal digits (empty, letters, spaces,
    /// the `x` box syntax, more than 18 digits).
    #[error("invalid range {item:?} in hostlist {list:?}: {reason}")]
    InvalidRange {
        /// The offending item between the commas of a bracket group.
        item: String,
        /// The whole list as given.
        list: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A negative number inside brackets (`node[-1]`).
    #[error("negative number in range {item:?} of hostlist {list:?}")]
    Negative {
        /// The offending item.
        item: String,
        /// The whole list as given.
        list: String,
    },
    /// A range whose start is above its end (`node[5-3]`).
    #[error("range {item:?} in hostlist {list:?} runs backwards ({lo} > {hi})")]
    Reversed {
        /// The offending item.
        item: String,
        /// The whole list as given.
        list: String,
        /// Its start.
        lo: u64,
        /// Its end.
        hi: u64,
    },
    /// The expansion would produce more than [`MAX_HOSTS`] names.
    #[error("hostlist {list:?} expands to more than {limit} host names")]
    TooMany {
        /// The whole list as given.
        list: String,
        /// The cap that was hit.
        limit: usize,
    },
}

/// One numeric range of a bracket group: `lo..=hi`, printed zero padded to `width` digits.
#[derive(Debug, Clone, Copy)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

impl Range {
    fn len(self) -> u64 {
        self.hi - self.lo + 1
    }
}

/// A piece of one host token: literal text or a bracket group.
#[derive(Debug)]
enum Part<'a> {
    Literal(&'a str),
    Group(Vec<Range>),
}

/// Expands a Slurm hostlist into host names, in order.
///
/// An empty (or all-separator) list gives an empty vector.
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    let mut hosts = Vec::new();
    for token in tokens(list)? {
        let parts = parse_token(token, list)?;
        expand_token(&parts, list, &mut hosts)?;
    }
    Ok(hosts)
}

/// The first host of a Slurm hostlist without expanding the rest (so a huge but valid list
/// still answers), or `None` for an empty list. The whole list is still checked for syntax.
pub fn first_host(list: &str) -> Result<Option<String>, HostlistError> {
    let tokens = tokens(list)?;
    let mut first = None;
    for (i, token) in tokens.into_iter().enumerate() {
        let parts = parse_token(token, list)?;
        if i == 0 {
            let mut name = String::new();
            for part in &parts {
                match part {
                    Part::Literal(text) => name.push_str(text),
                    // parse_token never yields an empty group.
                    Part::Group(ranges) => {
                        if let Some(r) = ranges.first() {
                            push_number(&mut name, r.lo, r.width);
                        }
                    }
                }
            }
            first = Some(name);
        }
    }
    Ok(first)
}

fn is_separator(c: char) -> bool {
    matches!(c, ',' | ' ' | '\t' | '\n' | '\r')
}

/// Splits the list at separators outside brackets; empty tokens are dropped.
fn tokens(list: &str) -> Result<Vec<&str>, HostlistError> {
    let mut out = Vec::new();
    let mut depth = false;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth => {
                return Err(HostlistError::Nested {
                    list: list.to_owned(),
                });
            }
            '[' => depth = true,
            ']' if !depth => {
                return Err(HostlistError::Unbalanced {
                    list: list.to_owned(),
                });
            }
            ']' => depth = false,
            c if !depth && is_separator(c) => {
                if i > start {
                    out.push(&list[start..i]);
                }
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if depth {
        return Err(HostlistError::Unbalanced {
            list: list.to_owned(),
        });
    }
    if start < list.len() {
        out.push(&list[start..]);
    }
    Ok(out)
}

/// Splits one token (brackets known to be balanced and flat) into literals and groups.
fn parse_token<'a>(token: &'a str, list: &str) -> Result<Vec<Part<'a>>, HostlistError> {
    let mut parts = Vec::new();
    let mut rest = token;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            parts.push(Part::Literal(&rest[..open]));
        }
        let after = &rest[open + 1..];
        // tokens() guarantees a matching ']' follows.
        let close = after.find(']').ok_or_else(|| HostlistError::Unbalanced {
            list: list.to_owned(),
        })?;
        parts.push(Part::Group(parse_group(&after[..close], list)?));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest));
    }
    Ok(parts)
}

/// Parses the inside of one bracket group: `01-04,07`.
fn parse_group(inside: &str, list: &str) -> Result<Vec<Range>, HostlistError> {
    inside
        .split(',')
        .map(|item| parse_range(item, list))
        .collect()
}

fn parse_range(item: &str, list: &str) -> Result<Range, HostlistError> {
    let invalid = |reason| HostlistError::InvalidRange {
        item: item.to_owned(),
        list: list.to_owned(),
        reason,
    };
    if item.is_empty() {
        return Err(invalid("empty range"));
    }
    if item.starts_with('-') {
        return Err(HostlistError::Negative {
            item: item.to_owned(),
            list: list.to_owned(),
        });
    }
    let (lo_text, hi_text) = match item.split_once('-') {
        Some((lo, hi)) => (lo, hi),
        None => (item, item),
    };
    let number = |text: &str| -> Result<u64, HostlistError> {
        if text.is_empty() {
            return Err(invalid("missing number"));
        }
        if text.starts_with('-') {
            return Err(HostlistError::Negative {
                item: item.to_owned(),
                list: list.to_owned(),
            });
        }
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("not a decimal number"));
        }
        if text.len() > MAX_DIGITS {
            return Err(invalid("number too long"));
        }
        text.parse().map_err(|_| invalid("not a decimal number"))
    };
    let lo = number(lo_text)?;
    let hi = number(hi_text)?;
    if lo > hi {
        return Err(HostlistError::Reversed {
            item: item.to_owned(),
            list: list.to_owned(),
            lo,
            hi,
        });
    }
    Ok(Range {
        lo,
        hi,
        width: lo_text.len(),
    })
}

fn push_number(name: &mut String, n: u64, width: usize) {
    use std::fmt::Write;
    // Writing into a String cannot fail.
    let _ = write!(name, "{n:0width$}");
}

/// Appends the cartesian product of one token's parts to `hosts`.
fn expand_token(
    parts: &[Part<'_>],
    list: &str,
    hosts: &mut Vec<String>,
) -> Result<(), HostlistError> {
    let too_many = || HostlistError::TooMany {
        list: list.to_owned(),
        limit: MAX_HOSTS,
    };
    // Count first so the cap is checked before anything is allocated.
    let mut count: u64 = 1;
    for part in parts {
        if let Part::Group(ranges) = part {
            let group: u64 = ranges
                .iter()
                .try_fold(0u64, |acc, r| acc.checked_add(r.len()))
                .ok_or_else(too_many)?;
            count = count.checked_mul(group).ok_or_else(too_many)?;
        }
    }
    let room = (MAX_HOSTS - hosts.len()) as u64;
    if count > room {
        return Err(too_many());
    }
    // Leftmost group outermost: each group multiplies the names built so far, and the names
    // already built vary slowest.
    let mut names = vec![String::new()];
    for part in parts {
        match part {
            Part::Literal(text) => names.iter_mut().for_each(|n| n.push_str(text)),
            Part::Group(ranges) => {
                let mut next = Vec::new();
                for name in &names {
                    for r in ranges {
                        for n in r.lo..=r.hi {
                            let mut host = name.clone();
                            push_number(&mut host, n, r.width);
                            next.push(host);
                        }
                    }
                }
                names = next;
            }
        }
    }
    hosts.extend(names);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(list: &str) -> Vec<String> {
        expand(list).unwrap_or_else(|e| panic!("{list:?}: {e}"))
    }

    #[test]
    fn plain_names_and_separators() {
        assert_eq!(ok("a,b c\td\ne"), ["a", "b", "c", "d", "e"]);
        assert_eq!(ok(" a,,b, "), ["a", "b"]);
        assert!(ok("").is_empty());
        assert!(ok(" , ").is_empty());
    }

    #[test]
    fn issue_example() {
        assert_eq!(
            ok("node[01-04,07],gpu-a1"),
            ["node01", "node02", "node03", "node04", "node07", "gpu-a1"]
        );
    }

    #[test]
    fn padding_follows_width_of_lo() {
        assert_eq!(ok("n[8-11]"), ["n8", "n9", "n10", "n11"]);
        assert_eq!(ok("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(ok("n[001-2]"), ["n001", "n002"]);
        assert_eq!(ok("n[007]"), ["n007"]);
    }

    #[test]
    fn suffix_after_bracket() {
        assert_eq!(ok("rack[1-2]-ib"), ["rack1-ib", "rack2-ib"]);
        assert_eq!(ok("[1-2]x"), ["1x", "2x"]);
    }

    #[test]
    fn cartesian_product_leftmost_outermost() {
        assert_eq!(ok("a[1-2]b[3-4]"), ["a1b3", "a1b4", "a2b3", "a2b4"]);
        assert_eq!(ok("r[1,3]n[0-1]x"), ["r1n0x", "r1n1x", "r3n0x", "r3n1x"]);
    }

    #[test]
    fn order_is_preserved() {
        assert_eq!(ok("z1,n[3,1,2],a"), ["z1", "n3", "n1", "n2", "a"]);
    }

    #[test]
    fn first_host_does_not_expand() {
        assert_eq!(
            first_host("node[01-04,07],gpu-a1").unwrap().as_deref(),
            Some("node01")
        );
        assert_eq!(
            first_host("a[3-4]b[07-9]c").unwrap().as_deref(),
            Some("a3b07c")
        );
        assert_eq!(first_host(" ,").unwrap(), None);
        // Far beyond MAX_HOSTS, but only the first name is needed.
        assert_eq!(first_host("n[0-999999999]").unwrap().as_deref(), Some("n0"));
        // The rest of the list is still checked.
        assert!(first_host("a,b[").is_err());
    }

    #[test]
    fn unbalanced_and_nested_brackets() {
        assert!(matches!(
            expand("node[1-2"),
            Err(HostlistError::Unbalanced { .. })
        ));
        assert!(matches!(
            expand("node1-2]"),
            Err(HostlistError::Unbalanced { .. })
        ));
        assert!(matches!(
            expand("n[1[2]]"),
            Err(HostlistError::Nested { .. })
        ));
    }

    #[test]
    fn bad_ranges() {
        assert!(matches!(
            expand("n[5-3]"),
            Err(HostlistError::Reversed { lo: 5, hi: 3, .. })
        ));
        assert!(matches!(
            expand("n[a-3]"),
            Err(HostlistError::InvalidRange { .. })
        ));
        assert!(matches!(
            expand("n[]"),
            Err(HostlistError::InvalidRange { .. })
        ));
        assert!(matches!(
            expand("n[1,,2]"),
            Err(HostlistError::InvalidRange { .. })
        ));
        assert!(matches!(
            expand("n[1-]"),
            Err(HostlistError::InvalidRange { .. })
        ));
        assert!(matches!(
            expand("n[1 2]"),
            Err(HostlistError::InvalidRange { .. })
        ));
        assert!(matches!(
            expand("n[1x2]"),
            Err(HostlistError::InvalidRange { .. })
        ));
        assert!(matches!(
            expand("n[1234567890123456789]"),
            Err(HostlistError::InvalidRange { .. })
        ));
        assert!(matches!(
            expand("n[-1]"),
            Err(HostlistError::Negative { .. })
        ));
        assert!(matches!(
            expand("n[1--3]"),
            Err(HostlistError::Negative { .. })
        ));
    }

    #[test]
    fn expansion_is_capped() {
        assert!(matches!(
            expand("n[0-99999999]"),
            Err(HostlistError::TooMany { .. })
        ));
        // Product of groups is capped too, and overflow is caught.
        assert!(matches!(
            expand("a[0-9999]b[0-9999]"),
            Err(HostlistError::TooMany { .. })
        ));
        assert!(matches!(
            expand("a[0-999999999999999999]b[0-999999999999999999]"),
            Err(HostlistError::TooMany { .. })
        ));
        // The cap counts across tokens.
        let half = format!("a[1-{}]", MAX_HOSTS / 2 + 1);
        assert!(matches!(
            expand(&format!("{half},{half}")),
            Err(HostlistError::TooMany { .. })
        ));
        assert_eq!(
            expand(&format!("n[1-{MAX_HOSTS}]")).unwrap().len(),
            MAX_HOSTS
        );
    }

    #[test]
    fn errors_name_the_input() {
        let e = expand("gpu[3-1]").unwrap_err().to_string();
        assert!(e.contains("gpu[3-1]") && e.contains("3 > 1"), "{e}");
    }
}
