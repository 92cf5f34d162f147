//! Types and pure helpers shared by the nodeport eBPF programs and the agent.
//!
//! Everything here is `no_std` and allocation-free so the kernel side can use it. Map keys and
//! values are `#[repr(C)]` with explicit padding; `bytemuck::Pod` rejects any implicit padding at
//! compile time and the `const` size assertions pin the layout both sides rely on. Fields in
//! network byte order end in `_be`.
//!
//! See docs/datapath.md for how the maps fit together.
#![no_std]

pub mod bench;
pub mod checksum;
pub mod counters;
pub mod hash;
pub mod maps;

pub use counters::{COUNTER_SLOTS, Counter};
pub use maps::*;

/// IP protocol numbers the datapath handles.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
