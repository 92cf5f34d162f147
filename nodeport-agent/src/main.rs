//! `nodeport-agent`: run the load balancer, inspect or remove its datapath, or report on the
//! node port range.

use std::io::IsTerminal as _;
use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use nodeport_agent::{
    agent,
    config::{self, RunArgs},
    datapath::{self, Maps, PinDir},
    dump::{self, DumpOptions, ServiceFilter},
    ledger::{PortsArgs, run_ports},
    model::Ipv4Prefix,
    output::{self, OutputFormat},
    status,
};

#[derive(Debug, Parser)]
#[command(
    name = "nodeport-agent",
    version,
    about = "eBPF load balancer for Kubernetes NodePort traffic"
)]
struct Cli {
    /// Log format on stderr: text, or json (one object per line, the fatal error included).
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value = "text"
    )]
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
  # On a node of a cluster (what deploy/base's DaemonSet runs; NODE_NAME from the env):
  nodeport-agent run --config /etc/nodeport/config.yaml
  # The same flags on the command line:
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
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
    },
    /// Show what the datapath holds: services, frontends, backends, counters, connections.
    /// Reads the pins, so it works whether the agent runs or not.
    #[command(after_help = DUMP_EXAMPLES)]
    Dump {
        /// Where the datapath is pinned.
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
        /// How to print: table (for people), wide (the table with --stats), json or yaml.
        #[arg(
            short = 'o',
            long,
            value_enum,
            value_name = "FORMAT",
            default_value = "table"
        )]
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
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/nodeport")]
        bpffs_dir: PathBuf,
        /// How to print: table (for people; long lists abridged), wide (everything), json or
        /// yaml.
        #[arg(
            short = 'o',
            long,
            value_enum,
            value_name = "FORMAT",
            default_value = "table"
        )]
        output: OutputFormat,
    },
    /// Who uses the node port range, how full it is, and what to change.
    #[command(after_help = PORTS_EXAMPLES)]
    Ports(PortsArgs),
}

fn dump_maps(
    bpffs_dir: PathBuf,
    output: OutputFormat,
    mut options: DumpOptions,
) -> anyhow::Result<ExitCode> {
    let (maps, sizing) = Maps::open_pinned(&PinDir::new(&bpffs_dir))
        .with_context(|| format!("no nodeport datapath pinned at {}", bpffs_dir.display()))?;
    // Wide: the table with everything it can show.
    options.stats |= output == OutputFormat::Wide;
    let view = dump::read(&maps, &sizing, &options)?.with_ipv6(&bpffs_dir, &options);
    output::print(&output.render(&view, |_| view.render())?)?;
    Ok(ExitCode::SUCCESS)
}

fn show_status(bpffs_dir: PathBuf, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let pins = PinDir::new(&bpffs_dir);
    // Switched off: no pin is left, and that is the state to report.
    if let Some(off) = status::switched_off(&pins) {
        output::print(&output.render(&off, |_| off.render())?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let view = status::read(&pins)
        .with_context(|| format!("no nodeport datapath pinned at {}", bpffs_dir.display()))?;
    output::print(&output.render(&view, |wide| view.render(wide))?)?;
    Ok(ExitCode::SUCCESS)
}

/// The command line, with `run --config FILE` merged in (the command line wins). A usage
/// error is clap's, printed as JSON when the command line asks for JSON logs.
fn parse(argv: Vec<OsString>) -> Result<Cli, clap::Error> {
    let run_command = Cli::command()
        .find_subcommand("run")
        .expect("run is a subcommand")
        .clone();
    let mut matches = Cli::command().try_get_matches_from(&argv)?;
    if let Some(("run", run)) = matches.subcommand()
        && let Some(file) = run.get_one::<PathBuf>("config")
    {
        let in_file = |message: String| {
            Cli::command().error(clap::error::ErrorKind::ValueValidation, message)
        };
        let extra = config::file_args(&run_command, run, file)
            .map_err(|e| in_file(output::error_chain(e.as_ref())))?;
        let merged = argv
            .iter()
            .cloned()
            .chain(extra.into_iter().map(OsString::from));
        matches = Cli::command().try_get_matches_from(merged).map_err(|e| {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            in_file(format!(
                "--config {}: {}",
                file.display(),
                first.trim_start_matches("error: ")
            ))
        })?;
    }
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Run(args), Some(("run", run))) = (&mut cli.command, matches.subcommand()) {
        args.effective = config::effective(&run_command, run);
    }
    Ok(cli)
}

/// Whether the command line asks for JSON logs (read before clap has parsed it, for its
/// own errors).
fn wants_json(argv: &[OsString]) -> bool {
    argv.windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || argv.iter().any(|a| a == "--log-format=json")
}

/// A fatal error as the log format has it: `error: ...` in text, one JSON object (as the
/// log lines are) in JSON.
fn report_fatal(json: bool, message: &str) {
    if json {
        let line = serde_json::json!({
            "timestamp": format!("{:.6}", k8s_openapi::jiff::Timestamp::now()),
            "level": "ERROR",
            "fields": { "message": message },
            "target": "nodeport_agent",
        });
        eprintln!("{line}");
    } else {
        eprintln!("error: {message}");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let json = wants_json(&argv);
    let cli = match parse(argv) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if !json
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelp
                        | ErrorKind::DisplayVersion
                        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                e.exit();
            }
            let text = e.render().to_string();
            let message = text.trim().trim_start_matches("error: ");
            report_fatal(true, message);
            return ExitCode::from(2);
        }
    };
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
        Command::Detach { bpffs_dir } => {
            // The switch's record goes too: nothing of nodeport's is left.
            nodeport_agent::switch::remove(&bpffs_dir);
            datapath::detach(&bpffs_dir)
                .map_err(anyhow::Error::from)
                .and_then(|removed| {
                    let mut text = String::new();
                    if removed.is_empty() {
                        text = format!("nothing pinned at {}\n", bpffs_dir.display());
                    }
                    for r in removed {
                        text.push_str(&format!("removed {r}\n"));
                    }
                    output::print(&text)?;
                    Ok(ExitCode::SUCCESS)
                })
        }
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
        // The whole cause chain on one line, each cause once; no backtrace for an operator's
        // mistake.
        report_fatal(
            matches!(cli.log_format, LogFormat::Json),
            &output::error_chain(err.as_ref()),
        );
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_of_every_command_has_help() {
        let cli = Cli::command();
        let commands = std::iter::once(&cli).chain(cli.get_subcommands());
        for command in commands {
            for arg in command.get_arguments() {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(
                    !help.is_empty(),
                    "{} --{} has no help",
                    command.get_name(),
                    arg.get_id()
                );
            }
        }
    }

    #[test]
    fn output_takes_kubectls_short_flag_and_formats() {
        for format in ["json", "yaml", "wide", "table"] {
            for command in ["status", "dump", "ports"] {
                let argv = ["nodeport-agent", command, "-o", format].map(OsString::from);
                assert!(parse(argv.to_vec()).is_ok(), "{command} -o {format}");
            }
        }
    }

    #[test]
    fn json_logs_are_asked_for_either_way() {
        let argv = |args: &[&str]| args.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(wants_json(&argv(&["x", "--log-format", "json", "run"])));
        assert!(wants_json(&argv(&["x", "run", "--log-format=json"])));
        assert!(!wants_json(&argv(&["x", "run", "--log-format", "text"])));
    }
}
