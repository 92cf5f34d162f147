//! Purpose servers for the conntrack end-to-end tests, run in a pod's namespace in place of
//! the lab's pod server (stop that first: they bind the same port, `lab::POD_PORT`).
//!
//! - [`Server::lines`]: answers every line like the lab's server ("<name> <peer>"), records
//!   every byte it reads, and after the client's FIN waits `linger` before a last line
//!   ("<name> late") and its own FIN: a server that answers a half-closed connection late.
//! - [`Server::http`]: a minimal HTTP/1.0 server (one request per connection), for `ab`.
//! - [`Server::udp_sink`]: records every datagram with its source and never answers.
//!
//! Each is a thread that entered the pod's namespace; stopped and joined on drop.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{lab::POD_PORT, netns::NetNs};

/// What a server saw.
#[derive(Default)]
pub struct Seen {
    /// Every byte read from any TCP connection, in order per connection.
    pub bytes: Mutex<Vec<u8>>,
    /// Every datagram (UDP sink): its source and payload.
    pub datagrams: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
    /// Requests answered (HTTP) or connections accepted (lines).
    pub served: AtomicU64,
}

pub struct Server {
    pub seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

enum Kind {
    Lines { name: String, linger: Duration },
    Http { name: String },
    UdpSink,
}

impl Server {
    /// The line server (see the module doc).
    pub fn lines(ns: &NetNs, name: &str, linger: Duration) -> Result<Self> {
        Self::start(
            ns,
            Kind::Lines {
                name: name.to_owned(),
                linger,
            },
        )
    }

    /// A minimal HTTP server answering "<name>\n" to every request.
    pub fn http(ns: &NetNs, name: &str) -> Result<Self> {
        Self::start(
            ns,
            Kind::Http {
                name: name.to_owned(),
            },
        )
    }

    /// A UDP server that records and never answers.
    pub fn udp_sink(ns: &NetNs) -> Result<Self> {
        Self::start(ns, Kind::UdpSink)
    }

    fn start(ns: &NetNs, kind: Kind) -> Result<Self> {
        let path = format!("/var/run/netns/{}", ns.name);
        let netns = File::open(&path).with_context(|| format!("opening {path}"))?;
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // SAFETY: setns on a namespace fd for this thread (and the threads it spawns).
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
                return;
            }
            let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, POD_PORT));
            match kind {
                Kind::UdpSink => {
                    let socket = match UdpSocket::bind(bind) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind: {e}")));
                            return;
                        }
                    };
                    let _ = socket.set_read_timeout(Some(Duration::from_millis(50)));
                    let _ = ready_tx.send(Ok(()));
                    let mut buf = [0u8; 2048];
                    while !stop2.load(Ordering::Relaxed) {
                        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                            let mut d = seen2.datagrams.lock().expect("not poisoned");
                            d.push((peer, buf[..n].to_vec()));
                        }
                    }
                }
                kind => {
                    let listener = match TcpListener::bind(bind) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind: {e}")));
                            return;
                        }
                    };
                    let _ = listener.set_nonblocking(true);
                    let _ = ready_tx.send(Ok(()));
                    let kind = Arc::new(kind);
                    while !stop2.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((stream, peer)) => {
                                let _ = stream.set_nonblocking(false);
                                let (kind, seen) = (kind.clone(), seen2.clone());
                                std::thread::spawn(move || {
                                    let _ = serve(&kind, stream, peer, &seen);
                                });
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(2)),
                        }
                    }
                }
            }
        });
        match ready_rx.recv_timeout(crate::lab::PATIENCE) {
            Ok(Ok(())) => Ok(Self {
                seen,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => bail!("purpose server: {e}"),
            Err(_) => bail!("purpose server did not start"),
        }
    }

    /// Everything the TCP connections delivered to the application, as text.
    pub fn received_text(&self) -> String {
        String::from_utf8_lossy(&self.seen.bytes.lock().expect("not poisoned")).into_owned()
    }

    /// The datagrams received so far.
    pub fn datagrams(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.datagrams.lock().expect("not poisoned").clone()
    }
}

fn serve(kind: &Kind, stream: TcpStream, peer: SocketAddr, seen: &Seen) -> std::io::Result<()> {
    let mut write = stream.try_clone()?;
    match kind {
        Kind::Lines { name, linger } => {
            seen.served.fetch_add(1, Ordering::Relaxed);
            let mut reader = BufReader::new(stream);
            loop {
                let mut line = Vec::new();
                let n = reader.read_until(b'\n', &mut line)?;
                seen.bytes
                    .lock()
                    .expect("not poisoned")
                    .extend_from_slice(&line);
                if n == 0 {
                    // The client's FIN: answer once more, late, then close.
                    std::thread::sleep(*linger);
                    write.write_all(format!("{name} late\n").as_bytes())?;
                    return write.shutdown(std::net::Shutdown::Write);
                }
                write.write_all(format!("{name} {peer}\n").as_bytes())?;
            }
        }
        Kind::Http { name } => {
            let mut reader = BufReader::new(stream);
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    return Ok(());
                }
                request.extend_from_slice(&line);
            }
            // The same length from every pod: ab counts a body of another length as failed.
            let body = format!("{name}\n");
            write.write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )?;
            seen.served.fetch_add(1, Ordering::Relaxed);
            write.shutdown(std::net::Shutdown::Write)?;
            // Let the client close first (its FIN), as HTTP/1.0 clients do.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            Ok(())
        }
        Kind::UdpSink => Ok(()),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
