//! The ports the node itself listens on, from /proc/net/{tcp,tcp6,udp,udp6} of the agent's
//! network namespace (the node's: the DaemonSet runs with hostNetwork). A frontend on such a
//! port would take the node's own service (sshd on 22, say) away from it, since XDP sees the
//! packets first, so the desired state refuses it.
//!
//! What counts: TCP sockets in LISTEN and unconnected UDP sockets, bound to the wildcard
//! (`0.0.0.0`, `::`, which also takes IPv4 unless IPV6_V6ONLY, invisible here, so counted) or
//! to an IPv4 address (also as `::ffff:a.b.c.d`). Loopback and other IPv6 addresses never
//! receive nodeport's traffic; whether an address is the node's is decided by the frontend
//! check, which knows the node's addresses.

use std::{collections::BTreeSet, net::Ipv4Addr};

use crate::model::Protocol;

/// A socket the node serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Listener {
    pub protocol: Protocol,
    /// `None`: every address (a wildcard bind).
    pub addr: Option<Ipv4Addr>,
    pub port: u16,
}

impl Listener {
    /// Whether a frontend on `addr:port` would take packets meant for this socket.
    pub fn covers(&self, protocol: Protocol, addr: Ipv4Addr, port: u16) -> bool {
        self.protocol == protocol && self.port == port && self.addr.is_none_or(|a| a == addr)
    }

    /// [`Listener::covers`] for an address of either family. Only wildcard listeners are known
    /// to cover IPv6 addresses: sockets bound to one IPv6 address are not read (`parse`), which
    /// a datapath that carries IPv6 will have to add.
    pub fn covers_ip(&self, protocol: Protocol, addr: std::net::IpAddr, port: u16) -> bool {
        match addr {
            std::net::IpAddr::V4(v4) => self.covers(protocol, v4, port),
            std::net::IpAddr::V6(_) => {
                self.protocol == protocol && self.port == port && self.addr.is_none()
            }
        }
    }
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.protocol {
            Protocol::Tcp => "a TCP listener",
            Protocol::Udp => "a UDP socket",
        };
        match self.addr {
            Some(a) => write!(f, "{what} of the node on {a}:{}", self.port),
            None => write!(f, "{what} of the node on *:{}", self.port),
        }
    }
}

/// TCP_LISTEN and TCP_CLOSE (an unconnected UDP socket) in the `st` column.
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// An address as /proc/net prints it: the in-memory bytes of each 32-bit word, printed as a
/// native integer in hex. None for addresses that never receive nodeport's traffic.
fn address(hex: &str) -> Option<Option<Ipv4Addr>> {
    let word = |w: &str| u32::from_str_radix(w, 16).ok().map(u32::to_ne_bytes);
    let addr = match hex.len() {
        8 => Ipv4Addr::from(word(hex)?),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            if v6.is_unspecified() {
                return Some(None);
            }
            v6.to_ipv4_mapped()?
        }
        _ => return None,
    };
    if addr.is_unspecified() {
        Some(None)
    } else if addr.is_loopback() {
        None
    } else {
        Some(Some(addr))
    }
}

/// The listeners in one /proc/net table (`protocol` says which).
pub fn parse(text: &str, protocol: Protocol) -> Vec<Listener> {
    let wanted = match protocol {
        Protocol::Tcp => TCP_LISTEN,
        Protocol::Udp => UDP_UNCONNECTED,
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (local, remote, state) = (fields.next()?, fields.next()?, fields.next()?);
            if state != wanted {
                return None;
            }
            // A UDP socket with a peer is a client's (connect()ed), not a service.
            let (_, remote_port) = remote.split_once(':')?;
            if remote_port != "0000" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(Listener {
                protocol,
                addr: address(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

/// Every listener of the node (tables that cannot be read, IPv6 disabled say, are skipped).
pub fn read() -> BTreeSet<Listener> {
    read_from(std::path::Path::new("/proc/net"))
}

pub fn read_from(dir: &std::path::Path) -> BTreeSet<Listener> {
    let mut out = BTreeSet::new();
    for (file, protocol) in [
        ("tcp", Protocol::Tcp),
        ("tcp6", Protocol::Tcp),
        ("udp", Protocol::Udp),
        ("udp6", Protocol::Udp),
    ] {
        if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
            out.extend(parse(&text, protocol));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    /// An IPv4 address as the kernel prints it on this machine.
    fn hex4(a: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(a.octets()))
    }

    fn hex6(a: std::net::Ipv6Addr) -> String {
        a.octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes(c.try_into().unwrap())))
            .collect()
    }

    fn line(local: &str, port: u16, remote: &str, rport: u16, st: &str) -> String {
        format!(
            "   0: {local}:{port:04X} {remote}:{rport:04X} {st} 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n"
        )
    }

    #[test]
    fn tcp_listeners_on_the_wildcard_or_an_address_count_loopback_and_connections_do_not() {
        let any = hex4(Ipv4Addr::UNSPECIFIED);
        let node = hex4("198.18.0.1".parse().unwrap());
        let lo = hex4(Ipv4Addr::LOCALHOST);
        let text = [
            HEADER.to_owned(),
            line(&any, 22, &any, 0, "0A"),
            line(&node, 8080, &any, 0, "0A"),
            line(&lo, 631, &any, 0, "0A"),
            line(&node, 22, &hex4("198.18.0.9".parse().unwrap()), 40000, "01"),
        ]
        .concat();
        assert_eq!(
            parse(&text, Protocol::Tcp),
            [
                Listener {
                    protocol: Protocol::Tcp,
                    addr: None,
                    port: 22
                },
                Listener {
                    protocol: Protocol::Tcp,
                    addr: Some("198.18.0.1".parse().unwrap()),
                    port: 8080
                },
            ]
        );
    }

    #[test]
    fn ipv6_wildcards_and_mapped_addresses_count_other_ipv6_addresses_do_not() {
        let any6 = hex6(std::net::Ipv6Addr::UNSPECIFIED);
        let mapped = hex6("::ffff:198.18.0.1".parse().unwrap());
        let global = hex6("fd00::1".parse().unwrap());
        let text = [
            HEADER.to_owned(),
            line(&any6, 22, &any6, 0, "0A"),
            line(&mapped, 80, &any6, 0, "0A"),
            line(&global, 443, &any6, 0, "0A"),
        ]
        .concat();
        let ports: Vec<(Option<Ipv4Addr>, u16)> = parse(&text, Protocol::Tcp)
            .iter()
            .map(|l| (l.addr, l.port))
            .collect();
        assert_eq!(
            ports,
            [(None, 22), (Some("198.18.0.1".parse().unwrap()), 80)]
        );
    }

    #[test]
    fn unconnected_udp_sockets_count_connected_ones_do_not() {
        let any = hex4(Ipv4Addr::UNSPECIFIED);
        let peer = hex4("198.18.0.53".parse().unwrap());
        let text = [
            HEADER.to_owned(),
            line(&any, 53, &any, 0, "07"),
            line(&any, 40001, &peer, 53, "01"),
        ]
        .concat();
        let got = parse(&text, Protocol::Udp);
        assert_eq!(got.len(), 1);
        assert!(got[0].covers(Protocol::Udp, "198.18.0.1".parse().unwrap(), 53));
        assert!(!got[0].covers(Protocol::Tcp, "198.18.0.1".parse().unwrap(), 53));
    }

    #[test]
    fn this_process_listening_is_seen() {
        let socket = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(read().contains(&Listener {
            protocol: Protocol::Tcp,
            addr: None,
            port
        }));
    }
}
