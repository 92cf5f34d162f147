//! `nodeport-agent run`: load (or adopt) the datapath, attach it, follow the cluster state and
//! the node's interfaces, and keep the maps, health checks and metrics up to date.
//!
//! The loop reacts to three things: a new snapshot from the source, a change of the node's
//! links or addresses, and signals. Services that could not be programmed (a full map) are
//! retried on every later round and every 30 seconds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nodeport_common::{AgentState, DatapathConfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{RunArgs, hostname},
    datapath::{self, Datapath, InterfaceRole, StartGuard},
    desired::{NodeContext, PortGuard, Reconciler},
    gc::Collector,
    health::{HealthConfig, HealthServer, ServiceHealth},
    interfaces::{self, ChangeWatcher, Layout, Selection},
    metrics::{self, Metrics, Sampler},
    model::{IpPrefix, Ipv4Prefix, NoticeKind, ServicePortKey},
    refusals::{Refusals, Refused, ServiceEvents},
    source::{self, Snapshot, SnapshotReceiver, SourceStats},
    switch::{self, DatapathState, Step},
    sync::{GlobalSettings, Programmed, Syncer},
};

/// The per-node secret of the SNAT port hash: the pinned datapath's when adopting one that was
/// configured (so a restart does not move the SNAT ports of live connections), a new random
/// one otherwise.
fn snat_secret(pinned: Option<DatapathConfig>) -> Result<u32> {
    if let Some(cfg) = pinned.filter(|c| c.maglev_size != 0 && c.snat_secret != 0) {
        return Ok(cfg.snat_secret);
    }
    loop {
        let mut bytes = [0u8; 4];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .context("reading /dev/urandom for the SNAT port secret")?;
        // 0 means "not set" in a pinned configuration.
        let secret = u32::from_ne_bytes(bytes);
        if secret != 0 {
            return Ok(secret);
        }
    }
}

/// Sources that are never an outside client (`NP_LOCAL_NETS`): every address of the node
/// (all interfaces, loopback included, whatever --nodeport-addresses says, and the Node
/// object's), and its pod networks (`--pod-cidr`, and the Node's spec.podCIDRs).
fn local_nets(
    layout: &Layout,
    snapshot: &Snapshot,
    pod_cidrs: &[IpPrefix],
) -> BTreeSet<Ipv4Prefix> {
    let mut nets: BTreeSet<Ipv4Prefix> = layout
        .all_addresses
        .iter()
        .chain(&layout.node_addresses)
        .map(|a| Ipv4Prefix::host(*a))
        .collect();
    for ip in snapshot.node_addresses.iter().flatten() {
        if let IpAddr::V4(v4) = ip {
            nets.insert(Ipv4Prefix::host(*v4));
        }
    }
    nets.extend(pod_cidrs.iter().filter_map(|p| p.v4()));
    nets.extend(snapshot.pod_cidrs.iter().flatten().copied());
    nets
}

/// Where node ports answer, per family: the interfaces' addresses `layout` chose, and the
/// Node object's addresses (a cloud's external IP, say) within --nodeport-addresses when given
/// (`selection`); with `primary`, the Node's first address of each family only (kube-proxy's
/// primary node IPs). Never loopback, nor IPv6 link-local.
fn node_addresses(
    layout: &Layout,
    snapshot: &Snapshot,
    selection: &Selection,
) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut addrs: BTreeSet<Ipv4Addr> = layout.node_addresses.clone();
    let mut addrs_v6: BTreeSet<Ipv6Addr> = layout.node_addresses_v6.clone();
    let node_object = snapshot.node_addresses.iter().flatten();
    let take = if selection.primary_only {
        1
    } else {
        usize::MAX
    };
    let prefixes = &selection.nodeport_prefixes;
    let v4 = node_object.clone().filter_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    for v4 in v4.take(take) {
        let inside = prefixes.is_empty() || prefixes.iter().any(|p| p.contains(v4));
        if inside && !v4.is_loopback() {
            addrs.insert(v4);
        }
    }
    let prefixes_v6 = &selection.nodeport_prefixes_v6;
    let v6 = node_object.filter_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    for v6 in v6.take(take) {
        let inside = prefixes_v6.is_empty() || prefixes_v6.iter().any(|p| p.contains(v6));
        if inside && interfaces::ipv6_frontend_address(&v6) {
            addrs_v6.insert(v6);
        }
    }
    (addrs.into_iter().collect(), addrs_v6.into_iter().collect())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This agent's version for `NP_AGENT`, NUL-padded.
fn version_bytes() -> [u8; 32] {
    crate::sync::text(env!("CARGO_PKG_VERSION"))
}

/// What is attached where (by name, with the ifindex it had).
type Attached = BTreeMap<(String, InterfaceRole), u32>;

/// The health servers: one when the node health server and the health-check node ports share
/// an address (the usual case), two otherwise.
struct Health {
    services: HealthServer,
    node: Option<HealthServer>,
}

impl Health {
    fn all(&self) -> impl Iterator<Item = &HealthServer> {
        std::iter::once(&self.services).chain(self.node.as_ref())
    }
    fn queued_update(&self) {
        self.all().for_each(HealthServer::queued_update);
    }
    fn updated(&self) {
        self.all().for_each(HealthServer::updated);
    }
    fn set_node_eligible(&self, eligible: bool) {
        self.all().for_each(|h| h.set_node_eligible(eligible));
    }
    fn heartbeat(&self) {
        self.all().for_each(HealthServer::heartbeat);
    }
    fn set_synced(&self, synced: bool) {
        self.all().for_each(|h| h.set_synced(synced));
    }
    async fn shutdown(self) {
        self.services.shutdown().await;
        if let Some(h) = self.node {
            h.shutdown().await;
        }
    }
}

async fn start_health(
    args: &RunArgs,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Health> {
    let config = |bind, port| HealthConfig {
        bind,
        node_healthz_port: port,
        health_timeout: crate::health::DEFAULT_HEALTH_TIMEOUT,
        liveness_timeout: crate::health::DEFAULT_LIVENESS_TIMEOUT,
    };
    let healthz = args.healthz_bind_address.0;
    let shared = healthz
        .filter(|a| a.ip() == args.health_check_bind_address)
        .map(|a| a.port());
    let services = HealthServer::start(config(args.health_check_bind_address, shared))
        .await
        .context("starting the health servers")?;
    services.register(registry);
    let node = match healthz.filter(|_| shared.is_none()) {
        Some(addr) => Some(
            HealthServer::start(config(addr.ip(), Some(addr.port())))
                .await
                .with_context(|| format!("starting the node health server on {addr}"))?,
        ),
        None => None,
    };
    Ok(Health { services, node })
}

struct Agent {
    args: RunArgs,
    /// The datapath configuration this agent writes (with the node's SNAT secret).
    config: DatapathConfig,
    /// The conntrack collector's thread; stopped on shutdown.
    gc: Option<Collector>,
    node_name: String,
    /// `None` while the datapath is switched off (`--datapath-switch`): detached.
    dp: Option<Datapath>,
    /// Where the datapath is, and since when it drains.
    datapath_state: DatapathState,
    drain_since: Option<Instant>,
    /// The last error reading the switch file, logged once.
    switch_error: Option<String>,
    /// The metrics sampler, handed new maps when the datapath is attached again.
    sampling: Option<Arc<metrics::Sampling>>,
    programmed: Programmed,
    reconciler: Reconciler,
    selection: Selection,
    layout: Layout,
    attached: Attached,
    /// Set until the first sync: what this start created, undone if it fails.
    start: Option<StartGuard>,
    /// The datapath was removed while the agent ran (see `check_attachments`).
    removed_under_us: bool,
    health: Health,
    /// A health-check port failed to start: retried on the next rounds.
    health_retry: bool,
    metrics: Metrics,
    /// EndpointSlice trigger times waiting for their Service to be programmed.
    latency: metrics::latency::ProgrammingLatency,
    /// What the last agent state written to `NP_AGENT` holds (for `status`).
    state: AgentState,
    /// Services that failed to program, retried on every round.
    retry: BTreeSet<ServicePortKey>,
    /// What keeps failing (refused services, unbound health-check node ports), reported once
    /// per change.
    refusals: Refusals,
    /// Events on refused Services, with the Kubernetes API.
    events: Option<ServiceEvents>,
    /// The last error writing the datapath's settings, logged once.
    settings_error: Option<String>,
    /// The last error following the interfaces, logged once.
    interfaces_error: Option<String>,
    /// The failure markers under the pins were written at least once.
    failing_recorded: bool,
    notices: BTreeSet<crate::model::Notice>,
    /// `notices` were written under the pins for `status` at least once.
    notices_recorded: bool,
    snapshot: Arc<Snapshot>,
    /// The node's own listening sockets, read with each interface scan (start, link changes,
    /// every 30 s): frontends never take their ports.
    listeners: BTreeSet<crate::listeners::Listener>,
    /// Held while the agent runs: a second agent on the same pins refuses to start.
    _pin_lock: datapath::PinLock,
}

pub async fn run(args: RunArgs) -> Result<()> {
    // What runs, and with what: the keys are the flags' (and a --config file's).
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config_file = args.config.as_ref().map(|f| f.display().to_string()),
        config = %serde_json::Value::from_iter(args.effective.clone()),
        "starting nodeport-agent"
    );
    // Everything that can be checked is checked before anything is created: a start that
    // stops here leaves the node untouched.
    args.validate()?;
    crate::privileges::check(&args)?;
    let node_name = args
        .node_name
        .clone()
        .or_else(hostname)
        .context("no --node-name and no host name")?;
    let selection = args.selection()?;
    if let Some(dir) = &args.manifests {
        check_manifests_dir(dir)?;
    }
    current_layout(&selection)?;
    // The client's configuration (in-cluster, or a kubeconfig): read now, connected later.
    let kube_client = match &args.manifests {
        Some(_) => None,
        None => Some(
            crate::config::kube_client(args.kubeconfig.as_deref(), args.context.as_deref()).await?,
        ),
    };

    // One agent per pin directory, for this agent's life (held by `Agent`).
    datapath::bpffs::ensure_mounted(&args.bpffs_dir).context("loading the datapath")?;
    let pin_lock = datapath::PinLock::acquire(&args.bpffs_dir)?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let refusals = Refusals::new();
    refusals.register(&mut registry);
    // Bind now, so a taken port is an error before the datapath is touched.
    let health = start_health(&args, &mut registry).await?;
    let metrics_listener = match args.metrics_bind_address.0 {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics on {addr}"))?,
        ),
        None => None,
    };

    // From here on the start creates things; the guard removes them again if it fails before
    // the first sync (an earlier run's datapath stays).
    let start = StartGuard::new(&args.bpffs_dir);
    // The datapath: adopt what a previous agent pinned, if anything.
    let mut dp = match Datapath::load(&args.sizing(), Some(&args.bpffs_dir)) {
        Ok(dp) => dp,
        // Another sizing or layout: no exit (a DaemonSet pod would crash-loop), the old
        // datapath keeps forwarding, and the agent says what to do until it is restarted.
        Err(e) if e.is_incompatible_pins() => {
            start.disarm();
            return refuse(&args, health, e).await;
        }
        Err(e) => return Err(anyhow::Error::from(e).context("loading the datapath")),
    };
    // Switched off: no new connection is taken, from the first packet on (an adopted
    // datapath's connections drain; a fresh one is removed after the first sync).
    let switched_off = match switch::read(args.datapath_switch.as_deref()) {
        Ok(wanted) => wanted == switch::Wanted::Off,
        Err(e) => {
            tracing::error!(error = %e, "reading the datapath switch; starting on");
            false
        }
    };
    if switched_off {
        dp.set_new_connections(false)
            .context("switching new connections to the kernel")?;
    }
    let pinned_config = dp.maps.config.get(&0, 0).ok();
    let config = args.datapath_config(snat_secret(pinned_config)?);
    let (programmed, orphans) =
        Programmed::adopt(&dp.maps, &dp.sizing).context("reading the pinned maps")?;
    if !programmed.services.is_empty() {
        tracing::info!(services = programmed.services.len(), dir = %args.bpffs_dir.display(), "adopted the pinned datapath");
    }
    if !orphans.is_empty() {
        let sizing = dp.sizing.clone();
        let n = Syncer {
            maps: &mut dp.maps,
            sizing: &sizing,
        }
        .remove_orphans(orphans);
        tracing::info!(entries = n, "removed leftovers of an interrupted run");
    }

    let events = kube_client
        .as_ref()
        .map(|client| ServiceEvents::new(client.clone(), &node_name));
    // The source of cluster state.
    let (tx, mut rx) = source::channel();
    let source_stats = match (&args.manifests, kube_client) {
        (Some(dir), _) => {
            let dir = dir.clone();
            let stats = source::files::FilesSourceStats::new();
            let task_stats = stats.clone();
            let node_name = node_name.clone();
            tokio::spawn(async move {
                if let Err(e) = source::files::run(dir, node_name, tx, task_stats).await {
                    tracing::error!(error = %e, "watching the manifests directory failed");
                }
            });
            SourceStats::Files(stats)
        }
        (None, client) => {
            let client = client.context("no Kubernetes client")?;
            let stats = source::kube::KubeSourceStats::new();
            let config = source::kube::KubeSourceConfig {
                node_name: Some(node_name.clone()),
                stats: stats.clone(),
                ..Default::default()
            };
            tokio::spawn(async move {
                if let Err(e) = source::kube::run(client, config, tx).await {
                    tracing::error!(error = %e, "the Kubernetes source stopped");
                }
            });
            SourceStats::Kube(stats)
        }
    };

    let mut sampling = None;
    if let Some(listener) = metrics_listener {
        // The sampler reads the maps at scrape time through handles of its own, sharing the
        // memory-mapped arrays with the syncer's (mapped once: they are most of the RSS).
        let maps = dp.maps.share().context("opening the maps for metrics")?;
        let sampler = Sampler::register(
            &mut registry,
            maps,
            config,
            source_stats,
            rx.clone(),
            args.service_node_port_range,
            args.metrics_per_service,
        );
        let registry = Arc::new(registry);
        let sampler = Arc::new(metrics::Sampling::new(sampler));
        sampling = Some(sampler.clone());
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, registry, sampler).await {
                tracing::error!(%addr, error = %e, "the metrics server stopped");
            }
        });
    }

    let gc = {
        let maps = dp
            .maps
            .share()
            .context("opening the maps for the conntrack collector")?;
        Collector::spawn(
            maps,
            Duration::from_secs(args.conntrack_gc_interval),
            metrics.clone(),
        )
        .context("starting the conntrack collector")?
    };

    // Frontends stay with the Services the pinned maps serve them for (docs/operations.md).
    let mut reconciler = Reconciler::new(NodeContext::default());
    reconciler.set_incumbents(programmed.frontend_holders());
    let mut agent = Agent {
        config,
        gc: Some(gc),
        reconciler,
        node_name,
        dp: Some(dp),
        datapath_state: if switched_off {
            DatapathState::Draining
        } else {
            DatapathState::On
        },
        drain_since: switched_off.then(Instant::now),
        switch_error: None,
        sampling,
        programmed,
        selection,
        layout: Layout::default(),
        attached: Attached::new(),
        start: Some(start),
        removed_under_us: false,
        health,
        health_retry: false,
        metrics,
        latency: metrics::latency::ProgrammingLatency::new(std::time::SystemTime::now()),
        state: AgentState {
            started_unix_ms: unix_ms(),
            pid: std::process::id(),
            version: version_bytes(),
            ..AgentState::default()
        },
        retry: BTreeSet::new(),
        refusals,
        events,
        settings_error: None,
        interfaces_error: None,
        failing_recorded: false,
        notices: BTreeSet::new(),
        notices_recorded: false,
        snapshot: Arc::new(Snapshot::default()),
        listeners: BTreeSet::new(),
        _pin_lock: pin_lock,
        args,
    };
    agent
        .rescan_interfaces()
        .context("attaching the datapath")?;
    agent.metrics.set_datapath_state(agent.datapath_state);
    agent.record_switch();
    if switched_off {
        tracing::info!("the datapath switch is off: draining (new connections go to kube-proxy)");
    }
    let switch_watch = switch::Watch::new(agent.args.datapath_switch.as_deref());
    let watcher = ChangeWatcher::new().context("subscribing to link and address changes")?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    tracing::info!(
        node = %agent.node_name,
        external = ?agent.layout.external.keys().collect::<Vec<_>>(),
        "waiting for the first complete list of Services and EndpointSlices"
    );
    // However long the first list takes (an API server out of reach, RBAC), the loop is
    // alive: /livez stays 200 while /readyz waits for the first sync.
    let mut beat = tokio::time::interval(ATTACHMENT_CHECK);
    let first = loop {
        agent.health.heartbeat();
        tokio::select! {
            first = wait_first(&mut rx) => break first?,
            _ = beat.tick() => {}
            _ = sigterm.recv() => return agent.shutdown().await,
            _ = sigint.recv() => return agent.shutdown().await,
        }
    };
    agent.set_snapshot(first);
    agent.reconcile().await;
    // Started: from now on the datapath outlives the agent, whatever ends it.
    if let Some(start) = agent.start.take() {
        start.disarm();
    }

    let mut periodic = tokio::time::interval(Duration::from_secs(30));
    periodic.tick().await;
    let mut check = tokio::time::interval(ATTACHMENT_CHECK);
    check.tick().await;
    let mut switch_poll = tokio::time::interval(SWITCH_POLL);
    switch_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Every round, at least every ATTACHMENT_CHECK: a loop stuck anywhere below turns
        // /livez to 503 (health::DEFAULT_LIVENESS_TIMEOUT) and the kubelet restarts the agent.
        agent.health.heartbeat();
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    bail!("the source of cluster state stopped");
                }
                if let Some(s) = rx.borrow_and_update().clone() {
                    agent.set_snapshot(s);
                }
                agent.reconcile().await;
            }
            changed = watcher.changed() => {
                if let Err(e) = changed {
                    tracing::warn!(error = %e, "link change notifications");
                }
                agent.follow_interfaces();
                agent.check_attachments();
                agent.reconcile().await;
            }
            _ = check.tick() => agent.check_attachments(),
            _ = switch_watch.changed.notified() => agent.follow_switch().await,
            _ = switch_poll.tick() => agent.follow_switch().await,
            _ = periodic.tick() => {
                agent.follow_interfaces();
                agent.reconcile().await;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    agent.shutdown().await
}

/// Stays up beside a pinned datapath this agent will not adopt: logs once, records why for
/// `status`, answers `/readyz` 503 with the reason (`/livez` 200: a restart would not help),
/// touches nothing. Ends on a signal, or when the pins are removed (`nodeport-agent detach`),
/// so that the kubelet starts the agent afresh.
async fn refuse(args: &RunArgs, health: Health, error: datapath::DatapathError) -> Result<()> {
    let root = &args.bpffs_dir;
    let differences = datapath::refusal(&args.sizing(), root)
        .map(|r| r.differences())
        .unwrap_or_else(|| vec![error.to_string()]);
    // Recorded for `status` and `/readyz` before the log line says so: whoever reads the log
    // finds both in place.
    if let Err(e) = datapath::layout::record_refusal(root, &differences) {
        tracing::warn!(error = %e, "recording the refusal for `status`");
    }
    let reason = format!("pinned datapath incompatible: {}", differences.join("; "));
    health
        .all()
        .for_each(|h| h.set_not_ready_reason(Some(reason.clone())));
    tracing::error!(
        %error,
        "not adopting the pinned datapath: it keeps forwarding untouched; this agent stays up \
         and not ready until it is restarted with matching flags, or the old datapath is \
         detached"
    );
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut beat = tokio::time::interval(ATTACHMENT_CHECK);
    loop {
        health.heartbeat();
        tokio::select! {
            _ = beat.tick() => {
                if !datapath::anything_pinned(root) {
                    tracing::info!(
                        "the refused datapath was removed: exiting, to start afresh when restarted"
                    );
                    break;
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    datapath::layout::remove_refusal(root);
    health.shutdown().await;
    Ok(())
}

/// Whether `desired` has a port of the Service `namespace`/`name`.
fn serves(
    desired: &BTreeMap<ServicePortKey, Arc<crate::model::DesiredService>>,
    namespace: &str,
    name: &str,
) -> bool {
    let first = ServicePortKey {
        namespace: namespace.into(),
        name: name.into(),
        port_name: "".into(),
        protocol: crate::model::Protocol::Tcp,
    };
    desired
        .range(first..)
        .next()
        .is_some_and(|(k, _)| &*k.namespace == namespace && &*k.name == name)
}

/// How often the agent re-reads the switch file (besides inotify) and, while draining, counts
/// the connections left: a batched read of the connection tables.
const SWITCH_POLL: Duration = Duration::from_secs(2);

/// How often the agent checks that its attachments are still in place (`nodeport-agent
/// detach` sends no event). A few syscalls per interface.
const ATTACHMENT_CHECK: Duration = Duration::from_secs(5);

/// The manifests directory must exist and be readable before the agent starts (the source
/// would only find out after the datapath is attached).
fn check_manifests_dir(dir: &std::path::Path) -> Result<()> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("--manifests {}: cannot read it", dir.display()))?;
    if !meta.is_dir() {
        bail!("--manifests {}: not a directory", dir.display());
    }
    std::fs::read_dir(dir)
        .with_context(|| format!("--manifests {}: cannot list it", dir.display()))?;
    Ok(())
}

/// The node's interfaces as the datapath would use them; fails when an external interface
/// named by a flag does not exist or there is none at all.
fn current_layout(selection: &Selection) -> Result<Layout> {
    let all = interfaces::scan().context("listing interfaces")?;
    let default_route = if selection.external.is_empty() {
        interfaces::default_route_interfaces().context("reading /proc/net/route")?
    } else {
        BTreeSet::new()
    };
    for name in &selection.external {
        if !all.contains_key(name) {
            bail!("--external-interface {name}: no such interface");
        }
    }
    let layout = selection.layout(&all, &default_route);
    if layout.external.is_empty() {
        bail!(
            "no external interface: none named with --external-interface, and none carries a \
             default route"
        );
    }
    Ok(layout)
}

async fn wait_first(rx: &mut SnapshotReceiver) -> Result<Arc<Snapshot>> {
    loop {
        if let Some(s) = rx.borrow_and_update().clone() {
            return Ok(s);
        }
        rx.changed().await.map_err(|_| {
            anyhow::anyhow!("the source of cluster state stopped before its first list")
        })?;
    }
}

impl Agent {
    /// Re-reads the interfaces; attaches to new ones, detaches from gone ones.
    fn rescan_interfaces(&mut self) -> Result<()> {
        // The operator removed the datapath: attaching anything again would undo that.
        if self.removed_under_us {
            tracing::debug!("the datapath was removed: not following the interfaces");
            return Ok(());
        }
        let Some(dp) = self.dp.as_mut() else {
            // Switched off: nothing to attach.
            return Ok(());
        };
        let layout = current_layout(&self.selection)?;
        let mut wanted: Attached = Attached::new();
        for (name, iface) in &layout.external {
            wanted.insert((name.clone(), InterfaceRole::External), iface.ifindex);
        }
        for (name, iface) in &layout.pod_facing {
            wanted.insert((name.clone(), InterfaceRole::Pod), iface.ifindex);
        }
        // Pins of an earlier run for interfaces that are gone or changed role.
        if self.attached.is_empty() {
            for a in dp.attached_interfaces()? {
                if !wanted.contains_key(&(a.name.clone(), a.role)) {
                    tracing::info!(interface = a.name, role = ?a.role, "removing a stale attachment");
                    dp.detach_interface(&a.name, a.role)?;
                }
            }
        }
        for ((name, role), ifindex) in &wanted {
            if self.attached.get(&(name.clone(), *role)) == Some(ifindex) {
                continue;
            }
            let result = match role {
                InterfaceRole::External => dp
                    .attach_external(name, self.args.xdp_mode, self.args.external_hook)
                    .map(|hook| hook.label()),
                InterfaceRole::Pod => dp.attach_pod(name).map(|()| "tc"),
            };
            match (result, role) {
                (Ok(hook), _) => {
                    tracing::info!(interface = %name, role = ?role, hook, "attached");
                    self.attached.insert((name.clone(), *role), *ifindex);
                    if let Some(start) = &mut self.start {
                        start.attached(name, *role);
                    }
                }
                (Err(e), InterfaceRole::External) => {
                    return Err(e).context("attaching to an external interface");
                }
                // A pod's veth can vanish between the scan and the attach.
                (Err(e), InterfaceRole::Pod) => {
                    tracing::warn!(interface = %name, error = %e, "attaching the pod hook")
                }
            }
        }
        let gone: Vec<(String, InterfaceRole)> = self
            .attached
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for (name, role) in gone {
            self.attached.remove(&(name.clone(), role));
            if let Err(e) = dp.detach_interface(&name, role) {
                tracing::warn!(interface = %name, error = %e, "detaching");
            }
        }
        self.layout = layout;
        self.listeners = crate::listeners::read();
        Ok(())
    }

    /// `rescan_interfaces` in the loop: an error is logged once per change, not on every
    /// rescan (every 30 seconds and every link event).
    fn follow_interfaces(&mut self) {
        match self.rescan_interfaces() {
            Ok(()) => {
                if self.interfaces_error.take().is_some() {
                    tracing::info!("following the node's interfaces again");
                }
            }
            Err(e) => {
                let error = crate::output::error_chain(e.as_ref());
                if self.interfaces_error.as_ref() != Some(&error) {
                    tracing::error!(
                        %error,
                        "following the node's interfaces; retried on every rescan, logged \
                         again only if the cause changes"
                    );
                    self.interfaces_error = Some(error);
                }
            }
        }
    }

    /// Notices attachments that vanished while their interface stayed (`nodeport-agent
    /// detach`, a link detached by hand) and turns the agent unhealthy instead of attaching
    /// again: removing the datapath is an operator's explicit action, and an agent that
    /// silently undid it would be fighting them. An interface that disappears and comes back
    /// (a re-created NIC, a new ifindex) is `rescan_interfaces`' business: it is attached again.
    fn check_attachments(&mut self) {
        if self.removed_under_us {
            return;
        }
        let Some(dp) = &self.dp else { return };
        let mut missing = Vec::new();
        for ((name, role), ifindex) in &self.attached {
            // Gone or re-created interfaces took their links with them; rescan_interfaces
            // follows them.
            if interfaces::ifindex_of(name) != Some(*ifindex) {
                continue;
            }
            match dp.attachment_intact(
                name,
                *role,
                self.args.xdp_mode,
                self.args.external_hook,
                *ifindex,
            ) {
                Ok(true) => {}
                Ok(false) => missing.push(format!("{name} ({role:?})")),
                Err(e) => tracing::warn!(interface = %name, error = %e, "checking the attachment"),
            }
        }
        tracing::debug!(
            interfaces = self.attached.len(),
            missing = missing.len(),
            "checked the attachments"
        );
        if missing.is_empty() {
            return;
        }
        // Unhealthy before the log line says so: whoever reads it sees the 503 at once.
        self.removed_under_us = true;
        self.health
            .all()
            .for_each(|h| h.set_datapath_attached(false));
        tracing::error!(
            interfaces = ?missing,
            "the datapath was removed from under the agent (`nodeport-agent detach`?); not \
             attaching it again: /healthz and /livez answer 503 until the agent is restarted"
        );
    }

    fn node_context(&self) -> NodeContext {
        let (addrs, addrs_v6) = node_addresses(&self.layout, &self.snapshot, &self.selection);
        NodeContext {
            node_name: self.node_name.clone(),
            zone: self.snapshot.node_zone.clone().unwrap_or_default(),
            node_addresses: addrs,
            node_addresses_v6: addrs_v6,
            proxy_name: self.args.service_proxy_name.clone(),
            guard: PortGuard {
                node_port_range: Some(self.args.service_node_port_range),
                snat_ports: self.args.snat_port_range.0.clone(),
                listeners: self.listeners.clone(),
            },
            source_ranges_on_node_ports: self.args.source_ranges_on_node_ports,
        }
    }

    fn local_nets(&self) -> BTreeSet<Ipv4Prefix> {
        local_nets(&self.layout, &self.snapshot, &self.args.pod_cidrs)
    }

    /// Takes a new snapshot from the source, noting the trigger times of the EndpointSlices
    /// it changed (the programming latency).
    fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        self.latency.note_snapshot(&self.snapshot, &snapshot);
        self.snapshot = snapshot;
    }

    /// Brings desired state, maps, health checks and notices up to date.
    async fn reconcile(&mut self) {
        let started = Instant::now();
        if self.dp.is_none() {
            // Switched off: kube-proxy programs the node; desired state is worked out afresh
            // when the datapath is attached again. Healthy and ready meanwhile.
            self.health.updated();
            return;
        }
        self.health.queued_update();
        if let Some(eligible) = self.snapshot.node_eligible {
            self.health.set_node_eligible(eligible);
        }
        let mut changes = self.reconciler.set_node(self.node_context());
        let more = self
            .reconciler
            .update(&self.snapshot.services, &self.snapshot.endpoint_slices);
        changes.services.extend(more.services);
        changes.health_checks |= more.health_checks;
        changes.notices |= more.notices;

        let mut keys = changes.services.clone();
        keys.extend(std::mem::take(&mut self.retry));
        let settings = GlobalSettings {
            config: self.config,
            snat_addrs: self.layout.snat_addresses.clone(),
            local_nets: self.local_nets(),
        };
        let dp = self.dp.as_mut().expect("checked above");
        let sizing = dp.sizing.clone();
        let report = Syncer {
            maps: &mut dp.maps,
            sizing: &sizing,
        }
        .apply_changes(
            &mut self.programmed,
            self.reconciler.desired(),
            &keys,
            &settings,
        );
        self.metrics
            .record_sync(&report, started.elapsed().as_secs_f64());
        let desired = &self.reconciler.desired().services;
        self.latency.programmed(
            report.failed.iter().map(|(key, _)| key),
            |namespace, name| serves(desired, namespace, name),
            std::time::SystemTime::now(),
            &self.metrics.programming_seconds,
        );
        self.report_refusals(&report, keys);
        if !report.applied.is_empty() || !report.removed.is_empty() {
            tracing::info!(
                applied = report.applied.len(),
                removed = report.removed.len(),
                unchanged = report.unchanged,
                micros = started.elapsed().as_micros() as u64,
                "datapath updated"
            );
            // A line per Service: trace, or debug logs would flood with a large cluster's start.
            for key in &report.applied {
                tracing::trace!(service = %key, "programmed");
            }
            for key in &report.removed {
                tracing::trace!(service = %key, "removed");
            }
        }

        if changes.health_checks || self.health_retry {
            let services: BTreeMap<u16, ServiceHealth> = self
                .reconciler
                .desired()
                .health_checks
                .iter()
                .map(|(port, hc)| {
                    let health = ServiceHealth {
                        namespace: hc.namespace.clone(),
                        name: hc.name.clone(),
                        local_endpoints: hc.local_endpoints,
                    };
                    (*port, health)
                })
                .collect();
            self.metrics.health_checks.set(services.len() as i64);
            // In the loop, not a task: updates apply in order, and a port that could not be
            // bound is known before the next round retries it.
            let errors = self.health.services.set_services(services).await;
            self.health_retry = !errors.is_empty();
            let unserved = errors.iter().map(|e| (e.port(), e.to_string())).collect();
            let changes = self.refusals.set_ports(unserved);
            for (port, error) in &changes.refused {
                tracing::warn!(
                    port,
                    %error,
                    "health-check node port not served; retried on every round, logged again \
                     only if the cause changes"
                );
            }
            for port in &changes.cleared {
                tracing::info!(port, "health-check node port served or no longer wanted");
            }
            self.record_failing(!changes.refused.is_empty() || !changes.cleared.is_empty());
        }
        if changes.notices {
            let notices = self.reconciler.notices();
            // IPv6 is no refusal: said once per service port, at info (its counts change with
            // its endpoints); everything else is a warning, once per change.
            let ipv6_before: BTreeSet<&str> = self
                .notices
                .iter()
                .filter(|n| n.kind == NoticeKind::Ipv6ToKernel)
                .map(|n| n.object.as_str())
                .collect();
            for n in notices.difference(&self.notices) {
                if n.kind != NoticeKind::Ipv6ToKernel {
                    tracing::warn!(object = %n.object, kind = n.kind.label(), "{}", n.detail);
                } else if !ipv6_before.contains(n.object.as_str()) {
                    tracing::info!(object = %n.object, kind = n.kind.label(), "{}", n.detail);
                }
            }
            self.metrics.set_ipv6(&notices);
            let mut counts: BTreeMap<NoticeKind, usize> = BTreeMap::new();
            for n in &notices {
                *counts.entry(n.kind).or_default() += 1;
            }
            self.metrics.set_notices(&counts);
            self.notices = notices;
        }
        // Also on the first round: markers a previous agent left may be stale.
        if changes.notices || !self.notices_recorded {
            if let Some(pins) = self.dp.as_ref().and_then(Datapath::pin_dir)
                && let Err(e) = datapath::notices::record(&pins.root, &self.notices)
            {
                tracing::warn!(error = %e, "recording what was not programmed for `status`");
            }
            self.notices_recorded = true;
        }
        self.metrics
            .services
            .set(self.programmed.services.len() as i64);
        self.metrics.backends.set(
            self.programmed
                .services
                .values()
                .map(|s| s.backends.len() as i64)
                .sum(),
        );
        // As kube-proxy: healthy means everything queued was applied; services that keep
        // failing make /healthz fail after the health timeout, so load balancers drain the node.
        if report.failed.is_empty() {
            self.health.updated();
        }
        // Ready once the datapath holds a complete state, refused Services or not.
        self.health.set_synced(!report.settings_failed);
        self.record_state(report.failed.is_empty());
        tracing::debug!(revision = self.snapshot.revision, "reconciled");
    }

    /// Retries what failed, and reports each refusal once per change: a log line, the gauges,
    /// the markers for `status`, an Event on the Service.
    fn report_refusals(
        &mut self,
        report: &crate::sync::SyncReport,
        keys: BTreeSet<ServicePortKey>,
    ) {
        if report.settings_failed {
            // Nothing was tried: everything is tried again, and the refusals stand as they were.
            self.retry.extend(keys);
            let error = report
                .failed
                .first()
                .map(|(_, e)| e.to_string())
                .unwrap_or_default();
            if self.settings_error.as_ref() != Some(&error) {
                tracing::error!(%error, "could not write the datapath's settings; retried on every round");
                self.settings_error = Some(error);
            }
            return;
        }
        if self.settings_error.take().is_some() {
            tracing::info!("wrote the datapath's settings");
        }
        let refused: BTreeMap<ServicePortKey, Refused> = report
            .failed
            .iter()
            .map(|(key, e)| (key.clone(), Refused::from(e)))
            .collect();
        self.retry.extend(refused.keys().cloned());
        let changes = self.refusals.set_services(refused);
        for (key, error) in &changes.refused {
            let reason = self.refusals.service(key).map_or("", |r| r.reason);
            tracing::error!(
                service = %key,
                reason,
                %error,
                "could not program the service; it keeps its previous state, is retried on \
                 every round, and is logged again only if the cause changes"
            );
            self.publish_event(key, Some(error));
        }
        for key in &changes.cleared {
            if self.programmed.services.contains_key(key) {
                tracing::info!(service = %key, "programmed the service it had refused");
                self.publish_event(key, None);
            } else {
                tracing::info!(service = %key, "a refused service is gone");
            }
        }
        self.record_failing(!changes.refused.is_empty() || !changes.cleared.is_empty());
    }

    /// An Event on the Service of `key`, with the Kubernetes API.
    fn publish_event(&self, key: &ServicePortKey, refused: Option<&str>) {
        let Some(events) = &self.events else { return };
        let service = self.snapshot.services.iter().find(|s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == &*key.namespace
                && s.metadata.name.as_deref() == Some(&*key.name)
        });
        if let Some(service) = service {
            events.publish(service, key, refused);
        }
    }

    /// Writes the failure markers under the pins when they `changed` (and once at first, for
    /// markers a previous agent left).
    fn record_failing(&mut self, changed: bool) {
        if !changed && self.failing_recorded {
            return;
        }
        if let Some(pins) = self.dp.as_ref().and_then(Datapath::pin_dir)
            && let Err(e) = datapath::notices::record_failing(&pins.root, &self.refusals.markers())
        {
            tracing::warn!(error = %e, "recording what keeps failing for `status`");
        }
        self.failing_recorded = true;
    }

    /// Writes what this round did to `NP_AGENT`, for `nodeport-agent status`.
    fn record_state(&mut self, everything_applied: bool) {
        let now = unix_ms();
        self.state.last_attempt_unix_ms = now;
        if everything_applied {
            self.state.last_sync_unix_ms = now;
        }
        self.state.revision = self.snapshot.revision;
        self.state.services = self.programmed.services.len() as u32;
        self.state.backends = self
            .programmed
            .services
            .values()
            .map(|s| s.backends.len() as u32)
            .sum();
        self.state.failing = self.retry.len() as u32;
        let Some(dp) = self.dp.as_mut() else { return };
        if let Err(e) = dp.maps.agent.set(0, self.state, 0) {
            tracing::warn!(error = %e, "recording the agent's state for `status`");
        }
    }

    /// Reads the switch file and takes the datapath one step towards what it asks for: a
    /// line per transition, the gauge, the record for `status`.
    async fn follow_switch(&mut self) {
        let wanted = match switch::read(self.args.datapath_switch.as_deref()) {
            Ok(wanted) => {
                if self.switch_error.take().is_some() {
                    tracing::info!("the datapath switch reads \"on\" or \"off\" again");
                }
                wanted
            }
            Err(e) => {
                let error = e.to_string();
                if self.switch_error.as_ref() != Some(&error) {
                    tracing::error!(%error, "datapath switch");
                    self.switch_error = Some(error);
                }
                return;
            }
        };
        let drained = self.datapath_state == DatapathState::Draining
            && wanted == switch::Wanted::Off
            && self.drained();
        match switch::step(self.datapath_state, wanted, drained) {
            Step::Stay => {}
            Step::StartDrain => {
                if let Some(dp) = self.dp.as_mut()
                    && let Err(e) = dp.set_new_connections(false)
                {
                    tracing::error!(error = %e, "switching new connections to the kernel; retried");
                    return;
                }
                self.drain_since = Some(Instant::now());
                self.set_datapath_state(DatapathState::Draining);
                tracing::info!(
                    drain_timeout_s = self.args.drain_timeout,
                    "datapath switched off: draining; new connections go to kube-proxy, \
                     established ones stay until they end or --drain-timeout"
                );
            }
            Step::Resume => {
                if let Some(dp) = self.dp.as_mut()
                    && let Err(e) = dp.set_new_connections(true)
                {
                    tracing::error!(error = %e, "taking new connections again; retried");
                    return;
                }
                self.drain_since = None;
                self.set_datapath_state(DatapathState::On);
                tracing::info!(
                    "datapath switched on again before the drain ended: taking new connections"
                );
            }
            Step::Detach => self.detach_datapath().await,
            Step::Attach => match self.attach_datapath().await {
                Ok(()) => {}
                Err(e) => {
                    let error = crate::output::error_chain(e.as_ref());
                    if self.switch_error.as_ref() != Some(&error) {
                        tracing::error!(%error, "attaching the datapath again; retried every 2 s");
                        self.switch_error = Some(error);
                    }
                }
            },
        }
    }

    /// Whether the drain is over: no live connection left in the connection tables, or
    /// --drain-timeout passed.
    fn drained(&self) -> bool {
        let Some(dp) = &self.dp else { return true };
        let now = datapath::jiffies_now(self.config.hz);
        let left = match datapath::census::conntrack(&dp.maps, &self.config, now) {
            Ok(c) => c.connections,
            Err(e) => {
                tracing::warn!(error = %e, "counting the connections left to drain");
                u64::MAX
            }
        };
        if left == 0 {
            return true;
        }
        let waited = self.drain_since.map_or(Duration::ZERO, |t| t.elapsed());
        if waited >= Duration::from_secs(self.args.drain_timeout) {
            tracing::warn!(
                connections = left,
                drain_timeout_s = self.args.drain_timeout,
                "the drain timed out: removing the datapath under the connections left"
            );
            return true;
        }
        tracing::debug!(connections = left, "draining");
        false
    }

    /// Removes the datapath (as `nodeport-agent detach`) and releases the health-check node
    /// ports (kube-proxy binds them on its next sync). The agent idles, ready.
    async fn detach_datapath(&mut self) {
        if let Some(gc) = self.gc.take() {
            gc.stop();
        }
        // Our link fds go first: a link lives while anyone holds it.
        self.dp = None;
        self.attached.clear();
        // The record first: it keeps the pin directory (and the lock held on it) in place.
        self.set_datapath_state(DatapathState::Off);
        let detached = datapath::detach(&self.args.bpffs_dir);
        let errors = self.health.services.set_services(BTreeMap::new()).await;
        for e in errors {
            tracing::warn!(error = %e, "releasing a health-check node port");
        }
        self.metrics.health_checks.set(0);
        self.drain_since = None;
        // Logged once all of it is done: whoever follows the log finds it so.
        match detached {
            Ok(removed) => tracing::info!(
                removed = removed.len(),
                "datapath switched off: drained and detached; kube-proxy carries the node ports"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "datapath switched off, but removing it failed: run `nodeport-agent detach`"
            ),
        }
    }

    /// Loads, attaches and programs the datapath as at start.
    async fn attach_datapath(&mut self) -> Result<()> {
        let mut dp = Datapath::load(&self.args.sizing(), Some(&self.args.bpffs_dir))
            .context("loading the datapath")?;
        let (programmed, orphans) =
            Programmed::adopt(&dp.maps, &dp.sizing).context("reading the pinned maps")?;
        if !orphans.is_empty() {
            let sizing = dp.sizing.clone();
            Syncer {
                maps: &mut dp.maps,
                sizing: &sizing,
            }
            .remove_orphans(orphans);
        }
        let gc = Collector::spawn(
            dp.maps
                .share()
                .context("opening the maps for the conntrack collector")?,
            Duration::from_secs(self.args.conntrack_gc_interval),
            self.metrics.clone(),
        )
        .context("starting the conntrack collector")?;
        if let Some(sampling) = &self.sampling {
            sampling.replace_maps(dp.maps.share().context("opening the maps for metrics")?);
        }
        let mut reconciler = Reconciler::new(NodeContext::default());
        reconciler.set_incumbents(programmed.frontend_holders());
        self.reconciler = reconciler;
        self.programmed = programmed;
        self.dp = Some(dp);
        self.gc = Some(gc);
        self.attached.clear();
        self.retry.clear();
        self.notices.clear();
        self.notices_recorded = false;
        self.failing_recorded = false;
        self.health_retry = true;
        if let Err(e) = self.rescan_interfaces() {
            // Back to off: nothing half attached stays.
            self.detach_datapath().await;
            return Err(e.context("attaching the datapath"));
        }
        self.set_datapath_state(DatapathState::On);
        self.reconcile().await;
        tracing::info!(
            services = self.programmed.services.len(),
            "datapath switched on: attached and programmed"
        );
        Ok(())
    }

    fn set_datapath_state(&mut self, state: DatapathState) {
        self.datapath_state = state;
        self.metrics.set_datapath_state(state);
        self.record_switch();
    }

    /// Records where the datapath is under the pin directory, for `status`.
    fn record_switch(&self) {
        if let Err(e) = switch::record(&self.args.bpffs_dir, self.datapath_state) {
            tracing::warn!(error = %e, "recording the datapath's state for `status`");
        }
    }

    async fn shutdown(mut self) -> Result<()> {
        tracing::info!("shutting down");
        if let Some(gc) = self.gc.take() {
            gc.stop();
        }
        // A signal is an ordinary end, also before the first sync.
        if let Some(start) = self.start.take() {
            start.disarm();
        }
        self.health.shutdown().await;
        let dir = self.args.bpffs_dir.clone();
        let detach = self.args.detach_on_exit;
        drop(self.dp);
        if detach {
            switch::remove(&dir);
            let removed = datapath::detach(&dir).context("removing the datapath")?;
            tracing::info!(
                removed = removed.len(),
                "datapath removed (--detach-on-exit)"
            );
        } else {
            tracing::info!(dir = %dir.display(), "the datapath stays attached and keeps forwarding");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::run_args;

    /// The programming latency is observed for the Services the datapath serves: any port of
    /// the Service, whatever its name and protocol.
    #[test]
    fn serves_finds_any_port_of_a_service() {
        let key = |ns: &str, name: &str, port: &str, protocol| ServicePortKey {
            namespace: ns.into(),
            name: name.into(),
            port_name: port.into(),
            protocol,
        };
        let service = Arc::new(crate::model::DesiredService {
            frontends: Default::default(),
            backends: Default::default(),
            local_only: false,
            affinity_timeout_s: None,
            source_ranges: Default::default(),
        });
        let desired: BTreeMap<ServicePortKey, Arc<crate::model::DesiredService>> = [
            key("a", "web", "http", crate::model::Protocol::Udp),
            key("b", "api", "", crate::model::Protocol::Tcp),
            key("b", "web2", "x", crate::model::Protocol::Tcp),
        ]
        .into_iter()
        .map(|k| (k, service.clone()))
        .collect();
        assert!(serves(&desired, "a", "web"));
        assert!(serves(&desired, "b", "api"));
        assert!(serves(&desired, "b", "web2"));
        assert!(!serves(&desired, "b", "web"));
        assert!(!serves(&desired, "a", "we"));
        assert!(!serves(&desired, "c", "web"));
    }

    #[test]
    fn local_nets_are_every_node_address_and_the_pod_networks() {
        let p = |s: &str| s.parse::<Ipv4Prefix>().unwrap();
        let layout = Layout {
            // --nodeport-addresses kept node ports off 10.0.0.5; it is still the node's.
            node_addresses: ["198.18.0.1".parse().unwrap()].into(),
            all_addresses: [
                "198.18.0.1".parse().unwrap(),
                "10.0.0.5".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
            ]
            .into(),
            ..Layout::default()
        };
        let snapshot = Snapshot {
            node_addresses: Some(vec![
                "203.0.113.5".parse().unwrap(),
                "fd00::5".parse().unwrap(),
            ]),
            pod_cidrs: Some(vec![p("10.244.1.0/24")]),
            ..Snapshot::default()
        };
        // An IPv6 pod network is taken (it stopped the agent) and applies to no IPv4 source.
        let args = run_args(&[
            "--pod-cidr",
            "10.245.0.0/16",
            "--pod-cidr",
            "fd00:10:244::/56",
            "--pod-cidr",
            "10.246.0.0/16",
        ]);
        assert_eq!(
            local_nets(&layout, &snapshot, &args.pod_cidrs),
            [
                "10.0.0.5/32",
                "10.244.1.0/24",
                "10.245.0.0/16",
                "10.246.0.0/16",
                "127.0.0.1/32",
                "198.18.0.1/32",
                "203.0.113.5/32",
            ]
            .map(p)
            .into()
        );
    }
    /// The Node object's addresses join the interfaces' in their own family, each family
    /// within its own --nodeport-addresses prefixes; `primary` takes its first of each family.
    #[test]
    fn the_node_objects_addresses_join_by_family() {
        let layout = Layout {
            node_addresses: ["198.18.0.1".parse().unwrap()].into(),
            node_addresses_v6: ["fd00:18::1".parse().unwrap()].into(),
            ..Layout::default()
        };
        let snapshot = Snapshot {
            node_addresses: Some(
                [
                    "10.0.0.5",
                    "fd00:5::5",
                    "203.0.113.5",
                    "2001:db8::5",
                    "fe80::5",
                ]
                .map(|a| a.parse().unwrap())
                .to_vec(),
            ),
            ..Snapshot::default()
        };
        let strings = |(v4, v6): (Vec<Ipv4Addr>, Vec<Ipv6Addr>)| {
            let v4: Vec<String> = v4.iter().map(ToString::to_string).collect();
            let v6: Vec<String> = v6.iter().map(ToString::to_string).collect();
            (v4, v6)
        };
        let all = Selection::default();
        assert_eq!(
            strings(node_addresses(&layout, &snapshot, &all)),
            (
                vec!["10.0.0.5".into(), "198.18.0.1".into(), "203.0.113.5".into()],
                vec![
                    "2001:db8::5".into(),
                    "fd00:5::5".into(),
                    "fd00:18::1".into()
                ]
            ),
            "link-local never"
        );
        let v6_prefix = Selection {
            nodeport_prefixes_v6: vec!["fd00::/8".parse().unwrap()],
            ..Selection::default()
        };
        assert_eq!(
            strings(node_addresses(&layout, &snapshot, &v6_prefix)).1,
            ["fd00:5::5", "fd00:18::1"]
        );
        let primary = Selection {
            primary_only: true,
            ..Selection::default()
        };
        assert_eq!(
            strings(node_addresses(&layout, &snapshot, &primary)),
            (
                vec!["10.0.0.5".into(), "198.18.0.1".into()],
                vec!["fd00:5::5".into(), "fd00:18::1".into()]
            )
        );
    }

    #[test]
    fn the_snat_secret_survives_adoption() {
        let pinned = DatapathConfig {
            maglev_size: 1021,
            snat_secret: 0xdead_beef,
            ..DatapathConfig::default()
        };
        assert_eq!(snat_secret(Some(pinned)).unwrap(), 0xdead_beef);
        // A fresh datapath (zeroed configuration), or one never configured: a new secret.
        let fresh = snat_secret(Some(DatapathConfig::default())).unwrap();
        assert_ne!(fresh, 0);
        let unconfigured = DatapathConfig {
            maglev_size: 0,
            ..pinned
        };
        assert_ne!(snat_secret(Some(unconfigured)).unwrap(), 0xdead_beef);
        // Random: two fresh ones differ (a 2^-32 chance of a false failure).
        assert_ne!(snat_secret(None).unwrap(), snat_secret(None).unwrap());
    }
}
