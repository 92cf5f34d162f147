//! Network namespaces for tests: uniquely named, removed on drop (also when a test panics).
//! Everything a test builds lives inside namespaces it created; the root namespace's routes,
//! addresses and firewall are never touched.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name unique on this machine for this process: `np<tag><pid>x<n>`.
pub fn unique_name(tag: &str) -> String {
    format!(
        "np{tag}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip` with arguments split on whitespace.
pub fn ip(args: &str) -> Result<Output> {
    run(Command::new("ip").args(args.split_whitespace()))
}

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique_name(tag);
        ip(&format!("netns add {name}"))?;
        let ns = Self { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) -> Result<Output> {
        ip(&format!("-n {} {args}", self.name))
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// A `Command` that runs inside the namespace, for callers that manage the child.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    pub fn sysctl(&self, setting: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", setting]).map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace (network namespaces are per
    /// thread, so the caller's thread is untouched).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd, for this thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// The index of an interface inside the namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: a valid NUL-terminated name.
        let index = self.run(|| unsafe { libc::if_nametoindex(name.as_ptr()) })?;
        if index == 0 {
            bail!("no interface {ifname} in {}", self.name);
        }
        Ok(index)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace removes the interfaces inside it (and veth peers elsewhere).
        if let Err(e) = ip(&format!("netns del {}", self.name)) {
            eprintln!("warning: could not remove namespace {}: {e:#}", self.name);
        }
    }
}

/// Fails loudly unless running as root: tests that need root never skip silently.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (BPF programs, network namespaces); run `cargo xtask test` as root"
    );
}
