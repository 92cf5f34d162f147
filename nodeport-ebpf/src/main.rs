//! The nodeport datapath: one object with the XDP and TC programs (see docs/datapath.md).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

mod answer;
#[cfg(feature = "bench")]
mod bench;
mod conntrack;
mod ext;
mod fib;
mod frag;
mod frame;
mod icmp;
mod maps;
mod nat;
mod packet;
mod select;
mod snat;
mod stats;
mod tc_ext;
mod tc_pod;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use frame::Frame;

/// XDP on external interfaces.
#[xdp]
pub fn np_xdp_ext(ctx: XdpContext) -> u32 {
    xdp_ext_verdict(&ctx)
}

/// A new connection's first packet, tail-called from `np_xdp_ext`.
#[xdp]
pub fn np_xdp_new(ctx: XdpContext) -> u32 {
    XdpContext::verdict(ext::process_new(&ctx))
}

/// In `np_xdp_new`'s slot while the datapath drains (`--datapath-switch` off): a new
/// connection's first packet goes to the kernel, where kube-proxy's rules take it. Swapping the
/// slot leaves the established path (and its stack) as it is.
#[xdp]
pub fn np_xdp_drain(_ctx: XdpContext) -> u32 {
    stats::count(nodeport_common::Counter::PassedDraining);
    xdp_action::XDP_PASS
}

/// Runs the external path in XDP and counts the packet's fate.
#[inline(always)]
fn xdp_ext_verdict(ctx: &XdpContext) -> u32 {
    XdpContext::verdict(ext::process(ctx))
}

/// TC ingress on external interfaces beside XDP: redirects what XDP translated.
#[classifier]
pub fn np_tc_ext(ctx: TcContext) -> i32 {
    tc_ext::redirect_translated(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

/// TC ingress on external interfaces without XDP (`--external-hook tc`): the external path
/// itself, and what an XDP program still attached translated (while the hooks change over).
#[classifier]
pub fn np_tc_ext_nat(ctx: TcContext) -> i32 {
    match tc_ext::redirect_translated(&ctx) {
        Some(action) => action,
        None => TcContext::verdict(ext::process(&ctx)) as i32,
    }
}

/// A new connection's first packet, tail-called from `np_tc_ext_nat`.
#[classifier]
pub fn np_tc_new(ctx: TcContext) -> i32 {
    TcContext::verdict(ext::process_new(&ctx)) as i32
}

/// `np_xdp_drain` for the TC hook, in `np_tc_new`'s slot while the datapath drains.
#[classifier]
pub fn np_tc_drain(_ctx: TcContext) -> i32 {
    stats::count(nodeport_common::Counter::PassedDraining);
    TC_ACT_UNSPEC
}

/// TC ingress on pod-facing interfaces.
#[classifier]
pub fn np_tc_pod(ctx: TcContext) -> i32 {
    tc_pod::process(&ctx)
}

/// The baseline of `cargo xtask bench`: what a bare XDP program costs.
#[xdp]
pub fn np_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

// The crate's license (MIT OR GPL-2.0-only), in the words the kernel takes for GPL-compatible:
// GPL-only helpers stay available, as with "GPL".
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
