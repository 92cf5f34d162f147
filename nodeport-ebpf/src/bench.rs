//! Benchmark entry points (feature `bench`): restore the packet from a template, then run the
//! same code as production. See nodeport_common::bench for why.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_meta,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use nodeport_common::bench::{BenchTemplate, FRAME_LEN};

use crate::packet::{ETH_HLEN, IP_SADDR_OFF, ptr_at};

#[map]
static NP_BENCH: Array<BenchTemplate> = Array::with_max_entries(1, 0);

#[map]
static NP_BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Offset of the IPv4 source address in a template frame.
const SADDR_OFF: usize = ETH_HLEN + IP_SADDR_OFF;
/// New clients come from 100.64.0.0/10 (the FIB lookup does not care where they are).
const CLIENT_BASE: u32 = 0x6440_0000;

#[inline(always)]
fn restore(ctx: &XdpContext) {
    // Metadata left by the previous repetition (the pointers are not reset either). Called
    // every time, also with 0, so the restore-only baseline pays the same helper call and the
    // subtraction leaves only the path's own cost.
    let meta_len = ctx.data() - ctx.metadata();
    // SAFETY: shrinking the metadata back to nothing.
    unsafe { bpf_xdp_adjust_meta(ctx.ctx, meta_len as i32) };
    let Some(template) = NP_BENCH.get(0) else {
        return;
    };
    let Some(frame) = ptr_at::<[u8; FRAME_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return;
    };
    // SAFETY: bounds-checked above.
    unsafe { *frame = template.frame };
    if template.vary_client != 0 {
        if let (Some(seq), Some(saddr)) = (
            NP_BENCH_SEQ.get_ptr_mut(0),
            ptr_at::<u32>(ctx.data(), ctx.data_end(), SADDR_OFF),
        ) {
            // SAFETY: a per-CPU slot and a bounds-checked address field.
            unsafe {
                *seq = (*seq).wrapping_add(1);
                *saddr = (CLIENT_BASE + (*seq & 0x003f_ffff)).to_be();
            }
        }
    }
}

#[xdp]
pub fn np_bench_ext(ctx: XdpContext) -> u32 {
    restore(&ctx);
    crate::xdp_ext_verdict(&ctx)
}

/// The new-connection program alone, as `np_xdp_ext` tail-calls it: the difference to
/// `np_bench_ext` on the same first packet is the tail call and the lookups before it.
#[xdp]
pub fn np_bench_new(ctx: XdpContext) -> u32 {
    restore(&ctx);
    <XdpContext as crate::frame::Frame>::verdict(crate::ext::process_new(&ctx))
}

#[xdp]
pub fn np_bench_restore(ctx: XdpContext) -> u32 {
    restore(&ctx);
    xdp_action::XDP_PASS
}
