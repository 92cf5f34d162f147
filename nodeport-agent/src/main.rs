use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use nodeport_agent::ledger::{PortsArgs, run_ports};

#[derive(Debug, Parser)]
#[command(
    name = "nodeport-agent",
    version,
    about = "eBPF load balancer for Kubernetes NodePort traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Who uses the node port range, how full it is, and what to change.
    Ports(PortsArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Ports(args) => run_ports(args).await,
    };
    result.unwrap_or_else(|err| {
        // The whole cause chain on one line; no backtrace for an operator's mistake.
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
