//! What the agent did not program, recorded under the pins for `nodeport-agent status`.
//!
//! bpffs holds only pins and directories, so each notice is an empty directory
//! `<pins>/notices/<kind>:<object>` (`/` and `%` escaped as `%2F`, `%25`), as the clsact
//! markers under `links/` are. The agent keeps the set equal to its notices after each change;
//! `status` lists them whether an agent runs or not; `detach` removes them. What the agent
//! keeps retrying (refused Service ports, unbound health-check node ports) is recorded the
//! same way under `<pins>/failing/<reason>:<object>`.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use crate::model::Notice;

const DIR: &str = "notices";
const FAILING: &str = "failing";

pub fn dir(root: &Path) -> PathBuf {
    root.join(DIR)
}

fn encode(kind: &str, object: &str) -> String {
    let escape = |s: &str| s.replace('%', "%25").replace('/', "%2F");
    format!("{}:{}", escape(kind), escape(object))
}

fn decode(name: &str) -> Option<(String, String)> {
    let unescape = |s: &str| s.replace("%2F", "/").replace("%25", "%");
    let (kind, object) = name.split_once(':')?;
    Some((unescape(kind), unescape(object)))
}

/// Makes `<root>/notices` hold one marker per (kind, object) of `notices`, and nothing else.
pub fn record(root: &Path, notices: &BTreeSet<Notice>) -> io::Result<()> {
    record_in(
        &dir(root),
        notices.iter().map(|n| (n.kind.label(), n.object.as_str())),
    )
}

/// Makes `<root>/failing` hold one marker per (reason, object) of `failing`, and nothing else.
pub fn record_failing(root: &Path, failing: &BTreeSet<(String, String)>) -> io::Result<()> {
    record_in(
        &root.join(FAILING),
        failing.iter().map(|(k, o)| (k.as_str(), o.as_str())),
    )
}

/// The recorded failures as (reason, object), sorted.
pub fn read_failing(root: &Path) -> Vec<(String, String)> {
    read_in(&root.join(FAILING))
}

fn record_in<'a>(dir: &Path, markers: impl Iterator<Item = (&'a str, &'a str)>) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let wanted: BTreeSet<String> = markers
        .map(|(kind, object)| encode(kind, object))
        // A name is at most 255 bytes; such an object is still in the log and the metrics.
        .filter(|name| name.len() <= 255)
        .collect();
    let mut present = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&name) {
            std::fs::remove_dir(dir.join(&name))?;
        } else {
            present.insert(name);
        }
    }
    for name in wanted.difference(&present) {
        std::fs::create_dir(dir.join(name))?;
    }
    Ok(())
}

/// The recorded notices as (kind, object), sorted; none when nothing was recorded.
pub fn read(root: &Path) -> Vec<(String, String)> {
    read_in(&dir(root))
}

fn read_in(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| decode(&e.file_name().to_string_lossy()))
        .collect();
    out.sort();
    out
}

/// Removes the markers and their directory (`detach`).
pub fn remove(root: &Path) {
    let _ = std::fs::remove_dir_all(dir(root));
    let _ = std::fs::remove_dir_all(root.join(FAILING));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NoticeKind;

    #[test]
    fn notices_are_recorded_and_read_back_as_markers() {
        let scratch = crate::test_support::ScratchDir::new("notice-markers");
        let notice = |kind, object: &str| Notice {
            kind,
            object: object.into(),
            detail: String::new(),
        };
        let mut notices: BTreeSet<Notice> = [
            notice(NoticeKind::FrontendConflict, "default/aaa:tcp/TCP"),
            notice(NoticeKind::NodePortOutsideRange, "evil/ssh/TCP"),
            notice(NoticeKind::NodePortOutsideRange, "evil/ssh/TCP"),
            notice(NoticeKind::FrontendOnHostListener, "odd%name/x/UDP"),
        ]
        .into();
        record(scratch.path(), &notices).unwrap();
        assert_eq!(
            read(scratch.path()),
            [
                ("frontend_conflict".into(), "default/aaa:tcp/TCP".into()),
                ("frontend_on_host_listener".into(), "odd%name/x/UDP".into()),
                ("node_port_outside_range".into(), "evil/ssh/TCP".into()),
            ]
        );
        notices.retain(|n| n.kind == NoticeKind::NodePortOutsideRange);
        record(scratch.path(), &notices).unwrap();
        assert_eq!(
            read(scratch.path()),
            [("node_port_outside_range".into(), "evil/ssh/TCP".into())]
        );
        let failing = BTreeSet::from([("map_full".to_owned(), "shop/web:http/TCP".to_owned())]);
        record_failing(scratch.path(), &failing).unwrap();
        assert_eq!(
            read_failing(scratch.path()),
            [("map_full".into(), "shop/web:http/TCP".into())]
        );
        assert_eq!(read(scratch.path()).len(), 1, "apart from the notices");
        remove(scratch.path());
        assert!(read(scratch.path()).is_empty());
        assert!(read_failing(scratch.path()).is_empty());
    }
}
