//! kube-proxy compatible health checking: the per-Service health check node ports and the
//! node's `/healthz`, `/livez` and `/readyz` server.
//!
//! - **Service health check node ports.** A Service with `externalTrafficPolicy: Local` has a
//!   `spec.healthCheckNodePort`; the cloud load balancer probes `http://<node>:<port>/` (any
//!   path, any method) and sends traffic only to nodes answering 200. The answer is 200 when
//!   this node has at least one local serving endpoint for the Service and the proxy is
//!   healthy, 503 otherwise, with kube-proxy's headers and body byte for byte
//!   (`pkg/proxy/healthcheck/service_health.go`). The endpoints counted are those of the
//!   family the probe arrived over, as kube-proxy's per-family health servers answer
//!   ([`LocalEndpoints::for_probe`]).
//! - **Node health** (kube-proxy's `--healthz-bind-address`, port 10256): `/healthz`
//!   (`pkg/proxy/healthcheck/proxier_health.go`), for load balancers. The proxy is healthy
//!   while starting up (before the first [`HealthServer::updated`]), when everything queued
//!   has been applied, or when the oldest change not yet applied is younger than the health
//!   timeout. `/healthz` also needs the node to be eligible (not being deleted, no
//!   `ToBeDeletedByClusterAutoscaler` taint), which the agent reports with
//!   [`HealthServer::set_node_eligible`].
//! - **The agent's probes** on the same server, for the kubelet: `/livez` answers whether the
//!   agent's loop still goes round ([`HealthServer::heartbeat`]) and its datapath was not
//!   removed from under it, nothing else; `/readyz` whether, besides, the datapath holds a
//!   complete state ([`HealthServer::set_synced`]: after the first sync, Services refused
//!   one by one or not).
//!
//! A listener on the wildcard address (`0.0.0.0` or `::`) takes both families on one socket,
//! as Go's wildcard listen does for kube-proxy ([`listen`]).
//!
//! Every listener is its own task owning its socket and its connections: removing a Service
//! closes its listener and its open connections at once (kube-proxy calls `http.Server.Close`),
//! and [`HealthServer::set_services`] returns only once every removed port is free and every
//! new one is bound. Ports that stay keep their listener; only the reported counts change.
//!
//! See `docs/health.md` for the exact formats and the differences from kube-proxy.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::model::{IpFamily, LocalEndpoints};

/// kube-proxy's default `--healthz-bind-address` port.
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;

/// kube-proxy's default health timeout: twice its default 30 s sync period.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the agent's loop may go without a [`HealthServer::heartbeat`] before `/livez`
/// fails: the loop beats at least every 5 seconds, so a minute means it is stuck.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// What one Service's health check node port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node, per family of the Service.
    pub local_endpoints: LocalEndpoints,
}

impl fmt::Display for ServiceHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where and how the health servers listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Address of every listener, the health check node ports and the node healthz port.
    /// `0.0.0.0` (the default) and `::` listen on every address of both families (IPv4 alone
    /// when the kernel has no IPv6), as kube-proxy's `0.0.0.0` does; another address on that
    /// address only.
    pub bind: IpAddr,
    /// Port of the node `/healthz` and `/livez` server; `None` disables it, `Some(0)` picks a
    /// free port (see [`HealthServer::local_addr_of_healthz`]).
    pub node_healthz_port: Option<u16>,
    /// How long a queued change may stay unapplied before the proxy counts as unhealthy.
    pub health_timeout: Duration,
    /// How long the agent's loop may go without a heartbeat before `/livez` fails.
    pub liveness_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            node_healthz_port: Some(DEFAULT_HEALTHZ_PORT),
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            liveness_timeout: DEFAULT_LIVENESS_TIMEOUT,
        }
    }
}

/// A listener that could not be started. The message names the port and the cause (the cause
/// is part of the message, not a separate `source`, so a log line or `{:#}` shows it once).
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(
        "cannot listen on {addr} for the health check node port {port} of service {service}: {cause}"
    )]
    ServicePort {
        port: u16,
        addr: SocketAddr,
        service: String,
        cause: io::Error,
    },
    #[error("service {service} has health check node port 0")]
    ZeroPort { service: String },
    #[error("cannot listen on {addr} for the node healthz port {port}: {cause}")]
    NodeHealthz {
        port: u16,
        addr: SocketAddr,
        cause: io::Error,
    },
}

impl HealthError {
    /// The port that could not be listened on.
    pub fn port(&self) -> u16 {
        match self {
            Self::ServicePort { port, .. } | Self::NodeHealthz { port, .. } => *port,
            Self::ZeroPort { .. } => 0,
        }
    }
}

/// The time source of the proxy health state; tests substitute a clock they move by hand.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// Wall-clock time that never goes backwards: the wall time at creation plus the monotonic
/// time since, so a wall clock step cannot make the proxy look late (or on time).
#[derive(Clone, Copy, Debug)]
pub struct SystemClock {
    wall: SystemTime,
    mono: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        self.wall + self.mono.elapsed()
    }
}

/// The health servers of one node. Clones share everything: any clone can update the state,
/// and [`HealthServer::shutdown`] on one stops the listeners of all of them. Dropping the last
/// clone stops every listener too (without waiting for it).
#[derive(Clone)]
pub struct HealthServer {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    bind: IpAddr,
    healthz_addr: Option<SocketAddr>,
    listeners: tokio::sync::Mutex<Listeners>,
}

#[derive(Default)]
struct Listeners {
    healthz: Option<Listener>,
    services: BTreeMap<u16, ServiceListener>,
    closed: bool,
}

struct ServiceListener {
    listener: Listener,
    service: Arc<Mutex<ServiceHealth>>,
}

/// A running listener task; dropping `stop` (or sending on it) ends it.
struct Listener {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Stops accepting, closes every open connection, and returns once the socket is closed.
    async fn stop(self) {
        let _ = self.stop.send(());
        if let Err(err) = self.task.await {
            warn!(error = %err, "health check listener task failed");
        }
    }
}

/// State the request handlers read.
struct Shared {
    clock: Arc<dyn Clock>,
    health_timeout: Duration,
    liveness_timeout: Duration,
    proxy: Mutex<ProxyState>,
    responses: Family<ResponseLabels, Counter>,
}

struct ProxyState {
    /// The last [`HealthServer::updated`]; `None` while starting up.
    last_updated: Option<SystemTime>,
    /// The first [`HealthServer::queued_update`] since the last `updated`.
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
    /// False once the datapath was removed from under the agent (`nodeport-agent detach`):
    /// the maps may be up to date, but no packet reaches them.
    datapath_attached: bool,
    /// The last [`HealthServer::heartbeat`] of the agent's loop (the start until the first).
    heartbeat: SystemTime,
    /// The datapath holds a complete state: the first snapshot was programmed, and the last
    /// round wrote the datapath's settings ([`HealthServer::set_synced`]).
    synced: bool,
    /// The agent finished a round ([`HealthServer::set_synced`] was called): it is no longer
    /// starting up, so a change pending since then counts even without an `updated`.
    started_up: bool,
    /// Why the agent will not become ready by itself (a pinned datapath it refused to adopt),
    /// reported by `/readyz` ([`HealthServer::set_not_ready_reason`]).
    not_ready_reason: Option<String>,
}

/// The proxy health at one instant.
struct ProxyHealth {
    healthy: bool,
    last_updated: Option<SystemTime>,
    now: SystemTime,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    /// `healthz`, `livez` or `service`.
    endpoint: &'static str,
    code: &'static str,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HealthServer {
    /// Starts the node healthz server (if configured) with the system clock. Fails if its port
    /// cannot be bound.
    pub async fn start(config: HealthConfig) -> Result<Self, HealthError> {
        Self::start_with_clock(config, Arc::new(SystemClock::new())).await
    }

    /// [`HealthServer::start`] with another time source for the proxy health.
    pub async fn start_with_clock(
        config: HealthConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, HealthError> {
        let started = clock.now();
        let shared = Arc::new(Shared {
            clock,
            health_timeout: config.health_timeout,
            liveness_timeout: config.liveness_timeout,
            proxy: Mutex::new(ProxyState {
                last_updated: None,
                oldest_pending: None,
                // Eligible until the agent learns otherwise, as kube-proxy.
                node_eligible: true,
                datapath_attached: true,
                heartbeat: started,
                synced: false,
                not_ready_reason: None,
                started_up: false,
            }),
            responses: Family::default(),
        });
        // The answers that mean something exist from the start, at 0: a rate of 503s then
        // sees the first one. The node endpoints only where this server serves them.
        let endpoints: &[&'static str] = if config.node_healthz_port.is_some() {
            &["service", "healthz", "livez", "readyz"]
        } else {
            &["service"]
        };
        for &endpoint in endpoints {
            for code in ["200", "503"] {
                shared
                    .responses
                    .get_or_create_owned(&ResponseLabels { endpoint, code });
            }
        }
        let mut listeners = Listeners::default();
        let mut healthz_addr = None;
        if let Some(port) = config.node_healthz_port {
            let addr = SocketAddr::new(config.bind, port);
            let socket = listen(addr).and_then(|socket| Ok((socket.local_addr()?, socket)));
            let (local, socket) =
                socket.map_err(|cause| HealthError::NodeHealthz { port, addr, cause })?;
            info!(addr = %local, "serving node /healthz, /livez and /readyz");
            healthz_addr = Some(local);
            let handler_state = shared.clone();
            listeners.healthz = Some(spawn_listener(socket, move |req, _family| {
                node_response(&handler_state, req)
            }));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                bind: config.bind,
                healthz_addr,
                listeners: tokio::sync::Mutex::new(listeners),
            }),
        })
    }

    /// Registers `nodeport_health_responses_total{endpoint="healthz|livez|readyz|service",code}`,
    /// the responses served (kube-proxy's `kubeproxy_healthz_total` and `kubeproxy_livez_total`
    /// plus the Service probes).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nodeport_health_responses",
            "Health check responses served, by endpoint and HTTP status code",
            self.inner.shared.responses.clone(),
        );
    }

    /// Makes `services` (health check node port → what it reports) the whole set of Service
    /// health checks: starts listeners for new ports, updates the reports of kept ports without
    /// touching their listener, and stops the listeners of removed ports, closing their
    /// connections. Returns once every removed port is free and every new one is bound, with
    /// the ports that could not be bound; those are logged and tried again on the next call.
    /// Does nothing after [`HealthServer::shutdown`].
    pub async fn set_services(&self, services: BTreeMap<u16, ServiceHealth>) -> Vec<HealthError> {
        let mut listeners = self.inner.listeners.lock().await;
        if listeners.closed {
            debug!("health server shut down: ignoring the services");
            return Vec::new();
        }
        let removed: Vec<u16> = listeners
            .services
            .keys()
            .filter(|port| !services.contains_key(port))
            .copied()
            .collect();
        for port in removed {
            if let Some(old) = listeners.services.remove(&port) {
                let service = lock(&old.service).to_string();
                old.listener.stop().await;
                info!(port, %service, "stopped health check node port");
            }
        }
        let mut errors = Vec::new();
        for (port, service) in services {
            if let Some(existing) = listeners.services.get(&port) {
                let mut current = lock(&existing.service);
                if *current != service {
                    debug!(port, %service, local_endpoints = ?service.local_endpoints,
                        "health check node port updated");
                    *current = service;
                }
                continue;
            }
            if port == 0 {
                let err = HealthError::ZeroPort {
                    service: service.to_string(),
                };
                debug!(error = %err, "not serving a health check node port");
                errors.push(err);
                continue;
            }
            let addr = SocketAddr::new(self.inner.bind, port);
            match listen(addr) {
                Ok(socket) => {
                    info!(port, %service, local_endpoints = ?service.local_endpoints,
                        "serving health check node port");
                    let service = Arc::new(Mutex::new(service));
                    let (shared, reported) = (self.inner.shared.clone(), service.clone());
                    let listener = spawn_listener(socket, move |_req, family| {
                        service_response(&shared, &lock(&reported), family)
                    });
                    listeners
                        .services
                        .insert(port, ServiceListener { listener, service });
                }
                Err(cause) => {
                    let err = HealthError::ServicePort {
                        port,
                        addr,
                        service: service.to_string(),
                        cause,
                    };
                    // The caller reports it, once per change (it retries on every round).
                    debug!(error = %err, "health check node port not served");
                    errors.push(err);
                }
            }
        }
        errors
    }

    /// A change is waiting to be applied to the datapath (kube-proxy's `QueuedUpdate`). Only
    /// the first call since the last [`HealthServer::updated`] starts the health timeout.
    pub fn queued_update(&self) {
        let now = self.inner.shared.clock.now();
        lock(&self.inner.shared.proxy)
            .oldest_pending
            .get_or_insert(now);
    }

    /// The datapath now reflects every queued change (kube-proxy's `Updated`).
    pub fn updated(&self) {
        let now = self.inner.shared.clock.now();
        let mut proxy = lock(&self.inner.shared.proxy);
        proxy.oldest_pending = None;
        proxy.last_updated = Some(now);
    }

    /// Whether the node may receive load balancer traffic: false while it is being deleted or
    /// carries the `ToBeDeletedByClusterAutoscaler` taint. Only `/healthz` reports it.
    pub fn set_node_eligible(&self, eligible: bool) {
        lock(&self.inner.shared.proxy).node_eligible = eligible;
    }

    /// The agent's loop is alive: it went round (`/livez` fails when it has not for the
    /// liveness timeout).
    pub fn heartbeat(&self) {
        let now = self.inner.shared.clock.now();
        lock(&self.inner.shared.proxy).heartbeat = now;
    }

    /// Whether the datapath holds a complete state: true after a round that programmed the
    /// first snapshot (individual Services refused or not) and wrote the datapath's settings,
    /// false after a round that could not write the settings. `/readyz` answers 200 only
    /// while it is true.
    ///
    /// The first call also ends the start-up: from then on a change queued and never applied
    /// fails the proxy health after the health timeout even if nothing was ever applied (an
    /// agent whose first round refused a Service is not healthy forever).
    pub fn set_synced(&self, synced: bool) {
        let mut proxy = lock(&self.inner.shared.proxy);
        proxy.synced = synced;
        proxy.started_up = true;
    }

    /// Why the agent is not ready and will not be by itself: `/readyz` answers 503 with it
    /// (`"reason"`) until it is cleared.
    pub fn set_not_ready_reason(&self, reason: Option<String>) {
        lock(&self.inner.shared.proxy).not_ready_reason = reason;
    }

    /// Whether the datapath is attached. While it is not, the proxy is unhealthy: `/healthz`,
    /// `/livez` and `/readyz` answer 503 and the Service probes report
    /// `serviceProxyHealthy: false`.
    pub fn set_datapath_attached(&self, attached: bool) {
        lock(&self.inner.shared.proxy).datapath_attached = attached;
    }

    /// The proxy health, without the node eligibility: what `/livez` and the Service probes'
    /// `serviceProxyHealthy` report.
    pub fn is_healthy(&self) -> bool {
        self.inner.shared.proxy_health().healthy
    }

    /// The address of the node healthz server, if it runs (its port when configured as 0).
    pub fn local_addr_of_healthz(&self) -> Option<SocketAddr> {
        self.inner.healthz_addr
    }

    /// Stops every listener of every clone, closing their connections, and returns once all
    /// their ports are free. Later [`HealthServer::set_services`] calls do nothing.
    pub async fn shutdown(self) {
        let mut listeners = self.inner.listeners.lock().await;
        listeners.closed = true;
        if let Some(healthz) = listeners.healthz.take() {
            healthz.stop().await;
        }
        for (_, service) in std::mem::take(&mut listeners.services) {
            service.listener.stop().await;
        }
        info!("health servers stopped");
    }
}

impl Shared {
    /// kube-proxy's `isHealthy`: healthy while starting up (before the first update or the
    /// first round), when nothing is pending, or when the oldest pending change is younger
    /// than the timeout.
    fn proxy_health(&self) -> ProxyHealth {
        let now = self.clock.now();
        let proxy = lock(&self.proxy);
        let in_time = match (proxy.last_updated, proxy.oldest_pending) {
            (None, _) if !proxy.started_up => true,
            (_, None) => true,
            // A clock that went backwards counts as no time elapsed.
            (_, Some(oldest)) => {
                now.duration_since(oldest).unwrap_or_default() < self.health_timeout
            }
        };
        let healthy = in_time && proxy.datapath_attached;
        ProxyHealth {
            healthy,
            last_updated: proxy.last_updated,
            now,
        }
    }

    fn node_eligible(&self) -> bool {
        lock(&self.proxy).node_eligible
    }

    /// `/livez`: the agent's loop went round within the liveness timeout, and its datapath
    /// was not removed from under it (the two states a restart cures). A Service that cannot
    /// be programmed does not count: a restart would not program it either.
    fn alive(&self, now: SystemTime) -> bool {
        let proxy = lock(&self.proxy);
        let quiet = now.duration_since(proxy.heartbeat).unwrap_or_default();
        quiet < self.liveness_timeout && proxy.datapath_attached
    }

    /// `/readyz`: alive, and the datapath holds a complete state.
    fn ready(&self, now: SystemTime) -> bool {
        let (synced, refused) = {
            let proxy = lock(&self.proxy);
            (proxy.synced, proxy.not_ready_reason.is_some())
        };
        synced && !refused && self.alive(now)
    }

    fn not_ready_reason(&self) -> Option<String> {
        lock(&self.proxy).not_ready_reason.clone()
    }

    fn count(&self, endpoint: &'static str, status: StatusCode) {
        let code = match status {
            StatusCode::OK => "200",
            StatusCode::SERVICE_UNAVAILABLE => "503",
            StatusCode::NOT_FOUND => "404",
            _ => "other",
        };
        self.responses
            .get_or_create(&ResponseLabels { endpoint, code })
            .inc();
    }
}

/// A listening socket on `addr`. The wildcard (`0.0.0.0` or `::`) gets one socket for both
/// families (`IPV6_V6ONLY` off, whatever `net.ipv6.bindv6only` says), as Go's `net.Listen`
/// gives kube-proxy for `0.0.0.0` ("It doesn't matter whether we listen on "0.0.0.0", "::",
/// or ""; go treats them all the same", `newServiceHealthServer` in
/// pkg/proxy/healthcheck/service_health.go); on a kernel without IPv6, IPv4 alone.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    if !addr.ip().is_unspecified() {
        return bind(addr, false);
    }
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port());
    match bind(any6, true) {
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            debug!("no IPv6 in this kernel: listening on IPv4 only");
            bind(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()),
                false,
            )
        }
        result => result,
    }
}

/// `bind(2)` and `listen(2)` with `SO_REUSEADDR`, as tokio's `TcpListener::bind`; with
/// `dual_stack`, an IPv6 socket that takes IPv4 too.
fn bind(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if dual_stack {
        let off: libc::c_int = 0;
        // SAFETY: setsockopt on a socket we own, with an int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                std::ptr::from_ref(&off).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts connections on `socket` until stopped, serving each with `handler`, which is told
/// the family of the address the connection came to (an IPv4 client of a dual-stack socket
/// counts as IPv4). On stop the socket is closed first, then every connection, then the task
/// ends.
fn spawn_listener<F>(socket: TcpListener, handler: F) -> Listener
where
    F: Fn(&Request<Incoming>, IpFamily) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let addr = socket.local_addr().ok();
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                // A send or a dropped sender: either way, stop.
                _ = &mut stopped => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = socket.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let handler = handler.clone();
                        let family = IpFamily::of(
                            stream.local_addr().map_or(peer.ip(), |local| local.ip()),
                        );
                        connections.spawn(async move {
                            let service = service_fn(move |req: Request<Incoming>| {
                                let response = handler(&req, family);
                                async move { Ok::<_, Infallible>(response) }
                            });
                            let served = hyper::server::conn::http1::Builder::new()
                                // Go's net/http spells header names this way.
                                .title_case_headers(true)
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                            if let Err(err) = served {
                                debug!(%peer, error = %err, "health check connection failed");
                            }
                        });
                    }
                    Err(err) => {
                        // Out of file descriptors, say: keep listening without spinning.
                        warn!(?addr, error = %err, "health check listener cannot accept");
                        tokio::select! {
                            _ = &mut stopped => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
            }
        }
        drop(socket);
        connections.shutdown().await;
        debug!(?addr, "health check listener closed");
    });
    Listener { stop, task }
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// kube-proxy's `hcHandler`: the same answer for every path and method, from the endpoints of
/// the family the probe came over (`LocalEndpoints::for_probe`).
fn service_response(shared: &Shared, service: &ServiceHealth, family: IpFamily) -> Response<Body> {
    let healthy = shared.proxy_health().healthy;
    let count = service.local_endpoints.for_probe(family);
    let status = if count != 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    shared.count("service", status);
    let mut response = json_response(status, service_body(service, count, healthy));
    response
        .headers_mut()
        .insert("x-load-balancing-endpoint-weight", HeaderValue::from(count));
    response
}

/// The Service probe body: kube-proxy's dedented template, tab indented, no final newline.
fn service_body(service: &ServiceHealth, local_endpoints: usize, proxy_healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        quote(&service.namespace),
        quote(&service.name),
        local_endpoints,
        proxy_healthy,
    )
}

/// A JSON string. kube-proxy uses Go's `%q`, which is the same for Kubernetes names (DNS
/// labels); this stays valid JSON for anything else.
fn quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// kube-proxy's healthz mux: `/healthz` and `/livez`, any method, plus nodeport's `/readyz`;
/// Go's 404 otherwise.
fn node_response(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => {
            let health = shared.proxy_health();
            let eligible = shared.node_eligible();
            let (status, last_updated) = node_status(&health, health.healthy && eligible);
            shared.count("healthz", status);
            json_response(
                status,
                format!(
                    r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {eligible}}}"#,
                    format_time(last_updated),
                    format_time(Some(health.now)),
                ),
            )
        }
        "/livez" => {
            let health = shared.proxy_health();
            let (status, last_updated) = node_status(&health, shared.alive(health.now));
            shared.count("livez", status);
            json_response(
                status,
                format!(
                    r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
                    format_time(last_updated),
                    format_time(Some(health.now)),
                ),
            )
        }
        "/readyz" => {
            let health = shared.proxy_health();
            let ready = shared.ready(health.now);
            let (status, last_updated) = node_status(&health, ready);
            shared.count("readyz", status);
            let reason = shared
                .not_ready_reason()
                .map(|r| format!(r#", "reason": {}"#, quote(&r)))
                .unwrap_or_default();
            json_response(
                status,
                format!(
                    r#"{{"lastUpdated": "{}","currentTime": "{}", "ready": {ready}{reason}}}"#,
                    format_time(last_updated),
                    format_time(Some(health.now)),
                ),
            )
        }
        _ => {
            let mut response = Response::new(Body::from("404 page not found\n"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            response
        }
    }
}

/// The status and the reported `lastUpdated`: kube-proxy reports the current time as the last
/// update whenever it answers 200, as its older releases did.
fn node_status(health: &ProxyHealth, healthy: bool) -> (StatusCode, Option<SystemTime>) {
    if healthy {
        (StatusCode::OK, Some(health.now))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, health.last_updated)
    }
}

/// RFC 3339 in UTC with nanoseconds; `None` is Go's zero time, which kube-proxy prints for a
/// proxy never updated.
fn format_time(time: Option<SystemTime>) -> String {
    const GO_ZERO_TIME: &str = "0001-01-01T00:00:00.000000000Z";
    let Some(time) = time else {
        return GO_ZERO_TIME.to_owned();
    };
    let nanos = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i128,
        Err(before) => -(before.duration().as_nanos() as i128),
    };
    match k8s_openapi::jiff::Timestamp::from_nanosecond(nanos) {
        Ok(timestamp) => format!("{timestamp:.9}"),
        Err(_) => GO_ZERO_TIME.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener as StdListener;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    use super::*;

    /// A clock the test moves by hand.
    struct ManualClock(Mutex<SystemTime>);

    impl ManualClock {
        fn new() -> Arc<Self> {
            // 2024-05-01T10:00:00.5Z
            Arc::new(Self(Mutex::new(
                UNIX_EPOCH + Duration::new(1_714_557_600, 500_000_000),
            )))
        }

        fn advance(&self, by: Duration) {
            *lock(&self.0) += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            *lock(&self.0)
        }
    }

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn config() -> HealthConfig {
        HealthConfig {
            bind: LOCALHOST,
            node_healthz_port: Some(0),
            health_timeout: Duration::from_secs(60),
            liveness_timeout: Duration::from_secs(60),
        }
    }

    async fn start(clock: &Arc<ManualClock>) -> HealthServer {
        HealthServer::start_with_clock(config(), clock.clone())
            .await
            .unwrap()
    }

    /// A port that was free a moment ago: bound on 127.0.0.1:0, then released.
    fn free_port() -> u16 {
        StdListener::bind((LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn web(local_endpoints: usize) -> ServiceHealth {
        ServiceHealth {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: LocalEndpoints::ipv4(local_endpoints),
        }
    }

    fn services(entries: &[(u16, ServiceHealth)]) -> BTreeMap<u16, ServiceHealth> {
        entries.iter().cloned().collect()
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        /// Names as sent on the wire.
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap()
        }
    }

    /// A minimal HTTP/1.1 client on one keep-alive connection.
    struct Client(BufReader<TcpStream>);

    impl Client {
        async fn connect(port: u16) -> io::Result<Self> {
            Self::connect_to(SocketAddr::new(LOCALHOST, port)).await
        }

        async fn connect_to(addr: SocketAddr) -> io::Result<Self> {
            Ok(Self(BufReader::new(TcpStream::connect(addr).await?)))
        }

        async fn get(&mut self, path: &str) -> io::Result<Reply> {
            let request = format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n");
            self.0.get_mut().write_all(request.as_bytes()).await?;
            let mut line = String::new();
            if self.0.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let status = line.split(' ').nth(1).unwrap().parse().unwrap();
            let mut headers = Vec::new();
            loop {
                line.clear();
                self.0.read_line(&mut line).await?;
                let line = line.trim_end_matches("\r\n");
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(": ").unwrap();
                headers.push((name.to_owned(), value.to_owned()));
            }
            let length: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .expect("content-length")
                .1
                .parse()
                .unwrap();
            let mut body = vec![0; length];
            self.0.read_exact(&mut body).await?;
            Ok(Reply {
                status,
                headers,
                body: String::from_utf8(body).unwrap(),
            })
        }
    }

    /// One request on a fresh connection.
    async fn get(port: u16, path: &str) -> Reply {
        Client::connect(port)
            .await
            .unwrap()
            .get(path)
            .await
            .unwrap()
    }

    /// One request to `ip`, on a fresh connection.
    async fn get_at(ip: IpAddr, port: u16, path: &str) -> Reply {
        Client::connect_to(SocketAddr::new(ip, port))
            .await
            .unwrap_or_else(|e| panic!("connecting to {ip} port {port}: {e}"))
            .get(path)
            .await
            .unwrap()
    }

    const LOCALHOST_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    /// A server listening on the wildcard `bind` (0.0.0.0 or ::).
    async fn start_on(bind: IpAddr) -> HealthServer {
        let config = HealthConfig { bind, ..config() };
        HealthServer::start_with_clock(config, ManualClock::new())
            .await
            .unwrap()
    }

    fn healthz_port(server: &HealthServer) -> u16 {
        server.local_addr_of_healthz().unwrap().port()
    }

    fn assert_port_free(port: u16) {
        if let Err(err) = StdListener::bind((LOCALHOST, port)) {
            panic!("port {port} still in use: {err}");
        }
    }

    const WEB_OK: &str = "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}";

    #[tokio::test]
    async fn service_with_a_local_endpoint_is_200_with_kube_proxy_body_and_headers() {
        let server = start(&ManualClock::new()).await;
        let port = free_port();
        assert!(
            server
                .set_services(services(&[(port, web(1))]))
                .await
                .is_empty()
        );

        for path in ["/", "/healthz", "/any/path?x=1"] {
            let reply = get(port, path).await;
            assert_eq!(reply.status, 200, "{path}");
            assert_eq!(reply.body, WEB_OK);
            assert_eq!(reply.body.len(), 114);
            let names: Vec<&str> = reply.headers.iter().map(|(n, _)| n.as_str()).collect();
            for (name, value) in [
                ("Content-Type", "application/json"),
                ("X-Content-Type-Options", "nosniff"),
                ("X-Load-Balancing-Endpoint-Weight", "1"),
                ("Content-Length", "114"),
            ] {
                assert!(
                    names.contains(&name),
                    "{name} spelled as Go does: {names:?}"
                );
                assert_eq!(reply.header(name), Some(value));
            }
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn service_without_local_endpoints_is_503() {
        let server = start(&ManualClock::new()).await;
        let port = free_port();
        assert!(
            server
                .set_services(services(&[(port, web(0))]))
                .await
                .is_empty()
        );

        let reply = get(port, "/").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("X-Load-Balancing-Endpoint-Weight"), Some("0"));
        assert_eq!(
            reply.body,
            WEB_OK.replace("\"localEndpoints\": 1", "\"localEndpoints\": 0")
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn updates_keep_the_listener_and_its_connections() {
        let server = start(&ManualClock::new()).await;
        let port = free_port();
        assert!(
            server
                .set_services(services(&[(port, web(0))]))
                .await
                .is_empty()
        );
        let mut held = Client::connect(port).await.unwrap();
        assert_eq!(held.get("/").await.unwrap().status, 503);

        for count in [3, 0, 1, 2] {
            assert!(
                server
                    .set_services(services(&[(port, web(count))]))
                    .await
                    .is_empty()
            );
            // The connection opened before the update still works: the listener and its
            // connections were not restarted (stopping a listener closes its connections).
            let reply = held.get("/").await.unwrap();
            assert_eq!(reply.status, if count == 0 { 503 } else { 200 });
            assert_eq!(reply.json()["localEndpoints"], count);
            assert_eq!(
                reply.header("X-Load-Balancing-Endpoint-Weight"),
                Some(count.to_string().as_str())
            );
            // And a new connection is accepted right after the update.
            assert_eq!(get(port, "/").await.json()["localEndpoints"], count);
        }

        // A new name for the same port is reported without a restart either.
        let renamed = ServiceHealth {
            name: "api".into(),
            ..web(1)
        };
        assert!(
            server
                .set_services(services(&[(port, renamed)]))
                .await
                .is_empty()
        );
        assert_eq!(
            held.get("/").await.unwrap().json()["service"]["name"],
            "api"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn removing_a_service_frees_its_port_and_closes_its_connections() {
        let server = start(&ManualClock::new()).await;
        let (kept, removed) = (free_port(), free_port());
        let both = services(&[(kept, web(1)), (removed, web(2))]);
        assert!(server.set_services(both).await.is_empty());
        let mut held = Client::connect(removed).await.unwrap();
        assert_eq!(held.get("/").await.unwrap().status, 200);

        assert!(
            server
                .set_services(services(&[(kept, web(1))]))
                .await
                .is_empty()
        );

        assert_port_free(removed);
        let refused = TcpStream::connect((LOCALHOST, removed)).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        assert!(held.get("/").await.is_err(), "connections closed too");
        assert_eq!(get(kept, "/").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_busy_port_fails_alone_and_is_retried_on_the_next_update() {
        let server = start(&ManualClock::new()).await;
        let blocker = StdListener::bind((LOCALHOST, 0)).unwrap();
        let busy = blocker.local_addr().unwrap().port();
        let other = free_port();
        let wanted = services(&[(busy, web(1)), (other, web(1))]);

        let errors = server.set_services(wanted.clone()).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].port(), busy);
        assert!(
            matches!(&errors[0], HealthError::ServicePort { service, cause, .. }
                if service == "default/web" && cause.kind() == io::ErrorKind::AddrInUse),
            "{:?}",
            errors[0]
        );
        assert!(errors[0].to_string().contains(&busy.to_string()));
        assert_eq!(get(other, "/").await.status, 200);

        // Still busy: still reported.
        assert_eq!(server.set_services(wanted.clone()).await.len(), 1);
        drop(blocker);
        assert!(server.set_services(wanted).await.is_empty());
        assert_eq!(get(busy, "/").await.body, WEB_OK);
        assert_eq!(get(other, "/").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn port_zero_is_an_error() {
        let server = start(&ManualClock::new()).await;
        let errors = server.set_services(services(&[(0, web(1))])).await;
        assert!(matches!(errors.as_slice(), [HealthError::ZeroPort { .. }]));
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_removed_datapath_makes_the_proxy_unhealthy() {
        let server = start(&ManualClock::new()).await;
        let port = healthz_port(&server);
        server.updated();
        assert_eq!(get(port, "/healthz").await.status, 200);
        server.set_datapath_attached(false);
        assert!(!server.is_healthy());
        // Applying changes in time does not make up for a datapath no packet reaches.
        server.updated();
        for path in ["/healthz", "/livez"] {
            assert_eq!(get(port, path).await.status, 503, "{path}");
        }
        server.set_datapath_attached(true);
        assert_eq!(get(port, "/healthz").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn node_health_follows_queued_and_applied_updates() {
        let clock = ManualClock::new();
        let server = start(&clock).await;
        let port = healthz_port(&server);
        let start_time = "2024-05-01T10:00:00.500000000Z";

        for path in ["/healthz", "/livez"] {
            let reply = get(port, path).await;
            assert_eq!(reply.status, 200, "{path}");
            assert_eq!(reply.header("Content-Type"), Some("application/json"));
            assert_eq!(reply.header("X-Content-Type-Options"), Some("nosniff"));
        }
        assert_eq!(
            get(port, "/healthz").await.body,
            format!(
                r#"{{"lastUpdated": "{start_time}","currentTime": "{start_time}", "nodeEligible": true}}"#
            )
        );
        assert_eq!(
            get(port, "/livez").await.body,
            format!(r#"{{"lastUpdated": "{start_time}","currentTime": "{start_time}"}}"#)
        );

        server.updated();
        server.queued_update();
        clock.advance(Duration::from_secs(30));
        // A later change does not restart the timeout.
        server.queued_update();
        clock.advance(Duration::from_secs(29));
        assert!(server.is_healthy());
        assert_eq!(get(port, "/healthz").await.status, 200);

        clock.advance(Duration::from_secs(1));
        assert!(!server.is_healthy());
        let now = "2024-05-01T10:01:00.500000000Z";
        let healthz = get(port, "/healthz").await;
        assert_eq!(healthz.status, 503);
        assert_eq!(
            healthz.body,
            format!(
                r#"{{"lastUpdated": "{start_time}","currentTime": "{now}", "nodeEligible": true}}"#
            )
        );
        // /livez is about the agent's loop, which still goes round: a change that cannot be
        // applied (a Service refused by a full map) is no reason to restart the agent.
        server.heartbeat();
        let livez = get(port, "/livez").await;
        assert_eq!(livez.status, 200);
        assert_eq!(
            livez.body,
            format!(r#"{{"lastUpdated": "{now}","currentTime": "{now}"}}"#)
        );

        server.updated();
        assert!(server.is_healthy());
        let healthz = get(port, "/healthz").await;
        assert_eq!(healthz.status, 200);
        assert_eq!(healthz.json()["lastUpdated"], now);
        assert_eq!(get(port, "/livez").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn livez_fails_when_the_loop_stops_going_round_and_only_then() {
        let clock = ManualClock::new();
        let server = start(&clock).await;
        let port = healthz_port(&server);
        // A change pending for two minutes (a refused Service) fails /healthz, not /livez.
        server.updated();
        server.queued_update();
        for _ in 0..24 {
            clock.advance(Duration::from_secs(5));
            server.heartbeat();
        }
        assert_eq!(get(port, "/healthz").await.status, 503);
        assert_eq!(get(port, "/livez").await.status, 200);
        // The loop stops: 59 s are fine, the 60th is not.
        clock.advance(Duration::from_secs(59));
        assert_eq!(get(port, "/livez").await.status, 200);
        clock.advance(Duration::from_secs(1));
        let livez = get(port, "/livez").await;
        assert_eq!(livez.status, 503);
        // It goes round again.
        server.heartbeat();
        assert_eq!(get(port, "/livez").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn readyz_waits_for_the_first_sync_and_ignores_refused_services() {
        let clock = ManualClock::new();
        let server = start(&clock).await;
        let port = healthz_port(&server);
        // Starting up, however long the first list takes: healthy as kube-proxy, not ready.
        server.queued_update();
        for _ in 0..720 {
            clock.advance(Duration::from_secs(5));
            server.heartbeat();
        }
        let now = "2024-05-01T11:00:00.500000000Z";
        let readyz = get(port, "/readyz").await;
        assert_eq!(readyz.status, 503);
        assert_eq!(readyz.header("Content-Type"), Some("application/json"));
        assert_eq!(
            readyz.body,
            format!(
                r#"{{"lastUpdated": "0001-01-01T00:00:00.000000000Z","currentTime": "{now}", "ready": false}}"#
            )
        );
        assert_eq!(get(port, "/healthz").await.status, 200);
        assert_eq!(get(port, "/livez").await.status, 200);

        // The first round: ready, also with a Service that could not be programmed (no
        // `updated`, the change stays pending past the health timeout). /healthz fails then
        // (kube-proxy's rule), although nothing was ever applied: the start-up is over.
        server.set_synced(true);
        let readyz = get(port, "/readyz").await;
        assert_eq!(readyz.status, 200);
        assert_eq!(readyz.json()["ready"], true);
        clock.advance(Duration::from_secs(61));
        server.heartbeat();
        assert_eq!(get(port, "/readyz").await.status, 200);
        assert_eq!(get(port, "/healthz").await.status, 503);

        // A round that could not write the datapath's settings, a stuck loop, a removed
        // datapath: not ready.
        server.set_synced(false);
        assert_eq!(get(port, "/readyz").await.status, 503);
        server.set_synced(true);
        clock.advance(Duration::from_secs(60));
        assert_eq!(get(port, "/readyz").await.status, 503);
        server.heartbeat();
        assert_eq!(get(port, "/readyz").await.status, 200);
        server.set_datapath_attached(false);
        assert_eq!(get(port, "/readyz").await.status, 503);
        server.set_datapath_attached(true);
        assert_eq!(get(port, "/readyz").await.status, 200);
        server.set_not_ready_reason(Some("pinned datapath incompatible".into()));
        let refused = get(port, "/readyz").await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.json()["reason"], "pinned datapath incompatible");
        assert_eq!(get(port, "/livez").await.status, 200);
        server.set_not_ready_reason(None);
        assert_eq!(get(port, "/readyz").await.status, 200);
        server.set_datapath_attached(false);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn node_is_healthy_while_starting_up_however_long_the_first_sync() {
        // kube-proxy: before the first Updated there is no proxier to be late.
        let clock = ManualClock::new();
        let server = start(&clock).await;
        server.queued_update();
        clock.advance(Duration::from_secs(3600));
        assert!(server.is_healthy());
        assert_eq!(get(healthz_port(&server), "/healthz").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn an_ineligible_node_fails_healthz_only() {
        let server = start(&ManualClock::new()).await;
        let port = healthz_port(&server);
        let service_port = free_port();
        assert!(
            server
                .set_services(services(&[(service_port, web(1))]))
                .await
                .is_empty()
        );

        server.set_node_eligible(false);
        let healthz = get(port, "/healthz").await;
        assert_eq!(healthz.status, 503);
        assert_eq!(healthz.json()["nodeEligible"], false);
        // Never updated: Go's zero time.
        assert_eq!(
            healthz.json()["lastUpdated"],
            "0001-01-01T00:00:00.000000000Z"
        );
        assert_eq!(get(port, "/livez").await.status, 200);
        // serviceProxyHealthy leaves the node out, as kube-proxy.
        assert!(server.is_healthy());
        assert_eq!(get(service_port, "/").await.body, WEB_OK);

        server.set_node_eligible(true);
        let healthz = get(port, "/healthz").await;
        assert_eq!(healthz.status, 200);
        assert_eq!(healthz.json()["nodeEligible"], true);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn an_unhealthy_proxy_fails_service_probes_with_local_endpoints() {
        let clock = ManualClock::new();
        let server = start(&clock).await;
        let port = free_port();
        assert!(
            server
                .set_services(services(&[(port, web(1))]))
                .await
                .is_empty()
        );
        server.updated();
        server.queued_update();
        clock.advance(Duration::from_secs(61));

        let reply = get(port, "/").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("X-Load-Balancing-Endpoint-Weight"), Some("1"));
        assert_eq!(
            reply.body,
            WEB_OK.replace(
                "\"serviceProxyHealthy\": true",
                "\"serviceProxyHealthy\": false"
            )
        );

        server.updated();
        assert_eq!(get(port, "/").await.body, WEB_OK);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn other_healthz_paths_are_go_404s() {
        let server = start(&ManualClock::new()).await;
        let reply = get(healthz_port(&server), "/healthz/").await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.body, "404 page not found\n");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_releases_every_port() {
        let server = start(&ManualClock::new()).await;
        let healthz = healthz_port(&server);
        let (a, b) = (free_port(), free_port());
        assert!(
            server
                .set_services(services(&[(a, web(1)), (b, web(0))]))
                .await
                .is_empty()
        );
        let mut held = Client::connect(a).await.unwrap();
        assert_eq!(held.get("/").await.unwrap().status, 200);
        let clone = server.clone();

        server.shutdown().await;

        for port in [healthz, a, b] {
            assert_port_free(port);
        }
        assert!(held.get("/").await.is_err(), "connections closed too");
        // The clone is shut down too.
        assert!(
            clone
                .set_services(services(&[(a, web(1))]))
                .await
                .is_empty()
        );
        assert_port_free(a);
    }

    #[tokio::test]
    async fn a_busy_healthz_port_fails_start() {
        let blocker = StdListener::bind((LOCALHOST, 0)).unwrap();
        let port = blocker.local_addr().unwrap().port();
        let config = HealthConfig {
            node_healthz_port: Some(port),
            ..config()
        };
        match HealthServer::start(config).await {
            Err(err @ HealthError::NodeHealthz { .. }) => assert_eq!(err.port(), port),
            Err(err) => panic!("unexpected error {err}"),
            Ok(_) => panic!("started on a busy port"),
        }
    }

    #[tokio::test]
    async fn healthz_can_be_disabled() {
        let config = HealthConfig {
            node_healthz_port: None,
            ..config()
        };
        let server = HealthServer::start(config).await.unwrap();
        assert_eq!(server.local_addr_of_healthz(), None);
        let port = free_port();
        assert!(
            server
                .set_services(services(&[(port, web(1))]))
                .await
                .is_empty()
        );
        assert_eq!(get(port, "/").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn responses_are_counted() {
        let clock = ManualClock::new();
        let server = start(&clock).await;
        let mut registry = Registry::default();
        server.register(&mut registry);
        let port = free_port();
        assert!(
            server
                .set_services(services(&[(port, web(0))]))
                .await
                .is_empty()
        );
        get(port, "/").await;
        get(healthz_port(&server), "/healthz").await;
        get(healthz_port(&server), "/livez").await;
        get(healthz_port(&server), "/livez").await;
        get(healthz_port(&server), "/readyz").await;

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"nodeport_health_responses_total{endpoint="service",code="503"} 1"#,
            r#"nodeport_health_responses_total{endpoint="healthz",code="200"} 1"#,
            r#"nodeport_health_responses_total{endpoint="livez",code="200"} 2"#,
            r#"nodeport_health_responses_total{endpoint="readyz",code="503"} 1"#,
            // Never answered, there from the start.
            r#"nodeport_health_responses_total{endpoint="service",code="200"} 0"#,
            r#"nodeport_health_responses_total{endpoint="healthz",code="503"} 0"#,
            r#"nodeport_health_responses_total{endpoint="livez",code="503"} 0"#,
            r#"nodeport_health_responses_total{endpoint="readyz",code="200"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        server.shutdown().await;
    }

    #[test]
    fn times_are_rfc3339_utc_with_nanoseconds() {
        let time = UNIX_EPOCH + Duration::new(1_714_557_600, 123_456_789);
        assert_eq!(format_time(Some(time)), "2024-05-01T10:00:00.123456789Z");
        assert_eq!(
            format_time(Some(UNIX_EPOCH)),
            "1970-01-01T00:00:00.000000000Z"
        );
        assert_eq!(format_time(None), "0001-01-01T00:00:00.000000000Z");
    }

    #[test]
    fn system_clock_follows_the_wall_clock() {
        let clock = SystemClock::new();
        let (before, now) = (SystemTime::now(), clock.now());
        let gap = now
            .duration_since(before)
            .unwrap_or_else(|err| err.duration());
        assert!(gap < Duration::from_secs(5), "{gap:?}");
    }

    /// kube-proxy's `0.0.0.0` is Go's wildcard, which takes both families: the agent's too,
    /// for the node health server and the health check node ports alike, whichever wildcard
    /// is configured.
    #[tokio::test]
    async fn the_wildcard_listens_on_both_families() {
        for bind in [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()] {
            let server = start_on(bind).await;
            let port = healthz_port(&server);
            let service_port = free_port();
            assert!(
                server
                    .set_services(services(&[(service_port, web(1))]))
                    .await
                    .is_empty()
            );
            for ip in [LOCALHOST, LOCALHOST_V6] {
                assert_eq!(
                    get_at(ip, port, "/healthz").await.status,
                    200,
                    "{bind} {ip}"
                );
                assert_eq!(
                    get_at(ip, service_port, "/").await.status,
                    200,
                    "{bind} {ip}"
                );
            }
            server.shutdown().await;
        }
    }

    /// An IPv6-only Service with a local IPv6 endpoint is healthy on this node, whichever
    /// family the load balancer probes over (kube-proxy's IPv6 proxier alone serves the port,
    /// on Go's dual-stack wildcard). The agent answered 503: it counted IPv4 endpoints only.
    #[tokio::test]
    async fn an_ipv6_only_service_with_a_local_ipv6_endpoint_answers_200() {
        let server = start_on(Ipv6Addr::UNSPECIFIED.into()).await;
        let port = free_port();
        let service = ServiceHealth {
            local_endpoints: LocalEndpoints {
                ipv4: None,
                ipv6: Some(1),
            },
            ..web(0)
        };
        assert!(
            server
                .set_services(services(&[(port, service)]))
                .await
                .is_empty()
        );
        for ip in [LOCALHOST_V6, LOCALHOST] {
            let reply = get_at(ip, port, "/").await;
            assert_eq!(reply.status, 200, "over {ip}");
            assert_eq!(reply.body, WEB_OK, "over {ip}");
            assert_eq!(reply.header("X-Load-Balancing-Endpoint-Weight"), Some("1"));
        }
        server.shutdown().await;
    }

    /// A dual-stack Service answers each family's probes from that family's endpoints, as
    /// kube-proxy's two health servers (one per proxier) do: a node whose local pod has no
    /// IPv6 address is out of the IPv6 load balancer and in the IPv4 one.
    #[tokio::test]
    async fn a_dual_stack_service_answers_each_family_from_its_own_endpoints() {
        let server = start_on(Ipv4Addr::UNSPECIFIED.into()).await;
        let port = free_port();
        let service = ServiceHealth {
            local_endpoints: LocalEndpoints {
                ipv4: Some(2),
                ipv6: Some(0),
            },
            ..web(0)
        };
        assert!(
            server
                .set_services(services(&[(port, service)]))
                .await
                .is_empty()
        );
        let v4 = get_at(LOCALHOST, port, "/").await;
        assert_eq!(v4.status, 200);
        assert_eq!(v4.json()["localEndpoints"], 2);
        assert_eq!(v4.header("X-Load-Balancing-Endpoint-Weight"), Some("2"));
        let v6 = get_at(LOCALHOST_V6, port, "/").await;
        assert_eq!(v6.status, 503);
        assert_eq!(v6.json()["localEndpoints"], 0);
        server.shutdown().await;
    }
}
