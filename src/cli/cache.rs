//! `cache ls|show|squash|resize|rm|export|import|prune`: one function per subcommand.

use super::exit;
use super::output::{self, json_or, print_json};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use jobcachefs::engine::SquashOutcome;
use jobcachefs::input::names::{CacheId, DEFAULT_NAMESPACE};
use jobcachefs::input::quantity::{human_bytes, parse_duration, parse_size};
use jobcachefs::sync::{ops, transport::Remote};
use jobcachefs::Engine;
use std::io::IsTerminal;

#[derive(Subcommand)]
pub(super) enum CacheCmd {
    /// List caches.
    Ls,
    /// Show a cache: generation, layers, limit and use, live volumes.
    Show(CacheRef),
    /// Squash the cache's layers into one base now; with --scope, merge that scope's layers
    /// into one delta layer instead.
    Squash {
        #[command(flatten)]
        cache: CacheRef,
        /// Merge this scope's layers (whiteouts and opaque dirs kept), not the cache's.
        #[arg(long)]
        scope: Option<String>,
        /// A metadata squash: one base of metadata whose files redirect into the old layers
        /// (O(files), not O(bytes); Linux 6.16+; refused, with the reason, where it cannot be).
        #[arg(long, conflicts_with_all = ["full", "scope"])]
        metadata: bool,
        /// A full squash whatever squash_method says.
        #[arg(long, conflicts_with = "scope")]
        full: bool,
    },
    /// Change a cache's size limit.
    Resize {
        #[command(flatten)]
        cache: CacheRef,
        /// New limit (e.g. 20Gi).
        size: String,
    },
    /// Remove a cache, or one of its scopes with --scope (live volumes keep working; space is
    /// freed when the last goes).
    Rm {
        #[command(flatten)]
        cache: CacheRef,
        /// Remove only this scope of the cache (a pull request's or a branch's layers).
        #[arg(long)]
        scope: Option<String>,
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
    /// List the cache's generations, newest first, with what produced each (commit: volume,
    /// PVC, PV, node; squash; import; rollback; resize).
    History {
        /// The cache.
        name: String,
        /// Namespace of the cache (`-n` is the count here, as in `git log -n`).
        #[arg(long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        /// Show at most this many.
        #[arg(short = 'n', long = "limit")]
        limit: Option<usize>,
        /// The history of this scope of the cache instead (its last 20 publishes).
        #[arg(long)]
        scope: Option<String>,
    },
    /// Publish an earlier generation's content as a new generation (live volumes keep theirs).
    Rollback {
        #[command(flatten)]
        cache: CacheRef,
        /// The generation to return to (see `cache history`).
        #[arg(long)]
        to: u64,
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
    /// Which nodes of the cluster hold a cache, or every cache without NAME: generation,
    /// allocated size, limit and last use, as each node's agent publishes them on its Node
    /// (reads the Kubernetes API as kubectl finds it: KUBECONFIG, ~/.kube/config, or a pod's
    /// service account).
    Where {
        /// The cache (every cache when absent).
        name: Option<String>,
        /// Namespace of the cache (default: `default` with NAME; every namespace without).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

#[derive(Args)]
pub(super) struct SyncArgs {
    #[command(flatten)]
    cache: CacheRef,
    /// Repository of the cache's image, without tag (default: from the config's [[registry]]);
    /// import also takes REPOSITORY:TAG or REPOSITORY@sha256:DIGEST (any image, to seed a cache).
    #[arg(long)]
    image: Option<String>,
    /// Verify the registry's TLS certificate (--tls-verify=false for a plain-HTTP registry).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    tls_verify: Option<bool>,
}

#[derive(Args)]
pub(super) struct CacheRef {
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

pub(super) fn run(engine: &Engine, cmd: &CacheCmd, json: bool) -> Result<u8> {
    match cmd {
        CacheCmd::Ls => ls(engine, json)?,
        CacheCmd::Show(c) => show(engine, &c.id()?, json)?,
        CacheCmd::Squash {
            cache,
            scope: None,
            metadata,
            full,
        } => {
            let id = cache.id()?;
            let outcome = if *metadata {
                engine.squash_metadata(&id)?
            } else if *full {
                engine.squash_full(&id)?
            } else {
                engine.squash(&id)?
            };
            squash(&id, outcome, json)?
        }
        CacheCmd::Squash {
            cache,
            scope: Some(scope),
            ..
        } => {
            let id = cache.id()?;
            let generation = engine.scope_squash(&id, scope)?;
            if json {
                print_json(
                    &serde_json::json!({"namespace": id.namespace, "name": id.name, "scope": scope, "generation": generation}),
                );
            } else {
                match generation {
                    Some(g) => println!(
                        "scope {scope} of cache {id} merged into one layer: its generation {g}"
                    ),
                    None => println!(
                        "scope {scope} of cache {id} has at most one layer: nothing to merge"
                    ),
                }
            }
        }
        CacheCmd::Resize { cache, size } => resize(engine, cache, size, json)?,
        CacheCmd::Rm {
            cache,
            yes: _,
            scope: Some(scope),
        } => {
            // A scope holds only what its own builds wrote: no confirmation, as a volume delete.
            let id = cache.id()?;
            let freed = engine.scope_rm(&id, scope)?;
            if json {
                print_json(
                    &serde_json::json!({"namespace": id.namespace, "name": id.name, "scope": scope, "freed": freed}),
                );
            } else {
                println!(
                    "scope {scope} of cache {id} removed: {} freed now",
                    human_bytes(freed)
                );
            }
        }
        CacheCmd::Rm {
            cache,
            yes,
            scope: None,
        } => rm(engine, &cache.id()?, *yes, json)?,
        CacheCmd::Export(a) => export(engine, a, json)?,
        CacheCmd::Import { sync, cache_size } => import(engine, sync, cache_size.as_deref(), json)?,
        CacheCmd::History {
            name,
            namespace,
            limit,
            scope: None,
        } => {
            let id = CacheId::new(namespace, name)?;
            json_or(json, &engine.cache_history(&id, *limit)?, |h| {
                output::print_history(h)
            })
        }
        CacheCmd::History {
            name,
            namespace,
            limit,
            scope: Some(scope),
        } => {
            let id = CacheId::new(namespace, name)?;
            let h = engine.scope_history(&id, scope, *limit)?;
            json_or(json, &h, |h| output::print_scope_history(h))
        }
        CacheCmd::Rollback { cache, to } => {
            let id = cache.id()?;
            let g = engine.cache_rollback(&id, *to)?;
            if json {
                print_json(&g);
            } else {
                println!(
                    "cache {id} rolled back to generation {to}'s content, published as generation {}",
                    g.generation
                );
            }
        }
        CacheCmd::Prune {
            unused_for,
            max_total,
            dry_run,
        } => prune(
            engine,
            unused_for.as_deref(),
            max_total.as_deref(),
            *dry_run,
            json,
        )?,
        CacheCmd::Where { .. } => unreachable!("run_where runs without the engine"),
    }
    Ok(exit::OK)
}

/// `cache where`: needs the API, not this machine's state dir (an operator runs it anywhere).
pub(super) fn run_where(
    config: &jobcachefs::input::config::Config,
    cmd: &CacheCmd,
    json: bool,
) -> Result<u8> {
    let CacheCmd::Where { name, namespace } = cmd else {
        unreachable!("only cache where");
    };
    let only = match name {
        Some(n) => Some(CacheId::new(
            namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
            n,
        )?),
        None => None,
    };
    let api = jobcachefs::k8s::volumes::client(config)?;
    let mut view = jobcachefs::k8s::placement::cluster_view(&api, only.as_ref())?;
    if let (None, Some(ns)) = (&only, namespace) {
        view.retain(|h| h.cache.split_once('/').is_some_and(|(n, _)| n == ns));
    }
    json_or(json, &view, |v| output::print_holdings(v));
    Ok(match (&only, view.is_empty()) {
        // As `cache show` of a missing cache: scripts can branch on "nowhere".
        (Some(_), true) => {
            eprintln!(
                "no node says it holds cache {}: its agents publish what they hold every round (--node-name, API access)",
                only.as_ref().map(|i| i.to_string()).unwrap_or_default()
            );
            exit::NOT_FOUND
        }
        _ => exit::OK,
    })
}

fn ls(engine: &Engine, json: bool) -> Result<()> {
    json_or(json, &engine.cache_list()?, |c| output::print_caches(c));
    Ok(())
}

fn show(engine: &Engine, id: &CacheId, json: bool) -> Result<()> {
    json_or(json, &engine.cache_show(id)?, output::print_cache);
    Ok(())
}

fn squash(id: &CacheId, outcome: SquashOutcome, json: bool) -> Result<()> {
    if json {
        print_json(&outcome);
        return Ok(());
    }
    match outcome {
        SquashOutcome::NothingToDo => {
            println!("cache {id} has at most one layer: nothing to squash")
        }
        SquashOutcome::Squashed {
            generation,
            folded,
            allocated,
            before,
        } => println!(
            "cache {id} squashed: {folded} layers ({}) into one base ({}), generation {generation}",
            human_bytes(before),
            human_bytes(allocated)
        ),
    }
    Ok(())
}

fn resize(engine: &Engine, cache: &CacheRef, size: &str, json: bool) -> Result<()> {
    let id = cache.id()?;
    let size = parse_size("SIZE", size)?;
    let record = engine.cache_resize(&id, size)?;
    if json {
        print_json(&record);
    } else {
        println!("cache {id} limit is now {}", human_bytes(record.cache_size));
    }
    Ok(())
}

/// Removes a cache after asking on a terminal; without a terminal `--yes` is required.
fn rm(engine: &Engine, id: &CacheId, yes: bool, json: bool) -> Result<()> {
    let info = engine.cache_show(id)?;
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
            return Ok(());
        }
    }
    let freed = engine.cache_rm(id)?;
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
    Ok(())
}

/// The registry of cache `id`: `--image`, else the config's `[[registry]]` for it; and whether
/// its imports accept device nodes.
fn remote_for(engine: &Engine, id: &CacheId, args: &SyncArgs) -> Result<(Remote, bool)> {
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

fn export(engine: &Engine, a: &SyncArgs, json: bool) -> Result<()> {
    let id = a.cache.id()?;
    let (remote, _) = remote_for(engine, &id, a)?;
    jobcachefs::host::cmd::require(&[jobcachefs::host::cmd::SKOPEO])?;
    let r = ops::export(engine, &id, &remote)?;
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
    Ok(())
}

fn import(engine: &Engine, a: &SyncArgs, cache_size: Option<&str>, json: bool) -> Result<()> {
    let id = a.cache.id()?;
    let cache_size = cache_size
        .map(|s| parse_size("--cache-size", s))
        .transpose()?;
    let (remote, allow_devices) = remote_for(engine, &id, a)?;
    jobcachefs::host::cmd::require(&[jobcachefs::host::cmd::SKOPEO])?;
    let r = ops::import(engine, &id, &remote, cache_size, allow_devices)?;
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
    Ok(())
}

fn prune(
    engine: &Engine,
    unused_for: Option<&str>,
    max_total: Option<&str>,
    dry_run: bool,
    json: bool,
) -> Result<()> {
    let age = unused_for
        .map(|s| parse_duration("--unused-for", s))
        .transpose()?;
    let budget = max_total
        .map(|s| parse_size("--max-total", s))
        .transpose()?;
    if age.is_none() && budget.is_none() {
        anyhow::bail!(jobcachefs::Error::invalid(
            "cache prune needs --unused-for DURATION and/or --max-total SIZE"
        ));
    }
    let plan = engine.prune(age, budget, dry_run)?;
    json_or(json, &plan, |p| output::print_prune(p, dry_run));
    Ok(())
}
