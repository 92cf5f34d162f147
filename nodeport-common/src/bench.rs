//! Shared with the benchmark build of the datapath (`cargo xtask bench`, feature `bench` of
//! nodeport-ebpf): BPF_PROG_TEST_RUN repeats a program on the same buffer without restoring it,
//! so a program that rewrites packets would measure its own output from the second repetition
//! on. The bench entry points first copy this template back into the packet.

use bytemuck::{Pod, Zeroable};

pub const TEMPLATE_MAP: &str = "NP_BENCH";
/// The program array of the TC entry points.
pub const TC_PROGRAMS_MAP: &str = "NP_BENCH_TC_PROGS";
/// The benchmark frames are exactly this long.
pub const FRAME_LEN: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct BenchTemplate {
    pub frame: [u8; FRAME_LEN],
    /// Non-zero: give every repetition another client address (a new flow each time).
    pub vary_client: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] bytemuck::Pod.
unsafe impl aya::Pod for BenchTemplate {}

pub mod programs {
    /// Template restore, then the production XDP path.
    pub const XDP_EXTERNAL: &str = "np_bench_ext";
    /// Template restore, then the new-connection program (`np_xdp_new`) without the tail call.
    pub const XDP_NEW_CONNECTION: &str = "np_bench_new";
    /// Template restore, then only the conntrack operations every new connection needs (the
    /// forward key looked up in both tables, the reply key in the established one, two
    /// inserts into the handshake table): the floor under the new-flow figure.
    pub const CONNTRACK_FLOOR: &str = "np_bench_ct_floor";
    /// Template restore, then the forward and the reply key looked up in the established
    /// table alone (both absent).
    pub const ESTABLISHED_ABSENT: &str = "np_bench_ct_absent";
    /// Template restore, then XDP_PASS: the cost of the restore itself.
    pub const RESTORE_ONLY: &str = "np_bench_restore";
    /// Template restore, then a tail call into the production TC external path
    /// (`np_tc_ext_nat`, slot 0 of [`super::TC_PROGRAMS_MAP`]).
    pub const TC_EXTERNAL: &str = "np_bench_tc_ext";
    /// Template restore, then the same tail call into a trivial program (`np_tc_drain`,
    /// slot 1): the baseline of the TC figures.
    pub const TC_RESTORE_ONLY: &str = "np_bench_tc_restore";
}
