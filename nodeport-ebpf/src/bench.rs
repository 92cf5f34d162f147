//! Benchmark entry points (feature `bench`): restore the packet from a template, then run the
//! same code as production. See nodeport_common::bench for why.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    helpers::bpf_xdp_adjust_meta,
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};
use nodeport_common::bench::{BenchTemplate, FRAME_LEN};

use nodeport_common::{CT_DIR_FORWARD, CT_DIR_REPLY, CtEntry, CtKey};

use crate::{
    maps::{NP_CT, NP_CT_NEW},
    packet::{ETH_HLEN, IP_SADDR_OFF, ptr_at},
};

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

/// The forward and reply keys of the template's (new) connection, taken from the packet as
/// restored: the source varies per repetition. The reply key is the forward key reversed,
/// which no connection of the bench holds either.
#[inline(always)]
fn floor_keys(ctx: &XdpContext) -> Option<(CtKey, CtKey)> {
    let flow = <XdpContext as crate::frame::Frame>::parse(ctx).ok()?;
    let forward = crate::conntrack::key(&flow, CT_DIR_FORWARD);
    let reply = CtKey {
        saddr_be: forward.daddr_be,
        daddr_be: forward.saddr_be,
        sport_be: forward.dport_be,
        dport_be: forward.sport_be,
        dir: CT_DIR_REPLY,
        ..forward
    };
    Some((forward, reply))
}

#[xdp]
pub fn np_bench_ct_floor(ctx: XdpContext) -> u32 {
    restore(&ctx);
    let Some((forward, reply)) = floor_keys(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    if NP_CT.get_ptr(&forward).is_some()
        || NP_CT_NEW.get_ptr(&forward).is_some()
        || NP_CT.get_ptr(&reply).is_some()
    {
        return xdp_action::XDP_DROP;
    }
    let entry = CtEntry {
        last_seen: crate::conntrack::now(),
        ..CtEntry::default()
    };
    let noexist = u64::from(aya_ebpf::bindings::BPF_NOEXIST);
    if NP_CT_NEW.insert(&reply, &entry, noexist).is_err()
        || NP_CT_NEW.insert(&forward, &entry, 0).is_err()
    {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn np_bench_ct_absent(ctx: XdpContext) -> u32 {
    restore(&ctx);
    let Some((forward, reply)) = floor_keys(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    if NP_CT.get_ptr(&forward).is_some() || NP_CT.get_ptr(&reply).is_some() {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn np_bench_restore(ctx: XdpContext) -> u32 {
    restore(&ctx);
    xdp_action::XDP_PASS
}

/// The TC programs the TC entry points go on to (set by the bench): a tail call, so the
/// production program keeps its own code (inlined into a second entry point, its stack frame
/// would change and could pass the verifier's limit).
#[map]
static NP_BENCH_TC_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// The TC hook's restore: the template back into the skb (linear in BPF_PROG_TEST_RUN).
#[inline(always)]
fn restore_skb(ctx: &TcContext) {
    let Some(template) = NP_BENCH.get(0) else {
        return;
    };
    let Some(frame) = ptr_at::<[u8; FRAME_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return;
    };
    // SAFETY: bounds-checked above.
    unsafe { *frame = template.frame };
}

/// Template restore, then the production TC external path (`np_tc_ext_nat`, slot 0).
#[classifier]
pub fn np_bench_tc_ext(ctx: TcContext) -> i32 {
    restore_skb(&ctx);
    // SAFETY: a tail call into a program of this object.
    unsafe { NP_BENCH_TC_PROGS.tail_call(&ctx, 0) };
    TC_ACT_SHOT
}

/// Template restore, then a trivial TC program (`np_tc_drain`, slot 1) by the same tail call.
#[classifier]
pub fn np_bench_tc_restore(ctx: TcContext) -> i32 {
    restore_skb(&ctx);
    // SAFETY: as above.
    unsafe { NP_BENCH_TC_PROGS.tail_call(&ctx, 1) };
    TC_ACT_SHOT
}
