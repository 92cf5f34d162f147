//! The agent benchmark: how long the agent takes to program 10,000 NodePort Services into empty
//! maps, and how long an EndpointSlice change takes to reach the maps.
//!
//! Everything runs in this process against a real datapath (maps created by the kernel, nothing
//! attached, no network traffic): the agent's own `Reconciler` (desired state) and `Syncer`
//! (map writes) are driven exactly as `Agent::reconcile` drives them.
//!
//! * Objects are built in code as k8s-openapi values (no YAML: parsing would dominate) and put
//!   in the kube source's own mirrors (`source::kube::Mirror`), so the snapshots the agent sees
//!   share unchanged objects' `Arc`s as they do in production.
//! * Node ports are 20000 + i, beyond the default 30000-32767 range: the bench's node context
//!   sets no port guard, and only the datapath maps are exercised here.
//! * Endpoint addresses are in 198.18.0.0/15 (benchmarking addresses); they are map contents
//!   only, no packet is sent.
//!
//! Timings of a change ("agent"): from handing the snapshot to `Reconciler::update` until
//! `Syncer::apply_changes` returns, when the maps hold the new state. The source's share
//! ("snapshot build") is measured separately for the same change: applying the watch event to
//! the mirror and building the snapshot from both mirrors, as `source::kube::run` does per
//! batch of events; so is the agent releasing its
//! previous snapshot. None of it includes the API server, the watch delivery or JSON decoding.
//! A second series applies changes back to back, without the source's work in between.
//!
//! Memory: the real agent binary (`NODEPORT_AGENT_BIN`) in a network namespace of its own,
//! started on manifests of 10,000 and 65,536 Services (the comparison's Services, default
//! Maglev M) with its metrics endpoint on and scraped once; its RSS from /proc/PID/status
//! against the kernel's memlock of its maps (/proc/PID/fdinfo). The Maglev and backend arrays
//! are memory-mapped, and a mapping counts in full in the RSS: the target is an RSS below twice
//! the maps' own size (one mapping, plus the agent's heap). `NODEPORT_BENCH_RSS_SERVICES`
//! picks other sizes (`0` skips the measurement).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::runtime::watcher::Event;
use nodeport_agent::{
    datapath::{Datapath, Sizing},
    desired::{self, NodeContext, Reconciler, SERVICE_NAME_LABEL},
    maglev::{self, MaglevKey},
    model::{Protocol, ServicePortKey},
    source::kube::Mirror,
    sync::{GlobalSettings, Programmed, SyncReport, Syncer},
};
use nodeport_common::{
    CT_F_SNAT, CtEntry, CtKey, CtState, FrontendKey, IPPROTO_TCP, capacity, frontend_port_bit,
};

/// NodePort Services to program.
const SERVICES: u32 = 10_000;
/// Ready endpoints per Service (one EndpointSlice each).
const ENDPOINTS: u32 = 3;
/// EndpointSlice changes measured.
const CHANGES: usize = 1_000;
/// Repetitions of the initial programming, each into a freshly loaded datapath.
const PROGRAM_ROUNDS: usize = 5;
/// The agent's default Maglev table size.
const MAGLEV_SIZE: u32 = capacity::MAGLEV_SIZE;
const FIRST_NODE_PORT: u32 = 20_000;
const BACKEND_PORT: u16 = 8080;
const NODE_NAME: &str = "node-0";
/// Endpoints are spread over this many nodes; those on `NODE_NAME` are local backends.
const NODES: u32 = 20;
const NAMESPACES: u32 = 50;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Targets from the issue.
const PROGRAM_TARGET: Duration = Duration::from_millis(500);
const CHANGE_P99_TARGET: Duration = Duration::from_millis(10);

fn sizing() -> Sizing {
    sizing_for(SERVICES)
}

fn sizing_for(services: u32) -> Sizing {
    let defaults = Sizing::default();
    Sizing {
        services: services + 16,
        // One frontend per Service and node address (one address here).
        frontends: services + 16,
        backends: services * ENDPOINTS + 16,
        maglev_size: MAGLEV_SIZE,
        ..defaults
    }
}

fn node() -> NodeContext {
    NodeContext {
        node_name: NODE_NAME.into(),
        zone: String::new(),
        node_addresses: vec![NODE_IP],
        node_addresses_v6: Vec::new(),
        proxy_name: None,
        guard: Default::default(),
        source_ranges_on_node_ports: false,
    }
}

fn settings() -> GlobalSettings {
    GlobalSettings {
        config: nodeport_tests::fixture::default_config(),
        snat_addrs: [(1, NODE_IP)].into(),
        local_nets: [nodeport_agent::model::Ipv4Prefix::host(NODE_IP)].into(),
    }
}

fn namespace(i: u32) -> String {
    format!("team-{:02}", i % NAMESPACES)
}

fn service_name(i: u32) -> String {
    format!("svc-{i:05}")
}

fn node_port(i: u32) -> u16 {
    u16::try_from(FIRST_NODE_PORT + i).expect("node ports fit in u16")
}

/// The i-th endpoint address of the benchmark, from 198.18.1.0 on (198.18.0.0/24 holds the
/// node's address).
fn endpoint_addr(n: u32) -> Ipv4Addr {
    let ip = u32::from(Ipv4Addr::new(198, 18, 1, 0)) + n;
    assert!(
        ip <= u32::from(Ipv4Addr::new(198, 19, 255, 255)),
        "out of 198.18.0.0/15"
    );
    Ipv4Addr::from(ip)
}

fn meta(namespace: String, name: String, version: u64) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace),
        name: Some(name),
        resource_version: Some(version.to_string()),
        ..ObjectMeta::default()
    }
}

fn service(i: u32) -> Service {
    Service {
        metadata: meta(namespace(i), service_name(i), u64::from(i) + 1),
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: 80,
                target_port: Some(IntOrString::Int(i32::from(BACKEND_PORT))),
                node_port: Some(i32::from(node_port(i))),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn endpoint(addr: Ipv4Addr, node: u32, ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec![addr.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(ready),
            terminating: Some(false),
        }),
        node_name: Some(format!("node-{node}")),
        ..Endpoint::default()
    }
}

fn slice(i: u32) -> EndpointSlice {
    let endpoints = (0..ENDPOINTS)
        .map(|k| {
            let n = i * ENDPOINTS + k;
            endpoint(endpoint_addr(n), n % NODES, true)
        })
        .collect();
    let mut metadata = meta(
        namespace(i),
        format!("{}-x7k2p", service_name(i)),
        u64::from(SERVICES + i) + 1,
    );
    metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), service_name(i))].into());
    EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints: Some(endpoints),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            protocol: Some("TCP".into()),
            port: Some(i32::from(BACKEND_PORT)),
            ..EndpointPort::default()
        }]),
    }
}

fn port_key(i: u32) -> ServicePortKey {
    ServicePortKey {
        namespace: namespace(i).into(),
        name: service_name(i).into(),
        port_name: "http".into(),
        protocol: Protocol::Tcp,
    }
}

/// The backends a slice should put in the Maglev table: its ready endpoints (none of the
/// benchmark's endpoints is terminating, so there is no fallback to consider).
fn expected_table(slice: &EndpointSlice) -> BTreeSet<SocketAddrV4> {
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| &e.addresses)
        .map(|a| SocketAddrV4::new(a.parse().expect("an IPv4 address"), BACKEND_PORT))
        .collect()
}

/// The kube source's mirrors (`source::kube::Mirror`), fed with watch events as the source
/// feeds them.
struct Stores {
    services: Mirror<Service>,
    slices: Mirror<EndpointSlice>,
}

struct Snapshot {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
}

fn listed<K: kube::ResourceExt + Clone>(objects: &[K]) -> Mirror<K> {
    let mut mirror = Mirror::default();
    mirror.apply(Event::Init);
    for obj in objects {
        mirror.apply(Event::InitApply(obj.clone()));
    }
    mirror.apply(Event::InitDone);
    mirror
}

impl Stores {
    fn new(services: &[Service], slices: &[EndpointSlice]) -> Self {
        Self {
            services: listed(services),
            slices: listed(slices),
        }
    }

    /// The snapshot as the source builds it (`Mirrors::snapshot`).
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.objects(),
            slices: self.slices.objects(),
        }
    }
}

/// Memory the kernel charges for the loaded maps (`memlock` of every BPF map this process
/// holds an fd of), and that of the Maglev array alone.
struct MapMemory {
    total: u64,
    maglev: u64,
}

fn map_memory(maglev_entries: u32) -> Result<MapMemory> {
    map_memory_of("self", |entries, _| entries == u64::from(maglev_entries))
}

/// [`map_memory`] of the process `pid` (`self` for this one); `is_maglev(max_entries,
/// map_flags)` tells the Maglev array.
fn map_memory_of(pid: &str, mut is_maglev: impl FnMut(u64, u64) -> bool) -> Result<MapMemory> {
    let mut memory = MapMemory {
        total: 0,
        maglev: 0,
    };
    // A map can be behind several fds (the agent's metrics sampler holds duplicates): each
    // map counts once.
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if field("map_type:").is_none() || !seen.insert(field("map_id:")) {
            continue;
        }
        let memlock = field("memlock:").unwrap_or(0);
        memory.total += memlock;
        let flags = text
            .lines()
            .find_map(|l| l.strip_prefix("map_flags:"))
            .and_then(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        if is_maglev(field("max_entries:").unwrap_or(0), flags) {
            memory.maglev += memlock;
        }
    }
    Ok(memory)
}

/// Checks one service in the maps themselves (not the agent's picture of them): its frontend,
/// its port bit, and a Maglev table whose every slot names one of `expected`, all of them.
fn check_in_maps(dp: &Datapath, i: u32, expected: &BTreeSet<SocketAddrV4>) -> Result<()> {
    let port = node_port(i);
    let key = FrontendKey::new(u32::from(NODE_IP).to_be(), port, IPPROTO_TCP);
    let fe = dp
        .maps
        .frontends
        .get(&key, 0)
        .with_context(|| format!("service {i}: no frontend for port {port}"))?;
    ensure!(
        usize::from(fe.backend_count) == expected.len(),
        "service {i}: backend_count {} (expected {})",
        fe.backend_count,
        expected.len()
    );
    let (word, bit) = frontend_port_bit(port);
    ensure!(
        dp.maps.frontend_ports.get(&word, 0)? & bit != 0,
        "service {i}: port bit of {port} not set"
    );
    if expected.is_empty() {
        return Ok(());
    }
    let m = dp.sizing.maglev_size;
    let mut seen = BTreeSet::new();
    for slot in 0..m {
        let id = dp.maps.maglev.get(fe.maglev_block * m + slot)?;
        let b = dp.maps.backends.get(id)?;
        ensure!(
            b.svc_id == fe.svc_id,
            "service {i}: slot {slot} holds backend {id} of service id {} (expected {})",
            b.svc_id,
            fe.svc_id
        );
        seen.insert(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(b.addr_be)),
            u16::from_be(b.port_be),
        ));
    }
    ensure!(
        &seen == expected,
        "service {i}: the Maglev table holds {seen:?}, expected {expected:?}"
    );
    Ok(())
}

/// Checks the agent's picture of one service against the expected table.
fn check_programmed(
    programmed: &Programmed,
    i: u32,
    expected: &BTreeSet<SocketAddrV4>,
) -> Result<()> {
    let key = port_key(i);
    let svc = programmed
        .services
        .get(&key)
        .with_context(|| format!("{key} is not programmed"))?;
    let table: BTreeSet<SocketAddrV4> = svc.table.iter().copied().collect();
    ensure!(
        table.len() == svc.table.len() && &table == expected,
        "{key}: programmed table {:?}, expected {expected:?}",
        svc.table
    );
    Ok(())
}

fn check_report(report: &SyncReport, applied: usize) -> Result<()> {
    if let Some((key, e)) = report.failed.first() {
        bail!(
            "{} service(s) failed, first {key}: {e}",
            report.failed.len()
        );
    }
    ensure!(
        report.applied.len() == applied && report.removed.is_empty(),
        "applied {} (expected {applied}), removed {}",
        report.applied.len(),
        report.removed.len()
    );
    Ok(())
}

/// One programming of every service into an empty datapath.
struct ProgramRun {
    load: Duration,
    reconcile: Duration,
    sync: Duration,
}

impl ProgramRun {
    fn total(&self) -> Duration {
        self.reconcile + self.sync
    }
}

/// Timings of one change.
struct ChangeRun {
    /// The source's work: the mirror takes the event, the snapshot is built.
    source: Duration,
    /// The agent releasing the previous snapshot as it stores the new one.
    release: Duration,
    reconcile: Duration,
    sync: Duration,
}

impl ChangeRun {
    /// What the target is about: `Reconciler::update` and `Syncer::apply_changes`.
    fn agent(&self) -> Duration {
        self.reconcile + self.sync
    }

    /// Everything from the watch event on, in this process.
    fn total(&self) -> Duration {
        self.source + self.release + self.reconcile + self.sync
    }
}

/// Where the time of the initial programming goes, measured apart from it.
struct Breakdown {
    /// `maglev::table` for every service's backends.
    maglev_tables: Duration,
    /// Writing every table into the mmap'ed array.
    maglev_writes: Duration,
}

pub struct Results {
    sizing: Sizing,
    memory: MapMemory,
    rss: Vec<RssRow>,
    program: Vec<ProgramRun>,
    breakdown: Breakdown,
    scrape: ScrapeCost,
    changes: Vec<ChangeRun>,
    direct: Vec<ChangeRun>,
    toggles: usize,
    moves: usize,
}

/// The nearest-rank percentile `q` (0..=1) of sorted durations.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted_by<T>(runs: &[T], f: impl Fn(&T) -> Duration) -> Vec<Duration> {
    let mut v: Vec<Duration> = runs.iter().map(f).collect();
    v.sort();
    v
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// A small deterministic generator, so every run changes the same services the same way.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % u64::from(bound)) as u32
    }
}

/// What a scrape of `/metrics` costs the agent with every service programmed and a full
/// connection table.
struct ScrapeCost {
    /// Entries in the connection table when sampled.
    conntrack_entries: u64,
    /// The first sample, which also computes the node port range gauges.
    first: Duration,
    /// The following samples (the range gauges are kept: the cluster state did not change).
    samples: Vec<Duration>,
    /// Encoding the registry into the response, after a sample.
    encode: Duration,
}

/// Times `metrics::Sampler::sample` (what each scrape runs, on a blocking thread) on a pinned
/// datapath holding the benchmark's services and a connection table filled to capacity.
fn scrape_cost(
    object: &[u8],
    sizing: &Sizing,
    settings: &GlobalSettings,
    services: &[Service],
    slices: &[EndpointSlice],
) -> Result<ScrapeCost> {
    let pins = nodeport_tests::agent::PinDirGuard::new("npbs");
    let mut dp = Datapath::load_object(object, sizing, Some(pins.path()))
        .context("loading a pinned datapath")?;
    let services: Vec<Arc<Service>> = services.iter().cloned().map(Arc::new).collect();
    let slices: Vec<Arc<EndpointSlice>> = slices.iter().cloned().map(Arc::new).collect();
    let mut reconciler = Reconciler::new(node());
    let mut programmed = Programmed::empty(&dp.sizing);
    let changes = reconciler.update(&services, &slices);
    let report = Syncer {
        maps: &mut dp.maps,
        sizing,
    }
    .apply_changes(
        &mut programmed,
        reconciler.desired(),
        &changes.services,
        settings,
    );
    check_report(&report, SERVICES as usize)?;

    // Live connections, half of them SNATed, spread over the services.
    let now = nodeport_agent::datapath::jiffies_now(settings.config.hz);
    for n in 0..sizing.conntrack {
        let key = CtKey {
            saddr_be: u32::from(Ipv4Addr::new(198, 19, (n >> 8) as u8, n as u8)).to_be(),
            daddr_be: u32::from(NODE_IP).to_be(),
            sport_be: (10_000 + (n >> 16) as u16).to_be(),
            dport_be: node_port(n % SERVICES).to_be(),
            proto: IPPROTO_TCP,
            dir: (n % 2) as u8,
            _pad: 0,
        };
        let entry = CtEntry {
            last_seen: now,
            flags: if n % 4 == 0 { CT_F_SNAT } else { 0 },
            state: CtState {
                replied: 1,
                established: 1,
                ..CtState::default()
            },
            svc_id: n % SERVICES,
            ..CtEntry::default()
        };
        dp.maps.conntrack.insert(key, entry, 0)?;
    }
    let conntrack_entries = dp.maps.conntrack.keys().count() as u64;

    let (tx, rx) = nodeport_agent::source::channel();
    tx.send(Some(Arc::new(nodeport_agent::source::Snapshot {
        services: services.clone(),
        endpoint_slices: slices.clone(),
        revision: 1,
        ..Default::default()
    })))?;
    let mut registry = prometheus_client::registry::Registry::default();
    let mut sampler = nodeport_agent::metrics::Sampler::register(
        &mut registry,
        dp.maps.share()?,
        settings.config,
        nodeport_agent::source::SourceStats::Files(
            nodeport_agent::source::files::FilesSourceStats::new(),
        ),
        rx,
        "30000-32767".parse().map_err(|e| anyhow::anyhow!("{e}"))?,
        true,
    );
    let timed = |sampler: &mut nodeport_agent::metrics::Sampler| {
        let started = Instant::now();
        sampler.sample();
        started.elapsed()
    };
    let first = timed(&mut sampler);
    let samples: Vec<Duration> = (0..5).map(|_| timed(&mut sampler)).collect();
    let started = Instant::now();
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry)?;
    let encode = started.elapsed();
    // What was read is what was written.
    let connections = body
        .lines()
        .find_map(|l| l.strip_prefix("nodeport_conntrack_connections "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    ensure!(
        connections.is_some_and(|c| c > 0 && c <= conntrack_entries),
        "the scrape read {connections:?} connections of {conntrack_entries} entries"
    );
    ensure!(
        body.matches("nodeport_service_packets_total{").count() == 2 * SERVICES as usize,
        "per-service series"
    );
    eprintln!(
        "bench: agent: a scrape with {SERVICES} services and {conntrack_entries} conntrack entries: {} ms (first {} ms), encoding {} ms",
        ms(samples[samples.len() / 2]),
        ms(first),
        ms(encode)
    );
    Ok(ScrapeCost {
        conntrack_entries,
        first,
        samples,
        encode,
    })
}

/// Times `maglev::table` and the table writes for the benchmark's services, to tell how much of
/// the sync they are.
fn breakdown(dp: &mut Datapath) -> Result<Breakdown> {
    let m = dp.sizing.maglev_size;
    let tables: Vec<Vec<MaglevKey>> = (0..SERVICES)
        .map(|i| {
            let mut keys: Vec<MaglevKey> = (0..ENDPOINTS)
                .map(|k| MaglevKey {
                    addr_be: u32::from(endpoint_addr(i * ENDPOINTS + k)).to_be(),
                    port_be: BACKEND_PORT.to_be(),
                })
                .collect();
            keys.sort();
            keys
        })
        .collect();
    let started = Instant::now();
    let computed: Vec<Vec<u32>> = tables.iter().map(|keys| maglev::table(keys, m)).collect();
    let maglev_tables = started.elapsed();
    let started = Instant::now();
    for (block, table) in computed.iter().enumerate() {
        dp.maps.maglev.set_range(block as u32 * m, table)?;
    }
    let maglev_writes = started.elapsed();
    Ok(Breakdown {
        maglev_tables,
        maglev_writes,
    })
}

/// A fresh datapath programmed with a whole snapshot, as the agent's first reconcile does.
struct Programming {
    dp: Datapath,
    reconciler: Reconciler,
    programmed: Programmed,
    changes: desired::Changes,
    report: SyncReport,
    run: ProgramRun,
}

/// Loads the datapath, then runs `Reconciler::update` and `Syncer::apply_changes` on the
/// snapshot, timing each part.
fn program_fresh(
    object: &[u8],
    sizing: &Sizing,
    settings: &GlobalSettings,
    snapshot: &Snapshot,
) -> Result<Programming> {
    let started = Instant::now();
    let mut dp = Datapath::load_object(object, sizing, None).context("loading the datapath")?;
    let load = started.elapsed();
    let mut reconciler = Reconciler::new(node());
    let mut programmed = Programmed::empty(&dp.sizing);

    let started = Instant::now();
    let changes = reconciler.update(&snapshot.services, &snapshot.slices);
    let reconciled = Instant::now();
    let report = Syncer {
        maps: &mut dp.maps,
        sizing,
    }
    .apply_changes(
        &mut programmed,
        reconciler.desired(),
        &changes.services,
        settings,
    );
    let synced = Instant::now();
    Ok(Programming {
        dp,
        reconciler,
        programmed,
        changes,
        report,
        run: ProgramRun {
            load,
            reconcile: reconciled - started,
            sync: synced - reconciled,
        },
    })
}

/// The largest count `program_times` takes: node ports 20000 + i must fit in a u16.
pub const MAX_PROGRAMMED: u32 = 45_000;

/// The agent's programming of `n` Services into empty maps, `rounds` times (each into a
/// freshly loaded datapath): `Reconciler::update` plus `Syncer::apply_changes`, as in `run`,
/// checked every round. For the comparison with iptables-restore at several sizes.
pub fn program_times(object: &[u8], n: u32, rounds: usize) -> Result<Vec<Duration>> {
    ensure!(
        n <= MAX_PROGRAMMED,
        "{n} services: node ports would overflow"
    );
    let sizing = sizing_for(n);
    let settings = settings();
    let services: Vec<Service> = (0..n).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..n).map(slice).collect();
    let snapshot = Stores::new(&services, &slices).snapshot();
    let mut times = Vec::new();
    for _ in 0..rounds {
        let fresh = program_fresh(object, &sizing, &settings, &snapshot)?;
        times.push(fresh.run.total());
        check_report(&fresh.report, n as usize)?;
        let frontends = fresh.dp.maps.frontends.keys().count();
        ensure!(frontends == n as usize, "{frontends} frontends in the map");
    }
    Ok(times)
}

/// Services at which the agent process's memory is measured.
const RSS_SERVICES: &[u32] = &[10_000, 65_536];
/// Where the measured agent serves its metrics (inside its own namespace).
const RSS_METRICS: &str = "127.0.0.1:9480";

/// The agent process's memory with `services` programmed.
struct RssRow {
    services: u32,
    /// The kernel's memlock of the agent's maps, and of the Maglev array alone.
    maps: MapMemory,
    /// From /proc/PID/status, bytes: VmRSS and its parts, and the peak (VmHWM).
    rss: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    peak: u64,
    /// VmRSS once programmed, before the first scrape.
    before_scrape: u64,
    /// From the start to the first reconcile.
    start: Duration,
}

impl RssRow {
    /// The target: one mapping of the maps plus the agent's heap, under twice the maps.
    fn met(&self) -> bool {
        self.rss < 2 * self.maps.total
    }
}

fn rss_rows() -> Result<Vec<RssRow>> {
    let counts: Vec<u32> = match std::env::var("NODEPORT_BENCH_RSS_SERVICES") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<Vec<u32>, _>>()?
            .into_iter()
            .filter(|n| *n > 0)
            .collect(),
        Err(_) => RSS_SERVICES.to_vec(),
    };
    let mut rows = Vec::new();
    for n in counts {
        eprintln!("bench: agent: memory of the agent process with {n} Services ...");
        let row = rss_at(n)?;
        eprintln!(
            "bench: agent: {n} Services: RSS {:.1} MiB (maps {:.1} MiB, peak {:.1} MiB)",
            mib(row.rss),
            mib(row.maps.total),
            mib(row.peak)
        );
        rows.push(row);
    }
    Ok(rows)
}

/// A `kB` line of /proc/PID/status, in bytes.
fn proc_status_bytes(pid: u32, name: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|k| k * 1024)
        .with_context(|| format!("{name} in /proc/{pid}/status"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Starts the agent binary on `n` Services in a namespace with one external interface, scrapes
/// its metrics once, and reads its memory.
fn rss_at(n: u32) -> Result<RssRow> {
    use crate::compare::{node, services as bench_services};
    let ns = nodeport_tests::netns::NetNs::new("rss")?;
    ns.ip("link add ext0 type veth peer name ext1")?;
    ns.ip("link set ext0 up")?;
    ns.ip("link set ext1 up")?;
    ns.ip("link set lo up")?;
    ns.ip("addr add 198.18.0.1/24 dev ext0")?;
    let fillers = bench_services::fillers(n);
    let measured = bench_services::measured(bench_services::BACKEND_A);
    let metrics: std::net::SocketAddr = RSS_METRICS.parse()?;
    let (agent, start) =
        node::Agent::start_with_metrics(&ns, &fillers, &measured, None, Some(metrics))?;
    let pid = agent.pid()?;
    let rss_before_scrape = proc_status_bytes(pid, "VmRSS:")?;
    // As under Prometheus: the sampler has read every map once.
    let body = ns.run(|| -> Result<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(metrics)?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    ensure!(
        body.starts_with("HTTP/1.1 200"),
        "/metrics: {}",
        body.lines().next().unwrap_or_default()
    );
    // Every Service programmed (the fillers' TCP ports and the measured Service's two), not
    // refused: the memory is that of N Services.
    let ports = u64::from(n) + 1;
    let programmed = body
        .lines()
        .find_map(|l| l.strip_prefix("nodeport_services "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    ensure!(
        programmed == Some(ports),
        "{programmed:?} service ports programmed, expected {ports}"
    );
    let kib = |name: &str| proc_status_bytes(pid, name);
    // The Maglev array: the larger of the two memory-mapped arrays (BPF_F_MMAPABLE).
    let mmapable = |flags: u64| flags & u64::from(nodeport_common::BPF_F_MMAPABLE) != 0;
    let mut largest = 0;
    map_memory_of(&pid.to_string(), |entries, flags| {
        if mmapable(flags) {
            largest = largest.max(entries);
        }
        false
    })?;
    let maps = map_memory_of(&pid.to_string(), |entries, flags| {
        mmapable(flags) && entries == largest
    })?;
    let row = RssRow {
        services: n,
        maps,
        rss: kib("VmRSS:")?,
        anon: kib("RssAnon:")?,
        file: kib("RssFile:")?,
        shmem: kib("RssShmem:")?,
        peak: kib("VmHWM:")?,
        before_scrape: rss_before_scrape,
        start,
    };
    agent.stop()?;
    Ok(row)
}

pub fn run(object: &[u8]) -> Result<Results> {
    let sizing = sizing();
    let settings = settings();
    eprintln!("bench: agent: building {SERVICES} Services and EndpointSlices ...");
    let services: Vec<Service> = (0..SERVICES).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..SERVICES).map(slice).collect();
    let stores = Stores::new(&services, &slices);
    let snapshot = stores.snapshot();
    ensure!(snapshot.services.len() == SERVICES as usize);
    ensure!(snapshot.slices.len() == SERVICES as usize);

    // 1. Programming everything into empty maps, a fresh datapath each round.
    let mut program = Vec::new();
    let mut last = None;
    let mut memory = None;
    for round in 0..PROGRAM_ROUNDS {
        drop(last.take());
        let Programming {
            dp,
            reconciler,
            programmed,
            changes,
            report,
            run,
        } = program_fresh(object, &sizing, &settings, &snapshot)?;
        // While this round's datapath is loaded (before it, no map is open).
        if memory.is_none() {
            memory = Some(map_memory(sizing.maglev_size * sizing.maglev_blocks())?);
        }

        // Correctness, every round: all services in the agent's picture and in the maps.
        ensure!(
            changes.services.len() == SERVICES as usize,
            "{} services changed (expected {SERVICES})",
            changes.services.len()
        );
        check_report(&report, SERVICES as usize)?;
        ensure!(programmed.services.len() == SERVICES as usize);
        let frontends = dp.maps.frontends.keys().count();
        ensure!(
            frontends == SERVICES as usize,
            "{frontends} frontends in the map"
        );
        for i in 0..SERVICES {
            let want = expected_table(&slices[i as usize]);
            check_programmed(&programmed, i, &want)?;
            check_in_maps(&dp, i, &want)?;
        }
        eprintln!(
            "bench: agent: round {round}: programmed {SERVICES} services in {} ms (reconcile {} ms, sync {} ms; datapath load {} ms); verified",
            ms(run.total()),
            ms(run.reconcile),
            ms(run.sync),
            ms(run.load)
        );
        program.push(run);
        last = Some((dp, reconciler, programmed));
    }
    let (dp, reconciler, programmed) = last.expect("at least one round");

    // 2. Changes, first as the kube source feeds them, then back to back.
    let positions = snapshot
        .slices
        .iter()
        .enumerate()
        .map(|(at, s)| {
            let name = s.metadata.name.as_deref().unwrap_or_default();
            let i: u32 = name[4..9].parse().context("a benchmark slice name")?;
            Ok((i, at))
        })
        .collect::<Result<_>>()?;
    let mut bench = Changes {
        dp,
        reconciler,
        programmed,
        sizing: sizing.clone(),
        settings,
        stores,
        held: snapshot,
        positions,
        slices,
        rng: Lcg(0x6e6f_6465_706f_7274),
        next_addr: SERVICES * ENDPOINTS,
        next_version: u64::from(2 * SERVICES) + 1,
        toggles: 0,
        moves: 0,
    };
    let changes = bench.run(Feed::Source)?;
    let direct = bench.run(Feed::Direct)?;
    eprintln!("bench: agent: {} changes applied and verified", 2 * CHANGES);
    // Nothing else moved: every service still as its slice says.
    for i in 0..SERVICES {
        check_programmed(
            &bench.programmed,
            i,
            &expected_table(&bench.slices[i as usize]),
        )?;
        check_in_maps(&bench.dp, i, &expected_table(&bench.slices[i as usize]))?;
    }

    let breakdown = breakdown(&mut bench.dp)?;
    let Changes {
        dp,
        settings,
        slices,
        toggles,
        moves,
        ..
    } = bench;
    // Its maps go before the scrape measurement loads another datapath.
    drop(dp);
    let scrape = scrape_cost(object, &sizing, &settings, &services, &slices)?;
    let rss = rss_rows()?;
    Ok(Results {
        sizing,
        memory: memory.expect("measured in the first round"),
        rss,
        program,
        breakdown,
        scrape,
        changes,
        direct,
        toggles,
        moves,
    })
}

/// How a change reaches the agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Through the source's mirror and a snapshot built as the kube source builds it, on this
    /// thread just before (so the agent's figures include the caches and allocator state that
    /// work leaves: pessimistic, since in the agent the source runs as another task).
    Source,
    /// The snapshot edited in place, changes back to back: the agent's own cost alone.
    Direct,
}

/// The change phase: everything programmed, and what changes are made of.
struct Changes {
    dp: Datapath,
    reconciler: Reconciler,
    programmed: Programmed,
    sizing: Sizing,
    settings: GlobalSettings,
    stores: Stores,
    /// The snapshot the agent holds.
    held: Snapshot,
    /// Service index -> position of its slice in the (sorted) snapshot.
    positions: BTreeMap<u32, usize>,
    /// Every slice as it now is.
    slices: Vec<EndpointSlice>,
    rng: Lcg,
    next_addr: u32,
    next_version: u64,
    toggles: usize,
    moves: usize,
}

impl Changes {
    /// CHANGES changes, each replacing one EndpointSlice: toggling an endpoint's readiness or
    /// moving an endpoint to a new address, so that the service's Maglev table changes. Each
    /// is verified in the agent's picture and in the maps (not timed).
    fn run(&mut self, feed: Feed) -> Result<Vec<ChangeRun>> {
        let mut runs = Vec::with_capacity(CHANGES);
        for n in 0..CHANGES {
            let i = self.rng.next(SERVICES);
            let k = self.rng.next(ENDPOINTS) as usize;
            let mut new = self.slices[i as usize].clone();
            let ep = &mut new.endpoints.as_mut().expect("endpoints")[k];
            if n % 2 == 0 {
                let c = ep.conditions.as_mut().expect("conditions");
                let ready = !c.ready.unwrap_or(true);
                c.ready = Some(ready);
                c.serving = Some(ready);
                self.toggles += 1;
            } else {
                ep.addresses = vec![endpoint_addr(self.next_addr).to_string()];
                self.next_addr += 1;
                self.moves += 1;
            }
            new.metadata.resource_version = Some(self.next_version.to_string());
            self.next_version += 1;
            let want = expected_table(&new);
            self.slices[i as usize] = new.clone();

            let started = Instant::now();
            let (built, received) = match feed {
                Feed::Source => {
                    // The source: the mirror takes the event and says it changed, the
                    // snapshot is built.
                    let publish = self.stores.slices.apply(Event::Apply(new));
                    let snapshot = self.stores.snapshot();
                    let built = Instant::now();
                    // The agent keeps the new snapshot, releasing the previous one
                    // (`agent.snapshot = s`).
                    self.held = snapshot;
                    let received = Instant::now();
                    ensure!(publish, "change {n}: the mirror saw no change");
                    (built, received)
                }
                Feed::Direct => {
                    self.held.slices[self.positions[&i]] = Arc::new(new);
                    (started, Instant::now())
                }
            };
            let changes = self
                .reconciler
                .update(&self.held.services, &self.held.slices);
            let reconciled = Instant::now();
            let report = Syncer {
                maps: &mut self.dp.maps,
                sizing: &self.sizing,
            }
            .apply_changes(
                &mut self.programmed,
                self.reconciler.desired(),
                &changes.services,
                &self.settings,
            );
            let synced = Instant::now();
            runs.push(ChangeRun {
                source: built - started,
                release: received - built,
                reconcile: reconciled - received,
                sync: synced - reconciled,
            });

            let at = || format!("change {n}");
            ensure!(
                changes.services == BTreeSet::from([port_key(i)]),
                "{}: the reconciler reported {:?}",
                at(),
                changes.services
            );
            check_report(&report, 1).with_context(at)?;
            check_programmed(&self.programmed, i, &want).with_context(at)?;
            check_in_maps(&self.dp, i, &want).with_context(at)?;
        }
        Ok(runs)
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

pub fn render(r: &Results, date: &str, machine: &str) -> Result<String> {
    let mut md = String::new();
    let s = &r.sizing;
    writeln!(md, "# Agent benchmark, {date}\n")?;
    writeln!(md, "Machine: {machine}\n")?;
    writeln!(
        md,
        "{SERVICES} NodePort Services (one TCP port each, node ports {FIRST_NODE_PORT}-{}: beyond \
         the default range: the bench's node context sets no port guard, only the maps are \
         exercised), each \
         with one EndpointSlice of {ENDPOINTS} ready endpoints; one node address ({NODE_IP}). \
         Objects are built in code and held in the kube source's mirrors \
         (`source::kube::Mirror`). The agent's `Reconciler` and `Syncer` write into a real datapath loaded \
         with maps sized services {}, frontends {}, backends {}, Maglev M = {} ({} blocks), \
         conntrack {}; nothing attached, no packet sent.\n",
        u32::from(node_port(SERVICES - 1)),
        s.services,
        s.frontends,
        s.backends,
        s.maglev_size,
        s.maglev_blocks(),
        s.conntrack
    )?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    writeln!(
        md,
        "Map memory (the kernel's memlock of the loaded maps): {:.1} MiB in all, of which the \
         Maglev array {:.1} MiB ({} blocks x {} slots x 8 bytes: the kernel lays 4-byte array \
         values 8 bytes apart). It loads without trouble on this machine.\n",
        mib(r.memory.total),
        mib(r.memory.maglev),
        s.maglev_blocks(),
        s.maglev_size
    )?;

    writeln!(md, "## Programming {SERVICES} services into empty maps\n")?;
    writeln!(
        md,
        "From `Reconciler::update` with every object (a fresh reconciler) until \
         `Syncer::apply_changes` returns; a freshly loaded datapath each round (its load, \
         verifier included, is not counted). {} rounds; every round verified in the agent's \
         picture and in the maps (every frontend, port bit and Maglev table).\n",
        r.program.len()
    )?;
    writeln!(md, "| | median | max |")?;
    writeln!(md, "|---|---:|---:|")?;
    type Column = fn(&ProgramRun) -> Duration;
    let rows: [(&str, Column); 4] = [
        ("desired state (`Reconciler::update`), ms", |p| p.reconcile),
        ("map writes (`Syncer::apply_changes`), ms", |p| p.sync),
        ("**total**, ms", ProgramRun::total),
        ("(datapath load, not counted), ms", |p| p.load),
    ];
    for (label, f) in rows {
        let v = sorted_by(&r.program, f);
        writeln!(
            md,
            "| {label} | {} | {} |",
            ms(percentile(&v, 0.5)),
            ms(*v.last().expect("rounds"))
        )?;
    }
    let b = &r.breakdown;
    writeln!(
        md,
        "\nMeasured apart, for the same {SERVICES} backend sets: `maglev::table` {} ms, writing \
         the tables into the mmap'ed array {} ms. The rest of the sync is the per-service \
         bookkeeping and one syscall each for the frontend, the service name and the frontend \
         port's bitmap word.\n",
        ms(b.maglev_tables),
        ms(b.maglev_writes)
    )?;

    writeln!(
        md,
        "## From an EndpointSlice change to the maps\n\n{SERVICES} services programmed; each \
         change replaces one EndpointSlice (a new object) of a service drawn at random (fixed \
         seed): half toggle an endpoint's readiness, half move an endpoint to a new address \
         ({} and {} over both runs below); either changes the service's Maglev table. After \
         each change the service is checked in the agent's picture and in the maps (not \
         timed).\n",
        r.toggles, r.moves
    )?;
    writeln!(
        md,
        "{CHANGES} changes fed as the kube source feeds them. *agent*: from handing the \
         snapshot to `Reconciler::update` until `Syncer::apply_changes` returns, when the maps \
         hold the new table: the agent's processing of a snapshot. *snapshot build*: what the \
         kube source does per batch of events (the mirror takes the event and reports the \
         change, the snapshot copies both mirrors' `Arc`s in order). *release*: the agent dropping its previous snapshot as it \
         stores the new one. *with snapshot build*: all of these. Not included: the API \
         server, the watch delivery and JSON decoding, the channel hop to the agent's task. \
         The source's work runs on the same thread just before the agent's, so the agent's \
         figures include the cache and allocator state it leaves (in the agent it is another \
         task).\n"
    )?;
    writeln!(
        md,
        "| ms | reconcile | sync | **agent** | snapshot build | release | **with snapshot build** |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    let cols: [Vec<Duration>; 6] = [
        sorted_by(&r.changes, |c| c.reconcile),
        sorted_by(&r.changes, |c| c.sync),
        sorted_by(&r.changes, ChangeRun::agent),
        sorted_by(&r.changes, |c| c.source),
        sorted_by(&r.changes, |c| c.release),
        sorted_by(&r.changes, ChangeRun::total),
    ];
    let quantiles = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)];
    for (label, q) in quantiles {
        let cells: Vec<String> = cols.iter().map(|c| ms(percentile(c, q))).collect();
        writeln!(md, "| {label} | {} |", cells.join(" | "))?;
    }
    writeln!(
        md,
        "\n{CHANGES} more changes back to back, the agent's snapshot edited in place (no source \
         work in between): the agent's own cost.\n"
    )?;
    writeln!(md, "| ms | reconcile | sync | **agent** |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    let direct: [Vec<Duration>; 3] = [
        sorted_by(&r.direct, |c| c.reconcile),
        sorted_by(&r.direct, |c| c.sync),
        sorted_by(&r.direct, ChangeRun::agent),
    ];
    for (label, q) in quantiles {
        let cells: Vec<String> = direct.iter().map(|c| ms(percentile(c, q))).collect();
        writeln!(md, "| {label} | {} |", cells.join(" | "))?;
    }

    let program = sorted_by(&r.program, ProgramRun::total);
    let program_median = percentile(&program, 0.5);
    let agent_p99 = percentile(&cols[2], 0.99);
    let total_p99 = percentile(&cols[5], 0.99);
    let sc = &r.scrape;
    let mut samples = sc.samples.clone();
    samples.sort();
    writeln!(md, "\n## A scrape of /metrics\n")?;
    writeln!(
        md,
        "What each scrape runs (`metrics::Sampler::sample`, on a blocking thread beside the \
         agent's loop) with the {SERVICES} services programmed and the connection table filled \
         to capacity ({} entries, all live): the datapath counters, per-service packets and \
         bytes ({} series), the fill level of every map and the connection census. Median of \
         {} samples {} ms (max {} ms); the first, which also computes the node port range \
         gauges, {} ms; encoding the response {} ms.",
        sc.conntrack_entries,
        4 * SERVICES,
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(*samples.last().expect("samples")),
        ms(sc.first),
        ms(sc.encode)
    )?;
    render_rss(&mut md, &r.rss)?;
    writeln!(md, "\n## Targets\n")?;
    writeln!(
        md,
        "Target 1, {SERVICES} services in under {} ms (iptables-restore of the equivalent \
         kube-proxy rules: about 4.7 s here): median {} ms (max {} ms), {}.",
        PROGRAM_TARGET.as_millis(),
        ms(program_median),
        ms(*program.last().expect("rounds")),
        verdict(program_median < PROGRAM_TARGET)
    )?;
    writeln!(
        md,
        "Target 2, p99 change latency under {} ms (the agent's processing, fed by the source): \
         {} ms, {}. With the source's snapshot build and the release: {} ms ({} the target).",
        CHANGE_P99_TARGET.as_millis(),
        ms(agent_p99),
        verdict(agent_p99 < CHANGE_P99_TARGET),
        ms(total_p99),
        if total_p99 < CHANGE_P99_TARGET {
            "also under"
        } else {
            "over"
        }
    )?;
    render_rss_targets(&mut md, &r.rss, "Target 3")?;
    Ok(md)
}

/// The memory rows alone (`NODEPORT_BENCH_ONLY=memory`).
pub fn render_memory_only(date: &str, machine: &str) -> Result<String> {
    let rows = rss_rows()?;
    let mut md = String::new();
    writeln!(md, "# Agent memory benchmark, {date}\n")?;
    writeln!(md, "Machine: {machine}\n")?;
    render_rss(&mut md, &rows)?;
    writeln!(md)?;
    render_rss_targets(&mut md, &rows, "Target")?;
    Ok(md)
}

/// One line per memory row: its RSS against twice its maps' size.
fn render_rss_targets(md: &mut String, rows: &[RssRow], label: &str) -> Result<()> {
    for row in rows {
        writeln!(
            md,
            "{label}, the agent's RSS with {} Services below twice its maps' size ({:.1} MiB): \
             {:.1} MiB, {}.",
            row.services,
            2.0 * mib(row.maps.total),
            mib(row.rss),
            verdict(row.met())
        )?;
    }
    Ok(())
}

fn render_rss(md: &mut String, rows: &[RssRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(md, "\n## Memory of the agent process\n")?;
    writeln!(
        md,
        "The agent binary (release build) in a network namespace of its own with one external \
         interface (a veth, native XDP), started on manifests of N Services (the comparison's: \
         one TCP port and three remote endpoints each, the measured Service two ports; files of \
         4,096 Services), maps sized for them (`--max-services` N + 17, Maglev M = {MAGLEV_SIZE}), \
         metrics on and scraped once; then /proc/PID/status. *maps*: the kernel's memlock of \
         every map the agent holds (/proc/PID/fdinfo), of which the Maglev array. The Maglev and \
         backend arrays are memory-mapped (BPF_F_MMAPABLE), and a mapping counts in full in the \
         RSS (as RssFile or RssShmem), so one mapping of them is the floor; target: RSS below \
         twice the maps' own size.\n"
    )?;
    let command = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|e| format!("({e})"))
    };
    writeln!(
        md,
        "`uname -a`: {}; `nproc`: {}\n",
        command("uname", &["-a"]),
        command("nproc", &[])
    )?;
    writeln!(
        md,
        "| Services | maps, MiB | of which Maglev | RSS before the first scrape, MiB | RSS, MiB | RssAnon | RssFile | RssShmem | peak (VmHWM) | RSS / maps | start to programmed, s | target |"
    )?;
    writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )?;
    for r in rows {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {} |",
            r.services,
            mib(r.maps.total),
            mib(r.maps.maglev),
            mib(r.before_scrape),
            mib(r.rss),
            mib(r.anon),
            mib(r.file),
            mib(r.shmem),
            mib(r.peak),
            r.rss as f64 / r.maps.total as f64,
            r.start.as_secs_f64(),
            verdict(r.met())
        )?;
    }
    Ok(())
}

/// Quick figures for the console.
pub fn summary(r: &Results) -> String {
    let program = sorted_by(&r.program, ProgramRun::total);
    let agent = sorted_by(&r.changes, ChangeRun::agent);
    let total = sorted_by(&r.changes, ChangeRun::total);
    let direct = sorted_by(&r.direct, ChangeRun::agent);
    format!(
        "program {SERVICES}: median {} ms; change p50/p99: agent {}/{} ms, with snapshot build {}/{} ms, back to back {}/{} ms",
        ms(percentile(&program, 0.5)),
        ms(percentile(&agent, 0.5)),
        ms(percentile(&agent, 0.99)),
        ms(percentile(&total, 0.5)),
        ms(percentile(&total, 0.99)),
        ms(percentile(&direct, 0.5)),
        ms(percentile(&direct, 0.99)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&v[..1], 0.99), Duration::from_millis(1));
    }

    #[test]
    fn objects_meet_in_the_desired_state() {
        let services: Vec<Arc<Service>> = (0..3).map(|i| Arc::new(service(i))).collect();
        let slices: Vec<Arc<EndpointSlice>> = (0..3).map(|i| Arc::new(slice(i))).collect();
        let mut reconciler = Reconciler::new(node());
        reconciler.update(&services, &slices);
        let desired = reconciler.desired();
        assert_eq!(desired.services.len(), 3);
        let ds = &desired.services[&port_key(1)];
        let table: BTreeSet<SocketAddrV4> = ds.table_backends().map(|(a, _)| *a).collect();
        assert_eq!(table, expected_table(&slices[1]));
        assert_eq!(table.len(), ENDPOINTS as usize);
        assert_eq!(
            ds.frontends.iter().next().map(|f| f.addr),
            Some(SocketAddrV4::new(NODE_IP, 20_001))
        );
        // Node 0's endpoints are local.
        assert!(
            desired.services[&port_key(0)]
                .backends
                .values()
                .any(|b| b.local)
        );
    }
}
