//! What the agent did not program, recorded under the pins for `nodeport-agent status`.
//!
//! bpffs holds only pins and directories, so each notice is an empty directory
//! `<pins>/notices/<kind>:<object>` (`/`, `%` and `#` escaped as `%2F`, `%25`, `%23`), as the
//! clsact markers under `links/` are; a notice with counts (`ipv6_to_kernel`: the service
//! port's IPv6 frontends and endpoints) has them after a `#`: `<kind>:<object>#<f>,<e>`. The agent keeps the set equal to its notices after each change;
//! `status` lists them whether an agent runs or not; `detach` removes them. What the agent
//! keeps retrying (refused Service ports, unbound health-check node ports) is recorded the
//! same way under `<pins>/failing/<reason>:<object>`.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::model::{IpFamily, Notice, NoticeCounts, NoticeKind};

const DIR: &str = "notices";
const FAILING: &str = "failing";

pub fn dir(root: &Path) -> PathBuf {
    root.join(DIR)
}

/// A notice as recorded: what `status` and `dump` show.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Recorded {
    pub kind: String,
    pub object: String,
    /// The frontends and endpoints it is about, for the kinds that count them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<NoticeCounts>,
}

fn encode(kind: &str, object: &str, counts: Option<NoticeCounts>) -> String {
    let escape = |s: &str| {
        s.replace('%', "%25")
            .replace('/', "%2F")
            .replace('#', "%23")
    };
    let mut name = format!("{}:{}", escape(kind), escape(object));
    if let Some(c) = counts {
        name.push_str(&format!("#{},{}", c.frontends, c.endpoints));
    }
    name
}

fn decode(name: &str) -> Option<Recorded> {
    let unescape = |s: &str| {
        s.replace("%2F", "/")
            .replace("%23", "#")
            .replace("%25", "%")
    };
    let (name, counts) = match name.split_once('#') {
        Some((name, counts)) => {
            let (f, e) = counts.split_once(',')?;
            let counts = NoticeCounts {
                frontends: f.parse().ok()?,
                endpoints: e.parse().ok()?,
            };
            (name, Some(counts))
        }
        None => (name, None),
    };
    let (kind, object) = name.split_once(':')?;
    Some(Recorded {
        kind: unescape(kind),
        object: unescape(object),
        counts,
    })
}

/// Makes `<root>/notices` hold one marker per (kind, object, counts) of `notices`, and nothing
/// else.
pub fn record(root: &Path, notices: &BTreeSet<Notice>) -> io::Result<()> {
    record_in(
        &dir(root),
        notices
            .iter()
            .map(|n| encode(n.kind.label(), &n.object, n.counts)),
    )
}

/// Makes `<root>/failing` hold one marker per (reason, object) of `failing`, and nothing else.
pub fn record_failing(root: &Path, failing: &BTreeSet<(String, String)>) -> io::Result<()> {
    record_in(
        &root.join(FAILING),
        failing.iter().map(|(k, o)| encode(k, o, None)),
    )
}

/// The recorded failures as (reason, object), sorted.
pub fn read_failing(root: &Path) -> Vec<(String, String)> {
    read_in(&root.join(FAILING))
        .into_iter()
        .map(|r| (r.kind, r.object))
        .collect()
}

fn record_in(dir: &Path, markers: impl Iterator<Item = String>) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let wanted: BTreeSet<String> = markers
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

/// The recorded notices, sorted; none when nothing was recorded.
pub fn read(root: &Path) -> Vec<Recorded> {
    read_in(&dir(root))
}

/// A service port whose IPv6 frontends the kernel carries, as `status` and `dump` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ipv6Port {
    /// `namespace/name[:port]/PROTOCOL`.
    pub service: String,
    pub family: IpFamily,
    pub frontends: usize,
    pub endpoints: usize,
}

/// The IPv6 service ports among recorded notices (`ipv6_to_kernel`), sorted.
pub fn ipv6_ports(recorded: &[Recorded]) -> Vec<Ipv6Port> {
    recorded
        .iter()
        .filter(|r| r.kind == NoticeKind::Ipv6ToKernel.label())
        .map(|r| {
            let counts = r.counts.unwrap_or(NoticeCounts {
                frontends: 0,
                endpoints: 0,
            });
            Ipv6Port {
                service: r.object.clone(),
                family: IpFamily::Ipv6,
                frontends: counts.frontends,
                endpoints: counts.endpoints,
            }
        })
        .collect()
}

impl Ipv6Port {
    /// One line of `status` and `dump` tables.
    pub fn render(&self) -> String {
        format!(
            "  {:<36} {} {} frontend(s), {} endpoint(s)",
            self.service, self.family, self.frontends, self.endpoints
        )
    }
}

fn read_in(dir: &Path) -> Vec<Recorded> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Recorded> = entries
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

    #[test]
    fn notices_are_recorded_and_read_back_as_markers() {
        let scratch = crate::test_support::ScratchDir::new("notice-markers");
        let notice = |kind, object: &str| Notice {
            kind,
            object: object.into(),
            detail: String::new(),
            counts: None,
        };
        let mut notices: BTreeSet<Notice> = [
            notice(NoticeKind::FrontendConflict, "default/aaa:tcp/TCP"),
            notice(NoticeKind::NodePortOutsideRange, "evil/ssh/TCP"),
            notice(NoticeKind::NodePortOutsideRange, "evil/ssh/TCP"),
            notice(NoticeKind::FrontendOnHostListener, "odd%name/x/UDP"),
        ]
        .into();
        let read = |root: &Path| -> Vec<(String, String)> {
            read(root).into_iter().map(|r| (r.kind, r.object)).collect()
        };
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

    /// The IPv6 notice of a service port carries its counts to `status` and `dump`, and a
    /// change of counts replaces the marker.
    #[test]
    fn counts_are_recorded_with_their_notice() {
        let scratch = crate::test_support::ScratchDir::new("notice-counts");
        let ipv6 = |frontends, endpoints| Notice {
            kind: NoticeKind::Ipv6ToKernel,
            object: "shop/web#1:http/TCP".into(),
            detail: String::new(),
            counts: Some(NoticeCounts {
                frontends,
                endpoints,
            }),
        };
        record(scratch.path(), &[ipv6(2, 3)].into()).unwrap();
        let recorded = Recorded {
            kind: "ipv6_to_kernel".into(),
            object: "shop/web#1:http/TCP".into(),
            counts: Some(NoticeCounts {
                frontends: 2,
                endpoints: 3,
            }),
        };
        assert_eq!(read(scratch.path()), std::slice::from_ref(&recorded));
        record(scratch.path(), &[ipv6(2, 4)].into()).unwrap();
        let mut changed = recorded;
        changed.counts = Some(NoticeCounts {
            frontends: 2,
            endpoints: 4,
        });
        assert_eq!(
            read(scratch.path()),
            std::slice::from_ref(&changed),
            "one marker, the new counts"
        );
        // What `status` and `dump` list: the IPv6 service ports, not the other notices.
        let other = Recorded {
            kind: "frontend_conflict".into(),
            object: "shop/api/TCP".into(),
            counts: None,
        };
        let ports = ipv6_ports(&[changed, other]);
        assert_eq!(
            ports,
            [Ipv6Port {
                service: "shop/web#1:http/TCP".into(),
                family: IpFamily::Ipv6,
                frontends: 2,
                endpoints: 4,
            }]
        );
        assert_eq!(
            ports[0].render().split_whitespace().collect::<Vec<_>>(),
            [
                "shop/web#1:http/TCP",
                "IPv6",
                "2",
                "frontend(s),",
                "4",
                "endpoint(s)"
            ]
        );
    }
}
