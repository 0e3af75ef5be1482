//! The job token: a random secret every data connection of a run presents (see
//! [`super::DistOptions::job_token`] and `axsave_dist::data_plane::TcpOptions::token`), and how
//! it is carried (hex in `AXSAVE_JOB_TOKEN`) and compared at the join (a digest).

/// A fresh random job token.
pub fn random_token() -> [u8; axsave_dist::data_plane::TOKEN_LEN] {
    let mut t = [0u8; axsave_dist::data_plane::TOKEN_LEN];
    if getrandom::fill(&mut t).is_err() {
        // No random source (never seen on Linux): the run tag's randomness is the best left.
        let tag = crate::runtag::RunTag::new().to_string();
        t.copy_from_slice(&sha256(tag.as_bytes())[..axsave_dist::data_plane::TOKEN_LEN]);
    }
    t
}

/// A token as hex (how `AXSAVE_JOB_TOKEN` carries it).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token from the hex of [`hex`]: exactly [`TOKEN_LEN`](axsave_dist::data_plane::TOKEN_LEN)
/// bytes.
pub fn unhex(s: &str) -> Option<[u8; axsave_dist::data_plane::TOKEN_LEN]> {
    let s = s.trim();
    if s.len() != 2 * axsave_dist::data_plane::TOKEN_LEN || !s.is_ascii() {
        return None;
    }
    let mut t = [0u8; axsave_dist::data_plane::TOKEN_LEN];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(t)
}

fn sha256(b: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(b).to_vec()
}

/// What ranks compare at the join: a digest of the token, which says nothing about it.
pub(crate) fn token_digest(t: &[u8]) -> String {
    hex(&sha256(t)[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_hex_and_differ() {
        let t = random_token();
        assert_eq!(unhex(&hex(&t)), Some(t));
        assert_ne!(random_token(), t);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex(&"zz".repeat(32)), None);
        assert_eq!(token_digest(&t).len(), 16);
        assert!(!hex(&t).contains(&token_digest(&t)));
    }
}
