//! `cargo xtask demo`: nodeport on a little cluster in network namespaces, with real traffic.
//!
//! It builds the lab of the end-to-end tests (tests/src/lab.rs), starts the agent on the
//! manifests in examples/, sends requests to the node port from a client, changes endpoints
//! while traffic flows (tests/demo/web-rollout.yaml replaces examples/web.yaml), kills and
//! restarts the agent under an open connection, prints what the agent holds, and removes
//! everything (also on Ctrl-C or failure). Exits non-zero when traffic did not flow as it
//! should.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use nodeport_tests::lab::{Answer, Lab, NODE1};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops between steps after Ctrl-C; returning an error unwinds into the lab's cleanup.
fn checkpoint() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// The demo's own step: the rollout, not an example of its own (it redefines web.yaml's
/// objects).
fn rollout_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/web-rollout.yaml")
}

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

/// How a pod saw the client, in words.
fn how(answer: &Answer, lab: &Lab) -> String {
    let pod = lab.pods.iter().find(|p| p.name == answer.pod);
    match pod {
        Some(p) if p.node == 1 => format!("local pod, saw the client itself ({})", answer.seen),
        Some(_) => format!("pod on node-2, saw node-1's SNAT address {}", answer.seen),
        None => answer.seen.to_string(),
    }
}

fn requests(lab: &Lab, to: SocketAddrV4, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut spread = BTreeMap::new();
    for i in 1..=n {
        checkpoint()?;
        let answer = lab
            .ask_tcp(to)
            .with_context(|| format!("request {i} to {to} got no answer"))?;
        println!("   #{i:<2} {:<6} {}", answer.pod, how(&answer, lab));
        *spread.entry(answer.pod).or_insert(0) += 1;
    }
    let line: Vec<String> = spread.iter().map(|(p, n)| format!("{p} {n}")).collect();
    println!("   spread: {}", line.join(", "));
    Ok(spread)
}

fn run() -> Result<()> {
    let web = std::fs::read_to_string(examples().join("web.yaml"))
        .context("reading examples/web.yaml")?;
    let rollout =
        std::fs::read_to_string(rollout_file()).context("reading tests/demo/web-rollout.yaml")?;
    let to = SocketAddrV4::new(NODE1, 30080);

    step(1, "Building a little cluster in network namespaces");
    let mut lab = Lab::new("demo")?;
    for (name, node, host) in [
        ("web-a", 1, 10),
        ("web-b", 1, 11),
        ("web-c", 2, 10),
        ("web-d", 1, 13),
    ] {
        lab.add_pod(name, node, host)?;
    }
    println!("   client 198.18.0.100 --- switch --- node-1 198.18.0.1 (runs nodeport-agent)");
    println!("                                  \\--- node-2 198.18.0.2");
    println!(
        "   pods: web-a 198.18.1.10, web-b 198.18.1.11, web-d 198.18.1.13 on node-1; web-c 198.18.2.10 on node-2"
    );
    checkpoint()?;

    step(
        2,
        "Starting nodeport-agent on node-1 with examples/web.yaml",
    );
    let started = Instant::now();
    lab.start_agent(&web)?;
    println!(
        "   XDP and TC attached, Service demo/web programmed, in {} ms (node port 30080)",
        started.elapsed().as_millis()
    );

    step(
        3,
        "12 requests from the client to 198.18.0.1:30080 (each a new TCP connection)",
    );
    let spread = requests(&lab, to, 12)?;
    ensure!(
        spread.len() >= 2,
        "12 connections all went to one pod: {spread:?}"
    );
    ensure!(
        !spread.contains_key("web-d"),
        "web-d is not an endpoint yet but got traffic"
    );

    step(
        4,
        "Rollout: tests/demo/web-rollout.yaml marks web-b terminating and adds web-d",
    );
    let mut open = lab.connect(to, None)?;
    let first = open.ask()?;
    println!("   an open connection is talking to {}", first.pod);
    lab.apply(&rollout)?;
    println!("   the agent reloaded the file and updated the datapath");
    let spread = requests(&lab, to, 12)?;
    ensure!(
        !spread.contains_key("web-b"),
        "a terminating pod got new connections: {spread:?}"
    );
    let again = open.ask()?;
    ensure!(
        again.pod == first.pod,
        "the open connection moved from {} to {}",
        first.pod,
        again.pod
    );
    println!(
        "   the open connection still talks to {} (established connections are kept)",
        again.pod
    );

    step(5, "Killing the agent with SIGKILL, then starting it again");
    lab.take_agent()?.kill9()?;
    println!("   no agent is running; the pinned datapath keeps forwarding:");
    let mut answered = 0;
    for _ in 0..10 {
        checkpoint()?;
        if lab.ask_tcp(to).is_ok() {
            answered += 1;
        }
    }
    println!("   {answered}/10 new connections answered while no agent ran");
    ensure!(
        answered == 10,
        "only {answered}/10 answered with the agent down"
    );
    let restarted = Instant::now();
    lab.start_agent(&rollout)?;
    let after = open.ask()?;
    ensure!(
        after.pod == first.pod,
        "the open connection did not survive the restart"
    );
    println!(
        "   agent back after {} ms; the open connection still talks to {}",
        restarted.elapsed().as_millis(),
        after.pod
    );

    step(6, "What the agent holds (nodeport-agent dump --stats)");
    let out = std::process::Command::new(nodeport_tests::lab::agent_binary()?)
        .args(["dump", "--stats", "--bpffs-dir"])
        .arg(lab.pins.path())
        .output()?;
    ensure!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }

    step(7, "Cleaning up: agent, pinned maps and links, namespaces");
    drop(lab);
    println!("   done");
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "nodeport demo: an eBPF NodePort load balancer, with real traffic between network namespaces"
    );
    match run() {
        Ok(()) => {
            println!("\nThe demo passed: traffic flowed through nodeport as expected.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nThe demo failed: {e:#}");
            eprintln!("(everything it created has been removed)");
            ExitCode::FAILURE
        }
    }
}
