//! The BPF filesystem the pins live on. Many nodes do not mount it at /sys/fs/bpf; the agent
//! mounts it there when needed, as Cilium and Calico do.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::{DatapathError, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the agent mounts bpffs when the pins' directory needs one.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

fn fs_type(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills the struct; we read it only on success.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// The closest existing ancestor of `path` (itself included).
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

/// Whether `ensure_mounted(pin_root)` will mount bpffs at /sys/fs/bpf: the pins' directory is
/// not on a bpffs, lies under /sys/fs/bpf, and nothing is mounted there yet.
pub fn will_mount(pin_root: &Path) -> bool {
    !on_bpffs(pin_root)
        && pin_root.starts_with(DEFAULT_MOUNT)
        && fs_type(Path::new(DEFAULT_MOUNT)) != Some(BPF_FS_MAGIC)
}

fn on_bpffs(path: &Path) -> bool {
    fs_type(&existing_ancestor(path)) == Some(BPF_FS_MAGIC)
}

/// Makes sure `pin_root` lies on a bpffs, mounting one at /sys/fs/bpf if that is where it
/// should be and nothing is mounted there yet.
pub fn ensure_mounted(pin_root: &Path) -> Result<()> {
    if on_bpffs(pin_root) {
        return Ok(());
    }
    let default = Path::new(DEFAULT_MOUNT);
    if !pin_root.starts_with(default) {
        return Err(DatapathError::Bpffs(format!(
            "{} is not on a BPF filesystem; choose a --bpffs-dir under a bpffs mount \
             (mount one with `mount -t bpf bpf <dir>`)",
            pin_root.display()
        )));
    }
    if fs_type(default) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    tracing::info!("mounting bpffs at {DEFAULT_MOUNT}");
    std::fs::create_dir_all(default)
        .map_err(|e| DatapathError::Bpffs(format!("creating {DEFAULT_MOUNT}: {e}")))?;
    let target = CString::new(DEFAULT_MOUNT).expect("no NUL");
    let fstype = CString::new("bpf").expect("no NUL");
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::Bpffs(format!(
            "mounting bpffs at {DEFAULT_MOUNT}: {} (the agent needs CAP_SYS_ADMIN, or mount it on \
             the host: `mount -t bpf bpf {DEFAULT_MOUNT}`)",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
