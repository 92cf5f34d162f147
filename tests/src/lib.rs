//! Test harness: network namespaces, packets, and the datapath fixture. The tests themselves
//! are in `tests/`; those that need root are `#[ignore]`d under plain `cargo test` and run by
//! `cargo xtask test`, which fails loudly when not root.

pub mod agent;
pub mod fixture;
pub mod flood;
pub mod kube_proxy;
pub mod lab;
pub mod monitoring;
pub mod netns;
pub mod packet;
pub mod servers;
