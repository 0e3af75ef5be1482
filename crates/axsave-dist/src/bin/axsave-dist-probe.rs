//! `axsave-dist-probe`: checks a launcher setup without any checkpoint, and serves the
//! multi-process tests.
//!
//! * `axsave-dist-probe world` — print what [`axsave_dist::detect_from_process_env`] sees.
//! * `axsave-dist-probe serve [--port N]` — host a store on all interfaces, print
//!   `listening on <port>`, serve until killed.
//! * `axsave-dist-probe rendezvous [--timeout SECONDS]` — every rank: detect the world, reach
//!   the store (hosting it on rank 0 unless torchrun's agent does), pass a barrier, receive a
//!   broadcast from rank 0, pass a final barrier, print `rank R/N ok: <message>`.
//!
//! Exit status 0 on success, 1 on failure (the reason on stderr), 2 on bad usage.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use axsave_dist::store::rendezvous;
use axsave_dist::{ClientOptions, ServerOptions, StoreClient, StoreServer, World};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("world") => world(),
        Some("serve") => match flag(&args, "--port") {
            Ok(port) => serve(port.unwrap_or(0)),
            Err(e) => return usage(&e),
        },
        Some("rendezvous") => match flag(&args, "--timeout") {
            Ok(t) => rendezvous(Duration::from_secs(t.unwrap_or(60).into())),
            Err(e) => return usage(&e),
        },
        _ => return usage("expected a subcommand: world | serve | rendezvous"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("axsave-dist-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "axsave-dist-probe: {msg}\nusage: axsave-dist-probe world | serve [--port N] | rendezvous [--timeout SECONDS]"
    );
    ExitCode::from(2)
}

/// The value of `--name N`, if given.
fn flag(args: &[String], name: &str) -> Result<Option<u16>, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("{name} needs a number up to 65535")),
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn world() -> Res {
    let w = axsave_dist::detect_from_process_env()?;
    println!("{w:#?}");
    Ok(())
}

fn serve(port: u16) -> Res {
    let server = StoreServer::start(ServerOptions {
        port,
        ..ServerOptions::default()
    })?;
    println!("listening on {}", server.port());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn rendezvous(timeout: Duration) -> Res {
    let deadline = Instant::now() + timeout;
    let w: World = axsave_dist::detect_from_process_env()?;
    w.log_detected();
    // Rank 0 hosts the store unless torchrun's agent already does; it must outlive the others'
    // use of it, which the final barrier guarantees.
    let server = if w.hosts_store() {
        Some(StoreServer::start(ServerOptions {
            port: w.master_port,
            ..ServerOptions::default()
        })?)
    } else if !w.is_distributed() {
        // Nobody to meet; a private store on a free loopback port exercises the same path.
        Some(StoreServer::start(ServerOptions {
            bind: vec![(std::net::Ipv4Addr::LOCALHOST, 0).into()],
            ..ServerOptions::default()
        })?)
    } else {
        None
    };
    let (host, port) = match (&server, w.is_distributed()) {
        (Some(s), false) => ("127.0.0.1".to_owned(), s.port()),
        _ => (
            w.master_addr
                .clone()
                .ok_or("MASTER_ADDR is unknown for this launch; set it")?,
            w.master_port,
        ),
    };
    let options = ClientOptions {
        connect_timeout: timeout,
        ..ClientOptions::default()
    };
    let mut client =
        StoreClient::connect(&host, port, options)?.with_namespace(&w.store_namespace());
    rendezvous::barrier(&mut client, "probe-start", w.world_size, deadline)?;
    let message = if w.rank == 0 {
        let m = format!("hello from rank 0 of {} ({})", w.world_size, w.launcher);
        rendezvous::broadcast_bytes(&mut client, "probe", m.as_bytes())?;
        m
    } else {
        String::from_utf8(rendezvous::receive_broadcast(
            &mut client,
            "probe",
            deadline,
        )?)?
    };
    rendezvous::barrier(&mut client, "probe-end", w.world_size, deadline)?;
    println!("rank {}/{} ok: {message}", w.rank, w.world_size);
    drop(client);
    if let Some(server) = server {
        // Peers may still be between their last requests; keep serving until they hang up.
        if !server.wait_for_disconnects(deadline) {
            return Err("some ranks did not disconnect from the store before the deadline".into());
        }
        server.shutdown();
    }
    Ok(())
}
