//! End-to-end: the real binary's `ports` command on fixture manifest directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ports(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nodeport-agent"))
        .arg("ports")
        .args(args)
        // No kubeconfig or cluster is needed with --manifests; make sure none is used.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run nodeport-agent")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn mixed() -> String {
    fixtures().join("ledger/mixed").display().to_string()
}

#[test]
fn table_report_for_a_manifests_directory() {
    let output = ports(&["--manifests", &mixed(), "--local-port-range", "none"]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let table = stdout(&output);
    for expected in [
        "NODE PORT RANGE 30000-32767 (2768 ports)",
        "  static band   30000-30085    86 ports  for hand-picked node ports",
        "  dynamic band  30086-32767  2682 ports  automatic allocation takes these first",
        "  node net.ipv4.ip_local_port_range: not checked",
        "BAND     SIZE  USED  FREE  USE %",
        "static     86     1    85   1.2%",
        "dynamic  2682     4  2678   0.1%",
        "all      2768     5  2763   0.2%",
        "consumers: 3 NodePort, 1 LoadBalancer, 1 HealthCheck; not yet allocated: 0; outside the range: 0",
        "PORT   PROTO    KIND          NAMESPACE/NAME  PORT-NAME        BAND     ALLOCATION",
        "30080  TCP      NodePort      default/web     http             static   likely_manual",
        "30553  TCP+UDP  NodePort      default/dns     dns-tcp,dns-udp  dynamic  unknown",
        "31000  TCP      LoadBalancer  shop/checkout   https            dynamic  unknown",
        "31443  TCP      NodePort      default/web     https            dynamic  unknown",
        "32000  TCP      HealthCheck   shop/checkout   -                dynamic  unknown",
        "FINDINGS: 0 critical, 0 warning, 2 info",
    ] {
        assert!(
            table.lines().any(|line| line == expected),
            "missing {expected:?} in:\n{table}"
        );
    }
    assert!(
        table.contains("[info] health_check_node_port: 1 LoadBalancer Service(s)"),
        "{table}"
    );
    // ClusterIP / ExternalName Services and other kinds are not consumers.
    assert!(
        !table.contains("shop/internal") && !table.contains("shop/legacy"),
        "{table}"
    );
}

#[test]
fn json_report_for_a_manifests_directory() {
    let output = ports(&[
        "--manifests",
        &mixed(),
        "--output",
        "json",
        "--local-port-range",
        "32000-60999",
    ]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("valid JSON");
    assert_eq!(json["range"]["size"], 2768);
    assert_eq!(json["range"]["band_offset"], 86);
    assert_eq!(json["bands"]["static"]["last"], 30085);
    assert_eq!(json["bands"]["dynamic"]["first"], 30086);
    assert_eq!(json["totals"]["all"]["used"], 5);
    assert_eq!(json["totals"]["all"]["free"], 2763);
    assert_eq!(json["totals"]["dynamic"]["used"], 4);
    assert_eq!(
        json["totals"]["consumers_by_kind"]["health_check_node_port"],
        1
    );
    let consumers = json["consumers"].as_array().unwrap();
    let ports: Vec<u64> = consumers
        .iter()
        .map(|c| c["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [30080, 30553, 31000, 31443, 32000]);
    assert_eq!(consumers[2]["kind"], "load_balancer_node_port");
    assert_eq!(consumers[2]["namespace"], "shop");
    assert_eq!(consumers[1]["protocols"], serde_json::json!(["TCP", "UDP"]));
    let kinds: Vec<&str> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "local_port_range_overlap",
            "load_balancer_node_ports_maybe_unneeded",
            "health_check_node_port"
        ]
    );
    assert_eq!(json["findings"][0]["severity"], "warning");
    assert_eq!(
        json["local_port_range"],
        serde_json::json!({"first": 32000, "last": 60999})
    );
}

#[test]
fn other_range_and_fail_on() {
    let dir = fixtures().join("ledger/small-range").display().to_string();
    let args = [
        "--manifests",
        &dir,
        "--service-node-port-range",
        "30000+15",
        "--local-port-range",
        "none",
    ];
    let output = ports(&args);
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("NODE PORT RANGE 30000-30015 (16 ports)"));
    // The only warning is the hand-picked port: --fail-on warning trips, critical does not.
    let with = |threshold: &str| {
        let mut all = args.to_vec();
        all.extend(["--fail-on", threshold]);
        ports(&all).status.code()
    };
    assert_eq!(with("warning"), Some(3));
    assert_eq!(with("critical"), Some(0));
}

#[test]
fn invalid_manifest_fails_naming_file_and_field() {
    let dir = fixtures().join("invalid-manifest");
    let output = ports(&["--manifests", &dir.display().to_string()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "no report on error");
    let err = stderr(&output);
    let expected = format!(
        "{}: document 2 (Service default/web): spec.ports[0].nodePort: invalid type: string \"abc\", \
         expected i32",
        dir.join("web.yaml").display()
    );
    assert!(err.contains(&expected), "want {expected:?} in:\n{err}");
}

#[test]
fn missing_directory_and_bad_range_fail() {
    let output = ports(&["--manifests", "/nonexistent/manifests"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("/nonexistent/manifests: cannot read the manifests directory")
    );
    let output = ports(&[
        "--manifests",
        &mixed(),
        "--service-node-port-range",
        "32767-30000",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("end port cannot be less than start port"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn unreachable_cluster_fails_with_context() {
    // A kubeconfig naming a port nothing listens on: the list fails fast (connection refused).
    let kubeconfig =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("ports-cli-unreachable.kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"https://127.0.0.1:1\"}\nusers:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nodeport-agent"))
        .args(["ports", "--local-port-range", "none"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "stderr: {}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("cannot list Services in all namespaces"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
