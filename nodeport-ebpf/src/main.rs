//! The nodeport datapath: one object with the XDP and TC programs (see docs/datapath.md).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

#[cfg(feature = "bench")]
mod bench;
mod conntrack;
mod fib;
mod frag;
mod icmp;
mod maps;
mod nat;
mod packet;
mod select;
mod snat;
mod stats;
mod tc_ext;
mod tc_pod;
mod xdp_ext;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use nodeport_common::counters::CounterKind;

/// XDP on external interfaces.
#[xdp]
pub fn np_xdp_ext(ctx: XdpContext) -> u32 {
    xdp_ext_verdict(&ctx)
}

/// A new connection's first packet, tail-called from `np_xdp_ext`.
#[xdp]
pub fn np_xdp_new(ctx: XdpContext) -> u32 {
    xdp_verdict(xdp_ext::process_new(&ctx))
}

/// In `np_xdp_new`'s slot while the datapath drains (`--datapath-switch` off): a new
/// connection's first packet goes to the kernel, where kube-proxy's rules take it. Swapping the
/// slot leaves the established path (and its stack) as it is.
#[xdp]
pub fn np_xdp_drain(_ctx: XdpContext) -> u32 {
    stats::count(nodeport_common::Counter::PassedDraining);
    xdp_action::XDP_PASS
}

/// Runs the external path and counts the packet's fate.
#[inline(always)]
fn xdp_ext_verdict(ctx: &XdpContext) -> u32 {
    xdp_verdict(xdp_ext::process(ctx))
}

/// Counts a packet's fate, exactly once (a tail call leaves its caller's counting to the
/// program it went to): the one place where an outcome becomes an action.
#[inline(always)]
fn xdp_verdict(outcome: Result<xdp_ext::Verdict, nodeport_common::Counter>) -> u32 {
    let (action, counter) = match outcome {
        Ok(verdict) => verdict,
        Err(counter) if counter.kind() == CounterKind::Dropped => (xdp_action::XDP_DROP, counter),
        Err(counter) => (xdp_action::XDP_PASS, counter),
    };
    stats::count(counter);
    action
}

/// TC ingress on external interfaces.
#[classifier]
pub fn np_tc_ext(ctx: TcContext) -> i32 {
    tc_ext::process(&ctx)
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

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
