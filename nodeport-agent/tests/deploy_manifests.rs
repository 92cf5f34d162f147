//! deploy/*.yaml checked against the agent it deploys:
//!
//! - every document parses with the k8s-openapi types the agent itself uses, and nothing in it
//!   is unknown to them (a misspelt or misplaced field would be silently ignored by a lenient
//!   parse, and by the API server's non-strict decoding);
//! - the DaemonSet's invariants, read through the agent's own definitions: its container
//!   arguments parse with the agent's `run` flags, the probes and ports follow those flags,
//!   NODE_NAME is the variable the flag reads, the capabilities are those privileges.rs requires;
//! - the ClusterRole allows every request the agent makes (the Kubernetes source of `run` and
//!   the cluster path of `ports`, both against the fake API server, which records every request)
//!   and grants nothing beyond get/list/watch on those resources, and creating Events.

#[expect(
    dead_code,
    reason = "the fake API's fault injection serves kube_source.rs; here it only records requests"
)]
mod fake_api;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Stdio,
};

use clap::{Args as _, Parser};
use fake_api::{FakeApi, Recorded, Res, guard};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use nodeport_agent::{
    config::RunArgs, health::DEFAULT_HEALTHZ_PORT, privileges, refusals::ServiceEvents, source,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every deploy/*.yaml, as JSON, with where it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|entry| entry.expect("readable").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (index, document) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("deploy/{name} document {index}: {e}"));
            // A document of comments only.
            if !value.is_null() {
                out.push((format!("deploy/{name} document {index}"), value));
            }
        }
    }
    out
}

/// Where `original` has something `reparsed` does not: fields the type does not know (dropped
/// by the parse) or values it reads differently.
fn lost(original: &Value, reparsed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, reparsed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => lost(value, other, &here, out),
                    None => out.push(format!("{here} (unknown field)")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} read as {b}")),
    }
}

/// Parses a document strictly: the field path of a type error, and a failure for anything the
/// type does not keep.
fn strict<T: DeserializeOwned + Serialize>(origin: &str, value: &Value) -> T {
    let object: T = serde_path_to_error::deserialize(value.clone())
        .unwrap_or_else(|e| panic!("{origin}: {} at {}", e.inner(), e.path()));
    let reparsed = serde_json::to_value(&object).unwrap();
    let mut differences = Vec::new();
    lost(value, &reparsed, "", &mut differences);
    assert!(
        differences.is_empty(),
        "{origin}: not understood by k8s-openapi's {}: {differences:#?}",
        std::any::type_name::<T>()
    );
    object
}

#[derive(Default)]
struct Manifests {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

impl Manifests {
    fn load() -> Self {
        let mut m = Manifests::default();
        for (origin, value) in documents() {
            let kind = (value["apiVersion"].as_str(), value["kind"].as_str());
            match kind {
                (Some("apps/v1"), Some("DaemonSet")) => {
                    m.daemon_sets.push(strict(&origin, &value));
                }
                (Some("v1"), Some("ServiceAccount")) => {
                    m.service_accounts.push(strict(&origin, &value));
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                    m.cluster_roles.push(strict(&origin, &value));
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                    m.bindings.push(strict(&origin, &value));
                }
                other => panic!(
                    "{origin}: {other:?} is not a kind these tests know; teach them before \
                     shipping it"
                ),
            }
        }
        m
    }

    fn one<'a, T>(items: &'a [T], kind: &str) -> &'a T {
        assert_eq!(items.len(), 1, "expected exactly one {kind} in deploy/");
        &items[0]
    }

    fn daemon_set(&self) -> &DaemonSet {
        Self::one(&self.daemon_sets, "DaemonSet")
    }
    fn service_account(&self) -> &ServiceAccount {
        Self::one(&self.service_accounts, "ServiceAccount")
    }
    fn cluster_role(&self) -> &ClusterRole {
        Self::one(&self.cluster_roles, "ClusterRole")
    }
    fn binding(&self) -> &ClusterRoleBinding {
        Self::one(&self.bindings, "ClusterRoleBinding")
    }
}

/// `nodeport-agent run ARGS` as the agent parses it.
#[derive(Parser)]
#[command(name = "nodeport-agent")]
struct AgentCli {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(clap::Subcommand)]
enum AgentCommand {
    Run(RunArgs),
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "one container: the agent");
    &pod.containers[0]
}

fn run_args(container: &Container) -> RunArgs {
    assert_eq!(
        container.command, None,
        "the image's entrypoint is the agent; the manifest passes arguments only"
    );
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let cli = AgentCli::try_parse_from(std::iter::once("nodeport-agent".to_owned()).chain(args))
        .unwrap_or_else(|e| panic!("the DaemonSet's args are not valid agent flags: {e}"));
    let AgentCommand::Run(run) = cli.command;
    run
}

/// The port a probe or annotation names, resolved through the container's named ports.
fn port_number(container: &Container, port: &IntOrString) -> u16 {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).unwrap(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| u16::try_from(p.container_port).unwrap())
            .unwrap_or_else(|| panic!("no container port named {name}")),
    }
}

#[test]
fn every_document_parses_with_the_agents_types_and_nothing_is_unknown() {
    let m = Manifests::load();
    m.daemon_set();
    m.service_account();
    m.cluster_role();
    m.binding();
}

#[test]
fn the_daemon_set_runs_the_agent_with_host_network_node_name_and_probes_from_its_flags() {
    let m = Manifests::load();
    let ds = m.daemon_set();
    let spec = &ds.spec;
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "XDP attaches to the node's interfaces, health-check node ports bind on its addresses"
    );
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    // One agent per node at any time, also during a rollout: two would both write the pins.
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));
    let template_labels = spec.template.metadata.as_ref().unwrap().labels.clone();
    assert_eq!(
        spec.selector.match_labels.as_ref(),
        template_labels.as_ref(),
        "the selector must select the pods"
    );

    let container = agent_container(ds);
    let args = run_args(container);

    // NODE_NAME from the downward API, under the name the --node-name flag reads.
    let node_name_env = RunArgs::augment_args(clap::Command::new("run"))
        .get_arguments()
        .find(|a| a.get_id() == "node_name")
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .expect("--node-name reads an environment variable");
    let env = container.env.as_ref().expect("env");
    let node_name = env
        .iter()
        .find(|e| e.name == node_name_env)
        .unwrap_or_else(|| panic!("no {node_name_env} in the container's env"));
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME comes from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    assert!(
        !container
            .args
            .iter()
            .flatten()
            .any(|a| a.starts_with("--node-name")),
        "the node name comes from the env, not --node-name"
    );
    assert_eq!(
        args.manifests, None,
        "a cluster deployment reads the API server"
    );

    // Readiness on /readyz (ready after the first sync) and liveness on /livez (the loop is
    // alive), on the agent's node health server, which must not be kube-proxy's port (it runs
    // next to kube-proxy). /healthz is for load balancers.
    let healthz = args
        .healthz_bind_address
        .0
        .expect("the node health server is on: the probes need it");
    assert_ne!(
        healthz.port(),
        DEFAULT_HEALTHZ_PORT,
        "kube-proxy holds {DEFAULT_HEALTHZ_PORT}; the agent would stop at start"
    );
    assert!(
        healthz.ip().is_unspecified(),
        "the kubelet probes the pod's address, the node's with hostNetwork: bind {healthz} to \
         0.0.0.0"
    );
    for (probe, path) in [
        (&container.readiness_probe, "/readyz"),
        (&container.liveness_probe, "/livez"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(port_number(container, &get.port), healthz.port(), "{path}");
        assert!(
            get.host.is_none(),
            "hostNetwork: the kubelet probes the node"
        );
    }

    // Declared ports and the scrape annotations follow the flags.
    let declared: BTreeMap<&str, u16> = container
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.as_deref().unwrap_or(""),
                u16::try_from(p.container_port).unwrap(),
            )
        })
        .collect();
    let metrics = args.metrics_bind_address.0.expect("metrics on");
    assert!(
        metrics.ip().is_unspecified(),
        "Prometheus scrapes the pod's address (the annotations say so): bind {metrics} to \
         0.0.0.0, whatever the agent's default"
    );
    assert_eq!(declared.get("healthz"), Some(&healthz.port()));
    assert_eq!(declared.get("metrics"), Some(&metrics.port()));
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&metrics.port().to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
}

#[test]
fn the_daemon_set_mounts_the_hosts_bpffs_and_adds_exactly_the_required_capabilities() {
    let m = Manifests::load();
    let ds = m.daemon_set();
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let container = agent_container(ds);
    let args = run_args(container);

    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    let privileged = security.privileged == Some(true);
    assert!(!privileged, "capabilities, not privileged: true");

    // The pin directory is on a mount of the host's /sys/fs/bpf, at the same path, so the
    // pins outlive the container and `nodeport-agent detach` on the host finds them.
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|vm| args.bpffs_dir.starts_with(&vm.mount_path))
        .max_by_key(|vm| vm.mount_path.len())
        .unwrap_or_else(|| panic!("no volume mount holds {}", args.bpffs_dir.display()));
    assert_eq!(mount.mount_path, "/sys/fs/bpf");
    assert_ne!(mount.read_only, Some(true), "the agent pins there");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    let host_path = volume.host_path.as_ref().expect("a hostPath volume");
    assert_eq!(host_path.path, "/sys/fs/bpf");
    assert_eq!(
        host_path.type_.as_deref(),
        Some("Directory"),
        "never create /sys/fs/bpf on the host: the kernel does"
    );
    // Bidirectional is refused by the API server for unprivileged containers; HostToContainer
    // lets a bpffs the host mounts later appear in the container.
    assert_eq!(
        mount.mount_propagation.as_deref(),
        Some(if privileged {
            "Bidirectional"
        } else {
            "HostToContainer"
        })
    );

    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        capabilities.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "drop everything the runtime grants by default"
    );
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let required: BTreeSet<&str> = privileges::REQUIRED
        .iter()
        .map(|(cap, _)| cap.kubernetes_name())
        .collect();
    assert_eq!(
        added, required,
        "the capabilities the agent checks for at start (privileges::REQUIRED)"
    );
    assert_eq!(security.allow_privilege_escalation, Some(false));
    // The runtimes' default profiles refuse what the agent does: some seccomp defaults allow
    // bpf(2) only with CAP_SYS_ADMIN, the default AppArmor profile denies writes under /sys/fs.
    assert_eq!(
        security.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined")
    );
    assert_eq!(
        security
            .app_armor_profile
            .as_ref()
            .map(|p| p.type_.as_str()),
        Some("Unconfined")
    );
}

#[test]
fn the_binding_gives_the_cluster_role_to_the_daemon_sets_service_account() {
    let m = Manifests::load();
    let ds = m.daemon_set();
    let sa = m.service_account();
    let binding = m.binding();
    let ds_namespace = ds.metadata.namespace.as_deref().expect("a namespace");
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(sa.metadata.namespace.as_deref(), Some(ds_namespace));
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        m.cluster_role().metadata.name.as_ref()
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "the agent's service account only");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(ds_namespace));
}

/// What RBAC authorizes a request as (the API server's request info).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Authorized {
    Resource {
        verb: &'static str,
        group: String,
        resource: String,
    },
    NonResource {
        path: String,
    },
}

fn authorized(request: &Recorded) -> Authorized {
    let path = request.path.trim_start_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => {
            return Authorized::NonResource {
                path: request.path.clone(),
            };
        }
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, subresource, ..] => (format!("{resource}/{subresource}"), true),
        [] => unreachable!("checked above"),
    };
    let watch = request.param("watch") == Some("true");
    let verb = match (request.method.as_str(), named, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, false) => "get",
        ("GET", false, false) => "list",
        ("POST", ..) => "create",
        ("PUT", ..) => "update",
        ("PATCH", ..) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        (method, ..) => panic!("unexpected method {method} for {}", request.path),
    };
    Authorized::Resource {
        verb,
        group: group.to_owned(),
        resource,
    }
}

fn allows(role: &ClusterRole, request: &Authorized) -> bool {
    let rules = role.rules.as_deref().unwrap_or_default();
    let has = |list: Option<&Vec<String>>, item: &str| {
        list.is_some_and(|l| l.iter().any(|x| x == item || x == "*"))
    };
    rules.iter().any(|rule| match request {
        Authorized::Resource {
            verb,
            group,
            resource,
        } => {
            has(rule.api_groups.as_ref(), group)
                && has(rule.resources.as_ref(), resource)
                && has(Some(&rule.verbs), verb)
                && rule.resource_names.as_ref().is_none_or(Vec::is_empty)
        }
        Authorized::NonResource { path } => has(rule.non_resource_urls.as_ref(), path),
    })
}

/// Every request the agent makes to the API server: the Kubernetes source of `run` (with a
/// node name, as in the DaemonSet) until all its watches are open, then `ports` against the
/// same server.
async fn agent_requests() -> Vec<Recorded> {
    let api = FakeApi::start().await;
    api.apply(
        Res::Nodes,
        json!({"metadata": {"name": "node-1"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "198.18.0.1"}]}}),
    );
    api.apply(
        Res::Services,
        json!({"metadata": {"namespace": "default", "name": "web"}, "spec": {
            "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}}),
    );
    api.apply(
        Res::EndpointSlices,
        json!({"metadata": {"namespace": "default", "name": "web-1",
            "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["198.18.1.10"]}],
            "ports": [{"port": 8080, "protocol": "TCP"}]}),
    );

    let (tx, mut rx) = source::channel();
    let config = source::kube::KubeSourceConfig {
        node_name: Some("node-1".to_owned()),
        ..Default::default()
    };
    let task = tokio::spawn(source::kube::run(api.client(), config, tx));
    guard(
        "the source's first snapshot",
        rx.wait_for(|snapshot| snapshot.is_some()),
    )
    .await
    .expect("the source runs");
    for res in [Res::Services, Res::EndpointSlices, Res::Nodes] {
        api.wait_for_request("a watch", 0, |r| r.is_watch_of(res))
            .await;
    }
    // The Event on a Service whose port the datapath refuses (refusals::ServiceEvents).
    let snapshot = rx.borrow().clone().expect("a snapshot");
    let events = ServiceEvents::new(api.client(), "node-1");
    let key = nodeport_agent::model::ServicePortKey {
        namespace: "default".into(),
        name: "web".into(),
        port_name: "".into(),
        protocol: nodeport_agent::model::Protocol::Tcp,
    };
    guard(
        "the Event",
        events.publish(&snapshot.services[0], &key, Some("the map is full")),
    )
    .await
    .unwrap();
    assert_eq!(api.events().len(), 1, "the Event was created");
    task.abort();

    let kubeconfig = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "deploy-manifests-{}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: \
             fake, user: agent}}\ncurrent-context: fake\n",
            api.url()
        ),
    )
    .unwrap();
    // tokio's Command: the fake server answers on this runtime while the child runs.
    let output = guard(
        "nodeport-agent ports",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_nodeport-agent"))
            .args(["ports", "--local-port-range", "none", "--output", "json"])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    let _ = std::fs::remove_file(&kubeconfig);
    assert!(
        output.status.success(),
        "ports against the fake API: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("30080"),
        "ports read the Service from the fake API"
    );
    api.requests()
}

#[tokio::test]
async fn the_cluster_role_allows_every_request_the_agent_makes_and_nothing_more() {
    let m = Manifests::load();
    let role = m.cluster_role();
    let requests = agent_requests().await;
    let made: BTreeSet<Authorized> = requests.iter().map(authorized).collect();

    // Not vacuous: list and watch of the three kinds, from both commands.
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
    ] {
        for verb in ["list", "watch"] {
            let request = Authorized::Resource {
                verb,
                group: group.to_owned(),
                resource: resource.to_owned(),
            };
            assert!(made.contains(&request), "no {request:?} among {made:#?}");
        }
    }
    let create_event = Authorized::Resource {
        verb: "create",
        group: "events.k8s.io".to_owned(),
        resource: "events".to_owned(),
    };
    assert!(made.contains(&create_event), "no Event among {made:#?}");

    let denied: Vec<&Authorized> = made.iter().filter(|r| !allows(role, r)).collect();
    assert!(
        denied.is_empty(),
        "the ClusterRole does not allow requests the agent makes: {denied:#?}"
    );

    // Nothing beyond get/list/watch on the resources the agent reads, and creating (patching
    // a repeat of) Events.
    let read = ["get", "list", "watch"];
    let events = ("events.k8s.io".to_owned(), "events".to_owned());
    let used: BTreeSet<(String, String)> = made
        .iter()
        .filter_map(|r| match r {
            Authorized::Resource {
                group, resource, ..
            } => Some((group.clone(), resource.clone())),
            Authorized::NonResource { .. } => None,
        })
        .collect();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(
            rule.non_resource_urls.as_ref().is_none_or(Vec::is_empty),
            "no non-resource URLs: {rule:?}"
        );
        let on_events = rule.api_groups.iter().flatten().all(|g| *g == events.0)
            && rule.resources.iter().flatten().all(|r| *r == events.1);
        for verb in &rule.verbs {
            let allowed = read.contains(&verb.as_str())
                || (on_events && ["create", "patch"].contains(&verb.as_str()));
            assert!(allowed, "verb {verb:?} in {rule:?}");
        }
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                assert!(
                    used.contains(&(group.clone(), resource.clone())),
                    "the ClusterRole grants {resource:?} in group {group:?}, which the agent \
                     never requests (a wildcard, a typo, or a leftover): {rule:?}"
                );
            }
        }
    }
}
