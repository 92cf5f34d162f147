//! The Linux capabilities `nodeport-agent run` needs, checked once at start: a missing one is
//! an error naming it and what it is for, instead of an `Operation not permitted` from deep
//! inside the loader after half of the work is done.
//!
//! Measured on Linux 6.18 by running the agent with a reduced capability set (docs/deploying.md,
//! "Capabilities", has the table with the errors):
//!
//! - CAP_BPF: creating maps (`failed to create map ...: Operation not permitted`).
//! - CAP_NET_ADMIN: XDP and TC are network program types; loading them needs it
//!   (`BPF_PROG_LOAD ... Operation not permitted`).
//! - CAP_PERFMON: without it the verifier applies the rules for untrusted programs and rejects
//!   the datapath's packet pointer arithmetic (`R4 pointer -= pointer prohibited`).
//! - CAP_SYS_ADMIN: only to mount bpffs at /sys/fs/bpf when nothing is mounted there.
//! - CAP_NET_BIND_SERVICE: only for a port below `net.ipv4.ip_unprivileged_port_start`.
//!
//! The kernel accepts CAP_SYS_ADMIN in place of the first three (its `bpf_capable()`,
//! `bpf_net_capable()` and `perfmon_capable()`), so a process holding it passes: that is how
//! runtimes or kernels older than CAP_BPF (Linux 5.8) grant the same. Not needed on Linux 5.11
//! and newer: CAP_SYS_RESOURCE (map memory is charged to the memory cgroup, not
//! RLIMIT_MEMLOCK), CAP_NET_RAW.
//!
//! [`assess`] is the decision, pure and unit-tested; [`check`] gathers its inputs from /proc
//! and the file system.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use thiserror::Error;

use crate::{config::RunArgs, datapath::bpffs};

/// The capabilities the agent asks for, by their bit in the kernel's capability sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    NetBindService,
    NetAdmin,
    SysAdmin,
    Perfmon,
    Bpf,
}

impl Capability {
    /// The bit number (include/uapi/linux/capability.h).
    pub const fn bit(self) -> u32 {
        match self {
            Self::NetBindService => 10,
            Self::NetAdmin => 12,
            Self::SysAdmin => 21,
            Self::Perfmon => 38,
            Self::Bpf => 39,
        }
    }

    /// The name without `CAP_`, as Kubernetes' `securityContext.capabilities` spells it.
    pub const fn kubernetes_name(self) -> &'static str {
        match self {
            Self::NetBindService => "NET_BIND_SERVICE",
            Self::NetAdmin => "NET_ADMIN",
            Self::SysAdmin => "SYS_ADMIN",
            Self::Perfmon => "PERFMON",
            Self::Bpf => "BPF",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CAP_{}", self.kubernetes_name())
    }
}

/// What every run needs, and why. deploy/base/daemonset.yaml adds exactly these (a test checks it).
pub const REQUIRED: [(Capability, &str); 3] = [
    (
        Capability::Bpf,
        "creating the BPF maps, loading the programs and pinning them",
    ),
    (
        Capability::NetAdmin,
        "loading the XDP and TC programs and attaching them to the interfaces",
    ),
    (
        Capability::Perfmon,
        "loading the datapath: the verifier accepts its packet pointer arithmetic only from a \
         process with CAP_PERFMON (without it: \"pointer -= pointer prohibited\")",
    ),
];

/// A capability set, as the hexadecimal masks of /proc/<pid>/status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapabilitySet(pub u64);

impl CapabilitySet {
    pub fn of(caps: &[Capability]) -> Self {
        Self(caps.iter().fold(0, |mask, cap| mask | 1 << cap.bit()))
    }

    pub fn contains(self, cap: Capability) -> bool {
        self.0 & (1 << cap.bit()) != 0
    }

    /// Whether the kernel lets this set do what `cap` is needed for: CAP_SYS_ADMIN stands in for
    /// CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN in every check the agent meets.
    fn allows(self, cap: Capability) -> bool {
        self.contains(cap)
            || (self.contains(Capability::SysAdmin)
                && matches!(
                    cap,
                    Capability::Bpf | Capability::Perfmon | Capability::NetAdmin
                ))
    }

    /// The capabilities of this set the agent knows by name, for messages.
    fn known(self) -> Vec<Capability> {
        use Capability::*;
        [NetBindService, NetAdmin, SysAdmin, Perfmon, Bpf]
            .into_iter()
            .filter(|cap| self.contains(*cap))
            .collect()
    }
}

impl fmt::Display for CapabilitySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known = self.known();
        if known.is_empty() {
            return write!(f, "none of them (CapEff {:016x})", self.0);
        }
        let names: Vec<String> = known.iter().map(ToString::to_string).collect();
        write!(f, "{} (CapEff {:016x})", names.join(", "), self.0)
    }
}

/// The effective set (`CapEff:`) from the text of /proc/self/status.
pub fn parse_effective(status: &str) -> Option<CapabilitySet> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .map(CapabilitySet)
}

/// Whether the agent will have to mount bpffs, and whether such a mount would be seen outside
/// the agent's mount namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpffsMount {
    /// The pin directory already lies on a bpffs (or is not the agent's to mount: the datapath
    /// then refuses the directory with its own message).
    NotNeeded,
    /// Nothing is mounted at /sys/fs/bpf; the agent mounts bpffs there. `propagates` tells
    /// whether the mount under it is a shared one, so the mount reaches the host.
    Needed { propagates: bool },
}

/// A port bound at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPort {
    /// `--healthz-bind-address`, ...
    pub flag: &'static str,
    pub port: u16,
}

/// What the agent is about to do, as far as privileges go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Situation {
    pub bpffs: BpffsMount,
    /// Ports bound at start.
    pub ports: Vec<BoundPort>,
    /// The first node port (health-check node ports come from that range).
    pub first_node_port: u16,
    /// net.ipv4.ip_unprivileged_port_start: lower ports need CAP_NET_BIND_SERVICE.
    pub unprivileged_port_start: u16,
}

/// A capability the run needs and does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub capability: Capability,
    /// What it is needed for here.
    pub purposes: Vec<String>,
}

/// The outcome of [`assess`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assessment {
    /// Fatal: the run would fail without these.
    pub missing: Vec<Missing>,
    /// Things that work now but will hurt later, or only in some cases.
    pub warnings: Vec<String>,
}

impl Assessment {
    fn need(&mut self, capability: Capability, purpose: String) {
        match self.missing.iter_mut().find(|m| m.capability == capability) {
            Some(missing) => missing.purposes.push(purpose),
            None => self.missing.push(Missing {
                capability,
                purposes: vec![purpose],
            }),
        }
    }
}

/// What `effective` lacks for `situation`.
pub fn assess(effective: CapabilitySet, situation: &Situation) -> Assessment {
    let mut out = Assessment::default();
    for (cap, purpose) in REQUIRED {
        if !effective.allows(cap) {
            out.need(cap, purpose.to_owned());
        }
    }
    match situation.bpffs {
        BpffsMount::NotNeeded => {}
        BpffsMount::Needed { .. } if !effective.contains(Capability::SysAdmin) => out.need(
            Capability::SysAdmin,
            "mounting bpffs at /sys/fs/bpf, where nothing is mounted; or mount it on the host \
             (`mount -t bpf bpf /sys/fs/bpf`; systemd does at boot) and keep CAP_SYS_ADMIN out"
                .to_owned(),
        ),
        BpffsMount::Needed { propagates: true } => {}
        BpffsMount::Needed { propagates: false } => out.warnings.push(
            "nothing is mounted at /sys/fs/bpf and the agent mounts bpffs there, but that mount \
             stays in this mount namespace (the mount under it is not shared): in a container, \
             the pins, and with them the datapath, vanish when the container ends. Mount bpffs \
             on the host (`mount -t bpf bpf /sys/fs/bpf`), or mount the host's /sys/fs/bpf with \
             mountPropagation: Bidirectional"
                .to_owned(),
        ),
    }
    if !effective.contains(Capability::NetBindService) {
        let start = situation.unprivileged_port_start;
        for BoundPort { flag, port } in &situation.ports {
            if *port != 0 && *port < start {
                out.need(
                    Capability::NetBindService,
                    format!(
                        "binding {flag} port {port}, below net.ipv4.ip_unprivileged_port_start \
                         ({start})"
                    ),
                );
            }
        }
        if situation.first_node_port < start {
            out.warnings.push(format!(
                "the node port range starts at {}, below net.ipv4.ip_unprivileged_port_start \
                 ({start}): health-check node ports under {start} cannot be bound without \
                 CAP_NET_BIND_SERVICE",
                situation.first_node_port
            ));
        }
    }
    out.missing.sort_by_key(|m| m.capability);
    out
}

#[derive(Debug, Error)]
pub enum PrivilegesError {
    #[error("{}", missing_message(.missing, *.effective))]
    Missing {
        missing: Vec<Missing>,
        effective: CapabilitySet,
    },
}

fn missing_message(missing: &[Missing], effective: CapabilitySet) -> String {
    let list: Vec<String> = missing
        .iter()
        .map(|m| format!("{} for {}", m.capability, m.purposes.join("; and for ")))
        .collect();
    format!(
        "missing capabilities: {}. This process has {effective}. Grant them (Kubernetes: the \
         container's securityContext.capabilities.add; systemd: AmbientCapabilities=), or run \
         as root",
        list.join("; ")
    )
}

const STATUS: &str = "/proc/self/status";
const MOUNTINFO: &str = "/proc/self/mountinfo";
const UNPRIVILEGED_PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";

/// Checks the privileges of this process for `run` with `args`: logs what it found, warns
/// about what may hurt later, and fails naming every missing capability.
pub fn check(args: &RunArgs) -> Result<(), PrivilegesError> {
    let status = std::fs::read_to_string(STATUS).unwrap_or_default();
    let Some(effective) = parse_effective(&status) else {
        tracing::warn!(
            path = STATUS,
            "cannot read the effective capabilities; not checking them"
        );
        return Ok(());
    };
    let situation = Situation {
        bpffs: bpffs_mount(&args.bpffs_dir),
        ports: [
            ("--healthz-bind-address", args.healthz_bind_address.0),
            ("--metrics-bind-address", args.metrics_bind_address.0),
        ]
        .into_iter()
        .filter_map(|(flag, addr)| {
            Some(BoundPort {
                flag,
                port: addr?.port(),
            })
        })
        .collect(),
        first_node_port: args.service_node_port_range.first,
        unprivileged_port_start: std::fs::read_to_string(UNPRIVILEGED_PORT_START)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(1024),
    };
    // A seccomp filter can refuse bpf(2) whatever the capabilities (some runtimes' default
    // profiles allow it only with CAP_SYS_ADMIN): worth seeing next to a loading error.
    let seccomp = match status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim)
    {
        Some("0") => "off",
        Some("1") => "strict",
        Some("2") => "filter",
        _ => "unknown",
    };
    tracing::info!(capabilities = %effective, seccomp, "privileges");
    let assessment = assess(effective, &situation);
    for warning in &assessment.warnings {
        tracing::warn!("{warning}");
    }
    if assessment.missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegesError::Missing {
            missing: assessment.missing,
            effective,
        })
    }
}

fn bpffs_mount(pin_root: &Path) -> BpffsMount {
    if !bpffs::will_mount(pin_root) {
        return BpffsMount::NotNeeded;
    }
    let mountinfo = std::fs::read_to_string(MOUNTINFO).unwrap_or_default();
    BpffsMount::Needed {
        propagates: mount_is_shared(&mountinfo, Path::new(bpffs::DEFAULT_MOUNT)),
    }
}

/// Whether a mount made at `path` would propagate: the mount `path` lies on (the last listed
/// of those with the longest mount point above it) is a shared one (`shared:N` among the
/// optional fields of /proc/self/mountinfo, proc(5)).
fn mount_is_shared(mountinfo: &str, path: &Path) -> bool {
    let mut best: Option<(PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount_point) = fields.get(4).map(PathBuf::from) else {
            continue;
        };
        if !path.starts_with(&mount_point) {
            continue;
        }
        let optional = fields.iter().skip(6).take_while(|f| **f != "-");
        let shared = optional.clone().any(|f| f.starts_with("shared:"));
        let deeper = best
            .as_ref()
            .is_none_or(|(b, _)| mount_point.components().count() >= b.components().count());
        if deeper {
            best = Some((mount_point, shared));
        }
    }
    best.is_some_and(|(_, shared)| shared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Capability::*;

    /// /proc/self/status of a container given `drop: [ALL]`, `add: [BPF, NET_ADMIN, PERFMON]`
    /// (the masks the kernel printed under setpriv with that bounding set).
    const DEPLOYED_STATUS: &str = "Name:\tnodeport-agent\nUmask:\t0022\nState:\tR (running)\n\
        CapInh:\t0000000000000000\nCapPrm:\t000000c000001000\nCapEff:\t000000c000001000\n\
        CapBnd:\t000000c000001000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\n";

    fn situation() -> Situation {
        Situation {
            bpffs: BpffsMount::NotNeeded,
            ports: vec![
                BoundPort {
                    flag: "--healthz-bind-address",
                    port: 10266,
                },
                BoundPort {
                    flag: "--metrics-bind-address",
                    port: 9480,
                },
            ],
            first_node_port: 30000,
            unprivileged_port_start: 1024,
        }
    }

    fn missing_caps(a: &Assessment) -> Vec<Capability> {
        a.missing.iter().map(|m| m.capability).collect()
    }

    #[test]
    fn parses_the_effective_set_and_only_it() {
        let set = parse_effective(DEPLOYED_STATUS).unwrap();
        assert_eq!(set, CapabilitySet::of(&[Bpf, NetAdmin, Perfmon]));
        assert_eq!(set.0, 0xc0_0000_1000);
        // Root with everything but CAP_SYS_RESOURCE, as on the build machines.
        let root =
            parse_effective("CapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n").unwrap();
        for cap in [NetBindService, NetAdmin, SysAdmin, Perfmon, Bpf] {
            assert!(root.contains(cap), "{cap}");
        }
        assert_eq!(
            root.0 & 1 << 24,
            0,
            "CAP_SYS_RESOURCE is the one bit missing"
        );
        // CapPrm alone is not what the kernel checks.
        assert_eq!(parse_effective("CapPrm:\t000000c000001000\n"), None);
        assert_eq!(parse_effective("CapEff:\tnot-hex\n"), None);
        assert_eq!(parse_effective(""), None);
    }

    #[test]
    fn the_deployed_set_passes() {
        let a = assess(CapabilitySet::of(&[Bpf, NetAdmin, Perfmon]), &situation());
        assert_eq!(a, Assessment::default());
    }

    #[test]
    fn each_required_capability_is_named_when_missing() {
        for (dropped, purpose) in REQUIRED {
            let rest: Vec<Capability> = REQUIRED
                .iter()
                .map(|(cap, _)| *cap)
                .filter(|cap| *cap != dropped)
                .collect();
            let effective = CapabilitySet::of(&rest);
            let a = assess(effective, &situation());
            assert_eq!(missing_caps(&a), vec![dropped]);
            assert_eq!(a.missing[0].purposes, vec![purpose.to_owned()]);
            let message = PrivilegesError::Missing {
                missing: a.missing,
                effective,
            }
            .to_string();
            assert!(
                message.starts_with(&format!("missing capabilities: {dropped} for ")),
                "{message}"
            );
        }
        let none = assess(CapabilitySet(0), &situation());
        assert_eq!(missing_caps(&none), vec![NetAdmin, Perfmon, Bpf]);
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_perfmon_and_net_admin() {
        let a = assess(CapabilitySet::of(&[SysAdmin]), &situation());
        assert_eq!(a, Assessment::default());
    }

    #[test]
    fn mounting_bpffs_needs_sys_admin_and_warns_when_it_would_not_reach_the_host() {
        let deployed = CapabilitySet::of(&[Bpf, NetAdmin, Perfmon]);
        let with_admin = CapabilitySet::of(&[Bpf, NetAdmin, Perfmon, SysAdmin]);
        for propagates in [true, false] {
            let mut s = situation();
            s.bpffs = BpffsMount::Needed { propagates };
            let a = assess(deployed, &s);
            assert_eq!(missing_caps(&a), vec![SysAdmin]);
            assert!(a.missing[0].purposes[0].contains("mount it on the host"));
        }
        let mut s = situation();
        s.bpffs = BpffsMount::Needed { propagates: true };
        assert_eq!(assess(with_admin, &s), Assessment::default());
        s.bpffs = BpffsMount::Needed { propagates: false };
        let a = assess(with_admin, &s);
        assert!(a.missing.is_empty());
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("vanish"), "{:?}", a.warnings);
    }

    #[test]
    fn low_ports_need_net_bind_service() {
        let deployed = CapabilitySet::of(&[Bpf, NetAdmin, Perfmon]);
        let mut s = situation();
        s.ports[0].port = 80;
        s.ports[1].port = 443;
        let a = assess(deployed, &s);
        assert_eq!(missing_caps(&a), vec![NetBindService]);
        assert_eq!(a.missing[0].purposes.len(), 2);
        assert!(a.missing[0].purposes[0].contains("--healthz-bind-address port 80"));
        let granted = CapabilitySet::of(&[Bpf, NetAdmin, Perfmon, NetBindService]);
        assert_eq!(assess(granted, &s), Assessment::default());
        // A lowered ip_unprivileged_port_start makes port 80 ordinary.
        s.unprivileged_port_start = 0;
        assert_eq!(assess(deployed, &s), Assessment::default());
        // Port 0 (any free port) is never privileged.
        let mut s = situation();
        s.ports[0].port = 0;
        s.unprivileged_port_start = 1024;
        assert_eq!(assess(deployed, &s), Assessment::default());
    }

    #[test]
    fn a_node_port_range_below_the_unprivileged_start_is_a_warning() {
        let deployed = CapabilitySet::of(&[Bpf, NetAdmin, Perfmon]);
        let mut s = situation();
        s.first_node_port = 80;
        let a = assess(deployed, &s);
        assert!(a.missing.is_empty());
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("starts at 80"));
        let granted = CapabilitySet::of(&[Bpf, NetAdmin, Perfmon, NetBindService]);
        assert_eq!(assess(granted, &s), Assessment::default());
    }

    #[test]
    fn mount_propagation_from_mountinfo() {
        // A systemd host: / and /sys shared, bpffs not mounted.
        let host = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    23 22 0:22 / /sys rw,nosuid shared:2 - sysfs sysfs rw\n";
        assert!(mount_is_shared(host, Path::new("/sys/fs/bpf")));
        // A container: the host's /sys/fs/bpf bound with HostToContainer (a slave mount).
        let slave = "700 650 0:70 / / rw master:3 - overlay overlay rw\n\
                     710 700 0:22 / /sys ro,nosuid - sysfs sysfs ro\n\
                     720 710 0:22 /fs/bpf /sys/fs/bpf rw master:2 - sysfs sysfs rw\n";
        assert!(!mount_is_shared(slave, Path::new("/sys/fs/bpf")));
        // The same with Bidirectional (rshared): propagates.
        let bidirectional = slave.replace("rw master:2", "rw shared:9 master:2");
        assert!(mount_is_shared(&bidirectional, Path::new("/sys/fs/bpf")));
        // `ip netns exec`: a fresh, private /sys.
        let private = "48 44 0:22 / /sys rw,relatime - sysfs sysfs rw\n";
        assert!(!mount_is_shared(private, Path::new("/sys/fs/bpf")));
        // Of two mounts on one mount point, the later (the top one) counts.
        let stacked = format!("{host}30 23 0:22 / /sys rw - sysfs sysfs rw\n");
        assert!(!mount_is_shared(&stacked, Path::new("/sys/fs/bpf")));
        // /sysfoo is not above /sys/fs/bpf.
        let lookalike = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                         23 22 0:22 / /sysfoo rw shared:2 - sysfs sysfs rw\n";
        assert!(!mount_is_shared(lookalike, Path::new("/sys/fs/bpf")));
    }

    #[test]
    fn kubernetes_names_and_bits_agree_with_the_kernel() {
        // Bits from include/uapi/linux/capability.h; names as `setpriv --list-caps` prints them.
        for (cap, bit, name) in [
            (NetBindService, 10, "NET_BIND_SERVICE"),
            (NetAdmin, 12, "NET_ADMIN"),
            (SysAdmin, 21, "SYS_ADMIN"),
            (Perfmon, 38, "PERFMON"),
            (Bpf, 39, "BPF"),
        ] {
            assert_eq!((cap.bit(), cap.kubernetes_name()), (bit, name));
            assert_eq!(cap.to_string(), format!("CAP_{name}"));
        }
    }
}
