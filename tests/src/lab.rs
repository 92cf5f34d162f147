//! A small cluster in network namespaces, for the end-to-end tests and the demo.
//!
//! ```text
//!   client (198.18.0.100, .101) ──┐
//!                                 ├── lan: bridge br0 ── node-1 ext0 198.18.0.1   pods 198.18.1.x
//!                                 └────────────────────── node-2 ext0 198.18.0.2   pods 198.18.2.x
//! ```
//! Pods hang off their node on routed veths (a /32 route per pod, the node side answering as
//! 198.18.N.1, as Calico and Cilium do). node-1 routes 198.18.2.0/24 via node-2. The agent runs
//! in node-1's network namespace as the real binary, with `--manifests`; the harness follows
//! its JSON log to know when a change is applied.
//!
//! Veths that send towards node-1's XDP have checksum offload off (frames from a wire carry
//! full checksums; veths otherwise pass partial ones); the bridge port behind node-1's ext0
//! runs a bare XDP_PASS program, without which the veth driver does not deliver XDP_TX frames
//! promptly (see `Lab::wire`); the bridge does not call netfilter.
//!
//! Everything is removed on drop, also when a test fails: the agent is killed, the pins are
//! removed, the namespaces deleted.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{agent::PinDirGuard, netns::NetNs};

pub const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The router of `Lab::add_router`, on the LAN, and the client behind it.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const FAR_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 100);
/// A second client address, outside 198.18.0.96/30 (used by source range tests).
pub const CLIENT2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
/// The port every pod server listens on (TCP and UDP).
pub const POD_PORT: u16 = 8080;
/// How long to wait for anything before failing (a guard, never a synchronisation).
pub const PATIENCE: Duration = Duration::from_secs(20);
/// The agent's metrics endpoint, on node-1's address.
pub const METRICS_PORT: u16 = 9480;

/// Where the agent binary is: NODEPORT_AGENT_BIN, or the workspace's debug build (which
/// `cargo xtask test` builds with the datapath embedded).
pub fn agent_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("NODEPORT_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nodeport-agent"),
    };
    ensure!(
        path.exists(),
        "{} not found: build it with the datapath (`cargo xtask test` does) or set NODEPORT_AGENT_BIN",
        path.display()
    );
    Ok(path)
}

/// A pod: its namespace, address and the server in it.
pub struct Pod {
    pub name: String,
    pub node: usize,
    pub addr: Ipv4Addr,
    server: Option<PodServer>,
    pub ns: NetNs,
}

impl Pod {
    pub fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, POD_PORT)
    }
}

/// A TCP and UDP server in a pod's namespace that answers every line or datagram with
/// "<pod name> <client address as the pod sees it>"; a TCP line "download N" gets N bytes
/// before its answer.
struct PodServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PodServer {
    fn start(ns: &NetNs, name: &str) -> Result<Self> {
        let path = format!("/var/run/netns/{}", ns.name);
        let netns = File::open(&path).with_context(|| format!("opening {path}"))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let name = name.to_owned();
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on a namespace fd for this thread only.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(serve(name, ready_tx, stop_rx));
        });
        match ready_rx.recv_timeout(PATIENCE) {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("pod server: {e}"),
            Err(_) => bail!("pod server did not start"),
        }
    }
}

async fn serve(
    name: String,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, POD_PORT));
    let (tcp, udp) = match (
        tokio::net::TcpListener::bind(bind).await,
        tokio::net::UdpSocket::bind(bind).await,
    ) {
        (Ok(t), Ok(u)) => (t, u),
        (t, u) => {
            let _ = ready.send(Err(format!("bind: {:?} {:?}", t.err(), u.err())));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let name = Arc::new(name);
    let tcp_name = name.clone();
    let tcp_task = async move {
        loop {
            let Ok((stream, peer)) = tcp.accept().await else {
                continue;
            };
            let name = tcp_name.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // "download N": N bytes first, then the answer line.
                    if let Some(n) = line
                        .strip_prefix("download ")
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        && write.write_all(&vec![b'y'; n]).await.is_err()
                    {
                        break;
                    }
                    if write
                        .write_all(format!("{name} {peer}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    };
    let udp_task = async move {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((_, peer)) = udp.recv_from(&mut buf).await {
                let _ = udp
                    .send_to(format!("{name} {peer}\n").as_bytes(), peer)
                    .await;
            }
        }
    };
    tokio::select! {
        _ = tcp_task => {}
        _ = udp_task => {}
        _ = stop => {}
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a pod answered: its name and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub pod: String,
    pub seen: SocketAddrV4,
}

fn parse_answer(line: &str) -> Result<Answer> {
    let mut parts = line.split_whitespace();
    let (Some(pod), Some(seen)) = (parts.next(), parts.next()) else {
        bail!("odd answer {line:?}")
    };
    Ok(Answer {
        pod: pod.to_owned(),
        seen: seen
            .parse()
            .with_context(|| format!("odd answer {line:?}"))?,
    })
}

/// An open TCP connection from the client namespace.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// One request and its answer on this connection.
    pub fn ask(&mut self) -> Result<Answer> {
        self.stream.write_all(b"hello\n").context("sending")?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading the answer")?;
        ensure!(n > 0, "the connection was closed");
        parse_answer(&line)
    }
}

/// The agent as a process in node-1's network namespace, with its log.
pub struct AgentProcess {
    child: Child,
    log: Arc<(Mutex<Vec<serde_json::Value>>, Condvar)>,
    /// How far `wait_log` callers have consumed (each search starts after what they saw).
    pub cursor: usize,
}

impl AgentProcess {
    /// Starts `nodeport-agent --log-format json run ARGS` in `ns`'s network namespace.
    pub fn spawn(ns: &NetNs, args: &[String]) -> Result<Self> {
        Self::spawn_wrapped(ns, &[], args)
    }

    /// `nodeport-agent run ARGS` in `ns`'s network namespace, started through `wrapper` (a
    /// command line the agent's is appended to, e.g. `setpriv ... --`) when not empty.
    pub fn spawn_wrapped(ns: &NetNs, wrapper: &[String], args: &[String]) -> Result<Self> {
        let path = format!("/var/run/netns/{}", ns.name);
        let netns = File::open(&path).with_context(|| format!("opening {path}"))?;
        let fd = netns.as_raw_fd();
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(agent_binary()?);
                cmd
            }
            None => Command::new(agent_binary()?),
        };
        cmd.arg("--log-format").arg("json").arg("run").args(args);
        cmd.env(
            "RUST_LOG",
            "info,nodeport_agent::agent=debug,nodeport_agent::gc=debug",
        );
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        // SAFETY: only setns (a syscall) between fork and exec. Network namespace only: the
        // mount namespace stays the host's, so pins land on the host's bpffs and outlive the
        // process (unlike under `ip netns exec`, which remounts /sys).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting nodeport-agent")?;
        drop(netns);
        let stderr = child.stderr.take().expect("piped");
        let log: Arc<(Mutex<Vec<serde_json::Value>>, Condvar)> = Arc::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if std::env::var_os("NODEPORT_TEST_AGENT_LOG").is_some() {
                    eprintln!("agent: {line}");
                }
                let (lock, cv) = &*sink;
                lock.lock().expect("not poisoned").push(value);
                cv.notify_all();
            }
            // Under the lock, so a waiter between its check and its wait does not miss it.
            // The marker tells `finish` that the log is complete.
            let (lock, cv) = &*sink;
            lock.lock()
                .expect("not poisoned")
                .push(serde_json::json!({ "end_of_log": true }));
            cv.notify_all();
        });
        Ok(Self {
            child,
            log,
            cursor: 0,
        })
    }

    /// Waits for a log entry after the cursor that satisfies `pred`; moves the cursor past it.
    pub fn wait_log(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        self.wait_log_within(what, PATIENCE, pred)
    }

    /// `wait_log` with another patience (the bench's agents load tens of thousands of
    /// Services).
    pub fn wait_log_within(
        &mut self,
        what: &str,
        patience: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + patience;
        let (lock, cv) = &*self.log;
        let mut entries = lock.lock().expect("not poisoned");
        // Entries already looked at are not looked at again: an agent logging a line per
        // Service would otherwise make this quadratic.
        let mut unseen = self.cursor;
        loop {
            if let Some(i) = entries[unseen..].iter().position(&pred) {
                self.cursor = unseen + i + 1;
                return Ok(entries[self.cursor - 1].clone());
            }
            unseen = entries.len();
            // An agent that exits at once can exit before its last lines are read: it has
            // ended when its log has.
            let ended = entries.last().is_some_and(|e| e["end_of_log"] == true);
            if let Ok(Some(status)) = self.child.try_wait()
                && ended
            {
                bail!(
                    "the agent exited ({status}) while waiting for {what}; log:\n{}",
                    tail(&entries)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {what} from the agent in {patience:?}; log:\n{}",
                    tail(&entries)
                );
            }
            entries = cv.wait_timeout(entries, left).expect("not poisoned").0;
        }
    }

    /// Whether any entry so far, before the cursor too, satisfies `pred`.
    pub fn logged(&self, pred: impl Fn(&serde_json::Value) -> bool) -> bool {
        self.log.0.lock().expect("not poisoned").iter().any(pred)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log entry so far.
    pub fn log_entries(&self) -> Vec<serde_json::Value> {
        self.log.0.lock().expect("not poisoned").clone()
    }

    /// The whole log so far, for messages.
    pub fn log_text(&self) -> String {
        tail(&self.log.0.lock().expect("not poisoned"))
    }

    /// SIGKILL: no chance to clean anything up.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Waits for the agent to exit by itself (after it logged why).
    pub fn wait(mut self) -> Result<std::process::ExitStatus> {
        self.wait_exit()
    }

    /// `finish`, with the log as text (an agent refusing to start prints its error last).
    pub fn exit_log(self) -> Result<(std::process::ExitStatus, String)> {
        let (status, log) = self.finish()?;
        let text = log
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        Ok((status, text))
    }

    /// Waits for the agent to exit by itself and for the end of its log; the status and the
    /// whole log (an agent that fails at once may exit before its last lines were read).
    pub fn finish(mut self) -> Result<(std::process::ExitStatus, Vec<serde_json::Value>)> {
        let status = self.wait_exit()?;
        let deadline = Instant::now() + PATIENCE;
        let (lock, cv) = &*self.log;
        let mut log = lock.lock().expect("not poisoned");
        while !log.last().is_some_and(|e| e["end_of_log"] == true) {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "the agent's log did not end in {PATIENCE:?}"
            );
            log = cv.wait_timeout(log, left).expect("not poisoned").0;
        }
        Ok((status, log.clone()))
    }

    /// SIGTERM and wait: the agent's clean shutdown.
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit()
    }

    /// The exit status, within `PATIENCE`: an agent that does not exit fails the test (and
    /// is killed when dropped) instead of hanging it. Wakes on each log line and at the end of
    /// the log, which comes with the exit.
    fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + PATIENCE;
        let (lock, cv) = &*self.log;
        let mut log = lock.lock().expect("not poisoned");
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the agent did not exit in {PATIENCE:?}; log:\n{}",
                    tail(&log)
                );
            }
            // The exit itself may trail the end of its log by a moment: look again soon.
            let slice = left.min(Duration::from_millis(50));
            log = cv.wait_timeout(log, slice).expect("not poisoned").0;
        }
    }
}

fn tail(entries: &[serde_json::Value]) -> String {
    let start = entries.len().saturating_sub(40);
    entries[start..]
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The message of the agent's fatal error (the last line of an agent that stops, a JSON
/// object as its log lines are), if `entry` is that line.
pub fn fatal_error(entry: &serde_json::Value) -> Option<&str> {
    (entry["level"] == "ERROR" && entry["target"] == "nodeport_agent")
        .then(|| entry.pointer("/fields/message").and_then(|m| m.as_str()))
        .flatten()
}

/// Whether a JSON log entry has this message.
pub fn message_is(entry: &serde_json::Value, message: &str) -> bool {
    entry.pointer("/fields/message").and_then(|m| m.as_str()) == Some(message)
}

/// A numeric field of a JSON log entry.
pub fn field_u64(entry: &serde_json::Value, field: &str) -> Option<u64> {
    entry
        .pointer(&format!("/fields/{field}"))
        .and_then(|v| v.as_u64())
}

/// A router on the LAN and a client behind it (`Lab::add_router`).
pub struct Router {
    pub ns: NetNs,
    /// The client behind the router.
    pub far: NetNs,
    mtu: u32,
}

/// The lab. Fields drop in order: agent, pins, pods, the peer program, nodes, client, router,
/// lan.
pub struct Lab {
    pub agent: Option<AgentProcess>,
    pub pins: PinDirGuard,
    pub pods: Vec<Pod>,
    /// A bare XDP_PASS program on the bridge port behind node-1's ext0 (see `wire`).
    peer_xdp: Option<nodeport_agent::datapath::Datapath>,
    pub node1: NetNs,
    pub node2: NetNs,
    pub client: NetNs,
    /// A router on the LAN and a client behind it (`add_router`).
    pub router: Option<Router>,
    pub lan: NetNs,
    pub manifests: PathBuf,
    /// The last manifests revision the agent applied.
    applied: u64,
    extra_agent_args: Vec<String>,
}

fn ethtool(ns: &NetNs, dev: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-K", dev];
    all.extend_from_slice(args);
    ns.exec("ethtool", &all).map(drop)
}

impl Lab {
    /// Builds the namespaces (no pods, no agent yet).
    pub fn new(tag: &str) -> Result<Self> {
        crate::netns::require_root();
        let lan = NetNs::new(&format!("{tag}l"))?;
        let client = NetNs::new(&format!("{tag}c"))?;
        let node1 = NetNs::new(&format!("{tag}a"))?;
        let node2 = NetNs::new(&format!("{tag}b"))?;
        let manifests = std::env::temp_dir().join(crate::netns::unique_name(&format!("{tag}m")));
        std::fs::create_dir_all(&manifests)?;
        let mut lab = Self {
            agent: None,
            pins: PinDirGuard::new(&format!("{tag}p")),
            pods: Vec::new(),
            peer_xdp: None,
            node1,
            node2,
            client,
            router: None,
            lan,
            manifests,
            applied: 0,
            extra_agent_args: Vec::new(),
        };
        lab.wire()?;
        Ok(lab)
    }

    fn wire(&mut self) -> Result<()> {
        let lan = &self.lan;
        // A plain switch: new namespaces get br_netfilter on, which would run the lab's
        // frames through netfilter and drop malformed ones before they reach the node.
        for table in ["iptables", "ip6tables", "arptables"] {
            lan.sysctl(&format!("net.bridge.bridge-nf-call-{table}=0"))?;
        }
        lan.ip("link add br0 type bridge")?;
        lan.ip("link set br0 up")?;
        for (ns, dev, port) in [
            (&self.client, "eth0", "lc"),
            (&self.node1, "ext0", "l1"),
            (&self.node2, "ext0", "l2"),
        ] {
            ns.ip(&format!(
                "link add {dev} type veth peer name {port} netns {}",
                lan.name
            ))?;
            lan.ip(&format!("link set {port} master br0 up"))?;
            ns.ip(&format!("link set {dev} up"))?;
        }
        self.client.ip("addr add 198.18.0.100/24 dev eth0")?;
        self.client.ip("addr add 198.18.0.101/24 dev eth0")?;
        self.node1.ip("addr add 198.18.0.1/24 dev ext0")?;
        self.node2.ip("addr add 198.18.0.2/24 dev ext0")?;
        for node in [&self.node1, &self.node2] {
            node.sysctl("net.ipv4.ip_forward=1")?;
            node.sysctl("net.ipv4.conf.all.rp_filter=0")?;
            node.sysctl("net.ipv4.conf.default.rp_filter=0")?;
        }
        self.node1
            .ip("route add 198.18.2.0/24 via 198.18.0.2 dev ext0")?;
        // Full checksums into node-1's XDP (see the module doc).
        ethtool(&self.client, "eth0", &["tx", "off"])?;
        ethtool(&self.node2, "ext0", &["tx", "off"])?;
        // XDP_TX out of a veth lands in its peer's XDP ring, and the veth driver schedules the
        // peer to read that ring only when the peer has an XDP program (veth_xdp_flush):
        // without one, frames wait for unrelated traffic. A bare XDP_PASS on the bridge port
        // stands in for a NIC's transmit queue. Real NICs need nothing of the kind.
        let mut dp = nodeport_agent::datapath::Datapath::load(&crate::fixture::sizing(), None)
            .context("loading the XDP_PASS program for the bridge port")?;
        let prog = dp.xdp_program(nodeport_common::programs::XDP_PASS)?;
        self.lan
            .run(|| prog.attach("l1", aya::programs::XdpMode::Driver).map(drop))??;
        self.peer_xdp = Some(dp);
        Ok(())
    }

    /// Turns transmit checksum offload, TSO, GSO and GRO on at the client, as on kind or
    /// containerlab nodes (the lab starts with checksum offload off: see the module doc).
    pub fn client_offloads_on(&self) -> Result<()> {
        ethtool(
            &self.client,
            "eth0",
            &["tx", "on", "tso", "on", "gso", "on", "gro", "on"],
        )
    }

    /// Adds a router on the LAN (ROUTER) with a link to node-2 and a client behind it
    /// (FAR_CLIENT), whose routes to the far client and to the pods named with
    /// `route_via_router` have MTU `mtu` (locked): a hop where path MTU discovery must work.
    pub fn add_router(&mut self, tag: &str, mtu: u32) -> Result<()> {
        let router = NetNs::new(&format!("{tag}r"))?;
        let far = NetNs::new(&format!("{tag}f"))?;
        router.ip(&format!(
            "link add eth0 type veth peer name lr netns {}",
            self.lan.name
        ))?;
        self.lan.ip("link set lr master br0 up")?;
        router.ip(&format!(
            "link add n2 type veth peer name rt0 netns {}",
            self.node2.name
        ))?;
        router.ip(&format!(
            "link add fc type veth peer name eth0 netns {}",
            far.name
        ))?;
        for dev in ["eth0", "n2", "fc"] {
            router.ip(&format!("link set {dev} up"))?;
        }
        router.ip(&format!("addr add {ROUTER}/24 dev eth0"))?;
        router.ip("addr add 198.18.3.1/30 dev n2")?;
        router.ip("addr add 198.18.4.1/24 dev fc")?;
        router.ip(&format!("route add {FAR_CLIENT}/32 dev fc mtu lock {mtu}"))?;
        router.ip("route add 198.18.2.0/24 via 198.18.3.2 dev n2")?;
        router.sysctl("net.ipv4.ip_forward=1")?;
        router.sysctl("net.ipv4.conf.all.rp_filter=0")?;
        router.sysctl("net.ipv4.conf.default.rp_filter=0")?;
        self.node2.ip("addr add 198.18.3.2/30 dev rt0")?;
        self.node2.ip("link set rt0 up")?;
        far.ip(&format!("addr add {FAR_CLIENT}/24 dev eth0"))?;
        far.ip("link set eth0 up")?;
        far.ip("route add default via 198.18.4.1")?;
        self.node1
            .ip(&format!("route add 198.18.4.0/24 via {ROUTER} dev ext0"))?;
        // Full checksums towards node-1's XDP (see the module doc).
        ethtool(&far, "eth0", &["tx", "off"])?;
        ethtool(&router, "eth0", &["tx", "off"])?;
        self.router = Some(Router {
            ns: router,
            far,
            mtu,
        });
        Ok(())
    }

    /// Routes node-1's traffic to the pod `name` on node-2, and the pod's traffic back, through
    /// the router (`add_router`), whose route to the pod has the router's MTU.
    pub fn route_via_router(&mut self, name: &str) -> Result<()> {
        let router = self.router.as_ref().context("add_router first")?;
        let addr = self.pod(name).addr;
        ensure!(self.pod(name).node == 2, "{name} is not on node-2");
        router.ns.ip(&format!(
            "route add {addr}/32 via 198.18.3.2 dev n2 mtu lock {}",
            router.mtu
        ))?;
        self.node1
            .ip(&format!("route add {addr}/32 via {ROUTER} dev ext0"))?;
        // The pod's packets leave node-2 through the router too (source routing).
        self.node2.ip(&format!("rule add from {addr} lookup 100"))?;
        self.node2
            .ip("route add default via 198.18.3.1 dev rt0 table 100")?;
        Ok(())
    }

    /// Adds a pod on node 1 or 2 with the last address byte `host`.
    pub fn add_pod(&mut self, name: &str, node: usize, host: u8) -> Result<&Pod> {
        let node_ns = if node == 1 { &self.node1 } else { &self.node2 };
        let ns = NetNs::new("pd")?;
        let addr = Ipv4Addr::new(198, 18, node as u8, host);
        let gw = Ipv4Addr::new(198, 18, node as u8, 1);
        let dev = format!("p-{name}");
        ensure!(
            dev.len() <= 15,
            "pod name {name} too long for an interface name"
        );
        node_ns.ip(&format!(
            "link add {dev} type veth peer name eth0 netns {}",
            ns.name
        ))?;
        node_ns.ip(&format!("addr add {gw}/32 dev {dev}"))?;
        node_ns.ip(&format!("link set {dev} up"))?;
        node_ns.ip(&format!("route add {addr}/32 dev {dev}"))?;
        ns.ip(&format!("addr add {addr}/32 dev eth0"))?;
        ns.ip("link set eth0 up")?;
        ns.ip(&format!("route add {gw} dev eth0"))?;
        ns.ip(&format!("route add default via {gw}"))?;
        let server = PodServer::start(&ns, name)?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            addr,
            server: Some(server),
            ns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Stops a pod's server (its namespace and address stay).
    pub fn stop_pod_server(&mut self, name: &str) {
        if let Some(p) = self.pods.iter_mut().find(|p| p.name == name) {
            p.server.take();
        }
    }

    /// Extra flags for the agent (before it starts).
    pub fn agent_args(&mut self, args: &[&str]) {
        self.extra_agent_args
            .extend(args.iter().map(|s| s.to_string()));
    }

    /// Forgets the flags of [`Lab::agent_args`]: the next agent starts with the lab's own.
    pub fn clear_agent_args(&mut self) {
        self.extra_agent_args.clear();
    }

    /// Writes the manifests (one file, replaced atomically).
    fn write_manifests(&self, yaml: &str) -> Result<()> {
        let tmp = self.manifests.join(".all.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join("all.yaml"))?;
        Ok(())
    }

    /// Starts the agent on the current manifests and waits until it has programmed them.
    pub fn start_agent(&mut self, yaml: &str) -> Result<()> {
        if self.agent.is_none() {
            self.write_manifests(yaml)?;
        }
        let args = self.run_args(&self.manifests, &[]);
        let mut agent = AgentProcess::spawn(&self.node1, &args)?;
        let loaded = agent.wait_log("the first manifests load", |e| {
            message_is(e, "manifests loaded")
        })?;
        let revision = field_u64(&loaded, "revision").context("revision in the log")?;
        agent.wait_log("the first reconcile", |e| {
            message_is(e, "reconciled") && field_u64(e, "revision").is_some_and(|r| r >= revision)
        })?;
        self.applied = revision;
        self.agent = Some(agent);
        Ok(())
    }

    /// Replaces the manifests and waits until the agent has applied them.
    pub fn apply(&mut self, yaml: &str) -> Result<()> {
        self.write_manifests(yaml)?;
        self.wait_applied()
    }

    /// The agent's arguments as `start_agent` passes them (for a second agent on the same
    /// pins, say).
    pub fn agent_command_line(&self) -> Vec<String> {
        self.run_args(&self.manifests, &[])
    }

    /// Starts the agent with `manifests` and `extra` flags on top of the lab's, without
    /// waiting for anything (a start expected to fail); the manifests are written first.
    pub fn spawn_agent(
        &self,
        yaml: &str,
        manifests: &std::path::Path,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        if manifests == self.manifests {
            self.write_manifests(yaml)?;
        }
        AgentProcess::spawn(&self.node1, &self.run_args(manifests, extra))
    }

    /// Starts the agent with the Kubernetes API of `kubeconfig` instead of manifests, and
    /// `extra` flags on top of the lab's, without waiting for anything.
    pub fn spawn_agent_with_kubeconfig(
        &self,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        let source = ["--kubeconfig".to_owned(), kubeconfig.display().to_string()];
        AgentProcess::spawn(&self.node1, &self.args_with_source(&source, extra))
    }

    /// The flags of `run` the lab starts the agent with.
    fn run_args(&self, manifests: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let source = ["--manifests".to_owned(), manifests.display().to_string()];
        self.args_with_source(&source, extra)
    }

    fn args_with_source(&self, source: &[String], extra: &[&str]) -> Vec<String> {
        let mut args = source.to_vec();
        args.extend([
            "--node-name".into(),
            "node-1".into(),
            "--external-interface".into(),
            "ext0".into(),
            "--pod-interfaces".into(),
            "p-*".into(),
            "--bpffs-dir".into(),
            self.pins.path().display().to_string(),
            "--healthz-bind-address".into(),
            format!("{NODE1}:10256"),
            "--metrics-bind-address".into(),
            format!("{NODE1}:{METRICS_PORT}"),
        ]);
        args.extend(self.extra_agent_args.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        // ext0 is a veth, where the agent would choose TC by itself: the lab runs XDP unless
        // a test chooses the hook.
        if !args.iter().any(|a| a.starts_with("--external-hook")) {
            args.extend(["--external-hook".into(), "xdp".into()]);
        }
        args
    }

    /// The status code of `path` on the agent's node health server (/healthz, /livez).
    pub fn node_health(&self, path: &str) -> Result<u16> {
        Ok(self.http_get(SocketAddrV4::new(NODE1, 10256), path)?.0)
    }

    /// Deletes node-1's ext0 and creates it again, wired as before (a NIC re-created: same
    /// name and MAC, a new ifindex).
    pub fn recreate_node1_ext0(&mut self) -> Result<()> {
        let mac = mac_of(&self.node1, "ext0")?;
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        self.node1.ip("link del ext0")?;
        self.node1.ip(&format!(
            "link add ext0 address {mac} type veth peer name l1 netns {}",
            self.lan.name
        ))?;
        self.lan.ip("link set l1 master br0 up")?;
        self.node1.ip("link set ext0 up")?;
        self.node1.ip("addr add 198.18.0.1/24 dev ext0")?;
        self.node1
            .ip("route add 198.18.2.0/24 via 198.18.0.2 dev ext0")?;
        // The bridge port's XDP_PASS went with the old l1 (see `wire`).
        let dp = self.peer_xdp.as_mut().context("no bridge port program")?;
        let prog = dp.xdp_program(nodeport_common::programs::XDP_PASS)?;
        self.lan
            .run(|| prog.attach("l1", aya::programs::XdpMode::Driver).map(drop))??;
        Ok(())
    }

    /// Waits until the agent has loaded and applied manifests newer than the last applied
    /// (after a change made to the directory by other means than `apply`).
    pub fn wait_applied(&mut self) -> Result<()> {
        let after = self.applied;
        let agent = self.agent.as_mut().context("no agent running")?;
        let loaded = agent.wait_log("the manifests reload", |e| {
            message_is(e, "manifests loaded") && field_u64(e, "revision").is_some_and(|r| r > after)
        })?;
        let revision = field_u64(&loaded, "revision").context("revision in the log")?;
        agent.wait_log("the reconcile of the new manifests", |e| {
            message_is(e, "reconciled") && field_u64(e, "revision").is_some_and(|r| r >= revision)
        })?;
        self.applied = revision;
        Ok(())
    }

    /// The running agent (to wait for its log).
    pub fn agent_mut(&mut self) -> Result<&mut AgentProcess> {
        self.agent.as_mut().context("no agent running")
    }

    /// The agent, taken out (to kill it).
    pub fn take_agent(&mut self) -> Result<AgentProcess> {
        self.agent.take().context("no agent running")
    }

    /// `nodeport-agent dump --stats --output json` of the lab's pins.
    pub fn dump(&self) -> Result<serde_json::Value> {
        self.agent_json(&["dump", "--stats", "--output", "json"])
    }

    /// The id of the XDP program on node-1's ext0, as the kernel reports it.
    pub fn node1_xdp_program(&self) -> Result<Option<u64>> {
        let out = self.node1.ip("-j -d link show dev ext0")?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let xdp = &links[0]["xdp"];
        // iproute2 reports one program as xdp.prog, several (multi-mode) as xdp.attached[].
        Ok(xdp["prog"]["id"]
            .as_u64()
            .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64()))
    }

    /// Every non-zero datapath counter and event from the dump, by name.
    pub fn counters(&self) -> Result<BTreeMap<String, u64>> {
        let dump = self.dump()?;
        // Packet fates under "counters", connection events under "events".
        Ok(["counters", "events"]
            .iter()
            .flat_map(|list| dump[list].as_array().cloned().unwrap_or_default())
            .filter_map(|c| Some((c[0].as_str()?.to_owned(), c[1].as_u64()?)))
            .collect())
    }

    /// A datapath counter's value from the dump (0 when absent).
    pub fn counter(&self, name: &str) -> Result<u64> {
        Ok(self.counters()?.get(name).copied().unwrap_or(0))
    }

    /// A new TCP connection from the client (from `from`, default the client's first address).
    pub fn connect(&self, to: SocketAddrV4, from: Option<Ipv4Addr>) -> Result<Conn> {
        self.client.run(|| -> Result<Conn> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            if let Some(from) = from {
                socket.bind(&SocketAddr::from((from, 0)).into())?;
            }
            socket.connect_timeout(&SocketAddr::V4(to).into(), Duration::from_secs(3))?;
            let stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let reader = BufReader::new(stream.try_clone()?);
            Ok(Conn { stream, reader })
        })?
    }

    /// One new TCP connection, one answer.
    pub fn ask_tcp(&self, to: SocketAddrV4) -> Result<Answer> {
        self.connect(to, None)?.ask()
    }

    /// One UDP datagram, one answer.
    pub fn ask_udp(&self, to: SocketAddrV4) -> Result<Answer> {
        self.client.run(|| -> Result<Answer> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send_to(b"hello\n", to)?;
            let mut buf = [0u8; 512];
            let (n, _) = socket.recv_from(&mut buf).context("no UDP answer")?;
            parse_answer(std::str::from_utf8(&buf[..n])?)
        })?
    }

    /// An HTTP GET from the client, over either family; (status, body).
    pub fn http_get(&self, to: impl Into<SocketAddr>, path: &str) -> Result<(u16, String)> {
        let (status, _, body) = self.http_get_with(to, path, &[])?;
        Ok((status, body))
    }

    /// An HTTP GET from the client with `headers`; (status, response headers, body).
    pub fn http_get_with(
        &self,
        to: impl Into<SocketAddr>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String, String)> {
        let to: SocketAddr = to.into();
        self.client.run(|| -> Result<(u16, String, String)> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .with_context(|| format!("connecting to {to}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let extra: String = headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {to}\r\n{extra}Connection: close\r\n\r\n"
            )?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("no status")?;
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            Ok((status, head.to_owned(), body.to_owned()))
        })?
    }

    /// `n` UDP datagrams from `from` to `to`, each from a new socket, not waiting for answers.
    pub fn send_udp(&self, from: Ipv4Addr, to: SocketAddrV4, n: usize) -> Result<()> {
        self.client.run(|| -> Result<()> {
            for _ in 0..n {
                let socket = UdpSocket::bind((from, 0))?;
                socket.send_to(b"hello\n", to)?;
            }
            Ok(())
        })?
    }

    /// The agent's metrics, scraped from the client through node-1's address (Prometheus
    /// text format: no Accept header).
    pub fn scrape(&self) -> Result<Scrape> {
        let (status, body) = self.http_get(SocketAddrV4::new(NODE1, METRICS_PORT), "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}: {body}");
        Ok(Scrape(body))
    }

    /// The agent's metrics with an `Accept` header: (Content-Type, body).
    pub fn scrape_as(&self, accept: &str) -> Result<(String, Scrape)> {
        let (status, head, body) = self.http_get_with(
            SocketAddrV4::new(NODE1, METRICS_PORT),
            "/metrics",
            &[("Accept", accept)],
        )?;
        ensure!(status == 200, "/metrics answered {status}: {body}");
        let content_type = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_owned())
            })
            .context("no Content-Type")?;
        Ok((content_type, Scrape(body)))
    }

    /// `nodeport-agent status --output json` of the lab's pins.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.agent_json(&["status", "--output", "json"])
    }

    /// `nodeport-agent dump --conntrack --output json` of the lab's pins.
    pub fn connections(&self) -> Result<Vec<serde_json::Value>> {
        let dump = self.agent_json(&["dump", "--conntrack", "--output", "json"])?;
        Ok(dump["connections"].as_array().cloned().unwrap_or_default())
    }

    fn agent_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.agent_output(args)?)?)
    }

    /// What `nodeport-agent ARGS --bpffs-dir PINS` prints (`status -o yaml`, say).
    pub fn agent_output(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(agent_binary()?)
            .args(args)
            .arg("--bpffs-dir")
            .arg(self.pins.path())
            .output()?;
        ensure!(
            out.status.success(),
            "nodeport-agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Answers of `n` new TCP connections, counted per pod.
    pub fn spread(&self, to: SocketAddrV4, n: usize) -> Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            *counts.entry(self.ask_tcp(to)?.pod).or_insert(0) += 1;
        }
        Ok(counts)
    }
}

/// One scrape of the agent's `/metrics` (Prometheus text or OpenMetrics: their samples are
/// written alike).
pub struct Scrape(pub String);

impl Scrape {
    /// The value of the sample `name` whose labels include every `labels` pair; None if there
    /// is none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let has = |(k, v): &(&str, &str)| label_text.contains(&format!("{k}=\"{v}\""));
            labels.iter().all(has).then(|| value.parse().ok())?
        })
    }

    /// The series of the scrape: each sample's name and labels as written (values left out).
    pub fn series(&self) -> std::collections::BTreeSet<String> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
            .collect()
    }

    /// The label names of the samples of `name`.
    pub fn labels_of(&self, name: &str) -> Option<std::collections::BTreeSet<String>> {
        let mut found = false;
        let mut labels = std::collections::BTreeSet::new();
        for series in self.series() {
            let (metric, rest) = series.split_once('{').unwrap_or((&series, ""));
            if metric != name {
                continue;
            }
            found = true;
            let mut rest = rest;
            while let Some((label, after)) = rest.split_once("=\"") {
                labels.insert(label.trim_start_matches(',').to_owned());
                // Label values here hold no quote.
                rest = after.split_once('"').map_or("", |(_, r)| r);
            }
        }
        found.then_some(labels)
    }

    /// Like `value`, 0 when absent (a counter not created yet).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// Manifests for the lab, as YAML.
pub mod manifests {
    use std::fmt::Write as _;

    /// An endpoint: pod address, node name, conditions (ready, serving, terminating).
    #[derive(Clone, Copy)]
    pub struct Ep<'a> {
        pub addr: &'a str,
        pub node: &'a str,
        pub ready: bool,
        pub serving: bool,
        pub terminating: bool,
    }

    pub fn ready<'a>(addr: &'a str, node: &'a str) -> Ep<'a> {
        Ep {
            addr,
            node,
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    pub fn terminating<'a>(addr: &'a str, node: &'a str) -> Ep<'a> {
        Ep {
            addr,
            node,
            ready: false,
            serving: true,
            terminating: true,
        }
    }

    /// A NodePort Service `name` on `node_port` (TCP and/or UDP) with `spec_extra` lines
    /// appended to its spec, and one EndpointSlice of `endpoints` on port 8080.
    pub fn service(
        name: &str,
        node_port: u16,
        protocols: &[&str],
        spec_extra: &str,
        endpoints: &[Ep],
    ) -> String {
        let mut y = String::new();
        let _ = writeln!(
            y,
            "kind: Service\napiVersion: v1\nmetadata: {{ name: {name}, namespace: default }}\nspec:"
        );
        let _ = writeln!(y, "  type: NodePort");
        for line in spec_extra.lines().filter(|l| !l.trim().is_empty()) {
            let _ = writeln!(y, "  {}", line.trim());
        }
        let _ = writeln!(y, "  ports:");
        for p in protocols {
            let pname = p.to_lowercase();
            let _ = writeln!(
                y,
                "  - {{ name: {pname}, port: 80, protocol: {p}, targetPort: 8080, nodePort: {node_port} }}"
            );
        }
        let _ = writeln!(
            y,
            "---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1"
        );
        let _ = writeln!(
            y,
            "metadata: {{ name: {name}-1, namespace: default, labels: {{ kubernetes.io/service-name: {name} }} }}"
        );
        let _ = writeln!(y, "addressType: IPv4\nports:");
        for p in protocols {
            let _ = writeln!(
                y,
                "- {{ name: {}, port: 8080, protocol: {p} }}",
                p.to_lowercase()
            );
        }
        let _ = writeln!(
            y,
            "endpoints:{}",
            if endpoints.is_empty() { " []" } else { "" }
        );
        for e in endpoints {
            let _ = writeln!(
                y,
                "- {{ addresses: [{}], nodeName: {}, conditions: {{ ready: {}, serving: {}, terminating: {} }} }}",
                e.addr, e.node, e.ready, e.serving, e.terminating
            );
        }
        y
    }

    /// Several documents in one file.
    pub fn join(parts: &[String]) -> String {
        parts.join("---\n")
    }
}

/// The MAC address of `dev` in `ns`.
pub fn mac_of(ns: &NetNs, dev: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&format!("-j link show dev {dev}"))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = json[0]["address"].as_str().context("no address")?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// Sends frames from the client's eth0 that are not ordinary node port traffic: an ARP
/// request, IPv6, ICMP, the first and a later fragment of a datagram to another port, a later
/// fragment to the node port whose first never came, and an IPv4 header with IHL 4.
pub fn send_odd_frames(lab: &Lab, node_port: u16) -> Result<()> {
    use etherparse::PacketBuilder;
    let node_mac = mac_of(&lab.node1, "ext0")?;
    let client_mac = mac_of(&lab.client, "eth0")?;
    let (client, node) = (CLIENT.octets(), NODE1.octets());
    let mut frames: Vec<Vec<u8>> = Vec::new();

    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&client_mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&client_mac);
    arp.extend_from_slice(&client);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&node);
    frames.push(arp);

    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(client_mac, node_mac)
        .ipv6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            64,
        )
        .udp(40000, node_port)
        .write(&mut v6, b"v6")?;
    frames.push(v6);

    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(client_mac, node_mac)
        .ipv4(client, node, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut icmp, b"ping")?;
    frames.push(icmp);

    // Sets a frame's IPv4 id and fragment word and fixes its header checksum.
    let fragment = |frame: &mut Vec<u8>, id: u16, frag_word: u16| {
        frame[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
        frame[14 + 6..14 + 8].copy_from_slice(&frag_word.to_be_bytes());
        frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = checksum_ipv4(&frame[14..34]);
        frame[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    };
    // The first fragment of a datagram to a port no Service uses (MF set, offset 0), then a
    // later fragment of it (offset 8 bytes): both passed to the kernel, the later one after
    // its first (later_fragment), which discards them once its reassembly times out.
    let other_port = node_port.wrapping_add(1000);
    let mut first = Vec::new();
    PacketBuilder::ethernet2(client_mac, node_mac)
        .ipv4(client, node, 64)
        .udp(45000, other_port)
        .write(&mut first, b"head")?;
    fragment(&mut first, 0x5151, 0x2000);
    frames.push(first);
    let mut later = Vec::new();
    PacketBuilder::ethernet2(client_mac, node_mac)
        .ipv4(client, node, 64)
        .udp(45000, other_port)
        .write(&mut later, b"tail")?;
    fragment(&mut later, 0x5151, 1);
    frames.push(later);

    // A later fragment (offset 800 bytes) of a datagram whose first fragment never came, to an
    // address the node does not hold (a LoadBalancer IP of another node's, say): the kernel
    // would forward it, so it is dropped (fragment_out_of_order). (One to the node's own
    // address would be passed, as later_fragment.)
    let mut stray = Vec::new();
    PacketBuilder::ethernet2(client_mac, node_mac)
        .ipv4(client, [198, 18, 0, 250], 64)
        .udp(45001, node_port)
        .write(&mut stray, b"tail")?;
    fragment(&mut stray, 0x5252, 100);
    frames.push(stray);

    // IHL 4: malformed, dropped.
    let mut bad = Vec::new();
    PacketBuilder::ethernet2(client_mac, node_mac)
        .ipv4(client, node, 64)
        .tcp(45002, node_port, 1, 1000)
        .syn()
        .write(&mut bad, b"")?;
    bad[14] = 0x44;
    frames.push(bad);
    send_frames(lab, frames)
}

/// Sends raw Ethernet frames from the client's eth0 (an AF_PACKET socket: the kernel adds
/// nothing, an 802.1Q tag written in the frame stays there).
pub fn send_frames(lab: &Lab, frames: Vec<Vec<u8>>) -> Result<()> {
    let ifindex = lab.client.ifindex("eth0")?;
    lab.client.run(move || -> Result<()> {
        // SAFETY: plain socket(2); closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            )
        };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        for frame in &frames {
            // SAFETY: sockaddr_ll is plain data.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: sending our buffer to a valid address.
            let n = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            ensure!(
                n == frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: closing our fd.
        unsafe { libc::close(fd) };
        Ok(())
    })??;
    Ok(())
}

/// The IPv4 header checksum of `header` (its checksum field counted as zero).
fn checksum_ipv4(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for (i, pair) in header.chunks(2).enumerate() {
        if i != 5 {
            sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
