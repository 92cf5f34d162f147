//! `nodeport-agent ports`: read Services, analyze, print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Service;

use super::{NodePortRange, RangeError, Severity, analyze};
use crate::manifests;

/// Where the node's ephemeral port range is read by `--local-port-range auto`.
pub(crate) const IP_LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Exit code when `--fail-on` matched a finding (errors exit with 1, usage errors with 2).
const EXIT_FINDINGS: u8 = 3;

/// Who uses the node port range, how full it is, and what to change.
///
/// Exit status: 0 when the report was printed, whatever it found, unless `--fail-on` is given:
/// then 3 when a finding is at least that severe. 1 on errors (unreadable directory, invalid
/// manifest, cluster unreachable), 2 on usage errors (clap's).
#[derive(Clone, Debug, clap::Args)]
pub struct PortsArgs {
    /// Read Services from the manifest files in DIR instead of the cluster (kubeconfig or
    /// in-cluster config).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "context"])]
    pub manifests: Option<PathBuf>,

    /// The kubeconfig file to reach the API server with. Default: the in-cluster
    /// configuration, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use. Default: its current-context.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,

    /// The API server's --service-node-port-range: N-M, N+K (N..N+K) or N.
    #[arg(long, value_name = "RANGE", default_value = "30000-32767")]
    pub service_node_port_range: NodePortRange,

    /// How to print the report: table (for people), wide (the table with each consumer's
    /// Service ports), json or yaml (the document of docs/ledger.md).
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT", default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// The node's net.ipv4.ip_local_port_range: auto reads /proc/sys/net/ipv4/ip_local_port_range
    /// of the host running this command (meaningful on a node only), none skips the check, A-B
    /// gives it.
    #[arg(long, value_name = "auto|none|A-B", default_value = "auto")]
    pub local_port_range: LocalPortRangeArg,

    /// Exit with status 3 when a finding is at least this severe: info, warning or critical.
    #[arg(long, value_enum, value_name = "SEVERITY")]
    pub fail_on: Option<Severity>,
}

pub use crate::output::OutputFormat;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalPortRangeArg {
    Auto,
    None,
    Given { first: u16, last: u16 },
}

impl FromStr for LocalPortRangeArg {
    type Err = RangeError;

    fn from_str(value: &str) -> Result<Self, RangeError> {
        match value {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            // Same syntax (and checks) as the node port range.
            range => {
                let range: NodePortRange = range.parse()?;
                Ok(Self::Given {
                    first: range.first,
                    last: range.last,
                })
            }
        }
    }
}

pub async fn run_ports(args: PortsArgs) -> anyhow::Result<ExitCode> {
    let services = match &args.manifests {
        Some(dir) => manifests::load_dir(dir)
            .with_context(|| format!("cannot load the manifests in {}", dir.display()))?
            .services
            .into_iter()
            .map(|(_, service)| std::sync::Arc::unwrap_or_clone(service))
            .collect(),
        None => list_cluster_services(args.kubeconfig.as_deref(), args.context.as_deref()).await?,
    };
    let local_port_range = match args.local_port_range {
        LocalPortRangeArg::Auto => read_local_port_range(Path::new(IP_LOCAL_PORT_RANGE)),
        LocalPortRangeArg::None => None,
        LocalPortRangeArg::Given { first, last } => Some((first, last)),
    };
    let ledger = analyze(&args.service_node_port_range, &services, local_port_range);
    crate::output::print(
        &args
            .output
            .render(&ledger, |wide| ledger.render_text(wide))?,
    )?;
    let failed = args.fail_on.is_some_and(|threshold| {
        ledger
            .worst_severity()
            .is_some_and(|worst| worst >= threshold)
    });
    Ok(if failed {
        ExitCode::from(EXIT_FINDINGS)
    } else {
        ExitCode::SUCCESS
    })
}

async fn list_cluster_services(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> anyhow::Result<Vec<Service>> {
    let client = crate::config::kube_client(kubeconfig, context).await?;
    let api: kube::Api<Service> = kube::Api::all(client);
    let mut params = kube::api::ListParams::default().limit(500);
    let mut services = Vec::new();
    loop {
        let page = api
            .list(&params)
            .await
            .context("cannot list Services in all namespaces")?;
        services.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    tracing::debug!(count = services.len(), "listed Services");
    Ok(services)
}

/// The ephemeral port range from `path` ("32768\t60999"); `None`, logged, when the file is
/// missing (not Linux) or unreadable.
pub(crate) fn read_local_port_range(path: &Path) -> Option<(u16, u16)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "no ip_local_port_range: check skipped");
            return None;
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "cannot read ip_local_port_range: check skipped");
            return None;
        }
    };
    let parsed = parse_ip_local_port_range(&text);
    if parsed.is_none() {
        tracing::warn!(path = %path.display(), text = text.trim(), "unexpected ip_local_port_range: check skipped");
    }
    parsed
}

fn parse_ip_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next(), numbers.next()) {
        (Some(Ok(first)), Some(Ok(last)), None) => Some((first, last)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ports: PortsArgs,
    }

    #[test]
    fn defaults() {
        let args = Cli::try_parse_from(["ports"]).unwrap().ports;
        assert_eq!(args.manifests, None);
        assert_eq!(args.service_node_port_range, NodePortRange::DEFAULT);
        assert_eq!(args.output, OutputFormat::Table);
        assert_eq!(args.local_port_range, LocalPortRangeArg::Auto);
        assert_eq!(args.fail_on, None);
    }

    #[test]
    fn parses_every_flag() {
        let args = Cli::try_parse_from([
            "ports",
            "--manifests",
            "dir",
            "--service-node-port-range",
            "30000+15",
            "--output",
            "json",
            "--local-port-range",
            "31000-40000",
            "--fail-on",
            "warning",
        ])
        .unwrap()
        .ports;
        assert_eq!(args.manifests.as_deref(), Some(Path::new("dir")));
        assert_eq!(
            args.service_node_port_range,
            NodePortRange::new(30000, 30015).unwrap()
        );
        assert_eq!(args.output, OutputFormat::Json);
        assert_eq!(
            args.local_port_range,
            LocalPortRangeArg::Given {
                first: 31000,
                last: 40000
            }
        );
        assert_eq!(args.fail_on, Some(Severity::Warning));
        let none = Cli::try_parse_from(["ports", "--local-port-range", "none"]).unwrap();
        assert_eq!(none.ports.local_port_range, LocalPortRangeArg::None);
    }

    #[test]
    fn rejects_bad_ranges_with_the_reason() {
        let err = Cli::try_parse_from(["ports", "--service-node-port-range", "32767-30000"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("end port cannot be less than start port"),
            "{err}"
        );
        let err = Cli::try_parse_from(["ports", "--local-port-range", "sometimes"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("\"sometimes\" is not a port number"), "{err}");
    }

    #[test]
    fn reads_the_procfs_format() {
        assert_eq!(
            parse_ip_local_port_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_ip_local_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_ip_local_port_range("32768"), None);
        assert_eq!(parse_ip_local_port_range("a b"), None);
        assert_eq!(parse_ip_local_port_range("1 2 3"), None);
        assert_eq!(
            read_local_port_range(Path::new("/nonexistent/ip_local_port_range")),
            None
        );
    }
}
