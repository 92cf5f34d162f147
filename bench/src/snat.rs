//! Short connections to a Service with endpoints on another node: nodeport's SNAT path
//! against kube-proxy's DNAT + MASQUERADE (`NODEPORT_BENCH_ONLY=snat`).
//!
//! The two-node lab of the end-to-end tests (nodeport_tests::lab): a client, node-1 (where
//! the agent runs, or kube-proxy's rules are loaded) and node-2, all on one bridge; pods a and
//! b on node-1, pod c on node-2. Service `mixed` (node port 30080) has the three pods as
//! endpoints, the setup of issue #11's `ab -n 20000 -c 16` finding; Service `far` (node port
//! 30081) has pod c alone: new connections to it all take a SNAT port.
//!
//! Three arms: kube-proxy's rules, nodeport with the XDP hook, and nodeport as `auto` picks on
//! these veth nodes (the TC hook). Per arm: 5 runs of 20,000 requests by 16 concurrent
//! clients, each request a new connection (connect, one line, the answer, close), as
//! `ab -n 20000 -c 16` does without keep-alive (the pods speak lines, not HTTP, hence the
//! bench's own loader), the median run's rate reported (one run lasts about a second, and
//! single runs of either arm vary by 15% on this 2-core machine); then new connections to
//! `far` as fast as 2 clients go for 60 s (10 s with NODEPORT_BENCH_QUICK=1), with the
//! datapath's SNAT drop counter read before and after. Every request is bounded (3 s connect,
//! 3 s answer) and so is every run (count and time).

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write as _},
    net::{SocketAddrV4, TcpStream},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use nodeport_common::counters::CounterKind;
use nodeport_tests::{
    kube_proxy::{self, Proxied},
    lab::{Lab, NODE1, manifests as yaml},
};

const MIXED_PORT: u16 = 30080;
const FAR_PORT: u16 = 30081;
const REQUESTS: u64 = 20_000;
const CONCURRENCY: usize = 16;
/// Runs of REQUESTS per arm (the median run's rate is reported).
const MIXED_RUNS: usize = 5;
const PATIENCE: Duration = Duration::from_secs(3);

/// What one load run saw.
#[derive(Clone, Debug, Default)]
pub struct Load {
    pub done: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Per request, ms, sorted.
    pub latencies: Vec<f64>,
    /// Requests slower than 1 s.
    pub over_1s: u64,
    /// Answers per pod name.
    pub pods: std::collections::BTreeMap<String, u64>,
    /// Failed requests by what failed (the error's kind).
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }

    pub fn max(&self) -> f64 {
        self.latencies.last().copied().unwrap_or(f64::NAN)
    }

    /// Adds `other`'s requests to these (times add up, latencies stay sorted).
    fn merge(&mut self, other: Load) {
        self.done += other.done;
        self.failed += other.failed;
        self.over_1s += other.over_1s;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.latencies.sort_by(f64::total_cmp);
        for (k, v) in other.pods {
            *self.pods.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// One request on a new connection; the answering pod's name.
fn request(to: SocketAddrV4) -> Result<String> {
    let stream = TcpStream::connect_timeout(&to.into(), PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_nodelay(true)?;
    (&stream).write_all(b"GET\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let pod = line.split_whitespace().next().context("empty answer")?;
    Ok(pod.to_owned())
}

/// `workers` clients in the client's namespace, each opening one connection after the other,
/// until `max` requests are done or `duration` is over.
fn load(lab: &Lab, to: SocketAddrV4, workers: usize, max: u64, duration: Duration) -> Result<Load> {
    let issued = AtomicU64::new(0);
    let out = Mutex::new(Load::default());
    let started = Instant::now();
    lab.client.run(|| {
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    let mut mine = Load::default();
                    while issued.fetch_add(1, Ordering::Relaxed) < max
                        && started.elapsed() < duration
                    {
                        let t = Instant::now();
                        match request(to) {
                            Ok(pod) => {
                                let ms = t.elapsed().as_secs_f64() * 1e3;
                                mine.done += 1;
                                mine.over_1s += u64::from(ms > 1_000.0);
                                mine.latencies.push(ms);
                                *mine.pods.entry(pod).or_default() += 1;
                            }
                            Err(e) => {
                                mine.failed += 1;
                                let kind = e
                                    .downcast_ref::<std::io::Error>()
                                    .map_or_else(|| e.to_string(), |e| format!("{:?}", e.kind()));
                                *mine.errors.entry(kind).or_default() += 1;
                            }
                        }
                    }
                    let mut all = out.lock().expect("not poisoned");
                    all.done += mine.done;
                    all.failed += mine.failed;
                    all.over_1s += mine.over_1s;
                    all.latencies.extend(mine.latencies);
                    for (k, v) in mine.pods {
                        *all.pods.entry(k).or_default() += v;
                    }
                    for (k, v) in mine.errors {
                        *all.errors.entry(k).or_default() += v;
                    }
                });
            }
        });
    })?;
    let mut out = out.into_inner().expect("not poisoned");
    out.elapsed = started.elapsed();
    out.latencies.sort_by(f64::total_cmp);
    Ok(out)
}

/// Spoofed SYNs: sources in 198.19.128.0/17 (inside the bench's 198.18.0.0/15, assigned to
/// nobody: the answers die unroutable in node-1), one raw socket in the client's namespace,
/// as fast as it goes, to `targets` in turn, until `stop` (or 100 million packets).
fn flood(
    lab: &Lab,
    targets: &[SocketAddrV4],
    rate: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<()> {
    lab.client.run(|| -> Result<()> {
        // SAFETY: a raw socket; IPPROTO_RAW implies IP_HDRINCL (the kernel fills in the IPv4
        // checksum and length).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut i: u32 = 0;
        let mut pkt = [0u8; 40];
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && i < 100_000_000 {
            // Paced in batches of 64 (rate 0: as fast as it goes).
            if rate != 0 && i.is_multiple_of(64) {
                let due = Duration::from_secs_f64(f64::from(i) / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let to = targets[(i as usize) % targets.len()];
            let src = 0xc613_8000 | (i.wrapping_mul(2_654_435_761) & 0x7fff);
            let sport = 1024 + (i % 60_000) as u16;
            syn_packet(&mut pkt, src, u32::from(*to.ip()), sport, to.port(), i);
            // SAFETY: sockaddr_in for the destination, the packet buffer and its length.
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*to.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let n = unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if n > 0 {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            i = i.wrapping_add(1);
        }
        // SAFETY: our socket.
        unsafe { libc::close(fd) };
        Ok(())
    })?
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 + TCP SYN with a correct TCP checksum.
fn syn_packet(p: &mut [u8; 40], src: u32, dst: u32, sport: u16, dport: u16, seq: u32) {
    p.fill(0);
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&src.to_be_bytes());
    p[16..20].copy_from_slice(&dst.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut sum: u32 = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + 6 + 20;
    for w in t.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    let c = fold(sum);
    p[36..38].copy_from_slice(&c.to_be_bytes());
}

/// What a flood did to the legitimate traffic.
#[derive(Clone, Debug, Default)]
pub struct Flood {
    pub duration: Duration,
    pub spoofed_per_s: f64,
    /// Requests on connections opened before the flood (one to each Service), answered / asked.
    pub long_answered: u64,
    pub long_asked: u64,
    /// New connections during the flood, to each Service.
    pub new_mixed: Load,
    pub new_far: Load,
}

/// Spoofed SYNs per second of the flood case (`NODEPORT_BENCH_FLOOD_RATE`, 0: unpaced).
fn flood_rate() -> Result<u64> {
    match std::env::var("NODEPORT_BENCH_FLOOD_RATE") {
        Ok(v) => v.parse().context("NODEPORT_BENCH_FLOOD_RATE"),
        Err(_) => Ok(FLOOD_RATE),
    }
}

/// Both arms' node can take this many spoofed SYNs a second on the shared 2 cores (the
/// sender's context pays for the node's path on veths, iptables' conntrack included).
const FLOOD_RATE: u64 = 15_000;

fn flood_case(lab: &Lab, duration: Duration) -> Result<Flood> {
    let mixed = SocketAddrV4::new(NODE1, MIXED_PORT);
    let far = SocketAddrV4::new(NODE1, FAR_PORT);
    let mut long = vec![lab.connect(mixed, None)?, lab.connect(far, None)?];
    for c in &mut long {
        c.ask()?;
    }
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let started = Instant::now();
    let mut out = Flood::default();
    std::thread::scope(|s| -> Result<()> {
        let rate = flood_rate()?;
        let (stop, sent) = (&stop, &sent);
        let flooder = s.spawn(move || flood(lab, &[mixed, far], rate, stop, sent));
        // Let the flood fill the tables first.
        std::thread::sleep(Duration::from_millis(500));
        let mut news = [Load::default(), Load::default()];
        let mut i = 0usize;
        while started.elapsed() < duration {
            for c in &mut long {
                out.long_asked += 1;
                out.long_answered += u64::from(c.ask().is_ok());
            }
            let to = if i.is_multiple_of(2) { mixed } else { far };
            let news = &mut news[i % 2];
            i += 1;
            let one = load(lab, to, 1, 1, PATIENCE)?;
            news.done += one.done;
            news.failed += one.failed;
            news.over_1s += one.over_1s;
            news.latencies.extend(one.latencies);
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        flooder.join().expect("the flooder")?;
        let [mut m, mut f] = news;
        for n in [&mut m, &mut f] {
            n.elapsed = started.elapsed();
            n.latencies.sort_by(f64::total_cmp);
        }
        (out.new_mixed, out.new_far) = (m, f);
        Ok(())
    })?;
    out.duration = started.elapsed();
    out.spoofed_per_s = sent.load(Ordering::Relaxed) as f64 / out.duration.as_secs_f64();
    Ok(out)
}

/// kube-proxy's iptables mode for the two Services (nodeport_tests::kube_proxy).
fn kube_proxy_rules() -> String {
    let eps = |list: &[&str]| list.iter().map(|e| e.parse().expect("address")).collect();
    kube_proxy::rules(&[
        Proxied {
            name: "MIXED",
            node_port: MIXED_PORT,
            protocol: "tcp",
            endpoints: eps(&["198.18.1.10:8080", "198.18.1.11:8080", "198.18.2.10:8080"]),
        },
        Proxied {
            name: "FAR",
            node_port: FAR_PORT,
            protocol: "tcp",
            endpoints: eps(&["198.18.2.10:8080"]),
        },
    ])
}

fn manifests() -> String {
    let n1 = "node-1";
    let n2 = "node-2";
    yaml::join(&[
        yaml::service(
            "mixed",
            MIXED_PORT,
            &["TCP"],
            "",
            &[
                yaml::ready("198.18.1.10", n1),
                yaml::ready("198.18.1.11", n1),
                yaml::ready("198.18.2.10", n2),
            ],
        ),
        yaml::service(
            "far",
            FAR_PORT,
            &["TCP"],
            "",
            &[yaml::ready("198.18.2.10", n2)],
        ),
    ])
}

/// One arm's figures.
#[derive(Clone, Debug, Default)]
pub struct ArmResult {
    /// The arm's name in the tables.
    pub name: String,
    /// All runs' requests to `mixed` together (latencies, failures, pods).
    pub mixed: Load,
    /// Each run's requests per second, sorted.
    pub mixed_rates: Vec<f64>,
    pub far: Load,
    /// SNAT drops (nodeport: the datapath's counter; iptables: the nat table's insert failures).
    pub snat_drops: u64,
    /// The most SNAT ports the agent's census saw held towards one backend during the run.
    pub snat_held_max: u64,
    /// nodeport: the datapath's drop and fallback counters that grew during the arm's loads
    /// (not the flood, whose spoofed SYNs are meant to be dropped).
    pub losses: std::collections::BTreeMap<String, u64>,
    pub flood: Flood,
}

pub struct Results {
    /// kube-proxy's rules first, then the nodeport arms.
    pub arms: Vec<ArmResult>,
    pub sustained: Duration,
}

impl ArmResult {
    /// The median run's requests per second to `mixed`.
    pub fn mixed_rate(&self) -> f64 {
        self.mixed_rates
            .get(self.mixed_rates.len() / 2)
            .copied()
            .unwrap_or(f64::NAN)
    }
}

fn conntrack_insert_failed(lab: &Lab) -> u64 {
    // /proc/net/stat/nf_conntrack: per-CPU hex columns; insert_failed is the 8th, drop the 9th.
    let Ok(out) = lab.node1.exec("cat", &["/proc/net/stat/nf_conntrack"]) else {
        return 0;
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return 0;
    };
    let cols: Vec<&str> = header.split_whitespace().collect();
    let want = ["insert_failed", "drop"];
    lines
        .map(|l| {
            l.split_whitespace()
                .zip(&cols)
                .filter(|(_, c)| want.contains(c))
                .map(|(v, _)| u64::from_str_radix(v, 16).unwrap_or(0))
                .sum::<u64>()
        })
        .sum()
}

fn run_arm(lab: &mut Lab, name: &str, nodeport: bool, sustained: Duration) -> Result<ArmResult> {
    let mixed = SocketAddrV4::new(NODE1, MIXED_PORT);
    let far = SocketAddrV4::new(NODE1, FAR_PORT);
    let drops = |lab: &Lab| -> Result<u64> {
        if nodeport {
            lab.counter("snat_port_exhausted")
        } else {
            Ok(conntrack_insert_failed(lab))
        }
    };
    // A first answer from every pod: the path works before it is timed.
    for _ in 0..30 {
        let _ = load(lab, mixed, 1, 1, PATIENCE)?;
    }
    let before = drops(lab)?;
    let counters_before = if nodeport {
        lab.counters()?
    } else {
        Default::default()
    };
    let mut mixed_load = Load::default();
    let mut mixed_rates = Vec::new();
    for _ in 0..MIXED_RUNS {
        let run = load(lab, mixed, CONCURRENCY, REQUESTS, Duration::from_secs(120))?;
        mixed_rates.push(run.rate());
        mixed_load.merge(run);
    }
    mixed_rates.sort_by(f64::total_cmp);
    // SNAT ports held towards the busiest backend, as the agent's census counted them at its
    // last conntrack sweep during the run (nodeport only).
    let mut held = Vec::new();
    let far_load = std::thread::scope(|s| -> Result<Load> {
        let run = s.spawn(|| load(lab, far, 2, u64::MAX, sustained));
        while !run.is_finished() {
            std::thread::sleep(Duration::from_secs(1));
            if nodeport
                && let Ok(scrape) = lab.scrape()
                && let Some(v) = scrape.value("nodeport_snat_ports_max_per_backend", &[])
            {
                held.push(v as u64);
            }
        }
        run.join().expect("the loader")
    })?;
    let after = drops(lab)?;
    let mut losses = std::collections::BTreeMap::new();
    if nodeport {
        for (name, value) in lab.counters()? {
            let grew = value - counters_before.get(&name).copied().unwrap_or(0);
            let kind = nodeport_common::Counter::ALL
                .iter()
                .find(|c| c.label() == name)
                .map(|c| c.kind());
            let loss = matches!(kind, Some(CounterKind::Dropped | CounterKind::Fallback));
            if loss && grew > 0 {
                losses.insert(name, grew);
            }
        }
    }
    eprintln!("bench: snat: flood ...");
    let flood = flood_case(lab, sustained.min(Duration::from_secs(30)))?;
    ensure!(
        mixed_load.pods.len() == 3,
        "the mixed Service answered from {:?}",
        mixed_load.pods
    );
    Ok(ArmResult {
        name: name.to_owned(),
        mixed: mixed_load,
        mixed_rates,
        far: far_load,
        snat_drops: after - before,
        snat_held_max: held.iter().copied().max().unwrap_or(0),
        losses,
        flood,
    })
}

pub fn run(quick: bool) -> Result<Results> {
    let sustained = Duration::from_secs(if quick { 10 } else { 60 });
    let mut lab = Lab::new("bs")?;
    for (name, node, host) in [("a", 1, 10), ("b", 1, 11), ("c", 2, 10)] {
        lab.add_pod(name, node, host)?;
    }
    // Many short connections from one client: ports come back quickly and there are enough.
    lab.client
        .sysctl("net.ipv4.ip_local_port_range=10000 65000")?;
    lab.client.sysctl("net.ipv4.tcp_tw_reuse=1")?;
    for ns in [&lab.node1, &lab.node2] {
        ns.sysctl("net.netfilter.nf_conntrack_max=262144").ok();
    }

    eprintln!("bench: snat: iptables arm ...");
    crate::compare::node::iptables_restore(&lab.node1, &kube_proxy_rules())?;
    let mut arms = vec![run_arm(
        &mut lab,
        "iptables (kube-proxy)",
        false,
        sustained,
    )?];
    crate::compare::node::flush_rules(&lab.node1)?;

    // Experiments: other agent flags (e.g. timeouts), `NODEPORT_BENCH_SNAT_AGENT_ARGS`.
    let extra: Vec<String> = std::env::var("NODEPORT_BENCH_SNAT_AGENT_ARGS")
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    // The XDP hook, then what `auto` picks on these veth nodes (TC: docs/datapath.md, "XDP or
    // TC"): a fresh datapath each (detached and its maps deleted in between, so the first
    // arm's flood leaves nothing in the second's tables).
    for (name, hook) in [
        ("nodeport, XDP hook", "xdp"),
        ("nodeport, auto (TC on veth)", "auto"),
    ] {
        eprintln!("bench: snat: {name} ...");
        let mut args = vec!["--external-hook", hook];
        args.extend(extra.iter().map(String::as_str));
        lab.agent_args(&args);
        lab.start_agent(&manifests())?;
        arms.push(run_arm(&mut lab, name, true, sustained)?);
        let _ = lab.take_agent()?.terminate();
        lab.agent_output(&["detach"])?;
        lab.clear_agent_args();
    }
    Ok(Results { arms, sustained })
}

pub fn render(r: &Results, date: &str, machine: &str) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "# SNAT path: short connections to remote pods, {date}\n"
    )?;
    writeln!(md, "Machine: {machine}\n")?;
    writeln!(md, "Load average at the end: {}\n", crate::load_average())?;
    if let Ok(extra) = std::env::var("NODEPORT_BENCH_SNAT_AGENT_ARGS") {
        writeln!(md, "Agent flags added: `{extra}`\n")?;
    }
    writeln!(
        md,
        "The two-node lab (client, node-1, node-2 on one bridge). Service `mixed`: pods a and b on \
         node-1, pod c on node-2; Service `far`: pod c alone. iptables arm: kube-proxy's chains \
         for the two Services (node port, KUBE-MARK-MASQ, random KUBE-SVC, DNAT, MASQUERADE \
         --random-fully) in node-1's legacy iptables; nodeport arm: the agent on node-1. \
         {REQUESTS} requests by {CONCURRENCY} concurrent clients, a new connection each (as \
         `ab -n {REQUESTS} -c {CONCURRENCY}`); then new connections to `far` from 2 clients for \
         {} s.\n",
        r.sustained.as_secs()
    )?;
    writeln!(
        md,
        "| arm | mixed: requests/s, median of {MIXED_RUNS} runs (slowest–fastest run) | p50 ms | p99 ms | max ms | slower than 1 s | failed | far: new connections/s for {} s | failed | SNAT drops | most SNAT ports held towards far's pod (agent census) |",
        r.sustained.as_secs()
    )?;
    writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for a in &r.arms {
        writeln!(
            md,
            "| {} | {:.0} ({:.0}–{:.0}) | {:.3} | {:.3} | {:.1} | {} | {} | {:.0} | {} | {} | {} |",
            a.name,
            a.mixed_rate(),
            a.mixed_rates.first().copied().unwrap_or(f64::NAN),
            a.mixed_rates.last().copied().unwrap_or(f64::NAN),
            a.mixed.pct(0.5),
            a.mixed.pct(0.99),
            a.mixed.max(),
            a.mixed.over_1s,
            a.mixed.failed,
            a.far.rate(),
            a.far.failed,
            a.snat_drops,
            if a.name.starts_with("nodeport") {
                a.snat_held_max.to_string()
            } else {
                "–".into()
            }
        )?;
    }
    writeln!(
        md,
        "\nPrevious: 2026-12-03, first pass (nodeport with the XDP hook, one run of 20,000 each): nodeport 18,258 requests/s, iptables 23,099 (0.79x). Issue #11 (`ab -n 20000 -c 16`, 2 local + 1 remote pod): nodeport ~980 requests/s, iptables ~7,200 requests/s."
    )?;
    let iptables = &r.arms[0];
    for np in &r.arms[1..] {
        let met = np.mixed_rate() >= iptables.mixed_rate() && np.mixed.over_1s == 0;
        writeln!(
            md,
            "\n{}: target, at least as fast as the iptables arm with no request slower than 1 s: {} ({:.0} vs {:.0} requests/s, {:.2}x, {} over 1 s). Target, zero SNAT drops while sustaining new connections to a remote backend: {} ({} drops).",
            np.name,
            if met { "met" } else { "NOT met" },
            np.mixed_rate(),
            iptables.mixed_rate(),
            np.mixed_rate() / iptables.mixed_rate(),
            np.mixed.over_1s,
            if np.snat_drops == 0 { "met" } else { "NOT met" },
            np.snat_drops
        )?;
    }
    writeln!(
        md,
        "\n## SYN flood\n\nSpoofed SYNs (sources in 198.19.128.0/17) from one raw socket in the client's namespace to both Services in turn, paced at {} a second (`NODEPORT_BENCH_FLOOD_RATE`, 0: unpaced), for {} s; meanwhile, every ~20 ms, one request on a connection to each Service opened before the flood, and one new connection, alternately to each Service (3 s to connect, 3 s for the answer).\n",
        flood_rate()?,
        r.arms[0].flood.duration.as_secs()
    )?;
    writeln!(
        md,
        "| arm | spoofed SYNs sent/s | long connections: requests answered | new connections to `mixed` that succeeded | to `far` (remote pod, SNAT) | new connections slower than 1 s |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    let share = |l: &Load| {
        let tried = l.done + l.failed;
        format!(
            "{}/{} ({:.1}%)",
            l.done,
            tried,
            l.done as f64 * 100.0 / tried.max(1) as f64
        )
    };
    for a in &r.arms {
        let f = &a.flood;
        writeln!(
            md,
            "| {} | {:.0} | {}/{} | {} | {} | {} |",
            a.name,
            f.spoofed_per_s,
            f.long_answered,
            f.long_asked,
            share(&f.new_mixed),
            share(&f.new_far),
            f.new_mixed.over_1s + f.new_far.over_1s
        )?;
    }
    writeln!(
        md,
        "\nWhat failed, and what the datapath dropped or handed to the kernel stack during the loads (not the flood):\n"
    )?;
    for a in &r.arms {
        writeln!(
            md,
            "- {}: client errors mixed {:?}, far {:?}; datapath {}",
            a.name,
            a.mixed.errors,
            a.far.errors,
            if a.name.starts_with("nodeport") {
                format!("{:?}", a.losses)
            } else {
                "–".to_owned()
            }
        )?;
    }
    let pods: Vec<String> = r
        .arms
        .iter()
        .map(|a| format!("{} {:?}", a.name, a.mixed.pods))
        .collect();
    writeln!(md, "\nAnswers per pod, mixed: {}.", pods.join("; "))?;
    Ok(md)
}
