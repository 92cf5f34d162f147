//! One agent per pin directory. Two agents on the same pins would fight over every map entry
//! and link (each removing what the other programmed), so `run` takes an exclusive `flock` on
//! the pin directory itself and holds it for its life; a second agent refuses to start and
//! names the holder. bpffs cannot hold regular files, but a directory can be locked anywhere.
//! The kernel drops the lock when the holder exits, however it exits (SIGKILL included).

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error(
        "another nodeport-agent ({holder}) is running on the pins in {dir}: two agents on the \
         same pins would undo each other's work. Stop it first, or give this one another \
         --bpffs-dir"
    )]
    Held { dir: PathBuf, holder: String },
    #[error("locking the pin directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
}

impl PinLock {
    /// Creates `dir` if needed and locks it, without waiting.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = File::open(dir).map_err(io)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Self { _dir: file });
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(err));
        }
        let holder = file
            .metadata()
            .ok()
            .and_then(|m| {
                let locks = std::fs::read_to_string("/proc/locks").ok()?;
                flock_holder(&locks, m.dev(), m.ino())
            })
            .map_or_else(|| "pid unknown".to_owned(), |pid| format!("pid {pid}"));
        Err(LockError::Held {
            dir: dir.to_path_buf(),
            holder,
        })
    }
}

/// The pid holding a FLOCK on device `dev`, inode `ino`, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`; the device as `major:minor` in hex).
/// Pids of other pid namespaces are not visible (0 or missing): None.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let wanted = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A waiter's line starts with "1: ->"; only the holder's counts.
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        if fields.get(1) == Some(&"->") {
            return None;
        }
        let pid: u32 = fields.get(at + 3)?.parse().ok()?;
        (fields.get(at + 4) == Some(&wanted.as_str()) && pid != 0).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_pins_is_refused_naming_the_holder() {
        let dir = crate::test_support::ScratchDir::new("pin-lock");
        let pins = dir.path().join("nodeport");
        let first = PinLock::acquire(&pins).expect("the first agent locks");
        // flock belongs to the open file description: a second open conflicts even in this
        // process, as a second agent would.
        let err = PinLock::acquire(&pins).expect_err("the second agent is refused");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "names the holder: {text}"
        );
        assert!(text.contains(&pins.display().to_string()), "{text}");
        drop(first);
        PinLock::acquire(&pins).expect("free again once the holder is gone");
    }

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:2a:77 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 4343 00:2a:77 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 99 00:2a:78 0 EOF\n";
        let dev = libc::makedev(0, 0x2a);
        assert_eq!(flock_holder(locks, dev, 77), Some(4242));
        assert_eq!(
            flock_holder(locks, dev, 78),
            None,
            "POSIX locks are not ours"
        );
        assert_eq!(flock_holder(locks, dev, 79), None);
    }
}
