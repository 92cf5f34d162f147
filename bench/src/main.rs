//! `cargo xtask bench`: the datapath, nanoseconds per packet with BPF_PROG_TEST_RUN, and the
//! agent, how long programming services and applying an EndpointSlice change take.
//!
//! Datapath: every figure is the kernel's own mean over `repeat = 1,000,000` runs, the median
//! of several such runs. Paths that rewrite the packet run through the bench build's entry
//! point, which restores the packet from a template first (BPF_PROG_TEST_RUN does not restore it
//! between repetitions); the restore's own cost is measured and taken off (see
//! nodeport_common::bench). Results go to `<out dir>/<date>-datapath.md`.
//!
//! Agent (module `agent`): 10,000 NodePort Services programmed into empty maps, then 1,000
//! EndpointSlice changes, through the agent's own reconciler and syncer against a loaded
//! datapath. Results go to `<out dir>/<date>-agent.md`.
//!
//! Loader (module `loader`): the manifests loader on a normal directory and with one
//! pathological file (nested 100,000 deep) next to the normal one. Results go to
//! `<out dir>/<date>-loader.md`.
//!
//! Comparison (module `compare`): nodeport against kube-proxy's iptables rules, side by side
//! on one namespace topology with real traffic; writes `bench/REPORT.md` and `bench/plots/`.
//!
//! Environment (xtask sets the first three):
//! - `NODEPORT_BENCH_OBJECT`: the bench build of the eBPF object (datapath part);
//! - `NODEPORT_EBPF_OBJECT`: the plain eBPF object (agent and comparison parts);
//! - `NODEPORT_AGENT_BIN`: the agent binary the comparison starts;
//! - `NODEPORT_BENCH_ONLY=agent`, `=datapath`, `=loader` or `=compare`: run only that part
//!   (default: all), e.g. `NODEPORT_BENCH_ONLY=compare cargo xtask bench`; `=memory`: only
//!   the agent part's memory rows (the agent process's RSS), to
//!   `<out dir>/<date>-agent-memory.md`;
//! - `NODEPORT_BENCH_RSS_SERVICES=10000,65536`: the sizes of the memory rows (`0`: none);
//! - `NODEPORT_BENCH_SERVICES=1,1000`: the datapath part at these service counts only;
//! - `NODEPORT_BENCH_ANY_ACTION=1`: the datapath part does not check the XDP verdicts;
//! - `NODEPORT_BENCH_QUICK=1`: a short comparison for development (2 rounds, 1 and 1,000
//!   Services, shorter runs); its report goes to a temporary directory, never bench/;
//! - `NODEPORT_BENCH_COMPARE_SERVICES=1,1000,10000`, `NODEPORT_BENCH_NODEPORT_ONLY_SERVICES=65536`,
//!   `NODEPORT_BENCH_ROUNDS=5`, `NODEPORT_BENCH_WORKERS=2`, `NODEPORT_BENCH_BIG_MAGLEV_SIZE=31`:
//!   the comparison's sizes, rounds, parallel clients, and Maglev M at nodeport-only sizes;
//! - `NODEPORT_BENCH_REPORT_DIR`: where REPORT.md and plots/ go (default: the parent of the
//!   results directory, i.e. bench/).

mod agent;
mod compare;
mod loader;

use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, Result, ensure};
use nodeport_agent::datapath::{Datapath, Sizing};
use nodeport_common::{
    IPPROTO_TCP,
    bench::{BenchTemplate, FRAME_LEN, TEMPLATE_MAP, programs as bench_programs},
    programs,
};
use nodeport_tests::{
    fixture::{
        CLIENT_MAC, EXT_MAC, Fixture, ServiceSpec, Topology, XDP_PASS, XDP_TX, local, remote,
        run_xdp,
    },
    netns::require_root,
    packet::{ACK, Pkt, SYN, sa},
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 11;
const SERVICE_COUNTS: &[u32] = &[1, 1_000, 10_000, 65_536];
/// Small: per-packet cost does not depend on M, and 65,536 tables of it must fit in memory.
const MAGLEV_SIZE: u32 = 31;

struct Row {
    services: u32,
    bare: f64,
    restore: f64,
    no_service: f64,
    established_remote: f64,
    established_local: f64,
    new_flow_local: f64,
}

fn vip(i: u32) -> String {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
    format!("{ip}:80")
}

/// A 64-byte frame from the client to `dst`.
fn frame(dst: &str, flags: nodeport_tests::packet::TcpFlags) -> Vec<u8> {
    let pkt = Pkt::tcp(sa("198.18.0.100:40000"), sa(dst), flags)
        .macs(CLIENT_MAC, EXT_MAC)
        .payload(&[0; 10]);
    let bytes = pkt.bytes();
    assert_eq!(bytes.len(), FRAME_LEN);
    bytes
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One measured path: which program, on which frame, with which template restored.
struct Scenario {
    program: &'static str,
    frame: Vec<u8>,
    template: Option<(Vec<u8>, bool)>,
    expect: u32,
}

type Template = aya::maps::Array<aya::maps::MapData, BenchTemplate>;

fn set_template(template: &mut Template, frame: &[u8], vary_client: bool) -> Result<()> {
    let mut t = BenchTemplate {
        frame: [0; FRAME_LEN],
        vary_client: u32::from(vary_client),
        _pad: 0,
    };
    t.frame.copy_from_slice(frame);
    template.set(0, t, 0)?;
    Ok(())
}

/// Kernel-measured mean ns per repetition of each scenario, the median over ROUNDS rounds.
/// Rounds interleave the scenarios, so a noisy moment of the machine hits all of them alike.
fn measure_all(
    fx: &mut Fixture,
    template: &mut Template,
    topo: &Topology,
    scenarios: &[Scenario],
) -> Result<Vec<f64>> {
    let mut samples = vec![Vec::new(); scenarios.len()];
    for _ in 0..ROUNDS {
        for (i, s) in scenarios.iter().enumerate() {
            if let Some((frame, vary)) = &s.template {
                set_template(template, frame, *vary)?;
            }
            let prog = fx.dp.xdp_program(s.program)?;
            let run = run_xdp(prog, &topo.ns, topo.ext_ifindex, &s.frame, REPEAT)?;
            // NODEPORT_BENCH_ANY_ACTION=1 for experiments that change where packets go.
            if std::env::var_os("NODEPORT_BENCH_ANY_ACTION").is_none() {
                ensure!(
                    run.action == s.expect,
                    "{}: action {} (expected {})",
                    s.program,
                    run.action,
                    s.expect
                );
            }
            samples[i].push(run.duration.as_nanos() as f64);
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

fn bench_at(object: &[u8], topo: &Topology, n: u32) -> Result<Row> {
    let sizing = Sizing {
        frontends: n + 16,
        services: n + 16,
        backends: n + 16,
        maglev_size: MAGLEV_SIZE,
        source_ranges: 16,
        conntrack: 262_144,
        conntrack_new: 65_536,
        affinity: 1024,
    };
    let mut dp = Datapath::load_object(object, &sizing, None)?;
    dp.load_extra_xdp(bench_programs::XDP_EXTERNAL)?;
    dp.load_extra_xdp(bench_programs::RESTORE_ONLY)?;
    let map = dp
        .take_extra_map(TEMPLATE_MAP)
        .context("the bench object has no template map")?;
    let mut template = Template::try_from(map)?;
    let mut fx = Fixture::with(dp, topo)?;
    // n services on VIPs, each with a remote backend; service n has a local pod.
    for i in 0..n {
        let backend = remote(i + 1, &format!("198.18.2.{}:8080", 1 + i % 250));
        fx.add_service(&ServiceSpec::new(i, &vip(i), IPPROTO_TCP, vec![backend]))?;
    }
    fx.add_service(&ServiceSpec::new(
        n,
        &vip(n),
        IPPROTO_TCP,
        vec![local(n + 1, "198.18.1.10:8080")],
    ))?;

    // Established: the first packet creates the connection, the repetitions reuse it.
    let remote_frame = frame(&vip(n / 2), ACK);
    let local_frame = frame(&vip(n), ACK);
    let new_flow_frame = frame(&vip(n), SYN);
    fx.xdp(topo, &remote_frame)?;
    fx.xdp(topo, &local_frame)?;
    let restored = |f: &Vec<u8>, vary| Some((f.clone(), vary));
    let scenarios = [
        Scenario {
            program: programs::XDP_PASS,
            frame: remote_frame.clone(),
            template: None,
            expect: XDP_PASS,
        },
        Scenario {
            program: programs::XDP_EXTERNAL,
            frame: frame("198.18.0.1:22", SYN),
            template: None,
            expect: XDP_PASS,
        },
        Scenario {
            program: bench_programs::RESTORE_ONLY,
            frame: remote_frame.clone(),
            template: restored(&remote_frame, false),
            expect: XDP_PASS,
        },
        Scenario {
            program: bench_programs::XDP_EXTERNAL,
            frame: remote_frame.clone(),
            template: restored(&remote_frame, false),
            expect: XDP_TX,
        },
        Scenario {
            program: bench_programs::XDP_EXTERNAL,
            frame: local_frame.clone(),
            template: restored(&local_frame, false),
            expect: XDP_PASS,
        },
        // A new client every repetition: selection plus two conntrack inserts (the LRU evicts).
        Scenario {
            program: bench_programs::XDP_EXTERNAL,
            frame: new_flow_frame.clone(),
            template: restored(&new_flow_frame, true),
            expect: XDP_PASS,
        },
    ];
    let t = measure_all(&mut fx, &mut template, topo, &scenarios)?;
    let (bare, no_service, restore) = (t[0], t[1], t[2]);
    // The restore is part of the bench entry point, not of the datapath: take it off.
    let overhead = (restore - bare).max(0.0);
    Ok(Row {
        services: n,
        bare,
        restore,
        no_service,
        established_remote: t[3] - overhead,
        established_local: t[4] - overhead,
        new_flow_local: t[5] - overhead,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct.
    unsafe { libc::uname(&mut uts) };
    let field = |f: &[libc::c_char]| {
        unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    format!(
        "{} ({cpu}, {cores} cores), Linux {}",
        field(&uts.nodename),
        field(&uts.release)
    )
}

fn today() -> String {
    let out = std::process::Command::new("date").arg("+%Y-%m-%d").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "undated".into())
}

/// Which parts to run (NODEPORT_BENCH_ONLY).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parts {
    All,
    Datapath,
    Agent,
    Loader,
    /// Only the agent part's memory rows.
    Memory,
    Compare,
}

fn main() -> Result<()> {
    require_root();
    let began = std::time::Instant::now();
    let out_dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: nodeport-bench <results dir>")?,
    );
    let parts = match std::env::var("NODEPORT_BENCH_ONLY").as_deref() {
        Err(_) | Ok("") => Parts::All,
        Ok("datapath") => Parts::Datapath,
        Ok("agent") => Parts::Agent,
        Ok("loader") => Parts::Loader,
        Ok("memory") => Parts::Memory,
        Ok("compare") => Parts::Compare,
        Ok(other) => {
            anyhow::bail!(
                "NODEPORT_BENCH_ONLY={other}: expected agent, memory, datapath, loader or compare"
            )
        }
    };
    let runs = |part: Parts| parts == Parts::All || parts == part;
    let date = today();
    std::fs::create_dir_all(&out_dir)?;
    let mut datapath_rows = None;
    if runs(Parts::Datapath) {
        let (rows, md) = datapath(&date)?;
        write_results(&out_dir, &format!("{date}-datapath.md"), &md)?;
        datapath_rows = Some(rows);
    }
    let object = || -> Result<Vec<u8>> {
        let object_path = std::env::var("NODEPORT_EBPF_OBJECT")
            .context("NODEPORT_EBPF_OBJECT (set by cargo xtask bench)")?;
        std::fs::read(&object_path).with_context(|| format!("reading {object_path}"))
    };
    let mut agent_summary = None;
    if runs(Parts::Agent) {
        let results = agent::run(&object()?)?;
        agent_summary = Some(agent::summary(&results));
        let md = agent::render(&results, &date, &machine())?;
        write_results(&out_dir, &format!("{date}-agent.md"), &md)?;
    }
    if runs(Parts::Loader) {
        let results = loader::run()?;
        eprintln!("bench: {}", loader::summary(&results));
        let md = loader::render(&results, &date)?;
        write_results(&out_dir, &format!("{date}-loader.md"), &md)?;
    }
    if parts == Parts::Memory {
        let md = agent::render_memory_only(&date, &machine())?;
        write_results(&out_dir, &format!("{date}-agent-memory.md"), &md)?;
    }
    if runs(Parts::Compare) {
        let cfg = compare::Config::from_env()?;
        let results = compare::run(&cfg, &object()?)?;
        let report_dir = match std::env::var_os("NODEPORT_BENCH_REPORT_DIR") {
            Some(dir) => PathBuf::from(dir),
            // A quick run is for development: it never overwrites the published report.
            None if cfg.quick => std::env::temp_dir().join("nodeport-bench-quick"),
            None => out_dir
                .parent()
                .context("the results directory has no parent")?
                .to_path_buf(),
        };
        std::fs::create_dir_all(&report_dir)?;
        let rows: Option<Vec<compare::report::DatapathRow>> = datapath_rows.map(|rows| {
            rows.iter()
                .map(|r| compare::report::DatapathRow {
                    services: r.services,
                    bare: r.bare,
                    established_local: r.established_local,
                    established_remote: r.established_remote,
                    new_flow_local: r.new_flow_local,
                })
                .collect()
        });
        compare::report::write(
            &compare::report::ReportInput {
                results: &results,
                datapath: rows.as_deref(),
                date: &date,
                machine: &machine(),
                total: began.elapsed(),
            },
            &report_dir,
        )?;
        println!(
            "bench: report written to {}",
            report_dir.join("REPORT.md").display()
        );
        println!("\n{}", compare::report::summary(&results));
    }
    if let Some(summary) = agent_summary {
        println!("bench: agent: {summary}");
    }
    println!(
        "bench: done in {:.1} min",
        began.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn write_results(out_dir: &std::path::Path, name: &str, md: &str) -> Result<()> {
    let path = out_dir.join(name);
    std::fs::write(&path, md)?;
    println!("{md}");
    println!("bench: results written to {}", path.display());
    Ok(())
}

/// The datapath part; returns its rows and its results page.
fn datapath(date: &str) -> Result<(Vec<Row>, String)> {
    let object_path = std::env::var("NODEPORT_BENCH_OBJECT")
        .context("NODEPORT_BENCH_OBJECT (set by cargo xtask bench)")?;
    let object = std::fs::read(&object_path).with_context(|| format!("reading {object_path}"))?;
    let topo = Topology::new()?;

    let mut rows = Vec::new();
    // NODEPORT_BENCH_SERVICES=1 (say) for a quick look at one size.
    let counts: Vec<u32> = match std::env::var("NODEPORT_BENCH_SERVICES") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => SERVICE_COUNTS.to_vec(),
    };
    for n in counts {
        eprintln!("bench: {n} services ...");
        let row = bench_at(&object, &topo, n)?;
        eprintln!(
            "bench: {n:>6} services: bare {:.1} ns, established {:.1} ns (remote) {:.1} ns (local), new flow {:.1} ns, no service {:.1} ns",
            row.bare,
            row.established_remote,
            row.established_local,
            row.new_flow_local,
            row.no_service
        );
        rows.push(row);
    }

    let mut md = String::new();
    writeln!(md, "# Datapath benchmark, {date}\n")?;
    writeln!(md, "Machine: {}\n", machine())?;
    writeln!(
        md,
        "BPF_PROG_TEST_RUN of the XDP program on `ext0` of a test namespace, repeat {REPEAT}, median of \
         {ROUNDS} runs; ns per packet as the kernel measures it. Rewriting paths run behind the bench \
         entry point that restores the packet first; its overhead (restore minus bare) is taken off. \
         Maglev tables of {MAGLEV_SIZE} slots (per-packet cost does not depend on M).\n"
    )?;
    writeln!(
        md,
        "| services | bare XDP_PASS | no service | established, remote (XDP_TX) | established, local pod (to TC) | new flow, local pod | restore overhead |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.services,
            r.bare,
            r.no_service,
            r.established_remote,
            r.established_local,
            r.new_flow_local,
            r.restore - r.bare
        )?;
    }
    // Target 1, row by row: each row's established paths against its own bare figure.
    let over: Vec<String> = rows
        .iter()
        .filter(|r| r.established_remote.max(r.established_local) > 2.0 * r.bare + 40.0)
        .map(|r| format!("{} services", r.services))
        .collect();
    let first = &rows[0];
    let last = rows.last().expect("rows");
    let drift = |a: f64, b: f64| (b - a) / a * 100.0;
    writeln!(
        md,
        "\nTarget 1, an established-flow packet at most 2 x bare + 40 ns, row by row: {}.",
        if over.is_empty() {
            "met in every row".to_owned()
        } else {
            format!("NOT met at {}", over.join(", "))
        }
    )?;
    let d_remote = drift(first.established_remote, last.established_remote);
    let d_local = drift(first.established_local, last.established_local);
    writeln!(
        md,
        "Target 2, flat within 15% from {} to {} services: remote {d_remote:+.1}%, local {d_local:+.1}%, {}.",
        first.services,
        last.services,
        if d_remote.abs() <= 15.0 && d_local.abs() <= 15.0 {
            "met"
        } else {
            "NOT met"
        }
    )?;

    Ok((rows, md))
}
