//! `nodeport-agent`: run the load balancer, inspect or remove its datapath, or report on the
//! node port range.

use std::io::IsTerminal as _;
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use nodeport_agent::{
    agent::{self, RunArgs},
    datapath::{self, Maps, PinDir},
    dump,
    ledger::{OutputFormat, PortsArgs, run_ports},
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

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Load and attach the datapath and keep it equal to the cluster's Services.
    Run(Box<RunArgs>),
    /// Remove the datapath: detach the programs and delete the pinned maps (established
    /// connections through it break).
    Detach {
        #[arg(long, default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
    },
    /// Show what the datapath holds: services, frontends, backends, counters. Reads the pins,
    /// so it works whether the agent runs or not.
    Dump {
        #[arg(long, default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: OutputFormat,
        /// Also packet counters per service and globally, and the conntrack size.
        #[arg(long)]
        stats: bool,
    },
    /// Who uses the node port range, how full it is, and what to change.
    Ports(PortsArgs),
}

fn dump_maps(bpffs_dir: PathBuf, output: OutputFormat, stats: bool) -> anyhow::Result<ExitCode> {
    let pins = PinDir::new(&bpffs_dir);
    let (maps, sizing) = Maps::open_pinned(&pins)
        .with_context(|| format!("no nodeport datapath pinned at {}", bpffs_dir.display()))?;
    let view = dump::read(&maps, &sizing, stats)?;
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
        } => dump_maps(bpffs_dir, output, stats),
        Command::Ports(args) => run_ports(args).await,
    };
    result.unwrap_or_else(|err| {
        // The whole cause chain on one line; no backtrace for an operator's mistake.
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
