//! Hostile traffic for the conntrack end-to-end tests: an attacker namespace on the lab's
//! switch next to the client, spoofed TCP segments written as whole Ethernet frames through
//! an AF_PACKET socket (built with etherparse, so the attacker's own stack never sees them),
//! a SYN flood from random sources bounded in count and time, and a sniffer that tells
//! whether frames carrying a marker ever reached an interface.
//!
//! Everything stays inside namespaces the test created: the attacker's veth hangs off the
//! lab's bridge, spoofed sources are inside 198.18.0.0/15 (the flood's in 198.18.64.0/18).

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use etherparse::PacketBuilder;

use crate::{
    lab::{Lab, mac_of},
    netns::NetNs,
};

/// The attacker's own address on the lab's LAN.
pub const ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);

/// A raw sender of whole frames out of one interface of a namespace.
pub struct FrameSender {
    fd: OwnedFd,
    ifindex: u32,
    /// The sending interface's MAC (frames' source).
    pub src_mac: [u8; 6],
    /// Where frames go (the next hop's MAC).
    pub dst_mac: [u8; 6],
}

/// An AF_PACKET socket opened inside `ns` (it stays bound to that namespace wherever it is
/// used from).
fn packet_socket(ns: &NetNs) -> Result<OwnedFd> {
    ns.run(|| -> Result<OwnedFd> {
        // SAFETY: plain socket(2); owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })?
}

impl FrameSender {
    /// Sends out of `dev` in `ns` towards the interface `peer_dev` in `peer_ns` (its MAC).
    pub fn new(ns: &NetNs, dev: &str, peer_ns: &NetNs, peer_dev: &str) -> Result<Self> {
        Ok(Self {
            fd: packet_socket(ns)?,
            ifindex: ns.ifindex(dev)?,
            src_mac: mac_of(ns, dev)?,
            dst_mac: mac_of(peer_ns, peer_dev)?,
        })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        loop {
            // SAFETY: sending our buffer to a valid address.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n == frame.len() as isize {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            // A full transmit queue: wait for it rather than lose the frame.
            if err.raw_os_error() == Some(libc::ENOBUFS) || err.raw_os_error() == Some(libc::EAGAIN)
            {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            anyhow::bail!("sendto: {err}");
        }
    }

    /// A TCP segment from `src` to `dst` with `flags` (TCP_* of nodeport_common), full
    /// checksums.
    pub fn tcp(
        &self,
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<Vec<u8>> {
        let mut b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac)
            .ipv4(src.0.octets(), dst.0.octets(), 64)
            .tcp(src.1, dst.1, seq, 64_240);
        if flags & nodeport_common::TCP_SYN != 0 {
            b = b.syn();
        }
        if flags & nodeport_common::TCP_RST != 0 {
            b = b.rst();
        }
        if flags & nodeport_common::TCP_FIN != 0 {
            b = b.fin();
        }
        if flags & nodeport_common::TCP_ACK != 0 {
            b = b.ack(ack);
        }
        if !payload.is_empty() {
            b = b.psh();
        }
        let mut frame = Vec::new();
        b.write(&mut frame, payload)?;
        Ok(frame)
    }
}

/// A namespace on the lab's switch next to the client, with address [`ATTACKER`], and a
/// frame sender towards node-1's external interface. Declare it after the lab: it must be
/// dropped first (its veth's peer is in the lab's switch namespace).
pub struct Attacker {
    pub sender: FrameSender,
    pub ns: NetNs,
}

impl Attacker {
    pub fn new(lab: &Lab) -> Result<Self> {
        let ns = NetNs::new("x")?;
        let port = format!("lx{}", std::process::id() % 100_000);
        ns.ip(&format!(
            "link add eth0 type veth peer name {port} netns {}",
            lab.lan.name
        ))?;
        lab.lan.ip(&format!("link set {port} master br0 up"))?;
        ns.ip("link set eth0 up")?;
        ns.ip(&format!("addr add {ATTACKER}/24 dev eth0"))?;
        let sender = FrameSender::new(&ns, "eth0", &lab.node1, "ext0")?;
        Ok(Self { sender, ns })
    }
}

/// A small xorshift generator: the flood needs unpredictable-looking numbers, not good ones.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(t | 1)
    }

    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
}

/// Bounds of a SYN flood: it stops by itself at whichever comes first.
#[derive(Clone, Copy, Debug)]
pub struct FloodLimits {
    pub max_frames: u64,
    pub max_time: Duration,
    /// Frames per second aimed at (paced in 1 ms steps); 0: as fast as it goes.
    pub rate: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct FloodReport {
    pub sent: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Spoofed SYNs to `target` from random addresses in 198.18.64.0/18 and random ports, until
/// a limit is reached or `stop` is set.
pub fn syn_flood(
    sender: &FrameSender,
    target: (Ipv4Addr, u16),
    limits: FloodLimits,
    stop: &AtomicBool,
) -> Result<FloodReport> {
    let mut rng = Rng::seeded();
    let start = Instant::now();
    let mut sent = 0u64;
    let base = u32::from(Ipv4Addr::new(198, 18, 64, 0));
    while sent < limits.max_frames && start.elapsed() < limits.max_time {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if limits.rate > 0 {
            let due = (start.elapsed().as_secs_f64() * limits.rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        let src = Ipv4Addr::from(base | (rng.next_u32() & 0x3fff));
        let sport = 1024 + (rng.next_u32() % 64_000) as u16;
        let frame = sender.tcp(
            (src, sport),
            target,
            rng.next_u32(),
            0,
            nodeport_common::TCP_SYN,
            b"",
        )?;
        sender.send(&frame)?;
        sent += 1;
    }
    Ok(FloodReport {
        sent,
        elapsed: start.elapsed(),
    })
}

/// Captures every frame on an interface of a namespace and remembers those carrying a
/// marker.
pub struct Sniffer {
    hits: Arc<Mutex<Vec<Vec<u8>>>>,
    frames: Arc<Mutex<u64>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    pub fn start(ns: &NetNs, dev: &str, marker: &[u8]) -> Result<Self> {
        let fd = packet_socket(ns)?;
        let ifindex = ns.ifindex(dev)?;
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: binding our socket to a valid address.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: setting a receive timeout on our socket.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        let hits: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let frames: Arc<Mutex<u64>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, f, s) = (hits.clone(), frames.clone(), stop.clone());
        let marker = marker.to_vec();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: reading into our buffer.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue;
                }
                let frame = &buf[..n as usize];
                *f.lock().expect("not poisoned") += 1;
                if frame.windows(marker.len()).any(|w| w == marker) {
                    h.lock().expect("not poisoned").push(frame.to_vec());
                }
            }
        });
        Ok(Self {
            hits,
            frames,
            stop,
            thread: Some(thread),
        })
    }

    /// Frames seen carrying the marker.
    pub fn hits(&self) -> Vec<Vec<u8>> {
        self.hits.lock().expect("not poisoned").clone()
    }

    /// Frames seen at all.
    pub fn frames(&self) -> u64 {
        *self.frames.lock().expect("not poisoned")
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
