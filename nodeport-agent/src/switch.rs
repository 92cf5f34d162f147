//! The datapath's off-switch (`--datapath-switch FILE`): `on`, or `off` to hand the node ports
//! back to kube-proxy without cutting what nodeport carries.
//!
//! `off` drains first: new connections go to the kernel (kube-proxy's rules) while established
//! ones keep their conntrack entries and their translation; once none is left, or after
//! `--drain-timeout`, the datapath is detached (links and pins, as `nodeport-agent detach`)
//! and the agent idles, ready. `on` attaches and programs it again as at start. The state is
//! recorded under the pin directory (`<pins>/switch/<state>`, an empty directory: bpffs holds
//! nothing else) for `nodeport-agent status`, which works while no pin is left.

use std::{
    io,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// What the switch file asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    On,
    Off,
}

/// Where the datapath is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DatapathState {
    /// Attached, taking new connections.
    On,
    /// Attached, serving established connections only; new ones go to the kernel.
    Draining,
    /// Detached: kube-proxy carries everything.
    Off,
}

impl DatapathState {
    pub const ALL: [Self; 3] = [Self::On, Self::Draining, Self::Off];

    pub fn label(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Draining => "draining",
            Self::Off => "off",
        }
    }

    fn from_label(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.label() == s)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SwitchError {
    #[error(
        "--datapath-switch {path}: {found:?} is neither \"on\" nor \"off\"; keeping the \
         datapath as it is"
    )]
    Invalid { path: PathBuf, found: String },
    #[error("--datapath-switch {path}: {message}; keeping the datapath as it is")]
    Unreadable { path: PathBuf, message: String },
}

/// Parses the file's content: `on` or `off`, whitespace around it ignored.
pub fn parse(path: &Path, text: &str) -> Result<Wanted, SwitchError> {
    match text.trim() {
        "on" => Ok(Wanted::On),
        "off" => Ok(Wanted::Off),
        other => Err(SwitchError::Invalid {
            path: path.to_owned(),
            found: other.chars().take(64).collect(),
        }),
    }
}

/// Reads the switch: no flag, or no file (a ConfigMap without the key), means `on`.
pub fn read(path: Option<&Path>) -> Result<Wanted, SwitchError> {
    let Some(path) = path else {
        return Ok(Wanted::On);
    };
    // Through the kubelet's `..data` symlink: a read follows whatever it points at now.
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Wanted::On),
        Err(e) => Err(SwitchError::Unreadable {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// What the agent does next, given where the datapath is and what the switch asks for, and,
/// while draining, whether the drain is over (no live connection left, or its timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Stay,
    /// Stop taking new connections.
    StartDrain,
    /// Take new connections again (the switch went back on before the drain finished).
    Resume,
    /// Remove the datapath.
    Detach,
    /// Attach and program the datapath again.
    Attach,
}

pub fn step(state: DatapathState, wanted: Wanted, drained: bool) -> Step {
    match (state, wanted) {
        (DatapathState::On, Wanted::Off) => Step::StartDrain,
        (DatapathState::Draining, Wanted::On) => Step::Resume,
        (DatapathState::Draining, Wanted::Off) if drained => Step::Detach,
        (DatapathState::Off, Wanted::On) => Step::Attach,
        _ => Step::Stay,
    }
}

/// Wakes the agent when the switch file may have changed. inotify (the `notify` crate, already
/// used for the manifests directory) on the file's directory, not the file: the kubelet
/// updates a ConfigMap volume by renaming a new `..data` symlink into place, which the
/// directory sees and a watch on the old file would not. The agent also re-reads the file
/// every 2 s (its drain check runs then anyway), so a directory created later, or a missed
/// event, costs at most that.
pub struct Watch {
    _watcher: Option<notify::RecommendedWatcher>,
    pub changed: std::sync::Arc<tokio::sync::Notify>,
}

impl Watch {
    pub fn new(path: Option<&Path>) -> Self {
        use notify::Watcher as _;
        let changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let watcher = path.and_then(|path| {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
            let wake = changed.clone();
            let mut w = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
                wake.notify_one();
            })
            .ok()?;
            match w.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "not watching the switch's directory; reading it every 2 s");
                    None
                }
            }
        });
        Self {
            _watcher: watcher,
            changed,
        }
    }
}

const MARKER_DIR: &str = "switch";

/// Records `state` under the pin directory `root` for `status`.
pub fn record(root: &Path, state: DatapathState) -> io::Result<()> {
    let dir = root.join(MARKER_DIR);
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if entry.file_name() != state.label() {
            std::fs::remove_dir(entry.path())?;
        }
    }
    match std::fs::create_dir(dir.join(state.label())) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// The state recorded under `root`, if any.
pub fn recorded(root: &Path) -> Option<DatapathState> {
    std::fs::read_dir(root.join(MARKER_DIR))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| DatapathState::from_label(&e.file_name().to_string_lossy()))
}

/// Removes the record (`detach`).
pub fn remove(root: &Path) {
    let dir = root.join(MARKER_DIR);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_says_on_or_off_and_nothing_else() {
        let p = Path::new("/etc/nodeport/datapath");
        assert_eq!(parse(p, "on"), Ok(Wanted::On));
        assert_eq!(parse(p, " off\n"), Ok(Wanted::Off));
        assert_eq!(parse(p, "\toff \r\n"), Ok(Wanted::Off));
        for bad in ["", "Off", "false", "0", "on off", "disabled"] {
            let err = parse(p, bad).unwrap_err();
            assert!(
                err.to_string().contains("neither \"on\" nor \"off\""),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn no_flag_or_no_file_means_on() {
        assert_eq!(read(None), Ok(Wanted::On));
        let dir = crate::test_support::ScratchDir::new("switch-read");
        let file = dir.path().join("datapath");
        assert_eq!(read(Some(&file)), Ok(Wanted::On));
        std::fs::write(&file, "off\n").unwrap();
        assert_eq!(read(Some(&file)), Ok(Wanted::Off));
        std::fs::write(&file, "maybe").unwrap();
        assert!(matches!(
            read(Some(&file)),
            Err(SwitchError::Invalid { .. })
        ));
    }

    /// A ConfigMap volume: the key is a symlink through `..data`, which the kubelet swaps.
    #[test]
    fn follows_the_kubelets_symlink_swap() {
        let dir = crate::test_support::ScratchDir::new("switch-symlink");
        let root = dir.path();
        let v1 = root.join("..2026_01_01_v1");
        let v2 = root.join("..2026_01_01_v2");
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v1.join("datapath"), "on").unwrap();
        std::fs::write(v2.join("datapath"), "off").unwrap();
        std::os::unix::fs::symlink(&v1, root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/datapath", root.join("datapath")).unwrap();
        let file = root.join("datapath");
        assert_eq!(read(Some(&file)), Ok(Wanted::On));
        // The kubelet's atomic swap: a new symlink renamed over `..data`.
        std::os::unix::fs::symlink(&v2, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert_eq!(read(Some(&file)), Ok(Wanted::Off));
    }

    #[test]
    fn steps() {
        use DatapathState as S;
        assert_eq!(step(S::On, Wanted::On, false), Step::Stay);
        assert_eq!(step(S::On, Wanted::Off, false), Step::StartDrain);
        assert_eq!(step(S::On, Wanted::Off, true), Step::StartDrain);
        assert_eq!(step(S::Draining, Wanted::Off, false), Step::Stay);
        assert_eq!(step(S::Draining, Wanted::Off, true), Step::Detach);
        assert_eq!(step(S::Draining, Wanted::On, true), Step::Resume);
        assert_eq!(step(S::Off, Wanted::Off, true), Step::Stay);
        assert_eq!(step(S::Off, Wanted::On, false), Step::Attach);
    }

    #[test]
    fn the_record_holds_one_state() {
        let dir = crate::test_support::ScratchDir::new("switch-record");
        assert_eq!(recorded(dir.path()), None);
        for s in [
            DatapathState::On,
            DatapathState::Draining,
            DatapathState::Off,
        ] {
            record(dir.path(), s).unwrap();
            record(dir.path(), s).unwrap();
            assert_eq!(recorded(dir.path()), Some(s));
            assert_eq!(
                std::fs::read_dir(dir.path().join("switch"))
                    .unwrap()
                    .count(),
                1
            );
        }
        remove(dir.path());
        assert_eq!(recorded(dir.path()), None);
        assert!(!dir.path().join("switch").exists());
    }
}
