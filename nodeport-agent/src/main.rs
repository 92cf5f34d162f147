//! `nodeport-agent`: run the load balancer, inspect or remove its datapath, or report on the
//! node port range.

use std::io::IsTerminal as _;
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use nodeport_agent::{
    agent,
    config::RunArgs,
    datapath::{self, Maps, PinDir},
    dump::{self, DumpOptions, ServiceFilter},
    ledger::{OutputFormat, PortsArgs, run_ports},
    model::Ipv4Prefix,
    status,
};

#[derive(Debug, Parser)]
#[command(
    name = "nodeport-agent",
    version,
    about = "eBPF load balancer for Kubernetes NodePort traffic"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

const RUN_EXAMPLES: &str = "\
Examples:
  # On a node of a cluster (what deploy/nodeport.yaml runs):
  nodeport-agent run --node-name \"$NODE_NAME\" --healthz-bind-address 0.0.0.0:10266
  # On one machine, from manifests, XDP on eth0 only, pod veths named veth*:
  nodeport-agent run --manifests ./examples --external-interface eth0 --pod-interfaces 'veth*'
  # Room for 10,000 service ports:
  nodeport-agent run --max-services 10240 --max-backends 65536";

const DETACH_EXAMPLES: &str = "\
Examples:
  nodeport-agent detach
  nodeport-agent detach --bpffs-dir /sys/fs/bpf/nodeport-test";

const DUMP_EXAMPLES: &str = "\
Examples:
  nodeport-agent dump                                   # services, frontends, backends
  nodeport-agent dump --stats                           # plus packets and the connection census
  nodeport-agent dump --service shop/web                # one Service
  nodeport-agent dump --conntrack --client 203.0.113.7  # one client's connections
  nodeport-agent dump --conntrack --service shop/web:https --output json";

const STATUS_EXAMPLES: &str = "\
Examples:
  nodeport-agent status
  kubectl -n kube-system exec ds/nodeport -- nodeport-agent status --output json";

const PORTS_EXAMPLES: &str = "\
Examples:
  nodeport-agent ports                                  # the cluster of the kubeconfig
  nodeport-agent ports --manifests ./examples --output json
  nodeport-agent ports --service-node-port-range 30000-32767";

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Load and attach the datapath and keep it equal to the cluster's Services.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Remove the datapath: detach the programs and delete the pinned maps (established
    /// connections through it break).
    #[command(after_help = DETACH_EXAMPLES)]
    Detach {
        /// Where the datapath is pinned.
        #[arg(long, default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
    },
    /// Show what the datapath holds: services, frontends, backends, counters, connections.
    /// Reads the pins, so it works whether the agent runs or not.
    #[command(after_help = DUMP_EXAMPLES)]
    Dump {
        /// Where the datapath is pinned.
        #[arg(long, default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
        /// Also packet counters per service and globally, and the connection table's census.
        #[arg(long)]
        stats: bool,
        /// Also the connections in the connection table.
        #[arg(long)]
        conntrack: bool,
        /// Only this Service: NAMESPACE/NAME, or NAMESPACE/NAME:PORT for one of its ports.
        #[arg(long, value_name = "NAMESPACE/NAME[:PORT]")]
        service: Option<ServiceFilter>,
        /// Only connections from this client address or CIDR (with --conntrack).
        #[arg(long, value_name = "IP|CIDR", requires = "conntrack")]
        client: Option<Ipv4Prefix>,
    },
    /// What is attached where (interfaces, XDP modes, program ids), how full the maps are, and
    /// what the agent last did. Reads the pins, so it works whether the agent runs or not.
    #[command(after_help = STATUS_EXAMPLES)]
    Status {
        /// Where the datapath is pinned.
        #[arg(long, default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Who uses the node port range, how full it is, and what to change.
    #[command(after_help = PORTS_EXAMPLES)]
    Ports(PortsArgs),
}

fn dump_maps(
    bpffs_dir: PathBuf,
    output: OutputFormat,
    options: DumpOptions,
) -> anyhow::Result<ExitCode> {
    let (maps, sizing) = Maps::open_pinned(&PinDir::new(&bpffs_dir))
        .with_context(|| format!("no nodeport datapath pinned at {}", bpffs_dir.display()))?;
    let view = dump::read(&maps, &sizing, &options)?;
    match output {
        OutputFormat::Table => print!("{}", view.render()),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&view)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn show_status(bpffs_dir: PathBuf, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let view = status::read(&PinDir::new(&bpffs_dir))
        .with_context(|| format!("no nodeport datapath pinned at {}", bpffs_dir.display()))?;
    match output {
        OutputFormat::Table => print!("{}", view.render()),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&view)?),
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => subscriber.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => subscriber.json().init(),
    }
    let result = match cli.command {
        Command::Run(args) => agent::run(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Detach { bpffs_dir } => datapath::detach(&bpffs_dir)
            .map(|removed| {
                if removed.is_empty() {
                    println!("nothing pinned at {}", bpffs_dir.display());
                }
                for r in removed {
                    println!("removed {r}");
                }
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Dump {
            bpffs_dir,
            output,
            stats,
            conntrack,
            service,
            client,
        } => dump_maps(
            bpffs_dir,
            output,
            DumpOptions {
                stats,
                conntrack,
                service,
                client,
            },
        ),
        Command::Status { bpffs_dir, output } => show_status(bpffs_dir, output),
        Command::Ports(args) => run_ports(args).await,
    };
    result.unwrap_or_else(|err| {
        // The whole cause chain on one line; no backtrace for an operator's mistake.
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
