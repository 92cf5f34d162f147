//! One topology for every arm: a client, a node and two backend pods, routed veths.
//!
//! ```text
//!   client eth0 198.18.0.100 ── ext0 198.18.0.1  node  p-a 198.18.1.1 ── eth0 198.18.1.10  pod a
//!                                                      p-b 198.18.1.1 ── eth0 198.18.1.11  pod b
//! ```
//! The node forwards (kube-proxy's arm) or runs the agent's XDP on ext0 (nodeport's arms). The
//! client's eth0 has transmit checksum offload off (frames into XDP carry full checksums, as
//! from a wire) and a bare XDP_PASS program, without which the veth driver does not deliver
//! frames XDP sends back out of ext0 promptly (docs/datapath.md, "Veth notes").
//!
//! Each pod runs a server that answers every line on a TCP connection with
//! "<pod name> <client address as the pod sees it>" and counts UDP datagrams; the address tells
//! which path carried the connection: kube-proxy masquerades (the pod sees the node's
//! 198.18.1.1), nodeport hands a local pod the client's own address.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nodeport_agent::datapath::Datapath;
use nodeport_tests::netns::NetNs;

use super::services::{BACKEND_A, BACKEND_B, BACKEND_PORT};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's address on the pod veths: what a masqueraded connection looks like to a pod.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

/// A pod: its namespace and its server.
pub struct Backend {
    pub addr: Ipv4Addr,
    server: Option<Server>,
    /// Held for its lifetime: dropping it removes the pod (after the server stopped).
    _ns: NetNs,
}

impl Backend {
    /// UDP datagrams received so far.
    pub fn udp_received(&self) -> u64 {
        self.server
            .as_ref()
            .map_or(0, |s| s.udp_count.load(Ordering::Relaxed))
    }
}

struct Server {
    stop: Arc<AtomicBool>,
    tcp_stop: Option<tokio::sync::oneshot::Sender<()>>,
    udp_count: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn enter(ns: &NetNs) -> Result<File> {
    let path = format!("/var/run/netns/{}", ns.name);
    File::open(&path).with_context(|| format!("opening {path}"))
}

fn setns(file: &File) -> std::io::Result<()> {
    // SAFETY: setns on a namespace fd, for the calling thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Server {
    fn start(ns: &NetNs, name: &'static str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_count = Arc::new(AtomicU64::new(0));
        let (tcp_stop, tcp_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();

        let netns = enter(ns)?;
        let ready = ready_tx.clone();
        let tcp = std::thread::spawn(move || {
            if let Err(e) = setns(&netns) {
                let _ = ready.send(Err(format!("setns: {e}")));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(serve_tcp(name, ready, tcp_stop_rx));
        });

        let netns = enter(ns)?;
        let (count, stopping) = (udp_count.clone(), stop.clone());
        let udp = std::thread::spawn(move || {
            let socket = setns(&netns)
                .and_then(|()| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)))
                .and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok(s)
                });
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("UDP: {e}")));
                    return;
                }
            };
            set_receive_buffer(&socket, 8 << 20);
            let _ = ready_tx.send(Ok(()));
            let mut buf = [0u8; 2048];
            while !stopping.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for _ in 0..2 {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("{name}'s server: {e}"),
                Err(_) => bail!("{name}'s server did not start"),
            }
        }
        Ok(Self {
            stop,
            tcp_stop: Some(tcp_stop),
            udp_count,
            threads: vec![tcp, udp],
        })
    }
}

fn set_receive_buffer(socket: &UdpSocket, bytes: i32) {
    // SAFETY: setsockopt with a valid int option on our socket. Failing only means a smaller
    // buffer (more drops under a flood), which the delivered count shows anyway.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&bytes).cast(),
            size_of::<i32>() as u32,
        );
    }
}

async fn serve_tcp(
    name: &'static str,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = (|| -> std::io::Result<tokio::net::TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).into())?;
        // A deep backlog: bursts of new connections must not overflow it.
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(socket.into())
    })();
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("TCP: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let accept = async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let answer = format!("{name} {}\n", peer.ip());
                let mut buf = [0u8; 512];
                // One answer per newline received (requests are small, one segment each).
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let lines = buf[..n].iter().filter(|b| **b == b'\n').count();
                    for _ in 0..lines {
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        _ = stop => {}
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(stop) = self.tcp_stop.take() {
            let _ = stop.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The topology. Fields drop in order: pods, the client's XDP program, node, client.
pub struct Topology {
    pub backends: Vec<Backend>,
    peer_xdp: Option<Datapath>,
    pub node: NetNs,
    pub client: NetNs,
}

fn ethtool_tx_off(ns: &NetNs, dev: &str) -> Result<()> {
    ns.exec("ethtool", &["-K", dev, "tx", "off"]).map(drop)
}

impl Topology {
    pub fn new() -> Result<Self> {
        let client = NetNs::new("kc")?;
        let node = NetNs::new("kn")?;
        node.ip(&format!(
            "link add ext0 type veth peer name eth0 netns {}",
            client.name
        ))?;
        client.ip(&format!("addr add {CLIENT}/24 dev eth0"))?;
        node.ip(&format!("addr add {NODE}/24 dev ext0"))?;
        client.ip("link set eth0 up")?;
        node.ip("link set ext0 up")?;
        node.sysctl("net.ipv4.ip_forward=1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter=0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter=0")?;
        // Many short connections: ports come back quickly and there are enough of them.
        client.sysctl("net.ipv4.ip_local_port_range=10000 65000")?;
        client.sysctl("net.ipv4.tcp_tw_reuse=1")?;
        ethtool_tx_off(&client, "eth0")?;

        let mut topo = Self {
            backends: Vec::new(),
            peer_xdp: None,
            node,
            client,
        };
        for (name, addr) in [("a", BACKEND_A), ("b", BACKEND_B)] {
            topo.add_backend(name, addr)?;
        }
        let mut dp = Datapath::load(&nodeport_tests::fixture::sizing(), None)
            .context("loading the XDP_PASS program for the client's eth0")?;
        let prog = dp.xdp_program(nodeport_common::programs::XDP_PASS)?;
        topo.client.run(|| {
            prog.attach("eth0", aya::programs::XdpMode::Driver)
                .map(drop)
        })??;
        topo.peer_xdp = Some(dp);
        Ok(topo)
    }

    fn add_backend(&mut self, name: &'static str, addr: Ipv4Addr) -> Result<()> {
        let ns = NetNs::new("kp")?;
        let dev = format!("p-{name}");
        self.node.ip(&format!(
            "link add {dev} type veth peer name eth0 netns {}",
            ns.name
        ))?;
        self.node.ip(&format!("addr add {GATEWAY}/32 dev {dev}"))?;
        self.node.ip(&format!("link set {dev} up"))?;
        self.node.ip(&format!("route add {addr}/32 dev {dev}"))?;
        ns.ip(&format!("addr add {addr}/32 dev eth0"))?;
        ns.ip("link set eth0 up")?;
        ns.ip(&format!("route add {GATEWAY} dev eth0"))?;
        ns.ip(&format!("route add default via {GATEWAY}"))?;
        ns.sysctl("net.core.somaxconn=4096")?;
        let server = Server::start(&ns, name)?;
        self.backends.push(Backend {
            addr,
            server: Some(server),
            _ns: ns,
        });
        Ok(())
    }

    pub fn backend(&self, addr: Ipv4Addr) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.addr == addr)
            .expect("a backend of the topology")
    }

    /// The measured Service's node port as the client reaches it.
    pub fn target(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(NODE, port)
    }

    /// Whether an XDP program is attached to the node's ext0 (the agent's, when it runs).
    pub fn node_has_xdp(&self) -> Result<bool> {
        let out = self.node.ip("-j -d link show dev ext0")?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(!links[0]["xdp"].is_null())
    }
}
