//! Whether this agent may adopt the datapath pinned under its directory.
//!
//! Two checks, before anything is created or changed: the **layout version** the agent that
//! created the pins recorded (`<pins>/layout/v<N>`, an empty directory: bpffs holds nothing
//! else; it survives restarts, `detach` removes it), for changes of meaning a map's shape does
//! not show; and every pinned map's type, key and value size, flags (its layout) and max
//! entries (its sizing) against this agent's specs. Pins of the version before the record
//! existed carry none: they are adopted when every map matches.
//!
//! This version migrates nothing: a difference is refused with the exact steps to apply it,
//! and the agent keeps running beside the old datapath, which keeps forwarding untouched
//! (docs/operations.md, "Incompatible pins").

use std::{io, path::Path};

use super::{DatapathError, PinComparison};

/// The layout of the maps this agent creates. Raise it with any change of a map's meaning
/// that its type, key size, value size, flags and max entries do not show.
pub const LAYOUT_VERSION: u32 = 1;

const DIR: &str = "layout";

/// What to do with the pins found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Nothing pinned: create the maps.
    Fresh,
    /// Same layout and sizing: adopt (connections and node ports carry on).
    Adopt,
    /// Leave it alone, and say why.
    Refuse(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another layout version recorded.
    Version { found: u32 },
    /// Maps of another shape, or missing ones: an older version, from before the record.
    Layout { differences: Vec<String> },
    /// Only max entries differ: other sizing flags.
    Sizing { differences: Vec<String> },
}

impl Refusal {
    /// One short line per difference (also the markers `status` shows).
    pub fn differences(&self) -> Vec<String> {
        match self {
            Self::Version { found } => {
                vec![format!("layout version {found}, expected {LAYOUT_VERSION}")]
            }
            Self::Layout { differences } | Self::Sizing { differences } => differences.clone(),
        }
    }

    pub fn into_error(self, root: &Path) -> DatapathError {
        let root = root.to_owned();
        match self {
            Self::Version { found } => DatapathError::LayoutVersion {
                root,
                found,
                expected: LAYOUT_VERSION,
            },
            Self::Layout { differences } => DatapathError::OldLayout {
                root,
                differences: differences.join("; "),
            },
            Self::Sizing { differences } => DatapathError::IncompatiblePin {
                root,
                difference: differences.join("; "),
            },
        }
    }
}

/// The decision, from the recorded layout version and how the pinned maps compare.
pub fn decide(recorded: Option<u32>, pins: &PinComparison) -> Adoption {
    if pins.present == 0 {
        return Adoption::Fresh;
    }
    match recorded {
        Some(found) if found != LAYOUT_VERSION => {
            return Adoption::Refuse(Refusal::Version { found });
        }
        _ => {}
    }
    if !pins.layout.is_empty() || !pins.missing.is_empty() {
        let mut differences = pins.layout.clone();
        // Max entries are listed too: an old layout's defaults may differ as well.
        differences.extend(pins.sizing.iter().cloned());
        if !pins.missing.is_empty() {
            differences.push(format!("no {}", pins.missing.join(", ")));
        }
        return Adoption::Refuse(Refusal::Layout { differences });
    }
    if !pins.sizing.is_empty() {
        return Adoption::Refuse(Refusal::Sizing {
            differences: pins.sizing.clone(),
        });
    }
    Adoption::Adopt
}

/// The layout version recorded under `root`, if any.
pub fn recorded(root: &Path) -> Option<u32> {
    std::fs::read_dir(root.join(DIR))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse().ok())
}

/// Records this agent's layout version under `root` (replacing any other).
pub fn record(root: &Path) -> io::Result<()> {
    let dir = root.join(DIR);
    std::fs::create_dir_all(&dir)?;
    let name = format!("v{LAYOUT_VERSION}");
    for e in std::fs::read_dir(&dir)?.flatten() {
        if e.file_name() != name.as_str() {
            std::fs::remove_dir(e.path())?;
        }
    }
    match std::fs::create_dir(dir.join(name)) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Removes the record (`detach`).
pub fn remove(root: &Path) {
    remove_markers(&root.join(DIR));
}

const REFUSED: &str = "incompatible";

/// Records why the agent refused the pins, one marker per difference, for `status`.
pub fn record_refusal(root: &Path, differences: &[String]) -> io::Result<()> {
    let dir = root.join(REFUSED);
    remove_markers(&dir);
    std::fs::create_dir_all(&dir)?;
    for d in differences {
        // A marker is a file name: at most 255 bytes, no `/`.
        let name: String = d.replace('%', "%25").replace('/', "%2F");
        let name: String = name.chars().take(200).collect();
        match std::fs::create_dir(dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// What the running agent refused, as recorded (empty: nothing refused).
pub fn refusal(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root.join(REFUSED))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .replace("%2F", "/")
                .replace("%25", "%")
        })
        .collect();
    out.sort();
    out
}

/// Removes the refusal record (the refusing agent exits, or `detach`).
pub fn remove_refusal(root: &Path) {
    remove_markers(&root.join(REFUSED));
}

fn remove_markers(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(layout: &[&str], sizing: &[&str], missing: &[&'static str]) -> PinComparison {
        PinComparison {
            present: 16 - missing.len(),
            missing: missing.to_vec(),
            layout: layout.iter().map(|s| s.to_string()).collect(),
            sizing: sizing.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn nothing_pinned_is_fresh_whatever_is_recorded() {
        for recorded in [None, Some(LAYOUT_VERSION), Some(LAYOUT_VERSION + 1)] {
            assert_eq!(decide(recorded, &PinComparison::default()), Adoption::Fresh);
        }
    }

    #[test]
    fn same_layout_and_sizing_is_adopted_with_or_without_a_record() {
        assert_eq!(
            decide(Some(LAYOUT_VERSION), &pins(&[], &[], &[])),
            Adoption::Adopt
        );
        // Pins of the version before the record existed.
        assert_eq!(decide(None, &pins(&[], &[], &[])), Adoption::Adopt);
    }

    #[test]
    fn another_sizing_is_refused_with_every_difference() {
        let p = pins(
            &[],
            &[
                "NP_CT: max entries 524288, expected 262144",
                "NP_AFFINITY: max entries 10, expected 20",
            ],
            &[],
        );
        let Adoption::Refuse(r) = decide(Some(LAYOUT_VERSION), &p) else {
            panic!("adopted")
        };
        assert!(matches!(r, Refusal::Sizing { .. }), "{r:?}");
        assert_eq!(r.differences().len(), 2);
        let e = r.into_error(Path::new("/sys/fs/bpf/nodeport")).to_string();
        assert!(
            e.contains("NP_CT: max entries 524288, expected 262144"),
            "{e}"
        );
        assert!(
            e.contains("nodeport-agent detach --bpffs-dir /sys/fs/bpf/nodeport"),
            "{e}"
        );
        assert!(e.contains("keeps forwarding"), "{e}");
    }

    #[test]
    fn another_layout_or_version_is_refused() {
        let old = pins(
            &["NP_CT: type LruHash, expected Hash"],
            &["NP_COUNTERS: max entries 40, expected 96"],
            &["NP_CT_NEW"],
        );
        let Adoption::Refuse(Refusal::Layout { differences }) = decide(None, &old) else {
            panic!("not refused as an old layout")
        };
        assert_eq!(
            differences,
            [
                "NP_CT: type LruHash, expected Hash",
                "NP_COUNTERS: max entries 40, expected 96",
                "no NP_CT_NEW"
            ]
        );
        // A newer (or older) recorded version is refused even when every map looks alike:
        // the meaning changed.
        for found in [LAYOUT_VERSION + 1, 0] {
            assert_eq!(
                decide(Some(found), &pins(&[], &[], &[])),
                Adoption::Refuse(Refusal::Version { found })
            );
        }
        // The version decides before the maps do.
        assert!(matches!(
            decide(
                Some(LAYOUT_VERSION + 1),
                &pins(&[], &["NP_CT: max entries 1, expected 2"], &[])
            ),
            Adoption::Refuse(Refusal::Version { .. })
        ));
    }

    #[test]
    fn records_round_trip() {
        let dir = crate::test_support::ScratchDir::new("layout-record");
        assert_eq!(recorded(dir.path()), None);
        record(dir.path()).unwrap();
        record(dir.path()).unwrap();
        assert_eq!(recorded(dir.path()), Some(LAYOUT_VERSION));
        remove(dir.path());
        assert_eq!(recorded(dir.path()), None);

        let diffs = vec![
            "NP_CT: max entries 524288, expected 262144".to_owned(),
            "odd/name 100%".to_owned(),
        ];
        record_refusal(dir.path(), &diffs).unwrap();
        let mut want = diffs.clone();
        want.sort();
        assert_eq!(refusal(dir.path()), want);
        remove_refusal(dir.path());
        assert!(refusal(dir.path()).is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
