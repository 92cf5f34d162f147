//! The manifests loader (`--manifests DIR`) on a normal directory and on the same directory
//! with one pathological file next to the normal one: 200 kB of brackets nested 100,000 deep,
//! which was reported keeping the loader busy for 25 s before files were bounded (size and
//! depth, checked before parsing: nodeport_agent::manifests::MAX_FILE_BYTES, MAX_DEPTH). For
//! scale, the loader's parse without the bound on such files.

use std::{fmt::Write as _, path::Path, time::Duration, time::Instant};

use anyhow::{Context, Result, ensure};
use nodeport_agent::manifests::{self, MAX_DEPTH, ManifestError};

/// Services (each with its EndpointSlice) in the normal file.
const SERVICES: u32 = 1_000;
const ROUNDS: usize = 7;
/// The pathological file of the report: 100,000 `[` then 100,000 `]`.
const DEEP: usize = 100_000;
/// Depths the unbounded parse is timed at, once each.
const PARSER_DEPTHS: [usize; 3] = [1_000, 10_000, 100_000];

pub struct Results {
    normal_bytes: usize,
    deep_bytes: usize,
    /// Median load of the normal directory, from a fresh parse cache.
    normal: Duration,
    /// Median load of the directory with the deep file too (refused).
    with_deep: Duration,
    /// (depth, time) of the loader's parse (serde_norway into serde_json::Value) of
    /// `[`*depth `]`*depth, without the bound.
    parser: Vec<(usize, Duration)>,
}

fn normal_text() -> String {
    let mut text = String::new();
    for i in 0..SERVICES {
        let _ = write!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: svc-{i}, namespace: bench }}\n\
             spec:\n  type: NodePort\n  ports:\n  - {{ name: http, port: 80, nodePort: {} }}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i}-1\n  \
             namespace: bench\n  labels: {{ kubernetes.io/service-name: svc-{i} }}\naddressType: IPv4\n\
             ports: [ {{ name: http, port: 8080 }} ]\nendpoints:\n- addresses: [10.0.{}.{}]\n  \
             nodeName: node-1\n  conditions: {{ ready: true }}\n---\n",
            30000 + i % 2768,
            i / 250,
            i % 250 + 1
        );
    }
    text
}

fn deep_text(depth: usize) -> String {
    "[".repeat(depth) + &"]".repeat(depth)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_load(dir: &Path) -> (Duration, Result<manifests::Manifests, ManifestError>) {
    let started = Instant::now();
    let loaded = manifests::load_dir(dir);
    (started.elapsed(), loaded)
}

pub fn run() -> Result<Results> {
    let dir = std::env::temp_dir().join(format!("nodeport-bench-loader-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = measure(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(dir: &Path) -> Result<Results> {
    let normal = normal_text();
    std::fs::write(dir.join("services.yaml"), &normal)?;
    let mut normal_runs = Vec::new();
    for _ in 0..ROUNDS {
        let (t, loaded) = time_load(dir);
        let loaded = loaded.context("loading the normal directory")?;
        ensure!(loaded.services.len() == SERVICES as usize);
        normal_runs.push(t);
    }
    let deep = deep_text(DEEP);
    // Named to sort after the normal file: the loader reads that one first, then refuses this.
    std::fs::write(dir.join("zz-deep.yaml"), &deep)?;
    let mut deep_runs = Vec::new();
    for _ in 0..ROUNDS {
        let (t, loaded) = time_load(dir);
        ensure!(
            matches!(loaded, Err(ManifestError::TooDeep { .. })),
            "the deep file is refused: {loaded:?}"
        );
        deep_runs.push(t);
    }
    let mut parser = Vec::new();
    for depth in PARSER_DEPTHS {
        let text = deep_text(depth);
        let started = Instant::now();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let _ = <serde_json::Value as serde::Deserialize>::deserialize(doc);
        }
        parser.push((depth, started.elapsed()));
        eprintln!(
            "bench: loader: parser alone, depth {depth}: {:?}",
            parser.last().unwrap().1
        );
    }
    Ok(Results {
        normal_bytes: normal.len(),
        deep_bytes: deep.len(),
        normal: median(normal_runs),
        with_deep: median(deep_runs),
        parser,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn command(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("({cmd}: {e})"))
}

pub fn render(r: &Results, date: &str) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Manifests loader benchmark, {date}\n")?;
    writeln!(
        md,
        "Machine: `{}`, nproc {}\n",
        command("uname", &["-a"]),
        command("nproc", &[])
    )?;
    writeln!(
        md,
        "`manifests::load_dir` from a fresh parse cache (what the agent does on its first load and \
         for every changed file), median of {ROUNDS} runs. The normal file holds {SERVICES} \
         Services with one EndpointSlice each ({} kB). The pathological file is {} kB of \
         brackets nested {DEEP} deep, next to the normal one; files nested deeper than \
         {MAX_DEPTH} levels are refused before parsing (docs/operations.md).\n",
        r.normal_bytes / 1000,
        r.deep_bytes / 1000
    )?;
    writeln!(md, "| directory | load, ms | outcome |")?;
    writeln!(md, "|---|---:|---|")?;
    writeln!(
        md,
        "| normal file | {} | {SERVICES} Services |",
        ms(r.normal)
    )?;
    writeln!(
        md,
        "| normal file + pathological file (read after it) | {} | refused: nested more than {MAX_DEPTH} levels |",
        ms(r.with_deep)
    )?;
    writeln!(
        md,
        "\nWhat the bound saves: the loader's parse without it (serde_norway into \
         serde_json::Value, as `manifests` does) of brackets nested N deep, one run each:\n"
    )?;
    writeln!(md, "| depth N | parse, ms |")?;
    writeln!(md, "|---:|---:|")?;
    for (depth, t) in &r.parser {
        writeln!(md, "| {depth} | {} |", ms(*t))?;
    }
    Ok(md)
}

pub fn summary(r: &Results) -> String {
    format!(
        "loader: normal {} ms, with a {DEEP}-deep file {} ms (refused)",
        ms(r.normal),
        ms(r.with_deep)
    )
}
