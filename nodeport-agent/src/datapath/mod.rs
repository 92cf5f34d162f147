//! The datapath as the agent sees it: the embedded eBPF object loaded with its maps sized and
//! pinned, the programs attached through pinned links, and typed handles on every map.
//!
//! Lifetime (docs/operations.md): maps and links are pinned under one bpffs directory. A new
//! agent adopts the pinned maps (after checking their layout) and atomically swaps its programs
//! into the pinned links, so established connections and node ports keep working across
//! restarts and while no agent runs. `detach` removes links and pins.

mod attach;
pub mod bpffs;
pub mod census;
mod clock;
pub mod conntrack;
pub mod ethtool;
pub mod layout;
mod lock;
mod maps;
mod mmap;
pub mod notices;
mod object;
mod start;
pub mod vlan_offload;

use std::path::{Path, PathBuf};

use aya::{Ebpf, EbpfLoader, VerifierLogLevel};
use nodeport_common::{capacity, names};
use thiserror::Error;

pub use attach::{
    AttachedInterface, ExternalHook, InterfaceRole, LinkDetail, XdpAttachMode, link_details,
};
pub use census::{ConntrackCensus, Fill, MapFill, SnatCensus, TableCensus};
pub use clock::{jiffies_now, kernel_hz};
pub use conntrack::{CtRecord, CtTable};
pub use lock::{LockError, PinLock};
pub use maps::{MapSpec, Maps, PinComparison, compare_pins, map_specs};
pub use mmap::MmapArray;
pub use start::StartGuard;

/// Map sizes, from the agent's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub maglev_size: u32,
    pub source_ranges: u32,
    /// Entries of the established-connection table `NP_CT` (two per connection).
    pub conntrack: u32,
    /// Entries of the handshake table `NP_CT_NEW` (two per connection being set up).
    pub conntrack_new: u32,
    pub affinity: u32,
}

impl Default for Sizing {
    fn default() -> Self {
        Self {
            frontends: capacity::FRONTENDS,
            services: capacity::SERVICES,
            backends: capacity::BACKENDS,
            maglev_size: capacity::MAGLEV_SIZE,
            source_ranges: capacity::SRC_RANGES,
            conntrack: capacity::CONNTRACK,
            conntrack_new: capacity::CONNTRACK_NEW,
            affinity: capacity::AFFINITY,
        }
    }
}

impl Sizing {
    pub fn maglev_blocks(&self) -> u32 {
        capacity::maglev_blocks(self.services)
    }
}

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "this nodeport-agent binary was built without the eBPF datapath; build it with \
         `cargo xtask build` (plain `cargo build` cannot compile the BPF programs)"
    )]
    NoEmbeddedObject,
    #[error(
        "Maglev table size {0} is not a prime number (Maglev needs a prime, e.g. 1021, 4093, 16381)"
    )]
    MaglevSizeNotPrime(u32),
    #[error("Maglev table of {size} slots x {blocks} blocks does not fit in a BPF array")]
    MaglevTooLarge { size: u32, blocks: u32 },
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error(
        "the datapath pinned at {root} has other map sizes than this agent's flags ({difference}). \
         It was created with other sizing flags (--max-services, --max-backends, --max-frontends, \
         --max-source-ranges, --conntrack-size, --conntrack-handshake-size, --affinity-size, \
         --maglev-table-size) or another version's defaults. Nothing was changed: the old \
         datapath keeps forwarding. To apply the new sizing, run `nodeport-agent detach \
         --bpffs-dir {root}` on the node, then restart the agent (connections through the old \
         datapath are cut; new ones go to kube-proxy until the agent has programmed the node); \
         or start the agent with the sizing the datapath was created with"
    )]
    IncompatiblePin { root: PathBuf, difference: String },
    #[error(
        "the datapath pinned at {root} has map layout version {found}; this agent writes \
         version {expected} and migrates none. Nothing was changed: the old datapath keeps \
         forwarding. To switch, run `nodeport-agent detach --bpffs-dir {root}` on the node, then \
         restart the agent (connections through the old datapath are cut; new ones go to \
         kube-proxy until the agent has programmed the node)"
    )]
    LayoutVersion {
        root: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "the datapath pinned at {root} was created by an older nodeport version with another \
         map layout ({differences}); this agent cannot adopt it. Nothing was changed: the old \
         datapath keeps forwarding. To upgrade, run `nodeport-agent detach --bpffs-dir {root}`, \
         then start the agent again. Connections through the old datapath are cut (new ones go \
         to kube-proxy until the agent has programmed the node)"
    )]
    OldLayout { root: PathBuf, differences: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("loading program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching to {interface}: {message}")]
    Attach { interface: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DatapathError {
    /// A pinned datapath this agent will not adopt (other sizing, layout or layout version):
    /// it is left forwarding, and the agent keeps running, not ready, saying what to do.
    pub fn is_incompatible_pins(&self) -> bool {
        matches!(
            self,
            Self::IncompatiblePin { .. } | Self::OldLayout { .. } | Self::LayoutVersion { .. }
        )
    }
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Where the pins live: `<dir>/maps/<MAP>` and `<dir>/links/<role>.<interface>`.
#[derive(Clone, Debug)]
pub struct PinDir {
    pub root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    pub sizing: Sizing,
    pins: Option<PinDir>,
}

impl Datapath {
    /// Loads the embedded object. With `pins`, maps are pinned there (adopting compatible
    /// existing pins); without, everything lives as long as this value (tests, benchmarks).
    pub fn load(sizing: &Sizing, pins: Option<&Path>) -> Result<Self> {
        Self::load_object(object::embedded()?, sizing, pins)
    }

    /// Loads a given object (tests that build their own).
    pub fn load_object(bytes: &[u8], sizing: &Sizing, pins: Option<&Path>) -> Result<Self> {
        raise_memlock_limit();
        if !is_prime(sizing.maglev_size) {
            return Err(DatapathError::MaglevSizeNotPrime(sizing.maglev_size));
        }
        if sizing
            .maglev_size
            .checked_mul(sizing.maglev_blocks())
            .is_none()
        {
            return Err(DatapathError::MaglevTooLarge {
                size: sizing.maglev_size,
                blocks: sizing.maglev_blocks(),
            });
        }
        let specs = map_specs(sizing);
        let pins = pins.map(PinDir::new);
        if let Some(pins) = &pins {
            bpffs::ensure_mounted(&pins.root)?;
            create_dir(&pins.maps())?;
            create_dir(&pins.links())?;
            let found = compare_pins(&specs, pins)?;
            if let layout::Adoption::Refuse(refusal) =
                layout::decide(layout::recorded(&pins.root), &found)
            {
                return Err(refusal.into_error(&pins.root));
            }
        }

        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        let pin_paths: Vec<PathBuf> = match &pins {
            Some(pins) => specs.iter().map(|s| pins.map(s.name)).collect(),
            None => Vec::new(),
        };
        for (i, spec) in specs.iter().enumerate() {
            loader.map_max_entries(spec.name, spec.max_entries);
            if let Some(path) = pin_paths.get(i) {
                loader.map_pin_path(spec.name, path.as_path());
            }
        }
        let mut ebpf = loader.load(bytes)?;
        let maps = Maps::take(&mut ebpf, sizing)?;
        let mut datapath = Self {
            ebpf,
            maps,
            sizing: sizing.clone(),
            pins,
        };
        datapath.load_programs()?;
        if let Some(pins) = &datapath.pins {
            layout::record(&pins.root).map_err(|source| DatapathError::Io {
                context: format!("recording the layout version under {}", pins.root.display()),
                source,
            })?;
        }
        Ok(datapath)
    }

    fn load_programs(&mut self) -> Result<()> {
        use aya::programs::{SchedClassifier, Xdp};
        use nodeport_common::programs as p;
        for name in [
            p::XDP_EXTERNAL,
            p::XDP_NEW_CONNECTION,
            p::XDP_PASS,
            p::XDP_DRAIN,
        ] {
            let prog: &mut Xdp = self.program_mut(name)?;
            prog.load().map_err(|source| DatapathError::Program {
                program: name,
                source,
            })?;
        }
        for name in [
            p::TC_EXTERNAL,
            p::TC_EXTERNAL_NAT,
            p::TC_NEW_CONNECTION,
            p::TC_DRAIN,
            p::TC_POD,
        ] {
            let prog: &mut SchedClassifier = self.program_mut(name)?;
            prog.load().map_err(|source| DatapathError::Program {
                program: name,
                source,
            })?;
        }
        // The slot each external program tail-calls for a new connection (one array per
        // program type). The arrays are pinned with the maps, so an attached program keeps
        // finding its new-connection program across agent restarts; a new agent puts its own in.
        self.set_new_connections(true)?;
        Ok(())
    }

    /// Whether new connections start here (`np_xdp_new`, `np_tc_new` in the tail-call slots)
    /// or go to the kernel (`np_xdp_drain`, `np_tc_drain`, while draining). Established
    /// connections are not affected.
    pub fn set_new_connections(&mut self, take: bool) -> Result<()> {
        use aya::programs::{SchedClassifier, Xdp};
        use nodeport_common::{names, programs as p};
        let (xdp, tc) = if take {
            (p::XDP_NEW_CONNECTION, p::TC_NEW_CONNECTION)
        } else {
            (p::XDP_DRAIN, p::TC_DRAIN)
        };
        let xdp_fd = program_fd(xdp, self.program_mut::<Xdp>(xdp)?.fd())?;
        let tc_fd = program_fd(tc, self.program_mut::<SchedClassifier>(tc)?.fd())?;
        for (array, program) in [(names::PROGRAMS, xdp_fd), (names::TC_PROGRAMS, tc_fd)] {
            // The arrays stay in the object (only written here, and pinned by the loader).
            let map = self
                .ebpf
                .map_mut(array)
                .ok_or(DatapathError::MissingMap { name: array })?;
            aya::maps::ProgramArray::try_from(map)
                .map_err(|source| DatapathError::Map {
                    name: array,
                    source,
                })?
                .set(nodeport_common::PROG_SLOT_NEW_CONNECTION, &program, 0)
                .map_err(|source| DatapathError::Map {
                    name: array,
                    source,
                })?;
        }
        Ok(())
    }

    fn program_mut<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program = self.ebpf.program_mut(name).ok_or(DatapathError::Program {
            program: name,
            source: aya::programs::ProgramError::NotLoaded,
        })?;
        program.try_into().map_err(|source| DatapathError::Program {
            program: name,
            source,
        })
    }

    /// A loaded program, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn xdp_program(&mut self, name: &'static str) -> Result<&mut aya::programs::Xdp> {
        self.program_mut(name)
    }

    /// A loaded TC program, for BPF_PROG_TEST_RUN in tests.
    pub fn tc_program(
        &mut self,
        name: &'static str,
    ) -> Result<&mut aya::programs::SchedClassifier> {
        self.program_mut(name)
    }

    /// Loads an XDP program of the object that is not one of the datapath's own (the bench
    /// build's entry points).
    pub fn load_extra_xdp(&mut self, name: &'static str) -> Result<()> {
        let prog: &mut aya::programs::Xdp = self.program_mut(name)?;
        prog.load().map_err(|source| DatapathError::Program {
            program: name,
            source,
        })
    }

    /// Loads a TC program of the object that is not one of the datapath's own (the bench
    /// build's entry points).
    pub fn load_extra_tc(&mut self, name: &'static str) -> Result<()> {
        let prog: &mut aya::programs::SchedClassifier = self.program_mut(name)?;
        prog.load().map_err(|source| DatapathError::Program {
            program: name,
            source,
        })
    }

    /// A map of the object that is not one of the datapath's own (the bench build's).
    pub fn take_extra_map(&mut self, name: &str) -> Option<aya::maps::Map> {
        self.ebpf.take_map(name)
    }

    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }
}

/// An owned copy of a loaded program's fd (for a program array).
fn program_fd(
    program: &'static str,
    fd: std::result::Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) -> Result<aya::programs::ProgramFd> {
    fd.map_err(|source| DatapathError::Program { program, source })?
        .try_clone()
        .map_err(|source| DatapathError::Io {
            context: format!("duplicating the fd of {program}"),
            source,
        })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup);
/// lift it as libbpf does. Best effort: without permission the map creation error says more.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lift RLIMIT_MEMLOCK");
    }
}

/// Why this agent (with `sizing`) would refuse the datapath pinned under `root`, if it would.
pub fn refusal(sizing: &Sizing, root: &Path) -> Option<layout::Refusal> {
    let pins = PinDir::new(root);
    let found = compare_pins(&map_specs(sizing), &pins).ok()?;
    match layout::decide(layout::recorded(root), &found) {
        layout::Adoption::Refuse(r) => Some(r),
        _ => None,
    }
}

/// Whether any map of the datapath is pinned under `root`.
pub fn anything_pinned(root: &Path) -> bool {
    let pins = PinDir::new(root);
    names::ALL.iter().any(|name| pins.map(name).exists())
}

/// Removes everything pinned under `root`: links first (which detaches the programs from the
/// interfaces), then the maps. Missing pieces are not an error: detach is idempotent.
pub fn detach(root: &Path) -> Result<Vec<String>> {
    let pins = PinDir::new(root);
    let mut removed = attach::remove_links(&pins)?;
    for name in names::ALL {
        let path = pins.map(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(format!("map {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::Io {
                    context: format!("removing {}", path.display()),
                    source,
                });
            }
        }
    }
    notices::remove(&pins.root);
    layout::remove(&pins.root);
    layout::remove_refusal(&pins.root);
    for dir in [pins.maps(), pins.links(), pins.root.clone()] {
        // Only empty directories go; anything else someone put there stays.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(removed)
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| DatapathError::Io {
        context: format!("creating {}", path.display()),
        source,
    })
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_is_specified_and_named_once() {
        let mut specified: Vec<&str> = map_specs(&Sizing::default())
            .iter()
            .map(|s| s.name)
            .collect();
        let mut named: Vec<&str> = names::ALL.to_vec();
        specified.sort();
        named.sort();
        assert_eq!(
            specified, named,
            "names::ALL (used by detach) and map_specs (used by load) differ"
        );
    }

    #[test]
    fn kernel_hz_is_a_known_config_hz() {
        assert!(
            [100, 250, 300, 1000].contains(&kernel_hz()),
            "{}",
            kernel_hz()
        );
    }

    #[test]
    fn primes() {
        assert!(is_prime(1021));
        assert!(is_prime(16381));
        assert!(is_prime(65537));
        assert!(!is_prime(1024));
        assert!(!is_prime(1));
        assert!(!is_prime(16383));
    }

    #[test]
    fn rejects_a_non_prime_maglev_size_before_touching_the_kernel() {
        let sizing = Sizing {
            maglev_size: 1000,
            ..Sizing::default()
        };
        let err = Datapath::load_object(&[], &sizing, None)
            .err()
            .expect("must fail");
        assert!(
            matches!(err, DatapathError::MaglevSizeNotPrime(1000)),
            "{err}"
        );
    }
}
