//! PMIx, opened at run time: how ranks started by Open MPI's `mpirun` (or any PMIx launcher)
//! find rank 0's store on another node without `MASTER_ADDR` and without linking MPI.
//!
//! [`share_from_rank0`] is the whole exchange: rank 0 puts a value, every rank commits and
//! fences, every other rank gets rank 0's value. Layers, as for NCCL: [`sys`] (the C API,
//! opened with libloading), [`result`] (status codes as errors), [`safe`] (a client that
//! finalises on drop).

pub mod result;
pub mod safe;
pub mod sys;

pub use result::PmixError;
pub use safe::Client;

/// The PMIx key under which rank 0 posts where its store listens.
pub const STORE_KEY: &str = "axsave.store";

/// Whether the environment says this process was started by a PMIx server (`PMIX_RANK` and a
/// server to talk to).
pub fn launched_by_pmix(env: &dyn Fn(&str) -> Option<String>) -> bool {
    env("PMIX_RANK").is_some()
        && (env("PMIX_NAMESPACE").is_some()
            || env("PMIX_SERVER_URI41").is_some()
            || env("PMIX_SERVER_URI4").is_some()
            || env("PMIX_SERVER_URI3").is_some()
            || env("PMIX_SERVER_URI21").is_some()
            || env("PMIX_SERVER_URI2").is_some())
}

/// Every rank of the job calls this once: rank 0 with `Some(value)`, which it posts, the others
/// with `None`; all get rank 0's value back. `expect_rank` is the rank the environment gave,
/// checked against PMIx's. Blocks until every rank of the job has called it, at most `timeout`
/// where the PMIx server honours `PMIX_TIMEOUT` (a rank that dies instead makes the launcher
/// end the job).
pub fn share_from_rank0(
    expect_rank: usize,
    value: Option<&str>,
    timeout: std::time::Duration,
) -> Result<String, PmixError> {
    let mut c = Client::init()?;
    if c.rank() as usize != expect_rank {
        return Err(PmixError::BadValue {
            key: "rank".into(),
            reason: format!(
                "PMIx says rank {}, the environment says rank {expect_rank}",
                c.rank()
            ),
        });
    }
    tracing::debug!(
        library = c.library(),
        namespace = c.namespace(),
        rank = c.rank(),
        "PMIx client up"
    );
    if let Some(v) = value {
        c.put_string(STORE_KEY, v)?;
    }
    c.commit()?;
    c.fence(timeout)?;
    match value {
        Some(v) => Ok(v.to_owned()),
        None => c.get_string(0, STORE_KEY, timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmix_is_recognised_from_its_variables() {
        let with = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(launched_by_pmix(&with(&[
            ("PMIX_RANK", "0"),
            ("PMIX_NAMESPACE", "prterun-x-1@1")
        ])));
        assert!(launched_by_pmix(&with(&[
            ("PMIX_RANK", "3"),
            ("PMIX_SERVER_URI41", "x")
        ])));
        assert!(!launched_by_pmix(&with(&[("PMIX_NAMESPACE", "x")])));
        assert!(!launched_by_pmix(&with(&[])));
    }
}
