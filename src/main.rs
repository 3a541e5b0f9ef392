//! The `jobcachefs` binary: the operator CLI, the plain-VM volume commands and the
//! local-path-provisioner hook, on top of the library's engine.

mod output;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use jobcachefs::engine::{CreateRequest, DeleteOutcome, SquashOutcome};
use jobcachefs::input::config::{Config, DEFAULT_CONFIG_PATH};
use jobcachefs::input::names::{CacheId, DEFAULT_NAMESPACE};
use jobcachefs::input::quantity::{human_bytes, parse_duration, parse_size};
use jobcachefs::state::layout::DEFAULT_STATE_DIR;
use jobcachefs::{Engine, ErrorKind};
use output::print_json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit codes (documented in README "Exit codes").
mod exit {
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
struct Cli {
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
    Volume(VolumeCmd),
    /// Inspect and manage caches.
    #[command(subcommand)]
    Cache(CacheCmd),
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
    Hook(HookArgs),
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
    },
    /// Print shell completions for SHELL to stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Man,
}

#[derive(Args)]
struct HookArgs {
    /// The volume's folder (env VOL_DIR).
    #[arg(short = 'p')]
    path: Option<String>,
    /// Requested size in bytes (env VOL_SIZE_BYTES).
    #[arg(short = 's', allow_hyphen_values = true)]
    size: Option<String>,
    /// Volume mode: Filesystem (Block is refused) (env VOL_MODE).
    #[arg(short = 'm')]
    mode: Option<String>,
    /// create (setup) or delete (teardown). deploy/'s scripts pass it and so does the
    /// provisioner: it may be given twice if both agree.
    #[arg(short = 'a', action = clap::ArgAction::Append)]
    action: Vec<String>,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume at DIR: the cache's layers below, a fresh writable image above.
    Create(CreateArgs),
    /// Delete the volume at DIR: commit it into its cache if created with --write-back.
    Delete {
        /// The volume's directory.
        dir: PathBuf,
        /// Throw the volume's changes away even if it was created with --write-back.
        #[arg(long)]
        discard: bool,
    },
    /// List live volumes.
    Ls,
    /// Show one volume.
    Show {
        /// The volume's directory.
        dir: PathBuf,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// Directory to mount the volume at (created if missing; must be empty).
    dir: PathBuf,
    /// Cache to read from (a DNS-1123 label). Without it the volume starts empty.
    #[arg(long)]
    cache: Option<String>,
    /// Namespace of the cache.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Size limit of the volume's writes (e.g. 2Gi); writes beyond it get ENOSPC.
    #[arg(long, allow_hyphen_values = true)]
    size: Option<String>,
    /// Commit the volume into the cache when it is deleted.
    #[arg(long)]
    write_back: bool,
    /// Size limit of the cache, if this creates it (e.g. 20Gi).
    #[arg(long, allow_hyphen_values = true)]
    cache_size: Option<String>,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List caches.
    Ls,
    /// Show a cache: generation, layers, limit and use, live volumes.
    Show(CacheRef),
    /// Squash the cache's layers into one base now.
    Squash(CacheRef),
    /// Change a cache's size limit.
    Resize {
        #[command(flatten)]
        cache: CacheRef,
        /// New limit (e.g. 20Gi).
        size: String,
    },
    /// Remove a cache (live volumes keep working; space is freed when the last goes).
    Rm {
        #[command(flatten)]
        cache: CacheRef,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Push the cache's generation to its registry as an OCI image; only layers the registry
    /// lacks are uploaded, and a line another node pushed meanwhile is built upon, not replaced.
    Export(SyncArgs),
    /// Pull the newest generation of the cache's image; only missing layers are downloaded, and
    /// each is rebuilt locally from its files (no filesystem image is taken from the network).
    Import {
        #[command(flatten)]
        sync: SyncArgs,
        /// Size limit of the cache, if this creates it (e.g. 20Gi).
        #[arg(long, allow_hyphen_values = true)]
        cache_size: Option<String>,
    },
    /// Remove caches unused for a while or beyond a node budget (least recently used first).
    Prune {
        /// Remove caches unused for at least this long (e.g. 14d, 12h).
        #[arg(long)]
        unused_for: Option<String>,
        /// Remove least recently used caches until all caches fit this total (e.g. 200Gi).
        #[arg(long)]
        max_total: Option<String>,
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
struct SyncArgs {
    #[command(flatten)]
    cache: CacheRef,
    /// Repository of the cache's image, without tag (default: from the config's [[registry]]).
    #[arg(long)]
    image: Option<String>,
    /// Verify the registry's TLS certificate (--tls-verify=false for a plain-HTTP registry).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    tls_verify: Option<bool>,
}

#[derive(Args)]
struct CacheRef {
    /// Cache name.
    name: String,
    /// Namespace of the cache.
    #[arg(long, short = 'n', default_value = DEFAULT_NAMESPACE)]
    namespace: String,
}

impl CacheRef {
    fn id(&self) -> jobcachefs::Result<CacheId> {
        CacheId::new(&self.namespace, &self.name)
    }
}

fn init_logging(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOBCACHEFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = e
                .chain()
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
                .unwrap_or(exit::FAILURE);
            ExitCode::from(code)
        }
    }
}

fn engine(cli: &Cli) -> Result<Engine> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let mut config = Config::load(&path, explicit)?;
    if let Command::Hook(_) = cli.command {
        // The provisioner gives a teardown 120 s: a due squash is queued for the agent instead.
        config.squash_inline = false;
    }
    let engine = Engine::open(&cli.state_dir, config)?;
    Ok(match output::progress_hook() {
        Some(hook) => engine.with_progress(hook),
        None => engine,
    })
}

fn run(cli: Cli) -> Result<u8> {
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
    let engine = engine(&cli)?;
    let json = cli.output == Format::Json;
    if let Command::Doctor = cli.command {
        let findings = jobcachefs::doctor::run(&engine);
        if json {
            print_json(&findings);
        } else {
            output::print_doctor(&findings);
        }
        let failed = findings
            .iter()
            .any(|f| f.status == jobcachefs::doctor::Status::Fail);
        return Ok(if failed { exit::FAILURE } else { exit::OK });
    }
    jobcachefs::host::cmd::require(jobcachefs::host::cmd::ENGINE_TOOLS)?;
    match &cli.command {
        Command::Volume(cmd) => volume(&engine, cmd, json),
        Command::Cache(cmd) => cache(&engine, cmd, json),
        Command::Hook(args) => hook(&engine, args, json),
        Command::Agent {
            interval,
            metrics_addr,
            rounds,
        } => {
            let config = engine.config().clone();
            let interval = match interval {
                Some(i) => parse_duration("--interval", i)?,
                None => config.agent.interval,
            };
            let addr = metrics_addr
                .clone()
                .unwrap_or_else(|| config.agent.metrics_addr.clone());
            jobcachefs::sync::agent::run(
                cli.state_dir.clone(),
                config,
                jobcachefs::sync::agent::AgentOptions {
                    interval: std::time::Duration::from_secs(interval),
                    metrics_addr: (addr != "off").then_some(addr),
                    rounds: *rounds,
                },
            )?;
            Ok(exit::OK)
        }
        Command::Gc { drain } => {
            let report = engine.gc(*drain)?;
            if json {
                print_json(&report);
            } else if report.is_empty() && report.errors.is_empty() {
                println!("nothing to repair or collect");
            } else {
                output::print_gc(&report);
            }
            Ok(if report.errors.is_empty() {
                exit::OK
            } else {
                exit::FAILURE
            })
        }
        Command::Completions { .. } | Command::Man | Command::Doctor => unreachable!(),
    }
}

fn hook(engine: &Engine, args: &HookArgs, json: bool) -> Result<u8> {
    use jobcachefs::k8s::hook::{self, HookOutcome, RawInputs};
    use jobcachefs::k8s::{client::Client, kubeconfig};
    let env = [
        "VOL_DIR",
        "VOL_SIZE_BYTES",
        "VOL_MODE",
        "VOL_USER",
        "VOL_GROUP",
        "VOL_PERM",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
    .collect();
    if args.action.windows(2).any(|w| w[0] != w[1]) {
        anyhow::bail!(jobcachefs::Error::invalid(format!(
            "-a is given as {}: a hook run is either -a create or -a delete",
            args.action.join(" and ")
        )));
    }
    let req = hook::resolve(&RawInputs {
        path: args.path.clone(),
        size: args.size.clone(),
        mode: args.mode.clone(),
        action: args.action.first().cloned(),
        env,
    })?;
    let budget = std::time::Duration::from_secs(engine.config().kubernetes.api_timeout);
    let outcome = hook::run(engine, &req, || {
        Client::new(kubeconfig::discover()?, budget)
    })?;
    if json {
        print_json(&outcome);
        return Ok(exit::OK);
    }
    match outcome {
        HookOutcome::Created {
            volume,
            repeated,
            notes,
        } => {
            let cache = match &volume.cache {
                Some(c) => format!(
                    "cache {c} generation {}{}",
                    volume.generation,
                    if volume.write_back {
                        ", write-back"
                    } else {
                        ", read-only for the cache"
                    }
                ),
                None => "no cache (plain volume)".to_string(),
            };
            println!(
                "{} volume {}: {cache}, size {}",
                if repeated {
                    "already set up:"
                } else {
                    "created"
                },
                volume.dir.display(),
                human_bytes(volume.size)
            );
            for n in notes {
                println!("note: {n}");
            }
        }
        HookOutcome::Deleted { path, result } => {
            println!(
                "deleted volume {}: {}",
                path.display(),
                describe_delete(&result)
            );
        }
    }
    Ok(exit::OK)
}

/// One line on what a delete did to the volume's changes.
fn describe_delete(outcome: &DeleteOutcome) -> String {
    match outcome {
        DeleteOutcome::NotFound => "no volume there (already deleted)".to_string(),
        DeleteOutcome::RolledBack => "half-made volume rolled back".to_string(),
        DeleteOutcome::Discarded => "deleted, changes discarded".to_string(),
        DeleteOutcome::NotCommitted { reason } => format!("deleted, not committed: {reason}"),
        DeleteOutcome::Unchanged => "deleted, nothing changed to commit".to_string(),
        DeleteOutcome::Committed {
            generation,
            squashed,
        } => format!(
            "deleted, committed as generation {generation}{}",
            if *squashed {
                " (squashed to fit the cache-size)"
            } else {
                ""
            }
        ),
        DeleteOutcome::Rejected { reason } => format!("deleted; {reason}"),
    }
}

fn volume(engine: &Engine, cmd: &VolumeCmd, json: bool) -> Result<u8> {
    match cmd {
        VolumeCmd::Create(a) => {
            // Every argument is checked before anything touches the disk.
            let cache = match &a.cache {
                Some(name) => Some(CacheId::new(&a.namespace, name)?),
                None => {
                    jobcachefs::input::names::validate_label("namespace", &a.namespace)?;
                    None
                }
            };
            let size = a
                .size
                .as_deref()
                .map(|s| parse_size("--size", s))
                .transpose()?;
            let cache_size = a
                .cache_size
                .as_deref()
                .map(|s| parse_size("--cache-size", s))
                .transpose()?;
            if cache_size.is_some() && cache.is_none() {
                anyhow::bail!(jobcachefs::Error::invalid(
                    "--cache-size needs --cache NAME"
                ));
            }
            if let Some(id) = &cache {
                jobcachefs::sync::ops::pull_if_cold(engine, id);
            }
            let record = engine.volume_create(&CreateRequest {
                dir: a.dir.clone(),
                cache,
                size,
                write_back: a.write_back,
                cache_size,
                ..Default::default()
            })?;
            if json {
                print_json(&record);
            } else {
                println!(
                    "volume {} ready: cache {} generation {} ({} layers), size {}, write-back {}",
                    record.dir.display(),
                    record
                        .cache
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "(none)".into()),
                    record.generation,
                    record.layers.len(),
                    human_bytes(record.size),
                    record.write_back
                );
            }
            Ok(exit::OK)
        }
        VolumeCmd::Delete { dir, discard } => {
            let outcome = engine.volume_delete(dir, *discard)?;
            if json {
                print_json(&outcome);
            } else {
                let text = format!("volume {}: {}", dir.display(), describe_delete(&outcome));
                match outcome {
                    DeleteOutcome::Rejected { .. } => eprintln!("{text}"),
                    _ => println!("{text}"),
                }
            }
            Ok(match outcome {
                DeleteOutcome::Rejected { .. } => exit::QUOTA,
                _ => exit::OK,
            })
        }
        VolumeCmd::Ls => {
            let vols = engine.volume_list()?;
            if json {
                print_json(&vols);
            } else {
                output::print_volumes(&vols);
            }
            Ok(exit::OK)
        }
        VolumeCmd::Show { dir } => {
            let v = engine.volume_show(dir)?;
            if json {
                print_json(&v);
            } else {
                output::print_volumes(std::slice::from_ref(&v));
            }
            Ok(exit::OK)
        }
    }
}

/// The registry of cache `id`: `--image`, else the config's `[[registry]]` for it.
fn remote_for(
    engine: &Engine,
    id: &CacheId,
    args: &SyncArgs,
) -> Result<(jobcachefs::sync::transport::Remote, bool)> {
    jobcachefs::sync::transport::remote_for(
        engine.config(),
        id,
        args.image.as_deref(),
        args.tls_verify,
    )?
    .ok_or_else(|| {
        jobcachefs::Error::invalid(format!(
            "no registry for cache {id}: pass --image REPOSITORY or add a [[registry]] to the config"
        ))
        .into()
    })
}

fn cache(engine: &Engine, cmd: &CacheCmd, json: bool) -> Result<u8> {
    match cmd {
        CacheCmd::Export(a) => {
            let id = a.cache.id()?;
            let (remote, _) = remote_for(engine, &id, a)?;
            jobcachefs::host::cmd::require(&[jobcachefs::host::cmd::SKOPEO])?;
            let r = jobcachefs::sync::ops::export(engine, &id, &remote)?;
            if json {
                print_json(&r);
            } else if r.outcome == "up-to-date" {
                println!(
                    "{} is up to date: generation {}, {} layers",
                    r.image, r.generation, r.layers
                );
            } else {
                println!(
                    "pushed {id} to {}:{} ({} layers, {} new, {}{}) in {:.1} s",
                    r.image,
                    r.generation,
                    r.layers,
                    r.new_layers,
                    human_bytes(r.new_bytes),
                    if r.rebased {
                        ", on top of another node's line"
                    } else {
                        ""
                    },
                    r.seconds
                );
            }
        }
        CacheCmd::Import { sync, cache_size } => {
            let id = sync.cache.id()?;
            let cache_size = cache_size
                .as_deref()
                .map(|s| parse_size("--cache-size", s))
                .transpose()?;
            let (remote, allow_devices) = remote_for(engine, &id, sync)?;
            jobcachefs::host::cmd::require(&[jobcachefs::host::cmd::SKOPEO])?;
            let r = jobcachefs::sync::ops::import(engine, &id, &remote, cache_size, allow_devices)?;
            if json {
                print_json(&r);
            } else if r.outcome == "up-to-date" {
                println!(
                    "{id} is up to date with {} (generation {})",
                    r.image, r.generation
                );
            } else {
                println!(
                    "imported {} into {id}: generation {}, {} new layers ({}){} in {:.1} s",
                    r.image,
                    r.generation,
                    r.new_layers,
                    human_bytes(r.new_bytes),
                    if r.kept_local > 0 {
                        format!(", {} local layers kept on top", r.kept_local)
                    } else {
                        String::new()
                    },
                    r.seconds
                );
            }
        }
        CacheCmd::Ls => {
            let caches = engine.cache_list()?;
            if json {
                print_json(&caches);
            } else {
                output::print_caches(&caches);
            }
        }
        CacheCmd::Show(c) => {
            let info = engine.cache_show(&c.id()?)?;
            if json {
                print_json(&info);
            } else {
                output::print_cache(&info);
            }
        }
        CacheCmd::Squash(c) => {
            let outcome = engine.squash(&c.id()?)?;
            if json {
                print_json(&outcome);
            } else {
                match outcome {
                    SquashOutcome::NothingToDo => println!("cache {} has at most one layer: nothing to squash", c.id()?),
                    SquashOutcome::Squashed { generation, folded, allocated, before } => println!(
                        "cache {} squashed: {folded} layers ({}) into one base ({}), generation {generation}",
                        c.id()?,
                        human_bytes(before),
                        human_bytes(allocated)
                    ),
                }
            }
        }
        CacheCmd::Resize { cache, size } => {
            let id = cache.id()?;
            let size = parse_size("SIZE", size)?;
            let record = engine.cache_resize(&id, size)?;
            if json {
                print_json(&record);
            } else {
                println!("cache {id} limit is now {}", human_bytes(record.cache_size));
            }
        }
        CacheCmd::Rm { cache, yes } => {
            let id = cache.id()?;
            let info = engine.cache_show(&id)?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    anyhow::bail!(jobcachefs::Error::invalid(format!(
                        "refusing to remove cache {id} without confirmation: add --yes"
                    )));
                }
                eprint!(
                    "remove cache {id} ({} on disk, {} live volumes)? [y/N] ",
                    human_bytes(info.on_disk),
                    info.volumes.len()
                );
                let mut answer = String::new();
                std::io::stdin()
                    .read_line(&mut answer)
                    .context("read confirmation")?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    println!("cache {id} kept");
                    return Ok(exit::OK);
                }
            }
            let freed = engine.cache_rm(&id)?;
            if json {
                print_json(
                    &serde_json::json!({"namespace": id.namespace, "name": id.name, "freed": freed}),
                );
            } else {
                println!(
                    "cache {id} removed: {} freed now{}",
                    human_bytes(freed),
                    if info.volumes.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", the rest when its {} live volumes are deleted",
                            info.volumes.len()
                        )
                    }
                );
            }
        }
        CacheCmd::Prune {
            unused_for,
            max_total,
            dry_run,
        } => {
            let age = unused_for
                .as_deref()
                .map(|s| parse_duration("--unused-for", s))
                .transpose()?;
            let budget = max_total
                .as_deref()
                .map(|s| parse_size("--max-total", s))
                .transpose()?;
            if age.is_none() && budget.is_none() {
                anyhow::bail!(jobcachefs::Error::invalid(
                    "cache prune needs --unused-for DURATION and/or --max-total SIZE"
                ));
            }
            let plan = engine.prune(age, budget, *dry_run)?;
            if json {
                print_json(&plan);
            } else {
                output::print_prune(&plan, *dry_run);
            }
        }
    }
    Ok(exit::OK)
}
