//! The BPF toolchain: what the eBPF crate needs and how to get it.
//!
//! The programs compile for `bpfel-unknown-none`, which rustup ships no `core` for. Two ways
//! work (docs/building.md):
//! - Debian's `rustc-web` with `libstd-rust-web-dev-bpf` (a prebuilt core for BPF) and a
//!   bpf-linker built against the same LLVM major. Installed here automatically when running
//!   as root on Debian/Ubuntu.
//! - The upstream aya way: a nightly toolchain with rust-src (`-Z build-std=core`) and
//!   bpf-linker. Selected with NODEPORT_BPF_TOOLCHAIN=nightly; never installed automatically.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{cmd, is_root, run, stdout_of, target_dir};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// How the eBPF crate gets compiled.
pub enum BpfToolchain {
    /// Debian's rustc with its prebuilt BPF core.
    Debian,
    /// `cargo +nightly` with `-Z build-std=core`.
    Nightly,
}

/// The LLVM major version a rustc was built with ("LLVM version: 22.1.8" -> 22).
fn llvm_major(rustc: &str) -> Result<u32> {
    let info = stdout_of(Command::new(rustc).arg("-vV"))?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .with_context(|| format!("{rustc} -vV does not say its LLVM version"))?;
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("LLVM version {version:?}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

/// The LLVM feature the installed bpf-linker was built with, from cargo's install records.
fn bpf_linker_llvm() -> Option<u32> {
    let records = std::fs::read_to_string(cargo_home().join(".crates2.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&records).ok()?;
    let installs = json.get("installs")?.as_object()?;
    let (_, entry) = installs
        .iter()
        .find(|(k, _)| k.starts_with("bpf-linker "))?;
    entry
        .get("features")?
        .as_array()?
        .iter()
        .find_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_debian_like() -> bool {
    Path::new("/etc/debian_version").exists() && have("apt-get")
}

fn apt_install(packages: &[&str]) -> Result<()> {
    println!("xtask: installing Debian packages: {}", packages.join(" "));
    run(cmd("apt-get").arg("update").arg("-q"))?;
    run(cmd("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn manual_steps(llvm: Option<u32>) -> String {
    let llvm = llvm.map_or("<N>".to_owned(), |v| v.to_string());
    format!(
        "The eBPF programs need a compiler for bpfel-unknown-none and bpf-linker.\n\
         Either (Debian/Ubuntu with the bookworm-security rustc-web, as root):\n\
         \x20   apt-get install rustc-web libstd-rust-web-dev-bpf llvm-{llvm}-dev iproute2 ethtool\n\
         \x20   LLVM_PREFIX=/usr/lib/llvm-{llvm} cargo install bpf-linker --version {BPF_LINKER_VERSION} \
         --locked --no-default-features --features llvm-{llvm}\n\
         \x20   (where {llvm} is the LLVM major of `/usr/bin/rustc -vV`; `cargo xtask` does all this \
         itself when run as root)\n\
         or (anywhere, the upstream aya way):\n\
         \x20   rustup toolchain install nightly --component rust-src\n\
         \x20   cargo install bpf-linker\n\
         \x20   NODEPORT_BPF_TOOLCHAIN=nightly cargo xtask build"
    )
}

/// iptables, for kube-proxy's rules: the root test of nodeport next to them
/// (tests/tests/kube_proxy.rs) and the benchmark's comparison. Debian's package brings both
/// backends (`iptables-legacy-restore`, `iptables-nft-restore`).
pub fn ensure_iptables() -> Result<()> {
    if have("iptables") && have("iptables-legacy-restore") && have("iptables-nft-restore") {
        return Ok(());
    }
    if !(is_root() && is_debian_like()) {
        bail!(
            "the test next to kube-proxy's rules and the benchmark need iptables \
             (iptables, iptables-legacy-restore); install it and run again"
        );
    }
    apt_install(&["iptables"])
}

/// Debian's `ab` (apache2-utils), `iperf3` and `curl`: real clients of the end-to-end tests
/// (tests/tests/conntrack.rs, tests/tests/e2e.rs).
pub fn ensure_test_clients() -> Result<()> {
    if have("ab") && have("iperf3") && have("curl") {
        return Ok(());
    }
    if !(is_root() && is_debian_like()) {
        bail!(
            "the end-to-end tests run `ab`, `iperf3` and `curl` \
             (Debian: apache2-utils, iperf3, curl); install them and run again"
        );
    }
    apt_install(&["apache2-utils", "iperf3", "curl"])
}

/// promtool, for the tests of the monitoring (tests/tests/monitoring.rs: the alert rules and
/// their `promtool test rules` fixtures, the dashboard's queries; the end-to-end test of the
/// agent's /metrics). It comes with Debian's `prometheus` package. Installing that package
/// would also install a Prometheus server, which a machine with systemd then starts; the
/// tests need only promtool, so the package is fetched with `apt-get download` and unpacked
/// under target/ instead (nothing installed, no service). `promtool` already on the PATH is
/// used as it is. Returns its path, which the tests read from NODEPORT_PROMTOOL.
pub fn ensure_promtool() -> Result<PathBuf> {
    if let Ok(path) = stdout_of(cmd("sh").args(["-c", "command -v promtool"])) {
        let path = path.trim();
        if !path.is_empty() {
            return Ok(PathBuf::from(path));
        }
    }
    let root = target_dir().join("prereqs");
    let unpacked = root.join("prometheus");
    let promtool = unpacked.join("usr/bin/promtool");
    if promtool.exists() {
        return Ok(promtool);
    }
    if !(is_root() && is_debian_like()) {
        bail!(
            "the monitoring tests need promtool, from Debian's `prometheus` package \
             (`apt-get install prometheus`, or any promtool on the PATH); install it and run again"
        );
    }
    println!(
        "xtask: unpacking promtool from Debian's prometheus package into {}",
        unpacked.display()
    );
    let download = root.join("download");
    std::fs::create_dir_all(&download)?;
    run(cmd("apt-get").arg("update").arg("-q"))?;
    run(cmd("apt-get")
        .args(["download", "-q", "prometheus"])
        .current_dir(&download))?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("prometheus_") && n.ends_with(".deb"))
        })
        .context("apt-get download prometheus left no .deb")?;
    run(cmd("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let _ = std::fs::remove_dir_all(&download);
    if !promtool.exists() {
        bail!("{} has no usr/bin/promtool", deb.display());
    }
    Ok(promtool)
}

/// kubectl, for `kubectl kustomize`: the deploy tests render every overlay of deploy/overlays
/// with it (nodeport-agent/tests/deploy_manifests.rs), and `cargo xtask manifests` renders
/// deploy/nodeport.yaml. The kustomizations use kustomize v4+ syntax (directories under
/// `resources:`, `patches:`), which kubectl embeds from 1.21 on. Debian's own package,
/// `kubernetes-client`, is kubectl 1.20 with kustomize v2.0.3 (bookworm), which cannot read
/// them, so it is no fallback: a kubectl on the PATH is required (the project's machines have
/// one). Returns its path, which the tests read from NODEPORT_KUBECTL.
pub fn ensure_kubectl() -> Result<PathBuf> {
    const HOW: &str = "install kubectl 1.21 or newer (kubectl's own packages; Debian bookworm's \
                       kubernetes-client is kubectl 1.20, whose kustomize v2.0.3 cannot read \
                       deploy/overlays) and run again";
    let path = stdout_of(cmd("sh").args(["-c", "command -v kubectl"]))
        .ok()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .with_context(|| {
            format!("the deploy tests render deploy/ with `kubectl kustomize`: {HOW}")
        })?;
    let version = stdout_of(cmd(&path).args(["version", "--client"]))?;
    match kustomize_major(&version) {
        Some(major) if major >= 4 => Ok(PathBuf::from(path)),
        _ => bail!(
            "{path} embeds no kustomize v4 or newer (`kubectl version --client` says: {}): {HOW}",
            version.trim()
        ),
    }
}

/// The major version of the kustomize a `kubectl version --client` names ("Kustomize Version:
/// v5.5.0" -> 5); None for kubectl before 1.24, which does not say.
fn kustomize_major(version: &str) -> Option<u32> {
    version
        .lines()
        .find_map(|l| l.trim().strip_prefix("Kustomize Version: v"))?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Makes sure the eBPF crate can be built, installing what is missing when allowed.
pub fn ensure() -> Result<BpfToolchain> {
    if std::env::var("NODEPORT_BPF_TOOLCHAIN").as_deref() == Ok("nightly") {
        if !have("bpf-linker") {
            bail!(
                "NODEPORT_BPF_TOOLCHAIN=nightly but bpf-linker is not installed.\n{}",
                manual_steps(None)
            );
        }
        return Ok(BpfToolchain::Nightly);
    }
    ensure_debian_toolchain()?;
    Ok(BpfToolchain::Debian)
}

fn ensure_debian_toolchain() -> Result<()> {
    let mut missing = Vec::new();
    if !Path::new(DEBIAN_RUSTC).exists() {
        missing.push("rustc-web");
    }
    if !Path::new(BPF_CORE).exists() {
        missing.push("libstd-rust-web-dev-bpf");
    }
    if !have("ip") {
        missing.push("iproute2");
    }
    // The test and demo namespaces set veth offloads with it.
    if !have("ethtool") {
        missing.push("ethtool");
    }
    if !missing.is_empty() {
        if !(is_root() && is_debian_like()) {
            bail!("missing: {}.\n{}", missing.join(", "), manual_steps(None));
        }
        apt_install(&missing)?;
    }

    let llvm = llvm_major(DEBIAN_RUSTC)?;
    if bpf_linker_llvm() == Some(llvm) && have("bpf-linker") {
        return Ok(());
    }
    if !(is_root() && is_debian_like()) {
        bail!(
            "bpf-linker built for LLVM {llvm} (the LLVM of {DEBIAN_RUSTC}) is not installed.\n{}",
            manual_steps(Some(llvm))
        );
    }
    let llvm_dev = format!("llvm-{llvm}-dev");
    let prefix = format!("/usr/lib/llvm-{llvm}");
    if !Path::new(&prefix).join("lib/libLLVM.so").exists() {
        apt_install(&[&llvm_dev])?;
    }
    println!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (a few minutes, once)"
    );
    run(cmd("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm}"),
        ])
        .env("LLVM_PREFIX", &prefix))
    .with_context(|| {
        format!(
            "building bpf-linker for LLVM {llvm} failed; if bpf-linker {BPF_LINKER_VERSION} has no \
             llvm-{llvm} feature, Debian's rustc moved to a newer LLVM: see docs/building.md"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::kustomize_major;

    #[test]
    fn kustomize_version_from_kubectl() {
        let modern = "Client Version: v1.32.4\nKustomize Version: v5.5.0\n";
        assert_eq!(kustomize_major(modern), Some(5));
        // kubectl 1.20 (Debian bookworm's kubernetes-client) names no kustomize.
        let old = "Client Version: version.Info{Major:\"1\", Minor:\"20\"}\n";
        assert_eq!(kustomize_major(old), None);
    }
}
