//! Phase 1, the join: every rank connects to the rendezvous store (rank 0 hosts it), claims
//! its rank number, says hello (world size, a fingerprint of its arguments, a digest of its job
//! token); rank 0 checks every hello and announces the run's tag (and the job token when it
//! minted one); every rank then registers the run and starts its watchdog.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axsave_dist::data_plane::TOKEN_LEN;
use axsave_dist::store::rendezvous::{broadcast_bytes, check_failure};
use axsave_dist::{ClientOptions, ServerOptions, StoreClient, StoreServer, World};

use super::token::{hex, random_token, token_digest, unhex};
use super::watchdog::Watchdog;
use super::{Rank, json, rank_list, unjson};
use crate::error::{CoreError, Result, ResultExt};
use crate::host::hostname;
use axsave_dist::address;

/// What every rank says when it joins.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Hello {
    pub(super) world_size: usize,
    pub(super) fingerprint: String,
    pub(super) host: String,
    #[serde(default)]
    pub(super) pid: u32,
    /// A digest of the job token this rank was given (never the token itself).
    #[serde(default)]
    pub(super) token_digest: Option<String>,
}

/// Rank 0's word that the run starts: its tag, and the job token when rank 0 minted it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Start {
    pub(super) tag: String,
    pub(super) token: Option<String>,
}

/// What the join settles: the run's tag, the job token, and the running watchdog.
pub(super) struct Joined {
    /// The run's tag (temporary names, the output lock's record).
    pub(super) tag: String,
    /// The token every data connection presents.
    pub(super) token: [u8; TOKEN_LEN],
    /// Beats this rank's heartbeat and watches the others' until the commit.
    pub(super) watchdog: Watchdog,
}

/// Starts the store on rank 0 (when this process hosts it), listening where MASTER_ADDR points
/// (see [`address::store_bind`]), and connects to it: within `rendezvous` for the connection,
/// `timeout` for each request, its keys under `namespace`. Saves and merges both join this way.
pub(crate) fn connect_store(
    world: &World,
    namespace: &str,
    rendezvous: Duration,
    timeout: Duration,
) -> Result<(Option<StoreServer>, StoreClient)> {
    let server = if world.hosts_store() {
        // Where the peers will connect: the addresses MASTER_ADDR names here (see `address`).
        let bind: Vec<SocketAddr> = match &world.master_addr {
            Some(master) => {
                address::store_bind(master, &address::resolve(master), address::is_local)
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, world.master_port))
                    .collect()
            }
            None => Vec::new(),
        };
        let s = StoreServer::start(ServerOptions {
            bind,
            port: world.master_port,
            ..ServerOptions::default()
        })
        .map_err(|source| CoreError::StoreServer {
            port: world.master_port,
            source,
        })?;
        tracing::debug!(addrs = ?s.local_addrs(), "the rendezvous store listens");
        Some(s)
    } else {
        None
    };
    let host = world.master_addr.clone().ok_or_else(|| {
        CoreError::Remote(format!(
            "{} started ranks on several nodes and gives no MASTER_ADDR: set MASTER_ADDR to the host of rank 0 (under mpirun, axsave asks PMIx instead when libpmix.so.2 is installed, or MPI when built with --features mpi)",
            world.launcher
        ))
    })?;
    let client_opts = ClientOptions {
        connect_timeout: rendezvous,
        io_timeout: timeout,
        ..ClientOptions::default()
    };
    let client = StoreClient::connect(&host, world.master_port, client_opts)
        .context(|| {
            format!(
                "cannot reach the rendezvous store at {host}:{}",
                world.master_port
            )
        })?
        .with_namespace(namespace);
    Ok((server, client))
}

/// Rank 0's check of one rank's hello against its own world size, arguments and job token.
pub(super) fn check_hello(
    r: usize,
    h: &Hello,
    world_size: usize,
    fingerprint: &str,
    token_digest: Option<&str>,
) -> Result<()> {
    let n = world_size;
    if h.world_size != n {
        return Err(CoreError::Remote(format!(
            "rank {r} (on {}) was started with a world size of {}, rank 0 with {n}: start every rank with the same WORLD_SIZE",
            h.host, h.world_size
        )));
    }
    if h.token_digest.as_deref() != token_digest {
        let (theirs, ours) = match (&h.token_digest, token_digest) {
            (Some(_), Some(_)) => ("another job token", "its own"),
            (Some(_), None) => ("a job token", "none"),
            _ => ("no job token", "one"),
        };
        return Err(CoreError::Remote(format!(
            "rank {r} (on {}) was given {theirs} (AXSAVE_JOB_TOKEN) and rank 0 {ours}: start every rank from the same launcher",
            h.host
        )));
    }
    if h.fingerprint != fingerprint {
        return Err(CoreError::Remote(format!(
            "rank {r} (on {}) was started with different arguments than rank 0 ({} vs {fingerprint}): every rank must get the same command line",
            h.host, h.fingerprint
        )));
    }
    Ok(())
}

/// The job token a rank other than 0 uses: its launcher's, else the one rank 0 minted.
pub(super) fn token_from_start(
    start: &Start,
    own: Option<[u8; TOKEN_LEN]>,
) -> Result<[u8; TOKEN_LEN]> {
    match (&start.token, own) {
        (_, Some(t)) => Ok(t),
        (Some(h), None) => {
            unhex(h).ok_or_else(|| CoreError::Remote("malformed job token from rank 0".into()))
        }
        (None, None) => Err(no_token()),
    }
}

fn no_token() -> CoreError {
    CoreError::Remote(
        "rank 0 was given a job token (AXSAVE_JOB_TOKEN) and this rank none: start every rank from the same launcher".into(),
    )
}

impl Rank<'_> {
    /// Phase 1: claim, hello, rank 0's checks and start, the run's registration, the watchdog.
    pub(super) fn join(&mut self) -> Result<Joined> {
        let (me, n) = (self.world.rank, self.world.world_size);
        let opts = self.opts;
        let hello = Hello {
            world_size: n,
            fingerprint: opts.fingerprint.clone(),
            host: hostname(),
            pid: std::process::id(),
            token_digest: opts.job_token.map(|t| token_digest(&t)),
        };
        self.claim_rank(&hello)?;
        // The address this rank's store connection comes from: where its peers can reach it
        // (set before the hello, so every rank that sees the start sees it).
        let seen = self
            .client
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        self.client
            .set(&format!("ip/{me}"), seen.to_string().as_bytes())?;
        self.client.set(&format!("hello/{me}"), &json(&hello)?)?;
        let (tag, token) = if me == 0 {
            self.check_hellos()?;
            let tag = crate::runtag::RunTag::new().to_string();
            // Through the store only when the launcher gave no token (see `job_token`).
            let minted = match opts.job_token {
                Some(_) => None,
                None => Some(random_token()),
            };
            let start = Start {
                tag: tag.clone(),
                token: minted.map(|t| hex(&t)),
            };
            broadcast_bytes(self.client, "start", &json(&start)?)?;
            (tag, opts.job_token.or(minted).ok_or_else(no_token)?)
        } else {
            let d = self.deadline();
            let start: Start = unjson(&self.receive("start", d)?, "start")?;
            let token = token_from_start(&start, opts.job_token)?;
            (start.tag, token)
        };
        tracing::debug!(rank = me, tag, "joined");
        self.guard = Some(crate::interrupt::register_run(&self.opts.output, &tag)?);
        self.run_files = Some((self.opts.output.clone(), tag.clone()));
        crate::fault::point("joined", me);
        let watch: Vec<usize> = if me == 0 { (1..n).collect() } else { vec![0] };
        let watchdog = Watchdog::start(
            self.client.reconnect()?,
            me,
            watch,
            opts.timeout,
            self.shared.clone(),
        );
        Ok(Joined {
            tag,
            token,
            watchdog,
        })
    }

    /// Every rank claims its number once in the store: a second process started with the same
    /// RANK fails here, naming both (rather than corrupting the transfers later), and its
    /// failure stops the others.
    fn claim_rank(&mut self, hello: &Hello) -> Result<()> {
        let me = self.world.rank;
        let claims = self.client.add(&format!("claim/{me}"), 1)?;
        if claims <= 1 {
            return Ok(());
        }
        let other = self
            .client
            .check(&[&format!("hello/{me}")])
            .ok()
            .filter(|&there| there)
            .and_then(|_| {
                self.client
                    .get(&format!("hello/{me}"), self.deadline())
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<Hello>(&b).ok())
            .map(|h| format!("process {} on {}", h.pid, h.host))
            .unwrap_or_else(|| "another process".into());
        Err(CoreError::Remote(format!(
            "two processes claim rank {me}: {other} and process {} on {}; every process needs its own RANK",
            hello.pid, hello.host
        )))
    }

    /// Rank 0: every hello must name the same world size, arguments and job token.
    fn check_hellos(&mut self) -> Result<()> {
        let n = self.world.world_size;
        let deadline = self.deadline();
        let mine = self.opts.job_token.map(|t| token_digest(&t));
        let mut seen = vec![false; n];
        let mut missing_from = 0;
        loop {
            self.check_cancel()?;
            if let Some(f) = check_failure(self.client)?.filter(|f| f.rank != 0) {
                return Err(CoreError::PeerFailed {
                    rank: f.rank,
                    message: f.message,
                });
            }
            for (r, seen_r) in seen.iter_mut().enumerate().skip(missing_from) {
                if *seen_r {
                    continue;
                }
                // A huge world size must not keep rank 0 past the deadline in one pass.
                if Instant::now() >= deadline {
                    break;
                }
                let key = format!("hello/{r}");
                if !self.client.check(&[&key])? {
                    continue;
                }
                let b = self.client.get(&key, deadline)?;
                let h: Hello = unjson(&b, "hello")?;
                check_hello(r, &h, n, &self.opts.fingerprint, mine.as_deref())?;
                *seen_r = true;
            }
            while missing_from < n && seen[missing_from] {
                missing_from += 1;
            }
            if missing_from == n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (missing_from..n).filter(|&r| !seen[r]).collect();
                return Err(CoreError::Remote(format!(
                    "{} of {n} ranks did not join within {}s (--rendezvous-timeout): {}",
                    missing.len(),
                    self.opts.rendezvous_timeout.as_secs(),
                    rank_list(&missing, 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(world_size: usize, fingerprint: &str, token: Option<&str>) -> Hello {
        Hello {
            world_size,
            fingerprint: fingerprint.into(),
            host: "node7".into(),
            pid: 42,
            token_digest: token.map(String::from),
        }
    }

    #[test]
    fn a_matching_hello_passes() {
        check_hello(3, &hello(4, "fp", Some("d")), 4, "fp", Some("d")).unwrap();
        check_hello(1, &hello(2, "fp", None), 2, "fp", None).unwrap();
    }

    #[test]
    fn a_hello_with_another_world_size_names_the_rank_and_host() {
        let e = check_hello(3, &hello(8, "fp", None), 4, "fp", None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "rank 3 (on node7) was started with a world size of 8, rank 0 with 4: start every rank with the same WORLD_SIZE"
        );
    }

    #[test]
    fn a_hello_with_other_arguments_shows_both_fingerprints() {
        let e = check_hello(1, &hello(2, "theirs", None), 2, "ours", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(theirs vs ours)"), "{e}");
        assert!(e.starts_with("rank 1 (on node7) was started with different arguments"));
    }

    #[test]
    fn job_token_mismatches_say_who_has_which() {
        let cases = [
            (
                Some("a"),
                Some("b"),
                "was given another job token (AXSAVE_JOB_TOKEN) and rank 0 its own",
            ),
            (
                Some("a"),
                None,
                "was given a job token (AXSAVE_JOB_TOKEN) and rank 0 none",
            ),
            (
                None,
                Some("b"),
                "was given no job token (AXSAVE_JOB_TOKEN) and rank 0 one",
            ),
        ];
        for (theirs, ours, want) in cases {
            let e = check_hello(2, &hello(4, "fp", theirs), 4, "fp", ours)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_world_size_is_checked_before_the_token_and_the_arguments() {
        let e = check_hello(2, &hello(5, "x", Some("a")), 4, "fp", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("world size of 5"), "{e}");
    }

    #[test]
    fn hellos_survive_the_store() {
        let h = hello(4, "fp", Some("d"));
        let back: Hello = unjson(&json(&h).unwrap(), "hello").unwrap();
        assert_eq!(back, h);
        // A hello of an older axsave (no pid, no token digest) still parses.
        let old: Hello =
            unjson(br#"{"world_size":2,"fingerprint":"f","host":"h"}"#, "hello").unwrap();
        assert_eq!((old.pid, old.token_digest), (0, None));
        assert!(
            unjson::<Hello>(b"{", "hello")
                .unwrap_err()
                .to_string()
                .starts_with("malformed hello from another rank")
        );
    }

    /// Two ranks joining against a real store; each returns its tag and token.
    fn join_two(fingerprints: [&str; 2]) -> Vec<Result<(String, [u8; TOKEN_LEN])>> {
        let out = tempfile::tempdir().unwrap();
        super::super::tests::two_ranks(fingerprints, "/nonexistent", out.path(), |rank| {
            let joined = rank.join()?;
            joined.watchdog.stop();
            Ok((joined.tag, joined.token))
        })
    }

    #[test]
    fn both_ranks_join_with_rank_0_s_tag_and_minted_token() {
        let r = join_two(["fp", "fp"]);
        let (tag0, token0) = r[0].as_ref().unwrap();
        let (tag1, token1) = r[1].as_ref().unwrap();
        assert_eq!(tag0, tag1);
        assert_eq!(token0, token1);
        assert!(crate::runtag::RunTag::parse(tag0).is_some(), "{tag0}");
    }

    #[test]
    fn rank_0_refuses_a_rank_with_other_arguments() {
        let r = join_two(["ours", "theirs"]);
        let e = r[0].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("rank 1 (on ") && e.contains("(theirs vs ours)"),
            "{e}"
        );
        // Rank 1 never hears a start.
        assert!(r[1].is_err());
    }

    #[test]
    fn the_token_comes_from_the_launcher_first_then_from_rank_0() {
        let own = [7u8; TOKEN_LEN];
        let minted = [9u8; TOKEN_LEN];
        let start = |token: Option<String>| Start {
            tag: "t".into(),
            token,
        };
        assert_eq!(
            token_from_start(&start(Some(hex(&minted))), Some(own)).unwrap(),
            own
        );
        assert_eq!(
            token_from_start(&start(Some(hex(&minted))), None).unwrap(),
            minted
        );
        assert!(
            token_from_start(&start(Some("zz".into())), None)
                .unwrap_err()
                .to_string()
                .contains("malformed job token")
        );
        assert!(
            token_from_start(&start(None), None)
                .unwrap_err()
                .to_string()
                .contains("this rank none")
        );
    }
}
