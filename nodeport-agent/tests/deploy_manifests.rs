//! deploy/ checked against the agent it deploys. Two sources: deploy/nodeport.yaml (the
//! default installation rendered, checked without kubectl) and every overlay of
//! deploy/overlays rendered by `kubectl kustomize` (the tests marked as needing kubectl, which
//! `cargo xtask test` provides in NODEPORT_KUBECTL); the same checks run on each:
//!
//! - every document parses with the k8s-openapi types the agent itself uses, and nothing in it
//!   is unknown to them (a misspelt or misplaced field would be silently ignored by a lenient
//!   parse, and by the API server's non-strict decoding);
//! - the DaemonSet's invariants, read through the agent's own definitions: its container
//!   arguments and the ConfigMap's config.yaml they point at parse with the agent's `run` flags
//!   and its `--config` parser (config::file_args), the ConfigMap is mounted as a directory
//!   where `--config` points, the probes and ports follow those flags, NODE_NAME is the
//!   variable the flag reads, the capabilities are those privileges.rs requires; the image,
//!   the node selector and the termination message policy;
//! - each overlay is what its name says, deploy/nodeport.yaml is the default overlay rendered;
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
    sync::atomic::{AtomicUsize, Ordering},
};

use clap::{Args as _, CommandFactory as _, FromArgMatches as _, Parser};
use fake_api::{FakeApi, Recorded, Res, guard};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use nodeport_agent::{
    config::{self, RunArgs},
    health::DEFAULT_HEALTHZ_PORT,
    privileges,
    refusals::ServiceEvents,
    source,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The documents of a multi-document YAML text, as JSON, each with where it came from.
fn parse_documents(origin: &str, text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(document)
            .unwrap_or_else(|e| panic!("{origin} document {index}: {e}"));
        // A document of comments only.
        if !value.is_null() {
            out.push((format!("{origin} document {index}"), value));
        }
    }
    out
}

/// Every document of every deploy/*.yaml (deploy/nodeport.yaml).
fn deployed_documents() -> Vec<(String, Value)> {
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
        out.extend(parse_documents(&format!("deploy/{name}"), &text));
    }
    out
}

/// kubectl: NODEPORT_KUBECTL (`cargo xtask test` sets it), else `kubectl` on the PATH.
fn kubectl() -> PathBuf {
    std::env::var_os("NODEPORT_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubectl"))
}

/// `kubectl kustomize DIR`, DIR relative to deploy/.
fn kustomize(dir: &str) -> Vec<(String, Value)> {
    let out = std::process::Command::new(kubectl())
        .arg("kustomize")
        .arg(deploy_dir().join(dir))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e}; these tests render deploy/ with `kubectl kustomize` (kubectl \
                 1.21+): `cargo xtask test` finds it",
                kubectl().display()
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_documents(
        &format!("kubectl kustomize deploy/{dir}"),
        &String::from_utf8(out.stdout).unwrap(),
    )
}

/// The overlays under deploy/overlays, by directory name.
fn overlays() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(deploy_dir().join("overlays"))
        .expect("deploy/overlays exists")
        .map(|e| e.expect("readable"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
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
    /// Where they came from, for messages.
    origin: String,
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    /// The Prometheus Operator's kinds (the monitoring overlay), which k8s-openapi has no
    /// types for; deploy/monitoring's own tests check them (tests/tests/monitoring.rs).
    monitoring: Vec<Value>,
}

impl Manifests {
    /// deploy/nodeport.yaml.
    fn deployed() -> Self {
        Self::from_documents("deploy/*.yaml", deployed_documents())
    }

    fn from_documents(origin: &str, documents: Vec<(String, Value)>) -> Self {
        let mut m = Manifests {
            origin: origin.to_owned(),
            ..Manifests::default()
        };
        for (origin, value) in documents {
            let kind = (value["apiVersion"].as_str(), value["kind"].as_str());
            match kind {
                (Some("apps/v1"), Some("DaemonSet")) => {
                    m.daemon_sets.push(strict(&origin, &value));
                }
                (Some("v1"), Some("ServiceAccount")) => {
                    m.service_accounts.push(strict(&origin, &value));
                }
                (Some("v1"), Some("ConfigMap")) => {
                    m.config_maps.push(strict(&origin, &value));
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                    m.cluster_roles.push(strict(&origin, &value));
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                    m.bindings.push(strict(&origin, &value));
                }
                (Some("monitoring.coreos.com/v1"), Some("PodMonitor" | "PrometheusRule")) => {
                    m.monitoring.push(value);
                }
                other => panic!(
                    "{origin}: {other:?} is not a kind these tests know; teach them before \
                     shipping it"
                ),
            }
        }
        m
    }

    fn one<'a, T>(&self, items: &'a [T], kind: &str) -> &'a T {
        assert_eq!(
            items.len(),
            1,
            "expected exactly one {kind} in {}",
            self.origin
        );
        &items[0]
    }

    fn daemon_set(&self) -> &DaemonSet {
        self.one(&self.daemon_sets, "DaemonSet")
    }
    fn service_account(&self) -> &ServiceAccount {
        self.one(&self.service_accounts, "ServiceAccount")
    }
    fn cluster_role(&self) -> &ClusterRole {
        self.one(&self.cluster_roles, "ClusterRole")
    }
    fn binding(&self) -> &ClusterRoleBinding {
        self.one(&self.bindings, "ClusterRoleBinding")
    }
    fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
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

/// `run` as clap sees it (what config::file_args matches a file's keys against).
fn run_command() -> clap::Command {
    RunArgs::augment_args(clap::Command::new("run"))
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "one container: the agent");
    &pod.containers[0]
}

/// The file `--config` names, as the container sees it: a key of a ConfigMap mounted as a
/// directory.
struct ConfigFile {
    /// The path in the container (`--config`'s value).
    path: PathBuf,
    /// The directory the ConfigMap is mounted at.
    mount: PathBuf,
    config_map: ConfigMap,
    text: String,
}

impl ConfigFile {
    /// The file's keys and values.
    fn keys(&self) -> BTreeMap<String, Value> {
        serde_norway::from_str::<Option<BTreeMap<String, Value>>>(&self.text)
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
            .unwrap_or_default()
    }
}

/// Resolves `--config` through the container's volume mounts to the ConfigMap key it reads.
fn config_file(m: &Manifests, container: &Container, path: &Path) -> ConfigFile {
    let ds = m.daemon_set();
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|vm| path.starts_with(&vm.mount_path))
        .max_by_key(|vm| vm.mount_path.len())
        .unwrap_or_else(|| panic!("--config {}: no volume mount holds it", path.display()));
    assert_eq!(
        Some(Path::new(&mount.mount_path)),
        path.parent(),
        "--config {}: the ConfigMap is mounted as a directory, its keys the files in it",
        path.display()
    );
    assert_eq!(
        mount.sub_path, None,
        "no subPath: the kubelet does not update a subPath mount when the ConfigMap changes, \
         and the datapath off-switch is read live"
    );
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    let source = volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("--config {}: not on a ConfigMap volume", path.display()));
    assert_eq!(
        source.items, None,
        "every key of the ConfigMap is a file (no items: the off-switch key must be there too)"
    );
    let name = source.name.as_str();
    let config_map = m
        .config_map(name)
        .unwrap_or_else(|| {
            panic!(
                "the ConfigMap {name} the DaemonSet mounts is not in {}",
                m.origin
            )
        })
        .clone();
    assert_eq!(config_map.metadata.namespace, ds.metadata.namespace);
    let key = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(&key))
        .unwrap_or_else(|| {
            panic!(
                "--config {}: the ConfigMap {name} has no key {key}",
                path.display()
            )
        })
        .clone();
    ConfigFile {
        path: path.to_owned(),
        mount: PathBuf::from(&mount.mount_path),
        config_map,
        text,
    }
}

/// A directory of its own under the target's temporary directory, for each call.
fn scratch_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "deploy-manifests-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The container's `run` flags as the agent reads them: its arguments, with the `--config`
/// file they name merged in by the agent's own parser (the command line wins, as in
/// nodeport-agent's main), and that file if there is one.
fn run_config(m: &Manifests, container: &Container) -> (RunArgs, Option<ConfigFile>) {
    assert_eq!(
        container.command, None,
        "the image's entrypoint is the agent; the manifest passes arguments only"
    );
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let argv: Vec<String> = std::iter::once("nodeport-agent".to_owned())
        .chain(args)
        .collect();
    let invalid = |e: clap::Error| -> ! {
        panic!(
            "{}: the DaemonSet's args are not valid agent flags: {e}",
            m.origin
        )
    };
    let matches = AgentCli::command()
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| invalid(e));
    let run = matches.subcommand_matches("run").expect("run");
    let Some(path) = run.get_one::<PathBuf>("config").cloned() else {
        let cli = AgentCli::from_arg_matches(&matches).unwrap_or_else(|e| invalid(e));
        let AgentCommand::Run(run) = cli.command;
        return (run, None);
    };
    let file = config_file(m, container, &path);
    // The file's text where the test can read it, under its own name.
    let copy = scratch_dir().join(path.file_name().unwrap());
    std::fs::write(&copy, &file.text).unwrap();
    let extra = config::file_args(&run_command(), run, &copy).unwrap_or_else(|e| {
        panic!(
            "{}: the ConfigMap {}'s {} is refused by the agent: {e:#}",
            m.origin,
            file.config_map.metadata.name.as_deref().unwrap_or_default(),
            path.display()
        )
    });
    let _ = std::fs::remove_dir_all(copy.parent().unwrap());
    let matches = AgentCli::command()
        .try_get_matches_from(argv.iter().cloned().chain(extra))
        .unwrap_or_else(|e| {
            panic!(
                "{}: a value in {} is not valid for its flag: {e}",
                m.origin,
                path.display()
            )
        });
    let cli = AgentCli::from_arg_matches(&matches).unwrap_or_else(|e| invalid(e));
    let AgentCommand::Run(run) = cli.command;
    (run, Some(file))
}

fn run_args(m: &Manifests, container: &Container) -> RunArgs {
    run_config(m, container).0
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
    check_documents(&Manifests::deployed());
}

fn check_documents(m: &Manifests) {
    m.daemon_set();
    m.service_account();
    m.cluster_role();
    m.binding();
}

#[test]
fn the_daemon_set_runs_the_agent_with_host_network_node_name_and_probes_from_its_flags() {
    check_flags_and_probes(&Manifests::deployed());
}

fn check_flags_and_probes(m: &Manifests) {
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
    let args = run_args(m, container);

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
    check_bpffs_and_capabilities(&Manifests::deployed());
}

fn check_bpffs_and_capabilities(m: &Manifests) {
    let ds = m.daemon_set();
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let container = agent_container(ds);
    let args = run_args(m, container);

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
    check_binding(&Manifests::deployed());
}

fn check_binding(m: &Manifests) {
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

#[test]
fn the_agent_reads_its_flags_from_a_config_map_and_runs_the_versions_image_on_linux_nodes() {
    check_packaging(&Manifests::deployed());
}

/// The flags live in the ConfigMap `nodeport` (key config.yaml), mounted as a directory where
/// `--config` points, beside the datapath off-switch (key `datapath`); the args hold `run
/// --config FILE` and nothing the file could say. The image is `nodeport-agent` at the agent's
/// version; Linux nodes only; a failed start's last log line is the termination message.
fn check_packaging(m: &Manifests) {
    let ds = m.daemon_set();
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let container = agent_container(ds);
    let (args, file) = run_config(m, container);
    let file = file.unwrap_or_else(|| panic!("{}: the agent runs with --config", m.origin));
    assert_eq!(args.config.as_deref(), Some(file.path.as_path()));
    assert_eq!(
        file.config_map.metadata.name.as_deref(),
        Some("nodeport"),
        "the ConfigMap the documented off-switch command patches"
    );
    assert_eq!(file.path, Path::new("/etc/nodeport/config.yaml"));
    // Flags of `run` other than --config belong in the file (the command line would override
    // it silently); global flags such as --log-format may stay.
    let run_flags: BTreeSet<String> = run_command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .filter(|l| l != "config")
        .collect();
    for arg in container.args.iter().flatten() {
        let name = arg
            .trim_start_matches("--")
            .split('=')
            .next()
            .unwrap_or_default();
        assert!(
            !(arg.starts_with("--") && run_flags.contains(name)),
            "{}: {arg} is in the args: the flags of `run` go in the ConfigMap's config.yaml",
            m.origin
        );
    }
    let keys = file.keys();
    assert!(
        keys.contains_key("healthz-bind-address") && keys.contains_key("metrics-bind-address"),
        "{}: config.yaml sets the health and metrics addresses the probes and ports follow: \
         {keys:?}",
        m.origin
    );

    // The off-switch: a key of its own, a file beside config.yaml, "on" as installed.
    let data = file.config_map.data.clone().unwrap_or_default();
    assert_eq!(
        data.get("datapath").map(String::as_str),
        Some("on"),
        "{}: the ConfigMap's datapath key installs the datapath on",
        m.origin
    );
    // config.yaml points the agent's watcher at that file.
    let expected = file.mount.join("datapath");
    assert_eq!(
        keys.get("datapath-switch").and_then(Value::as_str),
        expected.to_str(),
        "{}: config.yaml must set datapath-switch: {}",
        m.origin,
        expected.display()
    );

    // The image: named nodeport-agent, tagged with this agent's version.
    let image = container.image.as_deref().expect("an image");
    let (name, tag) = image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .unwrap_or_else(|| panic!("{}: image {image} has no tag", m.origin));
    assert!(
        name == "nodeport-agent" || name.ends_with("/nodeport-agent"),
        "{}: image {image}: the repository is nodeport-agent",
        m.origin
    );
    assert_eq!(
        tag,
        env!("CARGO_PKG_VERSION"),
        "{}: image {image}: the tag is the agent's version (CHANGELOG.md)",
        m.origin
    );

    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("kubernetes.io/os"))
            .map(String::as_str),
        Some("linux"),
        "{}: the agent is a Linux binary",
        m.origin
    );
    assert_eq!(
        container.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError"),
        "{}: the agent's fatal error is its last log line",
        m.origin
    );
}

/// Every check of a whole installation.
fn check_all(m: &Manifests) {
    check_documents(m);
    check_flags_and_probes(m);
    check_bpffs_and_capabilities(m);
    check_binding(m);
    check_packaging(m);
}

/// Whether `check` fails on these documents changed by `change`.
fn fails(documents: &[(String, Value)], change: impl FnOnce(&mut [(String, Value)])) -> bool {
    let mut changed = documents.to_vec();
    change(&mut changed);
    std::panic::catch_unwind(|| check_all(&Manifests::from_documents("changed", changed))).is_err()
}

/// The document of this kind and name.
fn document<'a>(documents: &'a mut [(String, Value)], kind: &str, name: &str) -> &'a mut Value {
    documents
        .iter_mut()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The checks are real: each of these breakages fails them.
#[test]
fn the_checks_fail_on_a_broken_installation() {
    let documents = deployed_documents();
    std::panic::catch_unwind(|| check_all(&Manifests::from_documents("as is", documents.clone())))
        .expect("the installation as it is passes");
    fn config(documents: &mut [(String, Value)]) -> &mut Value {
        &mut document(documents, "ConfigMap", "nodeport")["data"]["config.yaml"]
    }
    fn container(documents: &mut [(String, Value)]) -> &mut Value {
        &mut document(documents, "DaemonSet", "nodeport")["spec"]["template"]["spec"]["containers"]
            [0]
    }
    type Change = Box<dyn FnOnce(&mut [(String, Value)])>;
    let breakages: Vec<(&str, Change)> = vec![
        (
            "a key the agent does not know in config.yaml",
            Box::new(|d| {
                let text = config(d).as_str().unwrap().to_owned();
                *config(d) = json!(format!("{text}max-service: 10\n"));
            }),
        ),
        (
            "a value of the wrong type in config.yaml",
            Box::new(|d| {
                let text = config(d).as_str().unwrap().to_owned();
                *config(d) = json!(format!("{text}max-services: many\n"));
            }),
        ),
        (
            "the health port in config.yaml not the probes'",
            Box::new(|d| {
                let text = config(d).as_str().unwrap().replace(":10266", ":10267");
                *config(d) = json!(text);
            }),
        ),
        (
            "an argument that is no flag",
            Box::new(|d| {
                container(d)["args"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!("--no-such-flag"));
            }),
        ),
        (
            "the ConfigMap mounted with subPath",
            Box::new(|d| {
                for mount in container(d)["volumeMounts"].as_array_mut().unwrap() {
                    if mount["mountPath"] == "/etc/nodeport" {
                        mount["subPath"] = json!("config.yaml");
                    }
                }
            }),
        ),
        (
            "--config pointing where nothing is mounted",
            Box::new(|d| {
                container(d)["args"][1] = json!("--config=/etc/elsewhere/config.yaml");
            }),
        ),
        (
            "an image of another name",
            Box::new(|d| {
                container(d)["image"] = json!("ghcr.io/example/agent:0.1.0");
            }),
        ),
        (
            "no node selector",
            Box::new(|d| {
                document(d, "DaemonSet", "nodeport")["spec"]["template"]["spec"]
                    .as_object_mut()
                    .unwrap()
                    .remove("nodeSelector");
            }),
        ),
        (
            "the datapath switched off as installed",
            Box::new(|d| {
                document(d, "ConfigMap", "nodeport")["data"]["datapath"] = json!("off");
            }),
        ),
    ];
    for (what, change) in breakages {
        assert!(fails(&documents, change), "the checks pass with {what}");
    }
}

/// Every overlay renders, passes every check, and is what its name says; deploy/nodeport.yaml
/// is the default overlay rendered. A new overlay fails here until it is taught.
#[test]
#[ignore = "needs kubectl 1.21+ (kustomize): run `cargo xtask test`"]
fn every_overlay_renders_and_passes_every_check() {
    let default = kustomize("overlays/next-to-kube-proxy");
    let comparable = |documents: &[(String, Value)]| -> Vec<Value> {
        documents.iter().map(|(_, v)| v.clone()).collect()
    };
    assert_eq!(
        comparable(&deployed_documents()),
        comparable(&default),
        "deploy/nodeport.yaml is not deploy/overlays/next-to-kube-proxy rendered: run \
         `cargo xtask manifests`"
    );
    let base_config = {
        let m = Manifests::from_documents("default", default.clone());
        let (_, file) = run_config(&m, agent_container(m.daemon_set()));
        file.expect("--config").keys()
    };
    let overlays = overlays();
    assert!(overlays.len() >= 3, "{overlays:?}");
    for overlay in overlays {
        let documents = kustomize(&format!("overlays/{overlay}"));
        let m = Manifests::from_documents(&format!("overlay {overlay}"), documents.clone());
        check_all(&m);
        let (args, file) = run_config(&m, agent_container(m.daemon_set()));
        // What is not the base's, with the documents the base renders.
        let extra: Vec<Value> = comparable(&documents)
            .into_iter()
            .filter(|d| !comparable(&default).contains(d))
            .collect();
        match overlay.as_str() {
            "next-to-kube-proxy" => {}
            "monitoring" => {
                // The base plus deploy/monitoring, as that installs alone.
                let mut expected = comparable(&default);
                expected.extend(comparable(&kustomize("monitoring")));
                expected.sort_by_key(Value::to_string);
                let mut got = comparable(&documents);
                got.sort_by_key(Value::to_string);
                assert_eq!(got, expected, "overlay monitoring");
                let kinds: BTreeSet<&str> = m
                    .monitoring
                    .iter()
                    .filter_map(|d| d["kind"].as_str())
                    .collect();
                assert_eq!(kinds, BTreeSet::from(["PodMonitor", "PrometheusRule"]));
                assert!(
                    m.config_map("nodeport-dashboard").is_some(),
                    "the dashboard's ConfigMap"
                );
            }
            "strict-source-ranges" => {
                assert!(args.source_ranges_on_node_ports, "overlay {overlay}");
                let mut keys = file.expect("--config").keys();
                assert_eq!(
                    keys.remove("source-ranges-on-node-ports"),
                    Some(Value::Bool(true))
                );
                assert_eq!(
                    keys, base_config,
                    "overlay {overlay}: config.yaml is the base's plus one key"
                );
                let kinds: Vec<&str> = extra.iter().filter_map(|d| d["kind"].as_str()).collect();
                assert_eq!(
                    kinds,
                    ["ConfigMap"],
                    "overlay {overlay} changes the ConfigMap only"
                );
            }
            other => panic!(
                "deploy/overlays/{other}: an overlay these tests do not know; say here what it \
                 must be"
            ),
        }
        if overlay != "strict-source-ranges" {
            assert!(
                !args.source_ranges_on_node_ports,
                "overlay {overlay}: kube-proxy's semantics"
            );
        }
        if overlay != "monitoring" {
            assert!(m.monitoring.is_empty(), "overlay {overlay}");
        }
    }
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
    let m = Manifests::deployed();
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

/// The image's final stage puts the agent in a directory on its PATH and runs it from there,
/// so `kubectl exec ds/nodeport -- nodeport-agent status` works; and no document tells an
/// operator to run it from where it is not.
#[test]
fn the_image_has_the_agent_on_its_path() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile.lines().collect();
    let last_from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    let stage = &lines[last_from..];
    let instruction = |name: &str| -> Vec<&str> {
        stage
            .iter()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .collect()
    };
    let copies = instruction("COPY");
    assert_eq!(copies.len(), 1, "the binary alone: {copies:?}");
    let installed = Path::new(copies[0].split_whitespace().last().unwrap());
    assert_eq!(installed.file_name().unwrap(), "nodeport-agent");
    let path = instruction("ENV")
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .expect("ENV PATH=... in the final stage (scratch has none)")
        .to_owned();
    assert!(
        path.split(':')
            .any(|dir| Path::new(dir) == installed.parent().unwrap()),
        "{} is not on PATH={path}",
        installed.display()
    );
    let entrypoint = instruction("ENTRYPOINT");
    assert_eq!(
        entrypoint,
        [format!("[\"{}\"]", installed.display())],
        "the entrypoint runs the installed binary"
    );

    let root = deploy_dir().join("..");
    let mut texts = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            texts.push(path);
        }
    }
    for file in texts {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.contains("-- /nodeport-agent"),
                "{}:{}: the image has the agent at {}, on PATH: `-- nodeport-agent ...`",
                file.display(),
                n + 1,
                installed.display()
            );
        }
    }
}
