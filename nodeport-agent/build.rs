//! Embeds the eBPF object built by `cargo xtask build` (which sets NODEPORT_EBPF_OBJECT).
//! Without it the agent still builds, so `cargo build`/`clippy`/`test` need no BPF toolchain;
//! such a binary says so when asked to load the datapath.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=NODEPORT_EBPF_OBJECT");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("nodeport.bpf.o");
    match env::var_os("NODEPORT_EBPF_OBJECT") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            fs::copy(&path, &out)
                .unwrap_or_else(|e| panic!("copying the eBPF object {}: {e}", path.display()));
        }
        None => fs::write(&out, []).expect("writing the empty eBPF object placeholder"),
    }
}
