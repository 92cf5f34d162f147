//! The node's interfaces and addresses: which interfaces face clients (external: XDP), which
//! face pods (the reply hook), and which addresses node ports answer on.
//!
//! Read with getifaddrs(3); a netlink socket subscribed to link and address changes wakes the
//! agent when something changes, so a new pod's veth gets its hook at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use crate::model::Ipv4Prefix;

/// An interface and its IPv4 addresses (primary first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub up: bool,
    pub loopback: bool,
    pub addresses: Vec<Ipv4Addr>,
}

/// Every interface, by name.
pub fn scan() -> io::Result<BTreeMap<String, Interface>> {
    let mut out: BTreeMap<String, Interface> = BTreeMap::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let flags = ifa.ifa_flags;
        let entry = out.entry(name.clone()).or_insert_with(|| {
            let cname = std::ffi::CString::new(name.clone()).unwrap_or_default();
            Interface {
                // SAFETY: a NUL-terminated name.
                ifindex: unsafe { libc::if_nametoindex(cname.as_ptr()) },
                name,
                up: false,
                loopback: false,
                addresses: Vec::new(),
            }
        });
        entry.up |= flags & libc::IFF_UP as u32 != 0;
        entry.loopback |= flags & libc::IFF_LOOPBACK as u32 != 0;
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it says.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                entry
                    .addresses
                    .push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
    }
    // SAFETY: freeing what getifaddrs allocated.
    unsafe { libc::freeifaddrs(head) };
    out.retain(|_, i| i.ifindex != 0);
    Ok(out)
}

/// The current ifindex of the interface `name`, if it exists.
pub fn ifindex_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Interfaces that carry an IPv4 default route (from /proc/net/route): the external ones when
/// the operator names none.
pub fn default_route_interfaces() -> io::Result<BTreeSet<String>> {
    let table = std::fs::read_to_string("/proc/net/route")?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let iface = cols.next()?;
            let destination = cols.next()?;
            (destination == "00000000").then(|| iface.to_owned())
        })
        .collect())
}

/// How to tell the interfaces apart, from the agent's flags.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// External interfaces; empty: those with a default route.
    pub external: Vec<String>,
    /// Glob patterns of pod-facing interfaces; empty: every other interface that is up.
    pub pod_patterns: Vec<String>,
    /// Node ports answer only on addresses in these prefixes (kube-proxy's
    /// --nodeport-addresses); empty: on every address but loopback.
    pub nodeport_prefixes: Vec<Ipv4Prefix>,
    /// `--nodeport-addresses primary`: node ports answer only on the primary (first) IPv4
    /// address of each external interface (and the Node object's first IPv4 address).
    pub primary_only: bool,
}

/// Who is what, right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub external: BTreeMap<String, Interface>,
    pub pod_facing: BTreeMap<String, Interface>,
    /// Addresses node ports answer on.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// Every IPv4 address of every interface, whatever --nodeport-addresses says: sources
    /// that are never an outside client.
    pub all_addresses: BTreeSet<Ipv4Addr>,
    /// Ifindex -> its primary address: the SNAT address of traffic to a remote backend that
    /// leaves there. Every interface with an address has one, not only external ones: with an
    /// overlay (flannel.1, vxlan.calico, WireGuard) the route to another node's pods leaves
    /// through the overlay device, and replies come back through it to the pod-facing hook.
    pub snat_addresses: BTreeMap<u32, Ipv4Addr>,
}

/// Shell-style `*` and `?` matching, enough for interface name patterns like `veth*`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

impl Selection {
    /// Sorts the interfaces into roles. Pure, so it is tested without a machine to scan.
    pub fn layout(
        &self,
        interfaces: &BTreeMap<String, Interface>,
        default_route: &BTreeSet<String>,
    ) -> Layout {
        let external_names: BTreeSet<&str> = if self.external.is_empty() {
            default_route.iter().map(String::as_str).collect()
        } else {
            self.external.iter().map(String::as_str).collect()
        };
        let mut layout = Layout::default();
        for iface in interfaces.values() {
            if !iface.loopback
                && let Some(primary) = iface.addresses.first()
            {
                layout.snat_addresses.insert(iface.ifindex, *primary);
            }
            let external = external_names.contains(iface.name.as_str());
            if external {
                layout.external.insert(iface.name.clone(), iface.clone());
            } else if iface.up
                && !iface.loopback
                && (self.pod_patterns.is_empty()
                    || self.pod_patterns.iter().any(|p| glob_match(p, &iface.name)))
            {
                layout.pod_facing.insert(iface.name.clone(), iface.clone());
            }
            for (i, addr) in iface.addresses.iter().enumerate() {
                layout.all_addresses.insert(*addr);
                if self.primary_only {
                    if external && i == 0 && !addr.is_loopback() {
                        layout.node_addresses.insert(*addr);
                    }
                    continue;
                }
                // Never loopback, whatever --nodeport-addresses says: frames from the wire to
                // 127.0.0.1 must not reach a pod (CVE-2020-8558), and the node's own
                // connections to localhost node ports never pass the external interfaces'
                // hooks (kube-proxy's localhost node ports stay kube-proxy's).
                let wanted = !addr.is_loopback()
                    && (self.nodeport_prefixes.is_empty()
                        || self.nodeport_prefixes.iter().any(|p| p.contains(*addr)));
                if wanted {
                    layout.node_addresses.insert(*addr);
                }
            }
        }
        layout
    }
}

/// Wakes up when links or IPv4 addresses change (RTMGRP_LINK | RTMGRP_IPV4_IFADDR).
pub struct ChangeWatcher {
    fd: AsyncFd<OwnedFd>,
}

impl ChangeWatcher {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR) as u32;
        // SAFETY: binding our socket to a valid sockaddr_nl.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd is ours alone (OwnedFd) and stays open as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Waits for at least one change notification and drains what is queued.
    pub async fn changed(&self) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            loop {
                // SAFETY: reading into our buffer.
                let n = unsafe {
                    libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    break;
                }
                if n < 0 && err.raw_os_error() == Some(libc::ENOBUFS) {
                    // Overrun: we missed messages, which is just "something changed".
                    got = true;
                    continue;
                }
                return Err(err);
            }
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, ifindex: u32, addrs: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            ifindex,
            up: true,
            loopback: name == "lo",
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn machine() -> BTreeMap<String, Interface> {
        [
            iface("lo", 1, &["127.0.0.1"]),
            iface("eth0", 2, &["198.18.0.1", "198.18.0.9"]),
            iface("eth1", 3, &["10.1.0.5"]),
            iface("cali123", 4, &[]),
            iface("vethab", 5, &[]),
            Interface {
                up: false,
                ..iface("veth-down", 6, &[])
            },
        ]
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect()
    }

    #[test]
    fn defaults_external_from_the_default_route_and_pods_everything_else() {
        let layout = Selection::default().layout(&machine(), &BTreeSet::from(["eth0".to_owned()]));
        assert_eq!(layout.external.keys().collect::<Vec<_>>(), ["eth0"]);
        assert_eq!(
            layout.pod_facing.keys().collect::<Vec<_>>(),
            ["cali123", "eth1", "vethab"]
        );
        let snat = BTreeMap::from([
            (2, "198.18.0.1".parse().unwrap()),
            (3, "10.1.0.5".parse().unwrap()),
        ]);
        assert_eq!(
            layout.snat_addresses, snat,
            "every interface with an address, loopback aside"
        );
        let addrs: Vec<String> = layout
            .node_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            addrs,
            ["10.1.0.5", "198.18.0.1", "198.18.0.9"],
            "every address but loopback"
        );
    }

    #[test]
    fn named_interfaces_patterns_and_nodeport_addresses() {
        let sel = Selection {
            external: vec!["eth0".into(), "eth1".into()],
            pod_patterns: vec!["cali*".into()],
            nodeport_prefixes: vec![Ipv4Prefix {
                addr: "198.18.0.0".parse().unwrap(),
                len: 24,
            }],
            primary_only: false,
        };
        let layout = sel.layout(&machine(), &BTreeSet::new());
        assert_eq!(layout.external.keys().collect::<Vec<_>>(), ["eth0", "eth1"]);
        assert_eq!(layout.pod_facing.keys().collect::<Vec<_>>(), ["cali123"]);
        assert_eq!(layout.node_addresses.len(), 2);
        assert_eq!(
            layout.snat_addresses.len(),
            2,
            "eth0 and eth1: the only ones with addresses"
        );
    }

    /// kube-proxy's iptables mode answers node ports on 127.0.0.1 when --nodeport-addresses
    /// covers it, by setting route_localnet (CVE-2020-8558); nodeport never does.
    #[test]
    fn loopback_is_never_a_node_address() {
        let sel = Selection {
            external: Vec::new(),
            pod_patterns: Vec::new(),
            nodeport_prefixes: vec![
                Ipv4Prefix {
                    addr: "127.0.0.0".parse().unwrap(),
                    len: 8,
                },
                Ipv4Prefix {
                    addr: "198.18.0.0".parse().unwrap(),
                    len: 24,
                },
            ],
            primary_only: false,
        };
        let layout = sel.layout(&machine(), &BTreeSet::new());
        assert!(
            layout.node_addresses.iter().all(|a| !a.is_loopback()),
            "{:?}",
            layout.node_addresses
        );
        assert!(!layout.node_addresses.is_empty());
    }

    /// kube-proxy's `--nodeport-addresses primary`: the primary address of each external
    /// interface, not its secondary ones nor other interfaces'.
    #[test]
    fn primary_node_addresses() {
        let sel = Selection {
            primary_only: true,
            ..Selection::default()
        };
        let layout = sel.layout(&machine(), &BTreeSet::from(["eth0".to_owned()]));
        let addrs: Vec<String> = layout
            .node_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addrs, ["198.18.0.1"]);
        assert_eq!(
            layout.all_addresses.len(),
            4,
            "every address still counts as the node's own"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1234"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("lxc?", "lxc1"));
        assert!(!glob_match("lxc?", "lxc12"));
        assert!(!glob_match("cali*", "eth0"));
    }

    #[test]
    fn this_machine_has_a_loopback() {
        let all = scan().unwrap();
        assert!(
            all.values()
                .any(|i| i.loopback && i.addresses.contains(&Ipv4Addr::LOCALHOST)),
            "{all:?}"
        );
    }
}
