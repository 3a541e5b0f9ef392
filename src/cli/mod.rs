//! The command line: the clap types shared by every command, logging, exit codes and the
//! dispatch to one file per command group ([`volume`], [`cache`], [`hook`], [`node`], [`run`]).
//! Everything here is presentation; the checks and the work are in the library.

mod cache;
mod hook;
mod node;
mod output;
mod run;
mod volume;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use jobcachefs::input::config::{Config, DEFAULT_CONFIG_PATH};
use jobcachefs::state::layout::DEFAULT_STATE_DIR;
use jobcachefs::{Engine, ErrorKind};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Exit codes (documented in README "Exit codes").
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const QUOTA: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const CONFLICT: u8 = 5;
    pub const TOOL: u8 = 6;
    pub const UNAVAILABLE: u8 = 7;
}

#[derive(Parser)]
#[command(
    name = "jobcachefs",
    version,
    about = "Build-cache volumes: sparse ext4 layers under overlayfs, O(1) commit"
)]
pub struct Cli {
    /// State directory holding caches, volumes and their mounts.
    #[arg(long, global = true, env = "JOBCACHEFS_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Configuration file (defaults apply when the default file is missing).
    #[arg(long, global = true, env = "JOBCACHEFS_CONFIG")]
    config: Option<PathBuf>,
    /// Output format of listings and results.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Log format on stderr (default: text on a terminal, JSON otherwise).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create, delete and list volumes (plain Linux CI runners use these directly).
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Inspect and manage caches.
    #[command(subcommand)]
    Cache(cache::CacheCmd),
    /// Run CMD with a cache volume at --dir for its life: made before CMD starts (CMD gets
    /// JOBCACHEFS_DIR), deleted when it ends — committed under --write-back on-success if CMD
    /// exited 0, under always whatever its exit code, never under never (the default).
    ///
    /// SIGINT, SIGTERM and SIGHUP are passed on to CMD's process group and the volume is
    /// discarded. The exit code is CMD's (128 + the signal when a signal killed it); 127/126
    /// when CMD cannot be found/executed (nothing is made); jobcachefs' own codes when its setup
    /// fails, or when CMD exited 0 and the commit failed. A run killed with SIGKILL is repaired
    /// by the next run of the same DIR or by `gc`.
    Run(run::RunArgs),
    /// Node-wide operations.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Repair what crashes left and remove unreferenced layers; safe at any time.
    Gc {
        /// Also run queued squashes.
        #[arg(long)]
        drain: bool,
    },
    /// Check this node: kernel, tools, state dir, leftovers of crashes; each finding says what
    /// to do.
    Doctor,
    /// The local-path-provisioner setup/teardown hook (deploy/ runs it in the helper pod).
    ///
    /// Takes what the provisioner passes: -p PATH -s BYTES -m Filesystem|Block -a create|delete,
    /// with VOL_DIR, VOL_SIZE_BYTES, VOL_MODE, VOL_USER, VOL_GROUP, VOL_PERM as the environment
    /// (arguments win over the environment; a disagreement is logged).
    Hook(hook::HookArgs),
    /// The node agent: pulls newer generations of this node's caches, pushes its commits, drains
    /// the squash queue, and serves Prometheus metrics. Runs in the foreground.
    Agent {
        /// Time between sync rounds (default: [agent] interval, 30s).
        #[arg(long)]
        interval: Option<String>,
        /// Address for /metrics (default: [agent] metrics_addr, 127.0.0.1:9477; "off": none).
        #[arg(long)]
        metrics_addr: Option<String>,
        /// Run this many rounds, then exit (default: run until stopped).
        #[arg(long)]
        rounds: Option<u64>,
        /// This node's Kubernetes name (the DaemonSet passes spec.nodeName): with API access
        /// the agent labels its Node with the caches it holds, for placement and `cache where`.
        #[arg(long, env = "KUBE_NODE_NAME")]
        node_name: Option<String>,
    },
    /// The CSI plugin (driver csi.jobcachefs.io): Identity and Node services, and the
    /// Controller service with --controller, over a unix socket. kubelet calls it when a pod
    /// starts (a fresh volume from the cache's newest generation) and when it ends (the commit).
    /// Runs in the foreground; SIGTERM lets the calls in flight finish, then stops.
    Csi {
        /// The socket to serve, as unix:///PATH.
        #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
        endpoint: String,
        /// This node's Kubernetes name (the DaemonSet passes spec.nodeName).
        #[arg(long, env = "KUBE_NODE_NAME")]
        node_id: String,
        /// Also serve the Controller service (CreateVolume/DeleteVolume for PVCs).
        #[arg(long)]
        controller: bool,
    },
    /// The placement admission webhook (HTTPS, AdmissionReview v1 at /mutate): Pods that use a
    /// cache get preferred node affinity for the nodes warm for it. Never refuses a Pod. Runs
    /// in the foreground.
    Webhook {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: String,
        /// PEM certificate chain (read again when it changes).
        #[arg(long, default_value = "/tls/tls.crt")]
        tls_cert: PathBuf,
        /// PEM private key.
        #[arg(long, default_value = "/tls/tls.key")]
        tls_key: PathBuf,
    },
    /// Print shell completions for SHELL to stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Man,
}

/// Sets up logging on stderr: `JOBCACHEFS_LOG` filters (default `info`).
pub fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOBCACHEFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match cli.log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The exit code of a failed command: from the kind of the library error in its chain.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| c.downcast_ref::<jobcachefs::Error>())
        .map(|e| match e.kind() {
            ErrorKind::InvalidInput => exit::INVALID,
            ErrorKind::Quota => exit::QUOTA,
            ErrorKind::NotFound => exit::NOT_FOUND,
            ErrorKind::Conflict => exit::CONFLICT,
            ErrorKind::Tool => exit::TOOL,
            ErrorKind::Unavailable => exit::UNAVAILABLE,
            _ => exit::FAILURE,
        })
        .unwrap_or(exit::FAILURE)
}

/// A size flag that may be absent (`--size`, `--cache-size`), in quantity form.
fn optional_size(flag: &str, value: Option<&str>) -> jobcachefs::Result<Option<u64>> {
    value
        .map(|v| jobcachefs::input::quantity::parse_size(flag, v))
        .transpose()
}

fn load_config(cli: &Cli) -> Result<Config> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    Ok(Config::load(&path, explicit)?)
}

fn engine(cli: &Cli) -> Result<Engine> {
    let mut config = load_config(cli)?;
    if let Command::Hook(_) | Command::Csi { .. } = cli.command {
        // The provisioner gives a teardown 120 s, kubelet an unpublish 2 minutes (and the next
        // pod waits for nothing of it): a due squash is queued for the agent instead.
        config.squash_inline = false;
    }
    let engine = Engine::open(&cli.state_dir, config)?;
    Ok(match output::progress_hook() {
        Some(hook) => engine.with_progress(hook),
        None => engine,
    })
}

/// Runs the command; the exit code of a command that did not fail.
pub fn run(cli: Cli) -> Result<u8> {
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "jobcachefs",
                &mut std::io::stdout(),
            );
            return Ok(exit::OK);
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(exit::OK);
        }
        _ => {}
    }
    let json = cli.output == Format::Json;
    if let Command::Webhook {
        listen,
        tls_cert,
        tls_key,
    } = &cli.command
    {
        jobcachefs::webhook::serve(jobcachefs::webhook::Options {
            listen: listen.clone(),
            cert: tls_cert.clone(),
            key: tls_key.clone(),
            api: jobcachefs::webhook::api(),
        })?;
        return Ok(exit::OK);
    }
    if let Command::Cache(cmd @ cache::CacheCmd::Where { .. }) = &cli.command {
        return cache::run_where(&load_config(&cli)?, cmd, json);
    }
    let engine = engine(&cli)?;
    if let Command::Doctor = cli.command {
        return Ok(node::doctor(&engine, json));
    }
    jobcachefs::host::cmd::require(jobcachefs::host::cmd::ENGINE_TOOLS)?;
    match &cli.command {
        Command::Volume(cmd) => volume::run(&engine, cmd, json),
        Command::Cache(cmd) => cache::run(&engine, cmd, json),
        Command::Hook(args) => hook::run(&engine, args, json),
        Command::Agent {
            interval,
            metrics_addr,
            rounds,
            node_name,
        } => node::agent(
            &engine,
            &cli.state_dir,
            interval.as_deref(),
            metrics_addr.as_deref(),
            *rounds,
            node_name.as_deref(),
        ),
        Command::Gc { drain } => node::gc(&engine, *drain, json),
        Command::Run(args) => run::run(&engine, args),
        Command::Node(cmd) => node::run(&engine, cmd, json),
        Command::Csi {
            endpoint,
            node_id,
            controller,
        } => {
            jobcachefs::csi::serve(
                engine,
                jobcachefs::csi::Options {
                    endpoint: endpoint.clone(),
                    node_id: node_id.clone(),
                    controller: *controller,
                },
            )?;
            Ok(exit::OK)
        }
        Command::Completions { .. } | Command::Man | Command::Doctor | Command::Webhook { .. } => {
            unreachable!()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        // clap checks duplicate flags (e.g. two `-n`) only when the command is built: do it here
        // rather than in a user's first run.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
