//! The node's interfaces and addresses: which interfaces face clients (external: XDP), which
//! face pods (the reply hook), and which addresses node ports answer on.
//!
//! Read with getifaddrs(3), and /proc/net/if_inet6 for the state of IPv6 addresses (a
//! tentative, deprecated or duplicate address is no frontend); a netlink socket subscribed to
//! link and address changes of both families wakes the agent when something changes, so a new
//! pod's veth gets its hook at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use crate::model::{Ipv4Prefix, Ipv6Prefix};

/// An interface and its IPv4 addresses (primary first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub up: bool,
    pub loopback: bool,
    pub addresses: Vec<Ipv4Addr>,
    /// Its IPv6 addresses that may be used (link-local included; tentative, deprecated and
    /// duplicate ones left out), in the kernel's order.
    pub addresses_v6: Vec<Ipv6Addr>,
}

/// IPv6 address flags (`IFA_F_*`, linux/if_addr.h) that make an address unusable as a
/// frontend: a duplicate (DAD failed), one whose DAD has not finished (tentative: the kernel
/// does not accept packets for it yet), and a deprecated one (its preferred lifetime is over,
/// it is on its way out).
const IFA_F_DADFAILED: u8 = 0x08;
const IFA_F_DEPRECATED: u8 = 0x20;
const IFA_F_TENTATIVE: u8 = 0x40;

/// The IPv6 addresses of /proc/net/if_inet6 that are not usable (see `IFA_F_TENTATIVE`), as
/// (interface, address). Each line is `address ifindex prefix_len scope flags name`, the
/// address as 32 hex digits and the flags as the low byte of the address's flags, in hex.
pub fn unusable_ipv6(if_inet6: &str) -> BTreeSet<(String, Ipv6Addr)> {
    if_inet6
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [addr, _, _, _, flags, name] = fields.as_slice() else {
                return None;
            };
            let addr = Ipv6Addr::from(u128::from_str_radix(addr, 16).ok()?);
            let flags = u8::from_str_radix(flags, 16).ok()?;
            (flags & (IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE) != 0)
                .then(|| ((*name).to_owned(), addr))
        })
        .collect()
}

/// Whether an IPv6 address can be a node address frontends answer on: not loopback, not
/// link-local (fe80::/10: one per link, the same prefix on every link, never a Service
/// address), not unspecified or multicast.
pub fn ipv6_frontend_address(addr: &Ipv6Addr) -> bool {
    !(addr.is_loopback()
        || addr.is_unspecified()
        || addr.is_multicast()
        || addr.is_unicast_link_local())
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
                addresses_v6: Vec::new(),
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
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 means sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                entry
                    .addresses_v6
                    .push(Ipv6Addr::from(sin6.sin6_addr.s6_addr));
            }
        }
    }
    // SAFETY: freeing what getifaddrs allocated.
    unsafe { libc::freeifaddrs(head) };
    out.retain(|_, i| i.ifindex != 0);
    // getifaddrs does not say which IPv6 addresses are tentative or deprecated; the kernel's
    // table does (no such file: IPv6 is off, and there are no IPv6 addresses either).
    let unusable = std::fs::read_to_string("/proc/net/if_inet6")
        .map(|text| unusable_ipv6(&text))
        .unwrap_or_default();
    for iface in out.values_mut() {
        iface
            .addresses_v6
            .retain(|a| !unusable.contains(&(iface.name.clone(), *a)));
    }
    Ok(out)
}

/// The current ifindex of the interface `name`, if it exists.
pub fn ifindex_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Interfaces that carry a default route (from /proc/net/route, and /proc/net/ipv6_route for
/// IPv6-only nodes): the external ones when the operator names none.
pub fn default_route_interfaces() -> io::Result<BTreeSet<String>> {
    let table = std::fs::read_to_string("/proc/net/route")?;
    let mut out: BTreeSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let iface = cols.next()?;
            let destination = cols.next()?;
            (destination == "00000000").then(|| iface.to_owned())
        })
        .collect();
    // Absent when IPv6 is off.
    if let Ok(table) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(ipv6_default_route_interfaces(&table));
    }
    Ok(out)
}

/// `RTF_REJECT` (linux/route.h): the kernel's own `unreachable` default routes on `lo`.
const RTF_REJECT: u32 = 0x0200;

/// The interfaces of the IPv6 default routes in /proc/net/ipv6_route: lines of `destination
/// prefix_len source prefix_len next_hop metric refcount use flags name`, in hex.
pub fn ipv6_default_route_interfaces(ipv6_route: &str) -> BTreeSet<String> {
    ipv6_route
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [destination, len, .., flags, name] = fields.as_slice() else {
                return None;
            };
            let default = fields.len() == 10
                && destination.bytes().all(|b| b == b'0')
                && *len == "00"
                && u32::from_str_radix(flags, 16).is_ok_and(|f| f & RTF_REJECT == 0)
                && *name != "lo";
            default.then(|| (*name).to_owned())
        })
        .collect()
}

/// How to tell the interfaces apart, from the agent's flags.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// External interfaces; empty: those with a default route.
    pub external: Vec<String>,
    /// Glob patterns of pod-facing interfaces; empty: every other interface that is up.
    pub pod_patterns: Vec<String>,
    /// IPv4 node ports answer only on addresses in these prefixes (kube-proxy's
    /// --nodeport-addresses); empty: on every address but loopback.
    pub nodeport_prefixes: Vec<Ipv4Prefix>,
    /// The same for IPv6, independently: empty means every IPv6 address (but loopback and
    /// link-local), even when IPv4 prefixes are given, as kube-proxy's `NewNodePortAddresses`
    /// (pkg/proxy/util/nodeport_addresses.go) takes `::/0` for a family given no CIDR.
    pub nodeport_prefixes_v6: Vec<Ipv6Prefix>,
    /// `--nodeport-addresses primary`: node ports answer only on the primary (first) address
    /// of each family of each external interface (and the Node object's first address of each
    /// family).
    pub primary_only: bool,
}

/// Who is what, right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub external: BTreeMap<String, Interface>,
    pub pod_facing: BTreeMap<String, Interface>,
    /// Addresses node ports answer on.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    /// IPv6 addresses IPv6 node ports answer on (never link-local).
    pub node_addresses_v6: BTreeSet<Ipv6Addr>,
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
            let mut frontend_v6 = iface
                .addresses_v6
                .iter()
                .filter(|a| ipv6_frontend_address(a));
            if self.primary_only {
                if external && let Some(primary) = frontend_v6.next() {
                    layout.node_addresses_v6.insert(*primary);
                }
                continue;
            }
            for addr in frontend_v6 {
                if self.nodeport_prefixes_v6.is_empty()
                    || self.nodeport_prefixes_v6.iter().any(|p| p.contains(*addr))
                {
                    layout.node_addresses_v6.insert(*addr);
                }
            }
        }
        layout
    }
}

/// Wakes up when links or addresses change (RTMGRP_LINK | RTMGRP_IPV4_IFADDR |
/// RTMGRP_IPV6_IFADDR; an IPv6 address whose DAD completes is announced anew).
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
        addr.nl_groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
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
            addresses_v6: Vec::new(),
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
            nodeport_prefixes_v6: Vec::new(),
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
            nodeport_prefixes_v6: Vec::new(),
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

    fn machine_v6() -> BTreeMap<String, Interface> {
        let v6 = |name: &str, addrs: &[&str]| {
            let mut i = machine()[name].clone();
            i.addresses_v6 = addrs.iter().map(|a| a.parse().unwrap()).collect();
            (i.name.clone(), i)
        };
        let mut m = machine();
        m.extend([
            v6("lo", &["::1"]),
            v6("eth0", &["fd00:18::1", "2001:db8:18::1", "fe80::1"]),
            v6("eth1", &["fd00:1::5", "fe80::2"]),
        ]);
        m
    }

    fn v6_addresses(layout: &Layout) -> Vec<String> {
        layout
            .node_addresses_v6
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// IPv6 node ports answer on every global and unique-local address, never on link-local
    /// or loopback ones; IPv4 prefixes of --nodeport-addresses do not restrict IPv6 (kube-proxy
    /// takes ::/0 for a family given no CIDR), IPv6 prefixes do.
    #[test]
    fn ipv6_node_addresses_skip_link_local_and_follow_their_own_prefixes() {
        let routes = BTreeSet::from(["eth0".to_owned()]);
        let all = Selection::default().layout(&machine_v6(), &routes);
        assert_eq!(
            v6_addresses(&all),
            ["2001:db8:18::1", "fd00:1::5", "fd00:18::1"]
        );
        let v4_only = Selection {
            nodeport_prefixes: vec!["198.18.0.0/24".parse().unwrap()],
            ..Selection::default()
        };
        let layout = v4_only.layout(&machine_v6(), &routes);
        assert_eq!(layout.node_addresses.len(), 2);
        assert_eq!(v6_addresses(&layout), v6_addresses(&all));
        let v6_too = Selection {
            nodeport_prefixes_v6: vec!["fd00::/8".parse().unwrap(), "fe80::/10".parse().unwrap()],
            ..v4_only
        };
        let layout = v6_too.layout(&machine_v6(), &routes);
        assert_eq!(layout.node_addresses.len(), 2);
        assert_eq!(
            v6_addresses(&layout),
            ["fd00:1::5", "fd00:18::1"],
            "inside the prefixes, link-local never"
        );
        let primary = Selection {
            primary_only: true,
            ..Selection::default()
        };
        let layout = primary.layout(&machine_v6(), &routes);
        assert_eq!(v6_addresses(&layout), ["fd00:18::1"]);
    }

    /// /proc/net/if_inet6 says which addresses are not usable yet (tentative: duplicate
    /// address detection running) or any more (deprecated, DAD failed).
    #[test]
    fn tentative_deprecated_and_duplicate_ipv6_addresses_are_unusable() {
        let text = "\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
fd000000000000000000000000000003 04 40 00 c0     eth0
fd000000000000000000000000000004 04 40 00 20     eth0
fd000000000000000000000000000005 04 40 00 08     eth0
20010db8000000000000000000000006 04 40 00 01     eth0
";
        let unusable: Vec<String> = unusable_ipv6(text)
            .into_iter()
            .map(|(name, addr)| format!("{name} {addr}"))
            .collect();
        assert_eq!(unusable, ["eth0 fd00::3", "eth0 fd00::4", "eth0 fd00::5"]);
        // This machine's own table parses (whatever it holds).
        if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
            let lines = text.lines().count();
            let parsed = text
                .lines()
                .filter(|l| l.split_whitespace().count() == 6)
                .count();
            assert_eq!(lines, parsed, "{text}");
        }
    }

    /// An IPv6-only node's external interface is the one with the IPv6 default route; the
    /// kernel's `unreachable` default on lo is none.
    #[test]
    fn ipv6_default_routes_name_their_interface() {
        let text = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(
            ipv6_default_route_interfaces(text),
            BTreeSet::from(["eth0".to_owned()])
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
