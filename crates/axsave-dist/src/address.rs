//! Which addresses a rank listens on and publishes: where its peers will connect.
//!
//! - **The store** (rank 0): on the addresses `MASTER_ADDR` names on this host. A literal
//!   address or `localhost` is bound as it is (`MASTER_ADDR=127.0.0.1` listens on loopback
//!   only); a host name that resolves to addresses of this host is bound on those. Every
//!   interface is used only where the peers may connect elsewhere: a name that resolves here to
//!   loopback only (Debian's `127.0.1.1 <hostname>` line, while other nodes resolve the name
//!   to the real address), or an address that is not this host's (a NAT or a virtual IP).
//! - **The data listener** (each writer): on the address it publishes, which is the source
//!   address of its route to the store (the address its store connection comes from), or, when
//!   that is a loopback address and some peer is elsewhere, the source address of its route to
//!   that peer: never `127.0.1.1` nor a Docker bridge when the peers are on other nodes.
//!   `AXSAVE_ADDR` overrides it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};

/// A port nothing listens on now. The rendezvous store binds the wildcard address (IPv6
/// dual-stack, else IPv4), so the port is asked for the same way: free there means free on every
/// local address. Another program may still take it before the store binds it.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0))
        .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
    Ok(listener.local_addr()?.port())
}

/// The environment variable that sets the address a rank publishes.
pub const ADDR_VAR: &str = "AXSAVE_ADDR";

/// Whether `ip` is an address of this host (it can be bound).
pub fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The addresses `host` resolves to here (none when it does not resolve).
pub fn resolve(host: &str) -> Vec<IpAddr> {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![ip];
    }
    let mut out: Vec<IpAddr> = (host, 0)
        .to_socket_addrs()
        .map(|it| it.map(|a| a.ip()).collect())
        .unwrap_or_default();
    out.dedup();
    out
}

/// The addresses rank 0's store listens on for `master` (`MASTER_ADDR`), which resolves to
/// `resolved` here; `local` says whether an address belongs to this host. Empty: every
/// interface (see the module doc for when).
pub fn store_bind(
    master: &str,
    resolved: &[IpAddr],
    local: impl Fn(IpAddr) -> bool,
) -> Vec<IpAddr> {
    let literal = master
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok();
    let mut ips: Vec<IpAddr> = Vec::new();
    for &ip in resolved {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() || !ips.iter().all(|&ip| ip.is_loopback() || local(ip)) {
        // Peers connect to an address this host cannot bind (NAT, a virtual IP): every
        // interface, as torch does.
        return Vec::new();
    }
    let all_loopback = ips.iter().all(|ip| ip.is_loopback());
    let localhost = master.trim().eq_ignore_ascii_case("localhost");
    if all_loopback && !literal && !localhost {
        // A host name that means loopback only here may mean this host's real address on the
        // other nodes.
        return Vec::new();
    }
    ips
}

/// The source address of this host's route to `target` (no packet is sent).
pub fn route_source(target: IpAddr) -> std::io::Result<IpAddr> {
    let bind = match target {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = UdpSocket::bind(bind)?;
    // Any port: connecting a UDP socket only picks the route.
    s.connect(SocketAddr::new(target, 9))?;
    Ok(s.local_addr()?.ip())
}

/// The address this rank publishes to its peers: `AXSAVE_ADDR` when set, else `own` (the
/// address its store connection comes from) unless that is loopback while a peer is not, in
/// which case the source address of the route to the first such peer (`peers`: the addresses
/// the other ranks' store connections come from), found by `route`.
pub fn publish(
    override_addr: Option<IpAddr>,
    own: IpAddr,
    peers: &[IpAddr],
    route: impl Fn(IpAddr) -> std::io::Result<IpAddr>,
) -> IpAddr {
    if let Some(ip) = override_addr {
        return ip;
    }
    if !own.is_loopback() {
        return own;
    }
    peers
        .iter()
        .filter(|p| !p.is_loopback())
        .find_map(|&p| route(p).ok().filter(|ip| !ip.is_loopback()))
        .unwrap_or(own)
}

/// `AXSAVE_ADDR`, when set to an address.
pub fn override_from_env() -> Option<IpAddr> {
    std::env::var(ADDR_VAR)
        .ok()
        .and_then(|a| a.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_usable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const NODE0: &str = "10.77.0.1";

    fn local(a: IpAddr) -> bool {
        a.is_loopback() || a == ip(NODE0)
    }

    #[test]
    fn a_loopback_master_addr_binds_loopback_only() {
        assert_eq!(
            store_bind("127.0.0.1", &[ip("127.0.0.1")], local),
            [ip("127.0.0.1")]
        );
        assert_eq!(store_bind("::1", &[ip("::1")], local), [ip("::1")]);
        assert_eq!(store_bind("[::1]", &[ip("::1")], local), [ip("::1")]);
        assert_eq!(
            store_bind("localhost", &[ip("::1"), ip("127.0.0.1")], local),
            [ip("::1"), ip("127.0.0.1")]
        );
    }

    #[test]
    fn this_hosts_address_is_bound_alone() {
        assert_eq!(store_bind(NODE0, &[ip(NODE0)], local), [ip(NODE0)]);
        // A name for it too, with the loopback entry the same name has here.
        assert_eq!(
            store_bind("node0", &[ip(NODE0), ip("127.0.1.1")], local),
            [ip(NODE0), ip("127.0.1.1")]
        );
    }

    #[test]
    fn every_interface_where_peers_may_connect_elsewhere() {
        // Debian: the own host name is 127.0.1.1 here, the real address on the other nodes.
        assert!(store_bind("node0", &[ip("127.0.1.1")], local).is_empty());
        // Not an address of this host (NAT, a virtual IP), or not resolvable.
        assert!(store_bind("10.9.9.9", &[ip("10.9.9.9")], local).is_empty());
        assert!(store_bind("nowhere", &[], local).is_empty());
    }

    #[test]
    fn publishes_a_non_loopback_address_when_peers_are_elsewhere() {
        let route = |p: IpAddr| -> std::io::Result<IpAddr> {
            assert_eq!(p, ip("10.77.0.2"));
            Ok(ip(NODE0))
        };
        // Rank 0 reached its own store through 127.0.1.1; rank 2 came from 10.77.0.2.
        assert_eq!(
            publish(
                None,
                ip("127.0.0.1"),
                &[ip("127.0.0.1"), ip("10.77.0.2")],
                route
            ),
            ip(NODE0)
        );
        // A rank on another node publishes the address its store connection comes from.
        assert_eq!(
            publish(
                None,
                ip("10.77.0.2"),
                &[ip("127.0.0.1")],
                |_| unreachable!()
            ),
            ip("10.77.0.2")
        );
        // Everyone on this host: loopback.
        assert_eq!(
            publish(
                None,
                ip("127.0.0.1"),
                &[ip("127.0.0.1")],
                |_| unreachable!()
            ),
            ip("127.0.0.1")
        );
        // A route that also comes out loopback is not taken.
        assert_eq!(
            publish(None, ip("127.0.0.1"), &[ip("10.1.1.1")], |_| Ok(ip(
                "127.0.0.1"
            ))),
            ip("127.0.0.1")
        );
        // AXSAVE_ADDR wins.
        assert_eq!(
            publish(
                Some(ip("10.5.5.5")),
                ip("127.0.0.1"),
                &[ip("10.77.0.2")],
                |_| { unreachable!() }
            ),
            ip("10.5.5.5")
        );
    }

    #[test]
    fn routes_to_loopback_come_from_loopback() {
        assert!(route_source(ip("127.0.0.1")).unwrap().is_loopback());
        assert!(is_local(ip("127.0.0.1")));
        assert_eq!(resolve("127.0.0.1"), [ip("127.0.0.1")]);
        assert_eq!(resolve("[::1]"), [ip("::1")]);
    }
}
