//! Receive VLAN offload on external interfaces.
//!
//! With receive VLAN offload (`rx-vlan-offload`, on by default on most NICs), the NIC strips
//! the 802.1Q tag before XDP runs and hands it beside the frame. XDP then sees an untagged
//! IPv4 frame of VLAN 42 and would load-balance it on the untagged interface's addresses. The
//! datapath passes frames that still carry their tag (counter `vlan`), so the agent turns the
//! offload off on the interfaces it attaches XDP to: the tag stays in the frame, XDP passes it,
//! and the kernel untags it for the VLAN device (in software, a small cost for VLAN traffic).
//!
//! Reading the stripped tag in XDP instead (`bpf_xdp_metadata_rx_vlan_tag`, Linux 6.8) needs a
//! device-bound program and kfunc relocations, which aya 0.14 does not support.
//!
//! The legacy ethtool flags interface (ETHTOOL_GFLAGS/SFLAGS) is used: its RXVLAN flag is
//! `NETIF_F_HW_VLAN_CTAG_RX`, and it needs no feature-name lookup.

use std::io;

use super::ethtool::{self, ethtool};

const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
/// `ETH_FLAG_RXVLAN`: receive VLAN offload (`NETIF_F_HW_VLAN_CTAG_RX`).
const ETH_FLAG_RXVLAN: u32 = 1 << 8;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// What `disable_rx_offload` found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxVlanOffload {
    /// It was off (or the driver never strips tags).
    AlreadyOff,
    /// It was on; the agent turned it off.
    TurnedOff,
    /// It is on and the driver cannot turn it off.
    Fixed,
}

/// Turns receive VLAN offload off on `interface` (needs CAP_NET_ADMIN).
pub fn disable_rx_offload(interface: &str) -> io::Result<RxVlanOffload> {
    let fd = ethtool::socket()?;
    let mut flags = EthtoolValue {
        cmd: ETHTOOL_GFLAGS,
        data: 0,
    };
    match ethtool(&fd, interface, &mut flags) {
        Ok(()) => {}
        // No ethtool support at all (some virtual devices): nothing strips tags there.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            return Ok(RxVlanOffload::AlreadyOff);
        }
        Err(e) => return Err(e),
    }
    if flags.data & ETH_FLAG_RXVLAN == 0 {
        return Ok(RxVlanOffload::AlreadyOff);
    }
    let mut set = EthtoolValue {
        cmd: ETHTOOL_SFLAGS,
        data: flags.data & !ETH_FLAG_RXVLAN,
    };
    match ethtool(&fd, interface, &mut set) {
        Ok(()) => {}
        // The kernel answers EINVAL or EOPNOTSUPP for a feature the driver cannot change.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
            ) =>
        {
            return Ok(RxVlanOffload::Fixed);
        }
        Err(e) => return Err(e),
    }
    // A driver may accept the request and keep the feature (netdev_update_features).
    let mut check = EthtoolValue {
        cmd: ETHTOOL_GFLAGS,
        data: 0,
    };
    ethtool(&fd, interface, &mut check)?;
    Ok(if check.data & ETH_FLAG_RXVLAN == 0 {
        RxVlanOffload::TurnedOff
    } else {
        RxVlanOffload::Fixed
    })
}
