//! Building the eBPF object (docs/building.md).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{
    prereqs::BpfToolchain,
    util::{cargo, run, workspace_root},
};

const TARGET: &str = "bpfel-unknown-none";

/// Which object: the datapath, or the datapath plus the benchmark entry points.
#[derive(Clone, Copy)]
pub enum Flavour {
    Datapath,
    Bench,
}

/// Builds the object and returns its path.
pub fn build(toolchain: &BpfToolchain, flavour: Flavour) -> Result<PathBuf> {
    // A target directory of its own: the host build uses another rustc, and sharing one
    // directory would make the two rebuild each other's dependencies.
    let (target_dir, features) = match flavour {
        Flavour::Datapath => ("target/ebpf", None),
        Flavour::Bench => ("target/ebpf-bench", Some("bench")),
    };
    let mut build = cargo();
    match toolchain {
        BpfToolchain::Debian => {
            // RUSTC_BOOTSTRAP only for aya-ebpf, which needs asm_experimental_arch; a global
            // RUSTC_BOOTSTRAP=1 would make the build ask for build-std and rust-src.
            build
                .env("RUSTC", "/usr/bin/rustc")
                .env("RUSTC_BOOTSTRAP", "aya_ebpf");
            build.arg("build");
        }
        BpfToolchain::Nightly => {
            build = std::process::Command::new("rustup");
            build.current_dir(workspace_root());
            build.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
        }
    }
    build.args([
        "--package",
        "nodeport-ebpf",
        "--release",
        "--target",
        TARGET,
    ]);
    if let Some(features) = features {
        build.args(["--features", features]);
    }
    build.env("CARGO_TARGET_DIR", workspace_root().join(target_dir));
    println!("xtask: building the eBPF object ({target_dir})");
    run(&mut build).context("building the eBPF programs")?;
    Ok(workspace_root()
        .join(target_dir)
        .join(TARGET)
        .join("release/nodeport"))
}
