//! The binary's command line as an operator meets it: output to a closed pipe, errors (one
//! cause each, JSON with --log-format json), the examples directory with every documented
//! command. `run` and the commands reading pins are tested as root in tests/tests/e2e.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn agent() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nodeport-agent"));
    // No kubeconfig or cluster is used by these commands; make sure none is found.
    command
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG");
    command
}

fn run(args: &[&str]) -> Output {
    agent().args(args).output().expect("run nodeport-agent")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn mixed() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ledger/mixed")
        .display()
        .to_string()
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// No cause said twice: `a: b: b` is what `{:#}` printed for errors that hold their source.
fn assert_one_cause_each(line: &str) {
    let parts: Vec<&str> = line.split(": ").collect();
    for pair in parts.windows(2) {
        assert_ne!(pair[0], pair[1], "a cause repeated in {line:?}");
    }
    for (i, part) in parts.iter().enumerate() {
        assert!(
            part.len() < 12 || !parts[i + 1..].contains(part),
            "{part:?} twice in {line:?}"
        );
    }
}

#[test]
fn a_reader_that_goes_away_is_no_panic() {
    for format in ["table", "json", "yaml", "wide"] {
        let (reader, writer) = std::io::pipe().unwrap();
        // Closed before the agent writes: every write gets EPIPE, as with `| head` having
        // exited.
        drop(reader);
        let output = agent()
            .args([
                "ports",
                "--manifests",
                &mixed(),
                "--local-port-range",
                "none",
                "-o",
                format,
            ])
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&output);
        assert!(!err.contains("panicked"), "-o {format}: {err}");
        assert_eq!(output.status.code(), Some(0), "-o {format}: {err}");
    }
}

#[test]
fn ports_prints_yaml_and_wide() {
    let ports = |format: &str| {
        let output = run(&[
            "ports",
            "--manifests",
            &mixed(),
            "--local-port-range",
            "none",
            "-o",
            format,
        ]);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let yaml: serde_json::Value = serde_norway::from_str(&ports("yaml")).expect("YAML");
    let json: serde_json::Value = serde_json::from_str(&ports("json")).expect("JSON");
    assert_eq!(yaml, json, "the same document");
    let wide = ports("wide");
    assert!(
        wide.lines()
            .any(|l| l.starts_with("PORT ") && l.ends_with("SERVICE-PORT")),
        "{wide}"
    );
    assert!(
        wide.lines()
            .any(|l| l.starts_with("30553") && l.ends_with("53,53")),
        "{wide}"
    );
}

#[test]
fn the_examples_directory_serves_every_documented_command() {
    // `nodeport-agent ports --manifests ./examples` (README, --help).
    let dir = examples().display().to_string();
    let output = run(&["ports", "--manifests", &dir, "--local-port-range", "none"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(String::from_utf8(output.stdout).unwrap().contains("30080"));
    // `nodeport-agent run --manifests ./examples` reads them with the same loader.
    let loaded = nodeport_agent::manifests::load_dir(&examples()).expect("examples load");
    let mut names: Vec<_> = loaded
        .services
        .iter()
        .filter_map(|(_, svc)| svc.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["api", "web"]);
}

#[test]
fn a_fatal_error_is_one_line_with_each_cause_once() {
    let output = run(&["ports", "--manifests", "/nonexistent/dir"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    let line = err.trim_end();
    assert!(
        line.starts_with("error: cannot load the manifests in /nonexistent/dir: "),
        "{line}"
    );
    assert_one_cause_each(line);

    // aya's errors hold their source in their message too.
    let output = run(&["status", "--bpffs-dir", "/nonexistent/pins"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.starts_with("error: no nodeport datapath pinned at /nonexistent/pins: "),
        "{err}"
    );
    assert_one_cause_each(line);
}

#[test]
fn with_json_logs_the_fatal_error_is_json() {
    let output = run(&[
        "--log-format",
        "json",
        "ports",
        "--manifests",
        "/nonexistent/dir",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    let last = lines.last().expect("the error");
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with("cannot load the manifests in /nonexistent/dir: "),
        "{last}"
    );
    assert!(last["timestamp"].is_string());

    // A usage error too (clap's), after the flag or before it.
    for args in [
        &["--log-format", "json", "ports", "--bogus"][..],
        &["ports", "--bogus", "--log-format=json"][..],
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let err = stderr(&output);
        let line: serde_json::Value = serde_json::from_str(err.trim()).expect("one JSON line");
        assert!(
            line["fields"]["message"]
                .as_str()
                .unwrap()
                .contains("unexpected argument '--bogus'"),
            "{line}"
        );
    }
    // Help is help, not an error.
    let output = run(&["--log-format", "json", "ports", "--help"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        String::from_utf8(output.stdout)
            .unwrap()
            .contains("--kubeconfig")
    );
}

#[test]
fn help_says_the_units() {
    let output = run(&["run", "--help"]);
    let help = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "--conntrack-tcp-established-timeout <SECONDS>",
        "--conntrack-size <ENTRIES>",
        "--maglev-table-size <SLOTS>",
        "--kubeconfig <FILE>",
        "--node-name <NAME>",
        "[alias: --hostname-override]",
        "--config <FILE>",
    ] {
        assert!(help.contains(expected), "{expected} not in:\n{help}");
    }
}

/// `--version` prints the workspace version, which CHANGELOG.md's newest entry is, with its
/// pinned-map layout line (CHANGELOG.md, "Versions").
#[test]
fn the_version_is_the_changelogs_newest() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        format!("nodeport-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let changelog =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../CHANGELOG.md"))
            .unwrap();
    let mut entries = changelog
        .split("\n## ")
        .skip(1)
        .filter(|e| e.starts_with(|c: char| c.is_ascii_digit()));
    let newest = entries.next().expect("a version entry");
    let heading = newest.lines().next().unwrap();
    assert_eq!(
        heading.split_whitespace().next(),
        Some(env!("CARGO_PKG_VERSION")),
        "CHANGELOG.md's newest entry, {heading:?}, is not the version the binary prints: add \
         an entry for it"
    );
    for entry in std::iter::once(newest).chain(entries) {
        assert!(
            entry.contains("\nPinned-map layout: version "),
            "CHANGELOG.md, {:?}: no `Pinned-map layout: version N` line",
            entry.lines().next().unwrap()
        );
    }
}
