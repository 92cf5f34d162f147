//! The eBPF object embedded at build time (see build.rs).

use super::{DatapathError, Result};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport.bpf.o"));

/// The embedded object, or an error telling how to build a binary that has one.
pub fn embedded() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        Err(DatapathError::NoEmbeddedObject)
    } else {
        Ok(OBJECT)
    }
}
