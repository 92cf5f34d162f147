//! The load generator: plain blocking sockets on threads inside the client's namespace, each
//! run bounded in time and in count, every answer checked.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nodeport_tests::netns::NetNs;

/// Longest wait for a connect or an answer before a connection counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// What the backend must answer: "<pod> <address it saw>\n".
#[derive(Clone, Debug)]
pub struct Expect {
    pub answer: Vec<u8>,
}

impl Expect {
    pub fn new(pod: &str, seen: std::net::Ipv4Addr) -> Self {
        Self {
            answer: format!("{pod} {seen}\n").into_bytes(),
        }
    }
}

/// Sends one request line and reads one answer line into `buf`; returns its length.
fn ask(stream: &mut TcpStream, buf: &mut [u8; 128]) -> std::io::Result<usize> {
    stream.write_all(b"x\n")?;
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        if buf[..len].ends_with(b"\n") || len == buf.len() {
            return Ok(len);
        }
    }
}

fn connect(to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(to), IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

pub struct ConnRun {
    pub completed: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Connect to answer, per completed connection.
    pub latencies: Vec<Duration>,
}

impl ConnRun {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

/// New connections as fast as `workers` sequential clients manage, for `duration` or `max`
/// connections, whichever comes first. Fails on a wrong answer (wrong backend or wrong path).
pub fn connection_rate(
    client: &NetNs,
    to: SocketAddrV4,
    expect: &Expect,
    workers: usize,
    duration: Duration,
    max: u64,
) -> Result<ConnRun> {
    let started = AtomicU64::new(0);
    let wrong: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let failed = AtomicU64::new(0);
    client.run(|| {
        let begin = Instant::now();
        let deadline = begin + duration;
        let latencies: Vec<Vec<Duration>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut lat = Vec::with_capacity(16_384);
                        let mut buf = [0u8; 128];
                        while Instant::now() < deadline
                            && started.fetch_add(1, Ordering::Relaxed) < max
                        {
                            let t0 = Instant::now();
                            let answer = connect(to).and_then(|mut st| ask(&mut st, &mut buf));
                            match answer {
                                Ok(n) if buf[..n] == expect.answer[..] => lat.push(t0.elapsed()),
                                Ok(n) => {
                                    *wrong.lock().expect("not poisoned") =
                                        Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                                    break;
                                }
                                Err(_) => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        lat
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a load worker"))
                .collect()
        });
        let elapsed = begin.elapsed();
        if let Some(answer) = wrong.lock().expect("not poisoned").take() {
            bail!(
                "{to} answered {answer:?}, expected {:?}",
                String::from_utf8_lossy(&expect.answer)
            );
        }
        let latencies: Vec<Duration> = latencies.into_iter().flatten().collect();
        Ok(ConnRun {
            completed: latencies.len() as u64,
            failed: failed.load(Ordering::Relaxed),
            elapsed,
            latencies,
        })
    })?
}

/// Round trips of one request on one established connection (`max` of them, at most for
/// `duration`); the first few warm the path up and are not counted.
pub fn request_latency(
    client: &NetNs,
    to: SocketAddrV4,
    expect: &Expect,
    duration: Duration,
    max: usize,
) -> Result<Vec<Duration>> {
    client.run(|| {
        let mut stream = connect(to).with_context(|| format!("connecting to {to}"))?;
        let mut buf = [0u8; 128];
        for _ in 0..10 {
            ask(&mut stream, &mut buf)?;
        }
        let deadline = Instant::now() + duration;
        let mut out = Vec::with_capacity(max);
        while out.len() < max && Instant::now() < deadline {
            let t0 = Instant::now();
            let n = ask(&mut stream, &mut buf).context("a request on the open connection")?;
            out.push(t0.elapsed());
            ensure!(
                buf[..n] == expect.answer[..],
                "{to} answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        Ok(out)
    })?
}

pub struct UdpRun {
    pub sent: u64,
    pub elapsed: Duration,
}

/// UDP datagrams of 64 bytes from `flows` sockets (one thread each), as fast as they go, for
/// `duration` or until about `max` are sent. The caller counts what the backend received.
pub fn udp_flood(
    client: &NetNs,
    to: SocketAddrV4,
    flows: usize,
    duration: Duration,
    max: u64,
) -> Result<UdpRun> {
    const BATCH: u64 = 64;
    let budget = AtomicU64::new(0);
    client.run(|| {
        let begin = Instant::now();
        let deadline = begin + duration;
        let sent: Result<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..flows)
                .map(|_| {
                    s.spawn(|| -> Result<u64> {
                        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
                        socket.connect(to)?;
                        let payload = [0x55u8; 64];
                        let mut mine = 0u64;
                        while Instant::now() < deadline
                            && budget.fetch_add(BATCH, Ordering::Relaxed) < max
                        {
                            for _ in 0..BATCH {
                                // A refused send (an ICMP error about an earlier datagram) is
                                // not counted as sent; the delivered count tells the story.
                                if socket.send(&payload).is_ok() {
                                    mine += 1;
                                }
                            }
                        }
                        Ok(mine)
                    })
                })
                .collect();
            let mut total = 0;
            for h in handles {
                total += h.join().expect("a UDP sender")?;
            }
            Ok(total)
        });
        Ok(UdpRun {
            sent: sent?,
            elapsed: begin.elapsed(),
        })
    })?
}

/// CPU time this process has used, all threads: the client's and the backends' threads, in
/// user space and in the kernel, including the softirq work done in their context, which on
/// veths is the whole path through the node (a veth delivers in the sender's context). Counted
/// by the scheduler in nanoseconds, not sampled; other processes on the machine are not in it.
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub struct PacedRun {
    pub completed: u64,
}

/// New connections (connect, one request, close) at a fixed `rate` per second from one
/// client, for `duration`. Fails if it cannot keep up or an answer is wrong.
pub fn paced_connections(
    client: &NetNs,
    to: SocketAddrV4,
    expect: &Expect,
    rate: u32,
    duration: Duration,
) -> Result<PacedRun> {
    client.run(|| {
        let begin = Instant::now();
        let total = (f64::from(rate) * duration.as_secs_f64()) as u64;
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        let mut buf = [0u8; 128];
        for i in 0..total {
            let due = begin + interval * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let mut stream = connect(to).with_context(|| format!("connecting to {to}"))?;
            let n = ask(&mut stream, &mut buf)?;
            ensure!(
                buf[..n] == expect.answer[..],
                "{to} answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        let elapsed = begin.elapsed();
        ensure!(
            elapsed < duration + duration / 5,
            "could not keep {rate} connections/s: {total} took {elapsed:?}"
        );
        Ok(PacedRun { completed: total })
    })?
}

/// New connections one after another (50 µs apart) until one is answered `want`; every
/// answer before must be `before`. Returns the moment `want` arrived.
pub fn probe_until(
    client: &NetNs,
    to: SocketAddrV4,
    before: &Expect,
    want: &Expect,
    patience: Duration,
) -> Result<Instant> {
    client.run(|| {
        let deadline = Instant::now() + patience;
        let mut buf = [0u8; 128];
        loop {
            // A connection refused or lost while the node reprograms is retried.
            if let Ok(n) = connect(to).and_then(|mut s| ask(&mut s, &mut buf)) {
                let answer = &buf[..n];
                if answer == &want.answer[..] {
                    return Ok(Instant::now());
                }
                ensure!(
                    answer == &before.answer[..],
                    "{to} answered {:?} while changing backends",
                    String::from_utf8_lossy(answer)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "no answer {:?} from {to} within {patience:?}",
                String::from_utf8_lossy(&want.answer)
            );
            std::thread::sleep(Duration::from_micros(50));
        }
    })?
}
