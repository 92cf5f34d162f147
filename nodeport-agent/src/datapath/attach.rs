//! Attaching the programs to interfaces.
//!
//! With a pin directory every attachment is a bpf_link pinned at `links/<hook>.<interface>`:
//! the program stays attached when the agent exits, and a new agent swaps its program into the
//! existing link atomically (bpf_link_update), so no packet ever meets an interface without
//! a program. TC uses tcx links (Linux 6.6+); older kernels get a clsact filter, which also
//! outlives the agent but is replaced by delete-then-add.

use std::path::{Path, PathBuf};

use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use nodeport_common::programs;

use super::{Datapath, DatapathError, PinDir, Result};

/// How XDP runs on the external interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    /// In the driver, before an skb exists (the fast path; needs driver support).
    Native,
    /// In the kernel's generic receive path: works on any interface, slower.
    Generic,
}

impl XdpAttachMode {
    fn hook(self) -> &'static str {
        match self {
            Self::Native => XDP_NATIVE,
            Self::Generic => XDP_GENERIC,
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Native => Self::Generic,
            Self::Generic => Self::Native,
        }
    }

    fn aya(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

/// Which hook runs the external path on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalHook {
    /// TC on veth interfaces (kind, containerlab and other veth-based nodes), XDP elsewhere.
    Auto,
    /// XDP (in the mode of --xdp-mode), with a TC hook that redirects what XDP translated.
    Xdp,
    /// TC ingress alone: sees the kernel's skb, so packets with partial checksums (a veth
    /// peer's transmit checksum offload) and GRO/GSO packets are translated correctly.
    Tc,
}

impl ExternalHook {
    /// The hook for `interface`: `Auto` resolved by its driver.
    pub fn resolve(self, interface: &str) -> Self {
        match self {
            Self::Auto if super::ethtool::driver(interface).is_ok_and(|d| d == "veth") => Self::Tc,
            Self::Auto => Self::Xdp,
            chosen => chosen,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }
}

/// What an interface is to the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InterfaceRole {
    /// Faces clients and other nodes: XDP plus the TC ingress hook.
    External,
    /// Faces local pods: the TC ingress hook that translates their replies.
    Pod,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedInterface {
    pub name: String,
    pub role: InterfaceRole,
}

/// Names of link pins: `<hook>:<interface>`, the hook first so `ls links/` groups them.
/// bpffs refuses dots in names (reserved by the kernel) and interface names may hold dots
/// (`eth0.100`) but never `:`, so dots and `%` are %-escaped and `:` separates.
/// The XDP mode is part of the name: a link keeps the mode it was created with, so a new mode
/// means a new link.
const XDP_NATIVE: &str = "xdp_native";
const XDP_GENERIC: &str = "xdp_generic";
const TC_EXT: &str = "tc_ext";
const TC_POD: &str = "tc_pod";
/// clsact filters (pre-6.6 kernels) have no link to pin; a marker directory records them.
const NETLINK_MARKER: &str = ":netlink";

fn pin_name(hook: &str, interface: &str) -> String {
    format!(
        "{hook}:{}",
        interface.replace('%', "%25").replace('.', "%2E")
    )
}

/// `(hook, interface)` of a pin name.
fn parse_pin_name(name: &str) -> Option<(&str, String)> {
    let name = name.strip_suffix(NETLINK_MARKER).unwrap_or(name);
    let (hook, iface) = name.split_once(':')?;
    Some((hook, iface.replace("%2E", ".").replace("%25", "%")))
}

fn attach_error(interface: &str, message: impl std::fmt::Display) -> DatapathError {
    DatapathError::Attach {
        interface: interface.to_owned(),
        message: message.to_string(),
    }
}

fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl Datapath {
    /// Attaches the external path to an interface: XDP and the TC ingress hook that redirects
    /// what XDP translated, or (`ExternalHook::Tc`) the TC ingress hook alone. Returns the
    /// hook it chose. Changing hooks on an attached interface leaves no moment without a
    /// translating program: the TC program of either hook redirects what an XDP program still
    /// attached translated.
    pub fn attach_external(
        &mut self,
        interface: &str,
        mode: XdpAttachMode,
        hook: ExternalHook,
    ) -> Result<ExternalHook> {
        let hook = hook.resolve(interface);
        if hook == ExternalHook::Tc {
            self.attach_tc(interface, programs::TC_EXTERNAL_NAT, TC_EXT)?;
            for xdp in [XDP_NATIVE, XDP_GENERIC] {
                if let Some(old) = self.link_pin(xdp, interface).filter(|p| p.exists()) {
                    tracing::info!(interface, "the external hook changed from XDP to TC");
                    remove_link(&old)?;
                }
            }
            return Ok(hook);
        }
        // Before XDP: from then on, frames of other VLANs keep their tag and pass.
        use super::vlan_offload::{self, RxVlanOffload};
        match vlan_offload::disable_rx_offload(interface) {
            Ok(RxVlanOffload::AlreadyOff) => {}
            Ok(RxVlanOffload::TurnedOff) => tracing::info!(
                interface,
                "turned receive VLAN offload off, so that frames of other VLANs reach XDP \
                 with their tag and pass untouched"
            ),
            Ok(RxVlanOffload::Fixed) => tracing::warn!(
                interface,
                "receive VLAN offload cannot be turned off on this interface: frames of other \
                 VLANs arrive untagged and are load-balanced like the interface's own"
            ),
            Err(e) => tracing::warn!(
                interface,
                error = %e,
                "could not turn receive VLAN offload off: frames of other VLANs may be \
                 load-balanced like the interface's own"
            ),
        }
        self.attach_xdp(interface, mode)?;
        self.attach_tc(interface, programs::TC_EXTERNAL, TC_EXT)?;
        Ok(hook)
    }

    /// Attaches the reply hook to a pod-facing interface.
    pub fn attach_pod(&mut self, interface: &str) -> Result<()> {
        self.attach_tc(interface, programs::TC_POD, TC_POD)
    }

    fn link_pin(&self, hook: &str, interface: &str) -> Option<PathBuf> {
        self.pins
            .as_ref()
            .map(|p| p.links().join(pin_name(hook, interface)))
    }

    fn attach_xdp(&mut self, interface: &str, mode: XdpAttachMode) -> Result<()> {
        if let Some(old) = self
            .link_pin(mode.other().hook(), interface)
            .filter(|p| p.exists())
        {
            tracing::warn!(
                interface,
                from = ?mode.other(),
                to = ?mode,
                "the XDP mode changed: re-attaching (packets pass to the kernel for a moment)"
            );
            remove_link(&old)?;
        }
        let pin = self.link_pin(mode.hook(), interface);
        let prog: &mut Xdp = self.program_mut(programs::XDP_EXTERNAL)?;
        if let Some(pin) = &pin
            && let Some(link) = adopt(pin, interface)?
        {
            let link = XdpLink::try_from(link).map_err(|e| attach_error(interface, e))?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    // The pin keeps the link; our fd can go.
                    drop(prog.take_link(id));
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(interface, error = %e, "pinned XDP link is stale; attaching anew");
                    remove_pin(pin)?;
                }
            }
        }
        let id = prog.attach(interface, mode.aya()).map_err(|e| {
            let hint = match mode {
                XdpAttachMode::Native => {
                    " (if the driver has no native XDP support, run with --xdp-mode generic)"
                }
                XdpAttachMode::Generic => "",
            };
            attach_error(interface, format!("XDP in {mode:?} mode: {e}{hint}"))
        })?;
        if let Some(pin) = pin {
            let link = prog.take_link(id).map_err(|e| attach_error(interface, e))?;
            let link = FdLink::try_from(link).map_err(|e| {
                attach_error(
                    interface,
                    format!("this kernel has no bpf_link for XDP ({e}); Linux 5.9+ is needed"),
                )
            })?;
            link.pin(&pin)
                .map_err(|e| attach_error(interface, format!("pinning {}: {e}", pin.display())))?;
        }
        Ok(())
    }

    fn attach_tc(&mut self, interface: &str, program: &'static str, hook: &str) -> Result<()> {
        let pin = self.link_pin(hook, interface);
        let prog: &mut SchedClassifier = self.program_mut(program)?;
        if !tcx_supported() {
            return attach_tc_netlink(prog, interface, pin.as_deref());
        }
        if let Some(pin) = &pin
            && let Some(link) = adopt(pin, interface)?
        {
            let link =
                SchedClassifierLink::try_from(link).map_err(|e| attach_error(interface, e))?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    drop(prog.take_link(id));
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(interface, error = %e, "pinned TC link is stale; attaching anew");
                    remove_pin(pin)?;
                }
            }
        }
        let id = prog
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| attach_error(interface, format!("tcx ingress: {e}")))?;
        if let Some(pin) = pin {
            let link = prog.take_link(id).map_err(|e| attach_error(interface, e))?;
            let link = FdLink::try_from(link).map_err(|e| attach_error(interface, e))?;
            link.pin(&pin)
                .map_err(|e| attach_error(interface, format!("pinning {}: {e}", pin.display())))?;
        }
        Ok(())
    }

    /// Detaches whatever this datapath attached to `interface` in `role` (when the interface
    /// stops being ours; a vanished interface takes its links with it).
    pub fn detach_interface(&mut self, interface: &str, role: InterfaceRole) -> Result<()> {
        match &self.pins {
            Some(pins) => remove_attachment(pins, interface, role),
            None => Ok(()),
        }
    }

    /// Whether what this datapath attached to `interface` in `role` is still in place: every
    /// hook's link is pinned and still attached to the interface `ifindex`. False after
    /// `nodeport-agent detach` (the pins are gone) or a link detached by other means. The
    /// caller checks that `ifindex` is the interface's current one: a vanished interface
    /// takes its links with it, which is not what this looks for.
    pub fn attachment_intact(
        &self,
        interface: &str,
        role: InterfaceRole,
        mode: XdpAttachMode,
        hook: ExternalHook,
        ifindex: u32,
    ) -> Result<bool> {
        // Without pins the links live in this process: nothing else can remove them.
        let Some(pins) = &self.pins else {
            return Ok(true);
        };
        let hooks: &[&str] = match (role, hook.resolve(interface)) {
            (InterfaceRole::External, ExternalHook::Tc) => &[TC_EXT],
            (InterfaceRole::External, _) => &[mode.hook(), TC_EXT],
            (InterfaceRole::Pod, _) => &[TC_POD],
        };
        for hook in hooks {
            let pin = pins.links().join(pin_name(hook, interface));
            if *hook != mode.hook() && !tcx_supported() {
                // A clsact filter has no link to ask; its marker is all there is.
                if !netlink_marker(&pin).exists() {
                    return Ok(false);
                }
                continue;
            }
            let attached_to = pinned_link_ifindex(&pin).map_err(|source| DatapathError::Io {
                context: format!("reading the link {}", pin.display()),
                source,
            })?;
            if attached_to != Some(ifindex) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Interfaces with a pinned attachment, from the pin directory.
    pub fn attached_interfaces(&self) -> Result<Vec<AttachedInterface>> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        list_links(pins)
    }
}

/// Removes the links (and clsact markers) of `interface` in `role` under `pins`.
pub(super) fn remove_attachment(pins: &PinDir, interface: &str, role: InterfaceRole) -> Result<()> {
    let hooks: &[&str] = match role {
        InterfaceRole::External => &[XDP_NATIVE, XDP_GENERIC, TC_EXT],
        InterfaceRole::Pod => &[TC_POD],
    };
    for hook in hooks {
        let pin = pins.links().join(pin_name(hook, interface));
        remove_link(&pin)?;
        // On kernels without tcx the TC hook is a clsact filter recorded by a marker.
        let marker = netlink_marker(&pin);
        if marker.exists() {
            remove_link(&marker)?;
        }
    }
    Ok(())
}

/// The interface the bpf_link (XDP or tcx) pinned at `pin` is attached to: None when nothing
/// is pinned there, 0 once the link is detached (its interface gone, or `BPF_LINK_DETACH`).
/// aya's `LinkInfo` does not expose it, hence bpf(2) directly.
fn pinned_link_ifindex(pin: &Path) -> std::io::Result<Option<u32>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// The `obj` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// The `info` member of `union bpf_attr`.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: bpf(2) with an attr of the size passed; pointers in it are valid.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                std::mem::size_of::<T>(),
            )
        };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut obj = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = match bpf(BPF_OBJ_GET, &mut obj) {
        Ok(fd) => {
            // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd as i32) }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8 whose xdp and tcx
    // members both begin with the ifindex. A larger, zeroed buffer is accepted by any kernel.
    let mut info = [0u64; 32];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let bytes: &[u8] = bytemuck::cast_slice(&info);
    Ok(Some(u32::from_ne_bytes(
        bytes[16..20].try_into().expect("4 bytes"),
    )))
}

/// Opens a pinned link for adoption; None when there is none.
fn adopt(pin: &Path, interface: &str) -> Result<Option<FdLink>> {
    if !pin.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => Ok(Some(FdLink::from(pinned))),
        Err(e) => {
            tracing::warn!(interface, pin = %pin.display(), error = %e, "unreadable link pin; replacing it");
            remove_pin(pin)?;
            Ok(None)
        }
    }
}

fn remove_pin(pin: &Path) -> Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            context: format!("removing {}", pin.display()),
            source,
        }),
    }
}

/// Removes a link pin, detaching the program: a bpf_link lives while a pin or an fd holds it.
/// For a clsact marker, deletes the filter.
fn remove_link(pin: &Path) -> Result<()> {
    let name = pin.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(NETLINK_MARKER) {
        if let Some((hook, interface)) = parse_pin_name(name) {
            let program = if hook == TC_POD {
                programs::TC_POD
            } else {
                programs::TC_EXTERNAL
            };
            match tc::qdisc_detach_program(&interface, TcAttachType::Ingress, program) {
                Ok(()) => {}
                Err(e) => tracing::debug!(interface, error = %e, "clsact filter already gone"),
            }
        }
        return std::fs::remove_dir(pin).map_err(|source| DatapathError::Io {
            context: format!("removing {}", pin.display()),
            source,
        });
    } else if let Ok(pinned) = PinnedLink::from_pin(pin) {
        // Unpinning and dropping the last fd destroys the link, which detaches the program.
        let link = pinned.unpin().map_err(|source| DatapathError::Io {
            context: format!("unpinning {}", pin.display()),
            source,
        })?;
        drop(link);
        return Ok(());
    }
    remove_pin(pin)
}

/// The entries of the links directory (none when it does not exist yet).
fn link_pins(pins: &PinDir) -> Result<Vec<std::fs::DirEntry>> {
    let dir = pins.links();
    match std::fs::read_dir(&dir) {
        Ok(entries) => Ok(entries.flatten().collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(DatapathError::Io {
            context: format!("reading {}", dir.display()),
            source,
        }),
    }
}

pub(super) fn list_links(pins: &PinDir) -> Result<Vec<AttachedInterface>> {
    let mut found = Vec::new();
    for entry in link_pins(pins)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((hook, interface)) = parse_pin_name(&name) else {
            continue;
        };
        let role = match hook {
            XDP_NATIVE | XDP_GENERIC | TC_EXT => InterfaceRole::External,
            TC_POD => InterfaceRole::Pod,
            _ => continue,
        };
        let item = AttachedInterface {
            name: interface,
            role,
        };
        if !found.contains(&item) {
            found.push(item);
        }
    }
    found.sort_by(|a, b| (a.role, &a.name).cmp(&(b.role, &b.name)));
    Ok(found)
}

/// One pinned attachment, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LinkDetail {
    pub interface: String,
    pub role: &'static str,
    /// `xdp native`, `xdp generic`, `tcx ingress` or `clsact ingress`.
    pub hook: &'static str,
    /// Whether the interface exists now (a link of a vanished interface is gone with it,
    /// but its pin stays until the agent notices).
    pub interface_present: bool,
    /// The bpf_link's id and its program (none for clsact filters, which have no link).
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    pub program: Option<String>,
}

/// Every pinned attachment with its link and program, read from the pins.
pub fn link_details(pins: &PinDir) -> Result<Vec<LinkDetail>> {
    let mut found = Vec::new();
    for entry in link_pins(pins)? {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some((hook, interface)) = parse_pin_name(&file_name) else {
            continue;
        };
        let clsact = file_name.ends_with(NETLINK_MARKER);
        let (role, hook) = match (hook, clsact) {
            (XDP_NATIVE, _) => ("external", "xdp native"),
            (XDP_GENERIC, _) => ("external", "xdp generic"),
            (TC_EXT, false) => ("external", "tcx ingress"),
            (TC_EXT, true) => ("external", "clsact ingress"),
            (TC_POD, false) => ("pod", "tcx ingress"),
            (TC_POD, true) => ("pod", "clsact ingress"),
            _ => continue,
        };
        let info = (!clsact)
            .then(|| PinnedLink::from_pin(entry.path()).ok())
            .flatten()
            .and_then(|pinned| FdLink::from(pinned).info().ok());
        let program_id = info.as_ref().map(|i| i.program_id());
        let program = program_id.and_then(program_name);
        let interface_present = std::ffi::CString::new(interface.as_str())
            // SAFETY: a NUL-terminated name.
            .is_ok_and(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0);
        found.push(LinkDetail {
            interface,
            role,
            hook,
            interface_present,
            link_id: info.as_ref().map(|i| i.id()),
            program_id,
            program,
        });
    }
    found.sort_by(|a, b| (a.role, &a.interface, a.hook).cmp(&(b.role, &b.interface, b.hook)));
    Ok(found)
}

/// The name of the loaded program `id`.
fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
}

/// Removes every link pin under `pins` (used by `detach`).
pub(super) fn remove_links(pins: &PinDir) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in link_pins(pins)? {
        let path = entry.path();
        remove_link(&path)?;
        removed.push(format!("link {}", path.display()));
    }
    removed.sort();
    Ok(removed)
}

/// Where a clsact attachment for the link pin `pin` is recorded.
fn netlink_marker(pin: &Path) -> PathBuf {
    PathBuf::from(format!("{}{NETLINK_MARKER}", pin.display()))
}

/// clsact fallback for kernels without tcx: replace our filter (delete then add).
fn attach_tc_netlink(
    prog: &mut SchedClassifier,
    interface: &str,
    pin: Option<&Path>,
) -> Result<()> {
    if let Err(e) = tc::qdisc_add_clsact(interface) {
        // EEXIST: the qdisc is already there, which is fine.
        tracing::debug!(interface, error = %e, "clsact qdisc not added (probably present)");
    }
    let name = prog
        .info()
        .ok()
        .and_then(|i| i.name_as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = tc::qdisc_detach_program(interface, TcAttachType::Ingress, &name);
    let id = prog
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|e| attach_error(interface, format!("clsact ingress: {e}")))?;
    // The filter outlives the agent by itself; forget the link so dropping it does not detach.
    std::mem::forget(prog.take_link(id));
    if let Some(pin) = pin {
        let marker = netlink_marker(pin);
        // A bpffs directory accepts no regular files; record the marker in the name of an
        // empty directory instead.
        std::fs::create_dir_all(&marker).map_err(|source| DatapathError::Io {
            context: format!("recording {}", marker.display()),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_have_no_dots_and_round_trip() {
        for iface in ["eth0", "eth0.100", "weird%name", "a.b.c"] {
            let name = pin_name(TC_POD, iface);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(parse_pin_name(&name), Some((TC_POD, iface.to_owned())));
            let marker = format!("{name}{NETLINK_MARKER}");
            assert_eq!(parse_pin_name(&marker), Some((TC_POD, iface.to_owned())));
        }
    }
}
