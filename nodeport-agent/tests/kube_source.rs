//! The Kubernetes source against an in-process fake API server (see `fake_api`), with the
//! real kube-rs client and watcher.
//!
//! No test sleeps to synchronise. Each awaits either the snapshot channel or a request
//! arriving at the fake server, with a generous timeout as a failure guard only. The tests run
//! on tokio's current-thread runtime, which makes "the server saw request X" a reliable
//! sync point: the source decides whether to publish synchronously after handling a watcher
//! event, before it yields, and the watcher's next request can only reach the server after
//! that, because the server and the client's connections run on the same thread.

mod fake_api;

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_api::{FakeApi, Res, guard};
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use nodeport_agent::source::{
    self, Snapshot, SnapshotReceiver,
    kube::{KubeSourceConfig, KubeSourceError, KubeSourceStats, RetryBackoff, run},
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Short, so that retries keep the tests fast; long enough to measure.
const BACKOFF: Duration = Duration::from_millis(25);

struct Source {
    rx: SnapshotReceiver,
    stats: Arc<KubeSourceStats>,
    published: Arc<Mutex<Vec<Arc<Snapshot>>>>,
    task: JoinHandle<Result<(), KubeSourceError>>,
}

fn start(api: &FakeApi, node_name: Option<&str>) -> Source {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "nodeport_agent=debug".into()),
        )
        .try_init();
    let (tx, rx) = source::channel();
    let stats = KubeSourceStats::new();
    let published = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&published);
    let config = KubeSourceConfig {
        node_name: node_name.map(str::to_string),
        backoff: RetryBackoff::Fixed(BACKOFF),
        stats: Arc::clone(&stats),
        on_publish: Some(Arc::new(move |snapshot: &Arc<Snapshot>| {
            record.lock().unwrap().push(Arc::clone(snapshot));
        })),
    };
    let task = tokio::spawn(run(api.client(), config, tx));
    Source {
        rx,
        stats,
        published,
        task,
    }
}

impl Source {
    /// Waits until the channel holds a snapshot satisfying `predicate` and returns it.
    async fn wait_for(
        &mut self,
        what: &str,
        predicate: impl Fn(&Snapshot) -> bool,
    ) -> Arc<Snapshot> {
        let value = guard(
            what,
            self.rx
                .wait_for(|value| value.as_deref().is_some_and(&predicate)),
        )
        .await
        .unwrap_or_else(|_| panic!("the source stopped while waiting for {what}"));
        Arc::clone(value.as_ref().unwrap())
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        self.rx.borrow().clone()
    }

    fn published(&self) -> Vec<Arc<Snapshot>> {
        self.published.lock().unwrap().clone()
    }
}

fn service(namespace: &str, name: &str, port: u16) -> Value {
    json!({
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "type": "NodePort",
            "ports": [{"port": port, "targetPort": 8080, "nodePort": 30000 + port, "protocol": "TCP"}],
        },
    })
}

fn slice(namespace: &str, name: &str, service: &str, ip: &str) -> Value {
    json!({
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, addresses: &[(&str, &str)]) -> Value {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(kind, address)| json!({"type": kind, "address": address}))
        .collect();
    json!({"metadata": {"name": name}, "status": {"addresses": addresses}})
}

fn names<K: ResourceExt>(objects: &[std::sync::Arc<K>]) -> Vec<String> {
    objects
        .iter()
        .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
        .collect()
}

fn services(snapshot: &Snapshot) -> Vec<String> {
    names(&snapshot.services)
}

fn slices(snapshot: &Snapshot) -> Vec<String> {
    names(&snapshot.endpoint_slices)
}

fn find_service<'a>(snapshot: &'a Snapshot, name: &str) -> &'a Service {
    snapshot
        .services
        .iter()
        .find(|s| s.name_any() == name)
        .unwrap_or_else(|| panic!("no Service {name} in {:?}", services(snapshot)))
}

fn port_of(snapshot: &Snapshot, name: &str) -> i32 {
    find_service(snapshot, name)
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()[0]
        .port
}

fn ips(addresses: &[&str]) -> Vec<IpAddr> {
    addresses.iter().map(|a| a.parse().unwrap()).collect()
}

fn assert_no_unexpected_requests(api: &FakeApi) {
    assert_eq!(
        api.unexpected_requests().len(),
        0,
        "{:#?}",
        api.unexpected_requests()
    );
    assert!(api.events().is_empty(), "the source creates no Events");
}

/// The channel stays `None` while the Services are listed and watched but the EndpointSlice
/// list has not completed; the first snapshot has both.
#[tokio::test]
async fn nothing_is_published_until_both_kinds_are_listed() {
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-abcde", "web", "10.1.0.1"),
    );
    api.hold_lists(Res::EndpointSlices);
    let mut source = start(&api, None);

    api.wait_for_request("the EndpointSlice list", 0, |r| {
        r.is_list_of(Res::EndpointSlices)
    })
    .await;
    // The Service list is complete: the watcher watches from its resourceVersion.
    let watch = api
        .wait_for_request("the Service watch", 0, |r| r.is_watch_of(Res::Services))
        .await;
    assert_eq!(
        watch.resource_version(),
        Some(api.resource_version().to_string().as_str())
    );
    assert!(
        source.current().is_none(),
        "published with only the Services listed"
    );

    // A Service event while the EndpointSlices are still being listed publishes nothing
    // either. Ending the watch after it gives a sync point: the watcher re-watches only after
    // the event has gone through the source.
    let rv = api.apply(Res::Services, service("default", "api", 81));
    api.end_watches(Res::Services);
    let rewatch = api
        .wait_for_request("the second Service watch", 1, |r| {
            r.is_watch_of(Res::Services)
        })
        .await;
    assert_eq!(rewatch.resource_version(), Some(rv.to_string().as_str()));
    assert!(
        source.current().is_none(),
        "published with only the Services listed"
    );
    assert_eq!(source.published().len(), 0);

    api.release_lists(Res::EndpointSlices);
    let first = source.wait_for("the first snapshot", |_| true).await;
    assert_eq!(services(&first), ["default/api", "default/web"]);
    assert_eq!(slices(&first), ["default/web-abcde"]);
    assert_eq!(first.node_addresses, None);
    assert_eq!(source.published().len(), 1);
    assert_no_unexpected_requests(&api);
}

/// The first snapshot holds the listed objects; watch events then show up in later ones. Also
/// pins the list and watch parameters kube-rs sends.
#[tokio::test]
async fn initial_snapshot_then_watch_events() {
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(Res::Services, service("shop", "cart", 81));
    api.apply(Res::Services, service("default", "old", 82));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.1"),
    );
    api.apply(
        Res::EndpointSlices,
        slice("shop", "cart-1", "cart", "10.1.0.2"),
    );
    let listed_at = api.resource_version();
    let mut source = start(&api, None);

    let first = source.wait_for("the first snapshot", |_| true).await;
    // Sorted by namespace, then name.
    assert_eq!(
        services(&first),
        ["default/old", "default/web", "shop/cart"]
    );
    assert_eq!(slices(&first), ["default/web-1", "shop/cart-1"]);
    assert_eq!(port_of(&first, "web"), 80);
    assert_eq!(first.node_addresses, None);

    for res in [Res::Services, Res::EndpointSlices] {
        let list = api
            .wait_for_request("the list", 0, |r| r.is_list_of(res))
            .await;
        // resourceVersion=0: served from the API server's watch cache, unpaginated.
        assert_eq!(list.param("resourceVersion"), Some("0"), "{list:?}");
        assert_eq!(
            list.param("resourceVersionMatch"),
            Some("NotOlderThan"),
            "{list:?}"
        );
        assert_eq!(list.param("limit"), None, "{list:?}");
        let watch = api
            .wait_for_request("the watch", 0, |r| r.is_watch_of(res))
            .await;
        assert_eq!(
            watch.resource_version(),
            Some(listed_at.to_string().as_str())
        );
        assert_eq!(
            watch.param("allowWatchBookmarks"),
            Some("true"),
            "{watch:?}"
        );
        assert_eq!(watch.param("timeoutSeconds"), Some("290"), "{watch:?}");
        assert_eq!(watch.param("sendInitialEvents"), None, "{watch:?}");
    }
    // Nodes are watched only with a node name.
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.resource == Some(Res::Nodes))
    );

    api.apply(Res::Services, service("default", "new", 83));
    api.apply(Res::Services, service("default", "web", 8080));
    api.delete(Res::Services, "default", "old");
    api.apply(
        Res::EndpointSlices,
        slice("default", "new-1", "new", "10.1.0.3"),
    );
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.9"),
    );
    api.delete(Res::EndpointSlices, "shop", "cart-1");

    let done = source
        .wait_for("all the events", |s| {
            services(s) == ["default/new", "default/web", "shop/cart"]
                && port_of(s, "web") == 8080
                && slices(s) == ["default/new-1", "default/web-1"]
                && s.endpoint_slices[1].endpoints.as_ref().unwrap()[0].addresses == ["10.1.0.9"]
        })
        .await;
    assert_eq!(services(&done), ["default/new", "default/web", "shop/cart"]);
    assert_eq!(port_of(&done, "web"), 8080);
    assert_eq!(slices(&done), ["default/new-1", "default/web-1"]);
    let web_1 = done
        .endpoint_slices
        .iter()
        .find(|e| e.name_any() == "web-1")
        .unwrap();
    assert_eq!(web_1.endpoints.as_ref().unwrap()[0].addresses, ["10.1.0.9"]);
    assert_eq!(source.stats.events_applied(), 6);
    assert_eq!(source.stats.relists(), 0);
    assert_eq!(source.stats.watch_errors(), 0);
    assert_eq!(
        source.stats.snapshots_published(),
        source.published().len() as u64
    );
    assert_no_unexpected_requests(&api);
}

/// A 410 Gone on the Service watch makes the watcher relist. While the relist is under way
/// (the first attempt even fails), published snapshots still hold every Service as before;
/// afterwards they match the server, including a delete made while no watch was running.
#[tokio::test]
async fn gone_relists_atomically_and_converges() {
    let api = FakeApi::start().await;
    for (name, port) in [("keep", 80), ("doomed", 81), ("changed", 82)] {
        api.apply(Res::Services, service("default", name, port));
    }
    api.apply(
        Res::EndpointSlices,
        slice("default", "keep-1", "keep", "10.1.0.1"),
    );
    let mut source = start(&api, None);
    source.wait_for("the first snapshot", |_| true).await;
    api.wait_for_request("the Service watch", 0, |r| r.is_watch_of(Res::Services))
        .await;
    api.wait_for_request("the EndpointSlice watch", 0, |r| {
        r.is_watch_of(Res::EndpointSlices)
    })
    .await;

    api.fail_next_lists(Res::Services, 1);
    api.hold_lists(Res::Services);
    api.expire_watches(Res::Services);
    api.wait_for_request("the failed Service relist", 1, |r| {
        r.is_list_of(Res::Services)
    })
    .await;
    api.wait_for_request("the held Service relist", 2, |r| {
        r.is_list_of(Res::Services)
    })
    .await;

    // No Service watch is running: only the relist can tell about these.
    api.delete(Res::Services, "default", "doomed");
    let changed_rv = api.apply(Res::Services, service("default", "changed", 8082));
    api.apply(Res::Services, service("default", "newcomer", 83));
    // EndpointSlice events still publish meanwhile, with the Services as they were.
    api.apply(
        Res::EndpointSlices,
        slice("default", "keep-2", "keep", "10.1.0.2"),
    );
    let during = source
        .wait_for("the EndpointSlice event during the relist", |s| {
            slices(s).contains(&"default/keep-2".to_string())
        })
        .await;
    assert_eq!(
        services(&during),
        ["default/changed", "default/doomed", "default/keep"]
    );
    assert_eq!(port_of(&during, "changed"), 82);

    let relisted_at = api.resource_version();
    api.release_lists(Res::Services);
    let after = source
        .wait_for("the relisted Services", |s| {
            !services(s).contains(&"default/doomed".to_string())
        })
        .await;
    assert_eq!(
        services(&after),
        ["default/changed", "default/keep", "default/newcomer"]
    );
    assert_eq!(
        find_service(&after, "changed").resource_version(),
        Some(changed_rv.to_string())
    );
    assert_eq!(port_of(&after, "changed"), 8082);
    assert_eq!(slices(&after), ["default/keep-1", "default/keep-2"]);

    // The watch resumes from the relist's resourceVersion and its events arrive.
    let watch = api
        .wait_for_request("the Service watch after the relist", 1, |r| {
            r.is_watch_of(Res::Services)
        })
        .await;
    assert_eq!(
        watch.resource_version(),
        Some(relisted_at.to_string().as_str())
    );
    api.apply(Res::Services, service("default", "late", 84));
    source
        .wait_for("an event after the relist", |s| {
            services(s).contains(&"default/late".to_string())
        })
        .await;

    // Every published snapshot had the Services either as before the relist or as after it:
    // never empty, never partial, "keep" always there.
    let before = ["default/changed", "default/doomed", "default/keep"];
    let relisted = ["default/changed", "default/keep", "default/newcomer"];
    let late = [
        "default/changed",
        "default/keep",
        "default/late",
        "default/newcomer",
    ];
    let published = source.published();
    for snapshot in &published {
        let names = services(snapshot);
        assert!(
            names == before || names == relisted || names == late,
            "a snapshot with Services {names:?}"
        );
        assert!(slices(snapshot).contains(&"default/keep-1".to_string()));
    }
    // Initial, the EndpointSlice event, the relist, the late Service: nothing else.
    assert_eq!(published.len(), 4);
    assert_eq!(source.stats.relists(), 1);
    // The 410 and the failed list.
    assert_eq!(source.stats.watch_errors(), 2);
    assert_no_unexpected_requests(&api);
}

/// A watch connection that drops (abruptly, or cleanly as on a server timeout) is resumed
/// from the last resourceVersion seen, without a relist, and later events arrive.
#[tokio::test]
async fn dropped_watch_resumes_from_the_last_resource_version() {
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.1"),
    );
    let mut source = start(&api, None);
    source.wait_for("the first snapshot", |_| true).await;
    api.wait_for_request("the Service watch", 0, |r| r.is_watch_of(Res::Services))
        .await;

    let added = api.apply(Res::Services, service("default", "a", 81));
    source
        .wait_for("Service a", |s| {
            services(s).contains(&"default/a".to_string())
        })
        .await;
    // Changes elsewhere move the world's resourceVersion on, but not the Service watch's.
    api.apply(
        Res::EndpointSlices,
        slice("default", "a-1", "a", "10.1.0.2"),
    );

    api.abort_watches(Res::Services);
    let watch = api
        .wait_for_request("the Service re-watch", 1, |r| r.is_watch_of(Res::Services))
        .await;
    assert_eq!(watch.resource_version(), Some(added.to_string().as_str()));

    let modified = api.apply(Res::Services, service("default", "a", 8081));
    source
        .wait_for("Service a modified", |s| {
            services(s).contains(&"default/a".to_string()) && port_of(s, "a") == 8081
        })
        .await;

    api.end_watches(Res::Services);
    let watch = api
        .wait_for_request("the second Service re-watch", 2, |r| {
            r.is_watch_of(Res::Services)
        })
        .await;
    assert_eq!(
        watch.resource_version(),
        Some(modified.to_string().as_str())
    );
    api.delete(Res::Services, "default", "a");
    let last = source
        .wait_for("Service a deleted", |s| {
            !services(s).contains(&"default/a".to_string())
        })
        .await;
    assert_eq!(services(&last), ["default/web"]);

    let lists = api
        .requests()
        .into_iter()
        .filter(|r| r.is_list_of(Res::Services))
        .count();
    assert_eq!(lists, 1, "the Services were relisted");
    assert_eq!(source.stats.relists(), 0);
    assert_no_unexpected_requests(&api);
}

/// Bookmarks publish nothing and move the resourceVersion a re-watch starts from; a relist
/// that finds nothing new publishes nothing either.
#[tokio::test]
async fn bookmarks_and_empty_relists_publish_nothing() {
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.1"),
    );
    let listed_at = api.resource_version();
    let mut source = start(&api, None);
    source.wait_for("the first snapshot", |_| true).await;
    api.wait_for_request("the Service watch", 0, |r| r.is_watch_of(Res::Services))
        .await;
    api.wait_for_request("the EndpointSlice watch", 0, |r| {
        r.is_watch_of(Res::EndpointSlices)
    })
    .await;

    // An EndpointSlice change: the world's resourceVersion moves past the Service watch's.
    let slice_rv = api.apply(
        Res::EndpointSlices,
        slice("default", "web-2", "web", "10.1.0.2"),
    );
    source
        .wait_for("slice web-2", |s| {
            slices(s).contains(&"default/web-2".to_string())
        })
        .await;
    let published = source.published().len();
    assert_eq!(published, 2);
    assert!(slice_rv > listed_at);

    let bookmarked = api.bookmark(Res::Services);
    assert_eq!(bookmarked, slice_rv);
    api.bookmark(Res::EndpointSlices);
    api.bookmark(Res::Services);
    // Ending the watch after the bookmarks is the sync point: the re-watch starts from the
    // bookmark's resourceVersion, not from the list's.
    api.end_watches(Res::Services);
    let watch = api
        .wait_for_request("the Service re-watch", 1, |r| r.is_watch_of(Res::Services))
        .await;
    assert_eq!(
        watch.resource_version(),
        Some(bookmarked.to_string().as_str())
    );
    assert_eq!(
        source.published().len(),
        published,
        "a bookmark published a snapshot"
    );

    // A relist that finds what the store already has.
    api.expire_watches(Res::EndpointSlices);
    let watch = api
        .wait_for_request("the EndpointSlice watch after the relist", 1, |r| {
            r.is_watch_of(Res::EndpointSlices)
        })
        .await;
    assert_eq!(
        watch.resource_version(),
        Some(slice_rv.to_string().as_str())
    );
    assert_eq!(source.stats.relists(), 1);
    assert_eq!(
        source.published().len(),
        published,
        "an unchanged relist published a snapshot"
    );

    // Still live.
    api.apply(Res::Services, service("default", "api", 81));
    source
        .wait_for("Service api", |s| {
            services(s).contains(&"default/api".to_string())
        })
        .await;
    assert_eq!(source.published().len(), published + 1);
    assert_no_unexpected_requests(&api);
}

/// Connections reset at accept, then lists failing with 500: the source keeps retrying, with
/// the backoff between attempts, publishes nothing meanwhile and recovers without returning.
#[tokio::test]
async fn api_errors_are_retried_until_the_source_recovers() {
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.1"),
    );
    api.reset_connections(true);
    api.fail_next_lists(Res::Services, 3);
    let mut source = start(&api, None);

    api.wait_for_resets(4).await;
    assert!(source.current().is_none());
    assert!(!source.task.is_finished());
    api.reset_connections(false);

    let first = source.wait_for("the first snapshot", |_| true).await;
    assert_eq!(services(&first), ["default/web"]);
    assert_eq!(slices(&first), ["default/web-1"]);

    let lists: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.is_list_of(Res::Services))
        .collect();
    assert_eq!(lists.len(), 4, "three failed lists and one that worked");
    for pair in lists.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= BACKOFF, "retried after {gap:?}");
    }
    assert!(
        source.stats.watch_errors() >= 4 + 3,
        "{}",
        source.stats.watch_errors()
    );
    assert!(!source.task.is_finished());

    // And it is watching.
    api.wait_for_request("the Service watch", 0, |r| r.is_watch_of(Res::Services))
        .await;
    api.apply(Res::Services, service("default", "api", 81));
    source
        .wait_for("Service api", |s| {
            services(s).contains(&"default/api".to_string())
        })
        .await;
    assert_no_unexpected_requests(&api);
}

/// With a node name, the Node (only that one) is watched and its InternalIP and ExternalIP
/// addresses published; snapshots do not wait for it.
#[tokio::test]
async fn node_addresses_follow_the_node_object() {
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.1"),
    );
    api.apply(Res::Nodes, node("node-b", &[("InternalIP", "10.0.0.6")]));
    api.hold_lists(Res::Nodes);
    let mut source = start(&api, Some("node-a"));

    // Published while the Node list hangs.
    let first = source.wait_for("the first snapshot", |_| true).await;
    assert_eq!(first.node_addresses, None);
    let list = api
        .wait_for_request("the Node list", 0, |r| r.is_list_of(Res::Nodes))
        .await;
    assert_eq!(list.param("fieldSelector"), Some("metadata.name=node-a"));
    api.release_lists(Res::Nodes);
    let watch = api
        .wait_for_request("the Node watch", 0, |r| r.is_watch_of(Res::Nodes))
        .await;
    assert_eq!(watch.param("fieldSelector"), Some("metadata.name=node-a"));
    // The list (without node-a) changed nothing.
    assert_eq!(source.current().unwrap().node_addresses, None);
    assert_eq!(source.published().len(), 1);

    api.apply(
        Res::Nodes,
        node(
            "node-a",
            &[
                ("Hostname", "node-a"),
                ("InternalIP", "10.0.0.5"),
                ("InternalIP", "fd00::5"),
                ("ExternalIP", "203.0.113.5"),
            ],
        ),
    );
    let known = source
        .wait_for("node-a's addresses", |s| s.node_addresses.is_some())
        .await;
    assert_eq!(
        known.node_addresses.as_deref(),
        Some(ips(&["10.0.0.5", "fd00::5", "203.0.113.5"]).as_slice())
    );
    assert_eq!(services(&known), ["default/web"]);

    api.apply(Res::Nodes, node("node-b", &[("InternalIP", "10.0.0.16")]));
    api.apply(Res::Nodes, node("node-a", &[("InternalIP", "10.0.0.7")]));
    let changed = source
        .wait_for("node-a's new address", |s| {
            s.node_addresses.as_deref()
                != Some(ips(&["10.0.0.5", "fd00::5", "203.0.113.5"]).as_slice())
        })
        .await;
    assert_eq!(changed.node_addresses, Some(ips(&["10.0.0.7"])));

    assert_eq!(changed.node_eligible, Some(true));
    api.delete(Res::Nodes, "", "node-a");
    let gone = source
        .wait_for("node-a gone", |s| s.node_addresses.is_none())
        .await;
    // A deleted Node fails the node's health check, as kube-proxy's does.
    assert_eq!(gone.node_eligible, Some(false));
    assert!(source.published().iter().all(|s| {
        s.node_addresses.as_ref().is_none_or(|a| {
            !a.contains(&"10.0.0.6".parse().unwrap()) && !a.contains(&"10.0.0.16".parse().unwrap())
        })
    }));
    assert_no_unexpected_requests(&api);
}

/// Services as the API server writes them on a dual-stack cluster (`ipFamilies`,
/// `ipFamilyPolicy`, `clusterIPs`) and EndpointSlices of both address types reach the desired
/// state by family: a dual-stack Service gets frontends of both families, each with its own
/// family's endpoints, and an IPv6-only Service IPv6 ones only.
#[tokio::test]
async fn services_of_both_families_reach_the_desired_state_by_family() {
    let api = FakeApi::start().await;
    let with_families = |name: &str, port: u16, families: &[&str], cluster_ips: &[&str]| {
        let mut svc = service("default", name, port);
        svc["spec"]["ipFamilies"] = json!(families);
        svc["spec"]["ipFamilyPolicy"] = json!(if families.len() == 2 {
            "RequireDualStack"
        } else {
            "SingleStack"
        });
        svc["spec"]["clusterIP"] = json!(cluster_ips[0]);
        svc["spec"]["clusterIPs"] = json!(cluster_ips);
        svc
    };
    api.apply(
        Res::Services,
        with_families(
            "dual",
            80,
            &["IPv6", "IPv4"],
            &["fd00:96::10", "10.96.0.10"],
        ),
    );
    api.apply(
        Res::Services,
        with_families("v6", 81, &["IPv6"], &["fd00:96::11"]),
    );
    api.apply(
        Res::EndpointSlices,
        slice("default", "dual-v4", "dual", "10.1.0.1"),
    );
    for (name, service, ip) in [
        ("dual-v6", "dual", "fd00:1::1"),
        ("v6-v6", "v6", "fd00:1::2"),
    ] {
        let mut v6 = slice("default", name, service, ip);
        v6["addressType"] = json!("IPv6");
        api.apply(Res::EndpointSlices, v6);
    }
    let mut source = start(&api, None);
    let snapshot = source.wait_for("the first snapshot", |_| true).await;
    let services: Vec<Service> = snapshot.services.iter().map(|s| (**s).clone()).collect();
    let slices: Vec<_> = snapshot
        .endpoint_slices
        .iter()
        .map(|s| (**s).clone())
        .collect();
    let node = nodeport_agent::desired::NodeContext {
        node_name: "node-a".into(),
        node_addresses: vec!["198.18.0.1".parse().unwrap()],
        node_addresses_v6: vec!["fd00:18::1".parse().unwrap()],
        ..Default::default()
    };
    let desired = nodeport_agent::desired::desired_state(&services, &slices, &node);
    let view = |frontends: Vec<String>, backends: Vec<String>| (frontends, backends);
    let key = |name: &str| nodeport_agent::model::ServicePortKey {
        namespace: "default".into(),
        name: name.into(),
        port_name: "".into(),
        protocol: nodeport_agent::model::Protocol::Tcp,
    };
    let v4 = &desired.services[&key("dual")];
    assert_eq!(
        view(
            v4.frontends.iter().map(|f| f.addr.to_string()).collect(),
            v4.backends.keys().map(ToString::to_string).collect()
        ),
        (
            vec!["198.18.0.1:30080".into()],
            vec!["10.1.0.1:8080".into()]
        )
    );
    for (name, backend, node_port) in [
        ("dual", "[fd00:1::1]:8080", 30080),
        ("v6", "[fd00:1::2]:8080", 30081),
    ] {
        let v6 = &desired.services_v6[&key(name)];
        assert_eq!(
            view(
                v6.frontends.iter().map(|f| f.addr.to_string()).collect(),
                v6.backends.keys().map(ToString::to_string).collect()
            ),
            (
                vec![format!("[fd00:18::1]:{node_port}")],
                vec![backend.to_owned()]
            ),
            "{name}"
        );
    }
    assert!(
        !desired.services.contains_key(&key("v6")),
        "an IPv6-only Service has no IPv4 frontend"
    );
    assert_no_unexpected_requests(&api);
}

/// The node's zone label is published with the snapshot and follows the Node (topology hints
/// are matched against it); a change to another label publishes nothing.
#[tokio::test]
async fn the_node_zone_follows_its_label() {
    let labelled = |zone: Option<&str>, os: &str| {
        let mut node = node("node-a", &[("InternalIP", "10.0.0.5")]);
        let mut labels = json!({"kubernetes.io/os": os});
        if let Some(zone) = zone {
            labels["topology.kubernetes.io/zone"] = json!(zone);
        }
        node["metadata"]["labels"] = labels;
        node
    };
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.1"),
    );
    api.apply(Res::Nodes, labelled(Some("zone-a"), "linux"));
    let mut source = start(&api, Some("node-a"));
    let first = source
        .wait_for("node-a's zone", |s| s.node_zone.is_some())
        .await;
    assert_eq!(first.node_zone.as_deref(), Some("zone-a"));
    let published = source.published().len();

    // Another label, then the zone: only the zone publishes (the Node's events are in order).
    api.apply(Res::Nodes, labelled(Some("zone-a"), "windows"));
    api.apply(Res::Nodes, labelled(Some("zone-b"), "windows"));
    let moved = source
        .wait_for("zone-b", |s| s.node_zone.as_deref() == Some("zone-b"))
        .await;
    assert_eq!(source.published().len(), published + 1);
    assert!(Arc::ptr_eq(&first.services[0], &moved.services[0]));

    // An empty label is no zone, as for kube-proxy.
    api.apply(Res::Nodes, labelled(Some(""), "windows"));
    source
        .wait_for("no zone", |s| {
            s.node_zone.is_none() && s.node_addresses.is_some()
        })
        .await;
    api.apply(Res::Nodes, labelled(Some("zone-c"), "windows"));
    source
        .wait_for("zone-c", |s| s.node_zone.as_deref() == Some("zone-c"))
        .await;
    api.apply(Res::Nodes, labelled(None, "windows"));
    source
        .wait_for("the label removed", |s| s.node_zone.is_none())
        .await;
    assert_no_unexpected_requests(&api);
}

/// `run` returns `Ok` once the receiver is dropped, after the initial sync.
#[tokio::test]
async fn returns_ok_when_the_receiver_is_dropped() {
    let api = FakeApi::start().await;
    api.apply(Res::Services, service("default", "web", 80));
    api.apply(
        Res::EndpointSlices,
        slice("default", "web-1", "web", "10.1.0.1"),
    );
    let mut source = start(&api, Some("node-a"));
    source.wait_for("the first snapshot", |_| true).await;
    api.wait_for_request("the Service watch", 0, |r| r.is_watch_of(Res::Services))
        .await;
    drop(source.rx);
    let result = guard("the source to stop", source.task).await.unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// ... and before it, while a list hangs.
#[tokio::test]
async fn returns_ok_when_the_receiver_is_dropped_before_the_initial_sync() {
    let api = FakeApi::start().await;
    api.hold_lists(Res::Services);
    let source = start(&api, None);
    api.wait_for_request("the Service list", 0, |r| r.is_list_of(Res::Services))
        .await;
    drop(source.rx);
    let result = guard("the source to stop", source.task).await.unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(source.published.lock().unwrap().is_empty());
}

/// A node name that would change the meaning of the field selector is refused up front.
#[tokio::test]
async fn an_invalid_node_name_is_an_error() {
    let api = FakeApi::start().await;
    let source = start(&api, Some("node-a,metadata.name=node-b"));
    let result = guard("the source to stop", source.task).await.unwrap();
    assert!(
        matches!(result, Err(KubeSourceError::InvalidNodeName(_))),
        "{result:?}"
    );
    assert!(api.requests().is_empty());
}

/// The fake itself: with kube-rs's paginated lists (the watcher's default, though not the
/// source's), pages chain through `continue` tokens and the watcher sees every object.
#[tokio::test]
async fn the_fake_api_paginates_lists_for_the_kube_watcher() {
    use futures::StreamExt as _;
    use kube::runtime::watcher::{self, Event};

    let api = FakeApi::start().await;
    for i in 0..5 {
        api.apply(Res::Services, service("default", &format!("s{i}"), 80 + i));
    }
    let services: kube::Api<Service> = kube::Api::all(api.client());
    let mut events = std::pin::pin!(watcher::watcher(
        services,
        watcher::Config::default().page_size(2)
    ));
    let mut listed = Vec::new();
    loop {
        match guard("a watcher event", events.next()).await {
            Some(Ok(Event::Init)) => {}
            Some(Ok(Event::InitApply(service))) => listed.push(service.name_any()),
            Some(Ok(Event::InitDone)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(listed, ["s0", "s1", "s2", "s3", "s4"]);
    let lists: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.is_list_of(Res::Services))
        .collect();
    assert_eq!(lists.len(), 3);
    assert!(lists.iter().all(|r| r.param("limit") == Some("2")));
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some() && lists[2].param("continue").is_some());
}
