//! nodeport against kube-proxy's iptables mode, side by side on one topology
//! (`NODEPORT_BENCH_ONLY=compare`).
//!
//! For each N, every round runs the arms one after another on the same namespaces, alternating
//! the order (iptables, nodeport beside kube-proxy, nodeport; then the reverse), so that what
//! the machine does meanwhile hits every arm alike:
//! - *iptables*: kube-proxy's rules for N Services (`kubeproxy`), loaded with iptables-restore;
//! - *nodeport beside kube-proxy*: the agent started with the same rules still loaded;
//! - *nodeport*: the agent with kube-proxy's rules and chains removed (`iptables -F`, `-X`).
//!
//! Every arm measures: new connections per second, the latency of a new connection and of a
//! request on an established one, UDP datagrams delivered per second, CPU per connection at a
//! fixed rate, and the time from an endpoint change until a new connection reaches the new
//! backend. Control plane: iptables-restore of the full ruleset and the agent process from start
//! to programmed, every round; the agent's in-process programming (module `agent`) apart. Each
//! answer names the pod and the address it saw, which proves the path: kube-proxy masquerades,
//! nodeport hands a local pod the client's address. A wrong answer stops the run.
//!
//! Larger N for nodeport alone (65,536: kube-proxy's rules at that size take minutes per
//! round to load and make every connection crawl).

pub mod kubeproxy;
pub mod load;
pub mod node;
pub mod plot;
pub mod report;
pub mod services;
pub mod topology;

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use load::Expect;
use node::Agent;
use nodeport_tests::netns::NetNs;
use services::{BACKEND_A, BACKEND_B, BenchService, MEASURED_NODE_PORT};
use topology::{CLIENT, GATEWAY, Topology};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Arm {
    Iptables,
    NodeportBesideKubeProxy,
    Nodeport,
}

impl Arm {
    pub const ALL: [Arm; 3] = [Arm::Iptables, Arm::NodeportBesideKubeProxy, Arm::Nodeport];

    pub fn label(self) -> &'static str {
        match self {
            Arm::Iptables => "iptables (kube-proxy)",
            Arm::NodeportBesideKubeProxy => "nodeport beside kube-proxy",
            Arm::Nodeport => "nodeport",
        }
    }
}

/// Sizes, rounds and durations. `NODEPORT_BENCH_QUICK=1` for a short development run.
#[derive(Clone, Debug)]
pub struct Config {
    pub quick: bool,
    /// N for all three arms.
    pub counts: Vec<u32>,
    /// N for nodeport alone.
    pub nodeport_only: Vec<u32>,
    pub rounds: usize,
    /// Sequential clients of the main connection-rate run (1, as the reference figures).
    pub workers: usize,
    pub conn_duration: Duration,
    pub conn_max: u64,
    pub requests: usize,
    pub request_duration: Duration,
    pub udp_flows: usize,
    pub udp_duration: Duration,
    pub udp_max: u64,
    pub paced_rate: u32,
    pub paced_duration: Duration,
    /// `--maglev-table-size` at nodeport-only sizes (None: the agent's default, 1,021).
    pub big_maglev_size: Option<u32>,
}

fn list_env(name: &str) -> Result<Option<Vec<u32>>> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(Some(Vec::new())),
        Ok(v) => Ok(Some(
            v.split(',')
                .map(|s| s.trim().parse().with_context(|| format!("{name}={v}")))
                .collect::<Result<_>>()?,
        )),
        Err(_) => Ok(None),
    }
}

impl Config {
    pub fn from_env() -> Result<Self> {
        let quick = std::env::var_os("NODEPORT_BENCH_QUICK").is_some_and(|v| v != "0");
        let mut cfg = if quick {
            Self {
                quick,
                counts: vec![1, 1_000],
                nodeport_only: Vec::new(),
                rounds: 2,
                workers: 1,
                conn_duration: Duration::from_millis(700),
                conn_max: 100_000,
                requests: 1_000,
                request_duration: Duration::from_secs(1),
                udp_flows: 2,
                udp_duration: Duration::from_millis(500),
                udp_max: 2_000_000,
                paced_rate: 300,
                paced_duration: Duration::from_secs(1),
                big_maglev_size: None,
            }
        } else {
            Self {
                quick,
                counts: vec![1, 1_000, 10_000],
                nodeport_only: vec![65_536],
                rounds: 5,
                workers: 1,
                conn_duration: Duration::from_secs(2),
                conn_max: 200_000,
                requests: 2_000,
                request_duration: Duration::from_secs(2),
                udp_flows: 2,
                udp_duration: Duration::from_secs(1),
                udp_max: 5_000_000,
                paced_rate: 300,
                paced_duration: Duration::from_secs(2),
                big_maglev_size: None,
            }
        };
        if let Some(v) = list_env("NODEPORT_BENCH_COMPARE_SERVICES")? {
            cfg.counts = v;
        }
        if let Some(v) = list_env("NODEPORT_BENCH_NODEPORT_ONLY_SERVICES")? {
            cfg.nodeport_only = v;
        }
        if let Ok(v) = std::env::var("NODEPORT_BENCH_ROUNDS") {
            cfg.rounds = v.parse().context("NODEPORT_BENCH_ROUNDS")?;
        }
        if let Ok(v) = std::env::var("NODEPORT_BENCH_WORKERS") {
            cfg.workers = v.parse().context("NODEPORT_BENCH_WORKERS")?;
        }
        if let Ok(v) = std::env::var("NODEPORT_BENCH_BIG_MAGLEV_SIZE") {
            cfg.big_maglev_size = Some(v.parse().context("NODEPORT_BENCH_BIG_MAGLEV_SIZE")?);
        }
        ensure!(cfg.rounds >= 1, "at least one round");
        Ok(cfg)
    }
}

/// One arm's figures in one round.
#[derive(Clone, Debug, Default)]
pub struct ArmRound {
    pub conn_rate: f64,
    /// With `PARALLEL_CLIENTS` clients at once.
    pub conn_rate_parallel: f64,
    pub conn_failed: u64,
    /// New connection (connect, request, answer), ms.
    pub conn_p50: f64,
    pub conn_p99: f64,
    /// Request on an established connection, ms.
    pub req_p50: f64,
    pub req_p99: f64,
    pub udp_rate: f64,
    pub udp_sent: u64,
    pub udp_delivered: u64,
    /// CPU of client and backends per connection at the fixed rate, µs.
    pub cpu_per_conn: f64,
    /// From the endpoint change until a new connection reached the new backend, ms.
    pub change: f64,
}

pub struct Results {
    pub config: Config,
    pub arms: BTreeMap<(u32, Arm), Vec<ArmRound>>,
    /// iptables-restore of the full ruleset, s.
    pub restore: BTreeMap<u32, Vec<f64>>,
    /// iptables-restore of a partial sync after the endpoint change, s.
    pub restore_change: BTreeMap<u32, Vec<f64>>,
    /// The agent process from start until it logged its first reconcile, s.
    pub agent_start: BTreeMap<u32, Vec<f64>>,
    /// The agent's own programming into empty maps, in process (module `agent`), s.
    pub agent_program: BTreeMap<u32, Vec<f64>>,
    /// Rules (`-A` lines) of the full ruleset.
    pub rules: BTreeMap<u32, usize>,
    pub iptables_version: String,
    /// /proc/loadavg's 1-minute figure, before every round.
    pub load: Vec<f64>,
    pub duration: Duration,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops between steps after Ctrl-C or SIGTERM: the error unwinds through the Drop guards,
/// which stop the agent and remove the namespaces, pins and manifests.
fn checkpoint() -> Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// Clients of the second connection-rate run: one per core.
pub const PARALLEL_CLIENTS: usize = 2;

/// The priority of the comparison's threads and of the agent.
pub const NICE: i32 = -10;

pub fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The machine's busy share of CPU time (all cores, everything but idle and iowait) over `window`.
fn busy_share(window: Duration) -> Option<f64> {
    fn times() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let idle = fields.get(3)? + fields.get(4)?;
        Some((fields.iter().sum(), idle))
    }
    let (total0, idle0) = times()?;
    std::thread::sleep(window);
    let (total1, idle1) = times()?;
    let total = total1.checked_sub(total0)?.max(1);
    Some(1.0 - (idle1 - idle0) as f64 / total as f64)
}

/// Waits until the machine is quiet before a measurement: tearing down an agent with 65,536
/// Services frees gigabytes of map memory, and replacing 140,000 iptables rules frees the old
/// tables, in kernel work that runs for seconds after the process returned and would otherwise
/// land on whichever arm comes next. Gives up after `MAX_SETTLE` and says so.
fn settle(what: &str) {
    const QUIET: f64 = 0.15;
    const MAX_SETTLE: Duration = Duration::from_secs(20);
    let started = Instant::now();
    loop {
        match busy_share(Duration::from_millis(250)) {
            Some(busy) if busy > QUIET && started.elapsed() < MAX_SETTLE => continue,
            Some(busy) if busy > QUIET => {
                eprintln!(
                    "bench: compare: {what}: the machine stayed {:.0}% busy for {MAX_SETTLE:?}; measuring anyway",
                    busy * 100.0
                );
                return;
            }
            _ => {
                if started.elapsed() > Duration::from_secs(1) {
                    eprintln!(
                        "bench: compare: {what}: waited {:.1?} for the machine to settle",
                        started.elapsed()
                    );
                }
                return;
            }
        }
    }
}

/// How an arm moves the measured Service's endpoint from pod a to pod b and back.
enum Changer<'a> {
    Iptables {
        node: &'a NetNs,
        to_b: &'a str,
        to_a: &'a str,
        restores: &'a mut Vec<f64>,
    },
    Agent {
        agent: &'a mut Agent,
        on_a: &'a BenchService,
        on_b: &'a BenchService,
    },
}

impl Changer<'_> {
    /// Starts the change; returns when it started.
    fn move_to_b(&mut self) -> Result<Instant> {
        let started = Instant::now();
        match self {
            Changer::Iptables {
                node,
                to_b,
                restores,
                ..
            } => {
                let took = node::iptables_restore(node, to_b)?;
                restores.push(took.as_secs_f64());
            }
            Changer::Agent { agent, on_b, .. } => agent.change_measured(on_b)?,
        }
        Ok(started)
    }

    /// Back to pod a, applied when it returns (the caller then checks the traffic).
    fn move_back_to_a(&mut self) -> Result<()> {
        match self {
            Changer::Iptables { node, to_a, .. } => {
                node::iptables_restore(node, to_a)?;
            }
            Changer::Agent { agent, on_a, .. } => {
                agent.wait_applied()?;
                agent.change_measured(on_a)?;
                agent.wait_applied()?;
            }
        }
        Ok(())
    }
}

/// Every measurement of one arm, with the node already set up for it.
fn measure(topo: &Topology, cfg: &Config, arm: Arm, changer: &mut Changer) -> Result<ArmRound> {
    let to = Topology::target(MEASURED_NODE_PORT);
    ensure!(
        topo.node_has_xdp()? == (arm != Arm::Iptables),
        "{}: XDP on ext0 is {}",
        arm.label(),
        if arm == Arm::Iptables {
            "attached"
        } else {
            "missing"
        }
    );
    // The address the pod sees proves the path: masqueraded by kube-proxy, the client's own
    // through nodeport.
    let seen = if arm == Arm::Iptables {
        GATEWAY
    } else {
        CLIENT
    };
    let on_a = Expect::new("a", seen);
    let on_b = Expect::new("b", seen);
    let client = &topo.client;
    settle(arm.label());

    // Warm up (ARP, caches), checking the path.
    for _ in 0..20 {
        load::probe_until(client, to, &on_a, &on_a, Duration::from_secs(5))?;
    }

    checkpoint()?;
    let conn = load::connection_rate(
        client,
        to,
        &on_a,
        cfg.workers,
        cfg.conn_duration,
        cfg.conn_max,
    )?;
    ensure!(
        conn.failed * 100 <= conn.completed,
        "{}: {} of {} new connections failed",
        arm.label(),
        conn.failed,
        conn.completed + conn.failed
    );
    let mut conn_lat = conn.latencies.clone();
    conn_lat.sort();
    checkpoint()?;
    let parallel = load::connection_rate(
        client,
        to,
        &on_a,
        PARALLEL_CLIENTS,
        cfg.conn_duration,
        cfg.conn_max,
    )?;
    ensure!(
        parallel.failed * 100 <= parallel.completed,
        "{}: {} of {} new connections failed",
        arm.label(),
        parallel.failed,
        parallel.completed + parallel.failed
    );

    checkpoint()?;
    let mut req = load::request_latency(client, to, &on_a, cfg.request_duration, cfg.requests)?;
    req.sort();

    checkpoint()?;
    let (a, b) = (topo.backend(BACKEND_A), topo.backend(BACKEND_B));
    let (a0, b0) = (a.udp_received(), b.udp_received());
    let udp = load::udp_flood(client, to, cfg.udp_flows, cfg.udp_duration, cfg.udp_max)?;
    // Let what is in flight arrive.
    std::thread::sleep(Duration::from_millis(100));
    let delivered = a.udp_received() - a0;
    ensure!(
        b.udp_received() == b0,
        "{}: UDP reached pod b, which is no endpoint",
        arm.label()
    );
    ensure!(
        delivered > 0 && delivered <= udp.sent,
        "{}: {delivered} UDP datagrams delivered of {} sent",
        arm.label(),
        udp.sent
    );

    checkpoint()?;
    let cpu0 = load::process_cpu_time();
    let paced = load::paced_connections(client, to, &on_a, cfg.paced_rate, cfg.paced_duration)?;
    let cpu = load::process_cpu_time() - cpu0;

    checkpoint()?;
    let started = changer.move_to_b()?;
    let reached = load::probe_until(client, to, &on_a, &on_b, Duration::from_secs(60))?;
    let change = reached - started;
    changer.move_back_to_a()?;
    load::probe_until(client, to, &on_b, &on_a, Duration::from_secs(60))?;

    Ok(ArmRound {
        conn_rate: conn.rate(),
        conn_rate_parallel: parallel.rate(),
        conn_failed: conn.failed + parallel.failed,
        conn_p50: percentile(&conn_lat, 0.50),
        conn_p99: percentile(&conn_lat, 0.99),
        req_p50: percentile(&req, 0.50),
        req_p99: percentile(&req, 0.99),
        udp_rate: delivered as f64 / udp.elapsed.as_secs_f64(),
        udp_sent: udp.sent,
        udp_delivered: delivered,
        cpu_per_conn: cpu.as_secs_f64() * 1e6 / paced.completed as f64,
        change: change.as_secs_f64() * 1e3,
    })
}

fn log_round(n: u32, round: usize, arm: Arm, r: &ArmRound) {
    eprintln!(
        "bench: compare: {n:>6} services, round {round}, {:<27} {:>7.0} conn/s (p50 {:.3} ms, p99 {:.3} ms), request p50 {:.3} ms p99 {:.3} ms, UDP {:>7.0}/s, CPU {:.0} µs/conn, change {:.1} ms",
        arm.label(),
        r.conn_rate,
        r.conn_p50,
        r.conn_p99,
        r.req_p50,
        r.req_p99,
        r.udp_rate,
        r.cpu_per_conn,
        r.change
    );
}

/// One N of the three-arm comparison: its Services and kube-proxy's rules for them.
struct Size {
    n: u32,
    fillers: Vec<BenchService>,
    full: String,
    to_b: String,
    to_a: String,
}

impl Size {
    fn new(n: u32, on_a: &BenchService, on_b: &BenchService) -> Self {
        let fillers = services::fillers(n);
        let with = |measured: &BenchService| {
            let mut all = fillers.clone();
            all.push(measured.clone());
            all
        };
        let (all_a, all_b) = (with(on_a), with(on_b));
        Self {
            n,
            full: kubeproxy::full_sync(&all_a),
            to_b: kubeproxy::endpoint_change(&all_b, on_a, on_b),
            to_a: kubeproxy::endpoint_change(&all_a, on_b, on_a),
            fillers,
        }
    }

    fn rule_count(&self) -> usize {
        self.full.lines().filter(|l| l.starts_with("-A ")).count()
    }

    fn keep(&self, dir: &std::path::Path, on_a: &BenchService) -> Result<()> {
        let n = self.n;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("iptables-{n}.rules")), &self.full)?;
        std::fs::write(dir.join(format!("iptables-{n}-to-b.rules")), &self.to_b)?;
        let mut yaml = services::yaml_all(&self.fillers);
        services::yaml(on_a, &mut yaml);
        std::fs::write(dir.join(format!("manifests-{n}.yaml")), yaml)?;
        Ok(())
    }

    fn load_rules(&self, node: &NetNs, results: &mut Results) -> Result<()> {
        let took = node::iptables_restore(node, &self.full)?;
        eprintln!(
            "bench: compare: {} services: iptables-restore {took:.2?}",
            self.n
        );
        results
            .restore
            .entry(self.n)
            .or_default()
            .push(took.as_secs_f64());
        Ok(())
    }

    fn start_agent(
        &self,
        node: &NetNs,
        on_a: &BenchService,
        results: &mut Results,
    ) -> Result<Agent> {
        let (agent, took) = Agent::start(node, &self.fillers, on_a, None)?;
        eprintln!(
            "bench: compare: {} services: the agent programmed them in {took:.2?}",
            self.n
        );
        results
            .agent_start
            .entry(self.n)
            .or_default()
            .push(took.as_secs_f64());
        Ok(agent)
    }

    fn iptables_arm(
        &self,
        topo: &Topology,
        cfg: &Config,
        results: &mut Results,
    ) -> Result<ArmRound> {
        let mut restores = Vec::new();
        let r = measure(
            topo,
            cfg,
            Arm::Iptables,
            &mut Changer::Iptables {
                node: &topo.node,
                to_b: &self.to_b,
                to_a: &self.to_a,
                restores: &mut restores,
            },
        )?;
        results
            .restore_change
            .entry(self.n)
            .or_default()
            .extend(restores);
        Ok(r)
    }

    /// One round of the three arms, in the order the round's parity says.
    fn round(
        &self,
        topo: &Topology,
        cfg: &Config,
        round: usize,
        on_a: &BenchService,
        on_b: &BenchService,
        results: &mut Results,
    ) -> Result<()> {
        let n = self.n;
        let push = |arm: Arm, r: ArmRound, results: &mut Results| {
            log_round(n, round, arm, &r);
            results.arms.entry((n, arm)).or_default().push(r);
        };
        let agent_arm = |arm: Arm, agent: &mut Agent| {
            measure(topo, cfg, arm, &mut Changer::Agent { agent, on_a, on_b })
        };
        if round.is_multiple_of(2) {
            self.load_rules(&topo.node, results)?;
            let r = self.iptables_arm(topo, cfg, results)?;
            push(Arm::Iptables, r, results);
            let mut agent = self.start_agent(&topo.node, on_a, results)?;
            let r = agent_arm(Arm::NodeportBesideKubeProxy, &mut agent)?;
            push(Arm::NodeportBesideKubeProxy, r, results);
            node::flush_rules(&topo.node)?;
            let r = agent_arm(Arm::Nodeport, &mut agent)?;
            push(Arm::Nodeport, r, results);
            agent.stop()?;
        } else {
            let mut agent = self.start_agent(&topo.node, on_a, results)?;
            let r = agent_arm(Arm::Nodeport, &mut agent)?;
            push(Arm::Nodeport, r, results);
            self.load_rules(&topo.node, results)?;
            let r = agent_arm(Arm::NodeportBesideKubeProxy, &mut agent)?;
            push(Arm::NodeportBesideKubeProxy, r, results);
            agent.stop()?;
            let r = self.iptables_arm(topo, cfg, results)?;
            push(Arm::Iptables, r, results);
            node::flush_rules(&topo.node)?;
        }
        Ok(())
    }
}

/// One step of a round: a size measured in all three arms, or nodeport alone at a size.
enum Step<'a> {
    Compared(&'a Size),
    NodeportOnly(u32, &'a [BenchService]),
}

/// The whole comparison. `object` is the plain eBPF object (for the agent's in-process
/// programming figures).
pub fn run(cfg: &Config, object: &[u8]) -> Result<Results> {
    let began = Instant::now();
    // SAFETY: handlers that only store to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // The machine is shared: at nice -10 the load generator, the pods' servers (threads of this
    // process, created from here on) and the agent (a child) keep their CPU when others compile,
    // in every arm alike. Softirq work done in their context gets the same share.
    // SAFETY: setpriority on the calling thread; threads and children inherit it.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) } != 0 {
        eprintln!(
            "bench: compare: could not set nice {NICE}: {}",
            std::io::Error::last_os_error()
        );
    }
    let topo = Topology::new()?;
    let mut results = Results {
        config: cfg.clone(),
        arms: BTreeMap::new(),
        restore: BTreeMap::new(),
        restore_change: BTreeMap::new(),
        agent_start: BTreeMap::new(),
        agent_program: BTreeMap::new(),
        rules: BTreeMap::new(),
        iptables_version: node::iptables_version(),
        load: Vec::new(),
        duration: Duration::ZERO,
    };
    node::flush_rules(&topo.node)?;

    let on_a = services::measured(BACKEND_A);
    let on_b = services::measured(BACKEND_B);
    let mut sizes = Vec::new();
    for &n in &cfg.counts {
        let size = Size::new(n, &on_a, &on_b);
        results.rules.insert(n, size.rule_count());
        eprintln!(
            "bench: compare: {n} services: {} iptables rules",
            size.rule_count()
        );
        // NODEPORT_BENCH_RULES_DIR=DIR keeps the generated rules and manifests for a look.
        if let Some(dir) = std::env::var_os("NODEPORT_BENCH_RULES_DIR") {
            size.keep(std::path::Path::new(&dir), &on_a)?;
        }
        sizes.push(size);
    }
    let big: Vec<(u32, Vec<BenchService>)> = cfg
        .nodeport_only
        .iter()
        .map(|&n| (n, services::fillers(n)))
        .collect();

    // Rounds outermost: every size sees the machine's quiet and busy moments alike; the order
    // of the sizes alternates too, so none always comes right after the biggest.
    for round in 0..cfg.rounds {
        let mut steps: Vec<Step> = sizes
            .iter()
            .map(Step::Compared)
            .chain(
                big.iter()
                    .map(|(n, fillers)| Step::NodeportOnly(*n, fillers)),
            )
            .collect();
        if round % 2 == 1 {
            steps.reverse();
        }
        for step in steps {
            checkpoint()?;
            results.load.push(loadavg());
            match step {
                Step::Compared(size) => {
                    size.round(&topo, cfg, round, &on_a, &on_b, &mut results)?
                }
                Step::NodeportOnly(n, fillers) => {
                    let (mut agent, took) =
                        Agent::start(&topo.node, fillers, &on_a, cfg.big_maglev_size)?;
                    eprintln!(
                        "bench: compare: {n} services: the agent programmed them in {took:.2?}"
                    );
                    results
                        .agent_start
                        .entry(n)
                        .or_default()
                        .push(took.as_secs_f64());
                    let r = measure(
                        &topo,
                        cfg,
                        Arm::Nodeport,
                        &mut Changer::Agent {
                            agent: &mut agent,
                            on_a: &on_a,
                            on_b: &on_b,
                        },
                    )?;
                    log_round(n, round, Arm::Nodeport, &r);
                    results.arms.entry((n, Arm::Nodeport)).or_default().push(r);
                    agent.stop()?;
                }
            }
        }
    }
    for size in &sizes {
        let n = size.n;
        if n <= crate::agent::MAX_PROGRAMMED {
            checkpoint()?;
            eprintln!("bench: compare: the agent's in-process programming of {n} services ...");
            let times = crate::agent::program_times(object, n, cfg.rounds)?;
            results
                .agent_program
                .insert(n, times.iter().map(Duration::as_secs_f64).collect());
        }
    }
    results.duration = began.elapsed();
    Ok(results)
}
