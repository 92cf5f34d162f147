//! `cargo xtask`: the project's tasks. It orchestrates (toolchain, builds, root tests,
//! namespaces for the demo, benchmarks); product logic lives in the crates.

mod ebpf;
mod prereqs;
mod util;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use util::{cargo, is_root, run, target_dir, workspace_root};

#[derive(Parser)]
#[command(about = "nodeport's build, test, benchmark and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (as root on Debian/Ubuntu), build the eBPF object and the
    /// agent with it embedded: target/release/nodeport-agent.
    Build {
        /// Link the agent statically (glibc's static libc, `-C target-feature=+crt-static`), for
        /// an image with nothing but the binary: target/<host triple>/release/nodeport-agent.
        #[arg(long = "static")]
        statically: bool,
    },
    /// Everything: formatting, clippy, host tests and the root tests (BPF test runs, network
    /// namespaces). Needs root, and says so instead of skipping.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        skip_lint: bool,
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure the datapath, the agent, and nodeport against kube-proxy's iptables rules
    /// (needs root); results go to bench/results/, the comparison to bench/REPORT.md and
    /// bench/plots/. NODEPORT_BENCH_ONLY=datapath|agent|snat|compare runs one part,
    /// NODEPORT_BENCH_QUICK=1 a short pass (see bench/src/main.rs).
    Bench,
    /// Render deploy/nodeport.yaml from deploy/overlays/next-to-kube-proxy with `kubectl
    /// kustomize` (the deploy tests fail while it differs).
    Manifests,
    /// Show nodeport at work: a little cluster in network namespaces, the agent on
    /// examples/, real traffic, a live endpoint change and an agent restart (needs root).
    Demo,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Build { statically } => {
            let agent = build_agent(statically)?;
            println!("xtask: built {}", agent.display());
            Ok(())
        }
        Task::Test { skip_lint, filter } => test(skip_lint, filter),
        Task::Manifests => manifests(),
        Task::Bench => bench(),
        Task::Demo => demo(),
    }
}

/// Builds the eBPF object, then the agent with it embedded. Returns the agent binary.
fn build_agent(statically: bool) -> Result<std::path::PathBuf> {
    let toolchain = prereqs::ensure()?;
    let object = ebpf::build(&toolchain, ebpf::Flavour::Datapath)?;
    let mut build = cargo();
    build
        .args(["build", "--release", "--package", "nodeport-agent"])
        .env("NODEPORT_EBPF_OBJECT", &object);
    if !statically {
        run(&mut build)?;
        return Ok(target_dir().join("release/nodeport-agent"));
    }
    // An explicit --target keeps the flag away from build scripts and proc macros, which must
    // stay dynamic (a proc macro is a shared library).
    let host = util::host_triple()?;
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(flags) if !flags.trim().is_empty() => format!("{flags} -C target-feature=+crt-static"),
        _ => "-C target-feature=+crt-static".to_owned(),
    };
    run(build.args(["--target", &host]).env("RUSTFLAGS", rustflags))?;
    Ok(target_dir().join(host).join("release/nodeport-agent"))
}

fn test(skip_lint: bool, filter: Option<String>) -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask test runs tests that need root (BPF programs, network namespaces) and \
             does not skip them: run it as root, e.g. `sudo -E cargo xtask test`"
        );
    }
    let toolchain = prereqs::ensure()?;
    prereqs::ensure_iptables()?;
    prereqs::ensure_test_clients()?;
    let promtool = prereqs::ensure_promtool()?;
    let kubectl = prereqs::ensure_kubectl()?;
    let object = ebpf::build(&toolchain, ebpf::Flavour::Datapath)?;
    if !skip_lint {
        println!("xtask: cargo fmt --check");
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        println!("xtask: cargo clippy");
        run(cargo()
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("NODEPORT_EBPF_OBJECT", &object))?;
    }
    println!("xtask: cargo test (host and root tests)");
    let mut test = cargo();
    test.args(["test", "--workspace", "--", "--include-ignored"])
        .env("NODEPORT_EBPF_OBJECT", &object)
        // The end-to-end tests run the agent binary this build produces.
        .env(
            "NODEPORT_AGENT_BIN",
            target_dir().join("debug/nodeport-agent"),
        )
        // The monitoring tests check the alerts, the dashboard and /metrics with it.
        .env("NODEPORT_PROMTOOL", &promtool)
        // The deploy tests render deploy/overlays with `kubectl kustomize`.
        .env("NODEPORT_KUBECTL", &kubectl);
    if let Some(filter) = filter {
        test.arg(filter);
    }
    run(&mut test)?;
    println!("xtask: all tests passed");
    Ok(())
}

/// The head of deploy/nodeport.yaml; the rest is `kubectl kustomize`'s output, which keeps no
/// comments (deploy/base has them).
const MANIFESTS_HEADER: &str = "\
# nodeport, the default installation (next to kube-proxy) in one file, for `kubectl apply -f`.
# Generated from deploy/overlays/next-to-kube-proxy by `cargo xtask manifests`: do not edit;
# change deploy/base (whose comments explain every field) and run it again. docs/deploying.md
# has the walkthrough.
#
#   kubectl apply -f deploy/nodeport.yaml
";

fn manifests() -> Result<()> {
    let kubectl = prereqs::ensure_kubectl()?;
    let root = workspace_root();
    let rendered = util::stdout_of(
        std::process::Command::new(kubectl)
            .arg("kustomize")
            .arg(root.join("deploy/overlays/next-to-kube-proxy")),
    )?;
    let out = root.join("deploy/nodeport.yaml");
    std::fs::write(&out, format!("{MANIFESTS_HEADER}---\n{rendered}"))?;
    println!("xtask: wrote {}", out.display());
    Ok(())
}

fn bench() -> Result<()> {
    if !is_root() {
        bail!("cargo xtask bench loads BPF programs and needs root");
    }
    let toolchain = prereqs::ensure()?;
    prereqs::ensure_iptables()?;
    // iperf3 for the offloads part.
    prereqs::ensure_test_clients()?;
    let datapath = ebpf::build(&toolchain, ebpf::Flavour::Datapath)?;
    let bench_object = ebpf::build(&toolchain, ebpf::Flavour::Bench)?;
    // The comparison runs the agent binary: the release build, with the datapath embedded.
    run(cargo()
        .args(["build", "--release", "--package", "nodeport-agent"])
        .env("NODEPORT_EBPF_OBJECT", &datapath))?;
    run(cargo()
        .args(["run", "--release", "--package", "nodeport-bench", "--"])
        .arg(workspace_root().join("bench/results"))
        .env("NODEPORT_EBPF_OBJECT", &datapath)
        .env("NODEPORT_BENCH_OBJECT", &bench_object)
        .env(
            "NODEPORT_AGENT_BIN",
            target_dir().join("release/nodeport-agent"),
        ))
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask demo creates network namespaces and loads BPF programs: run it as root, \
             e.g. `sudo -E cargo xtask demo`"
        );
    }
    let toolchain = prereqs::ensure()?;
    let object = ebpf::build(&toolchain, ebpf::Flavour::Datapath)?;
    println!("xtask: building the agent and the demo");
    run(cargo()
        .args([
            "build",
            "--package",
            "nodeport-agent",
            "--package",
            "nodeport-tests",
        ])
        .args(["--bin", "nodeport-agent", "--bin", "nodeport-demo"])
        .env("NODEPORT_EBPF_OBJECT", &object))?;
    run(
        std::process::Command::new(target_dir().join("debug/nodeport-demo")).env(
            "NODEPORT_AGENT_BIN",
            target_dir().join("debug/nodeport-agent"),
        ),
    )
}
