//! `jobcachefs agent`: the node's background worker. Every interval it pulls newer generations of
//! the caches this node holds (and of the configured `prefetch` caches), pushes what was
//! committed here, and drains the squash queue (the hook leaves squashes to it; caches of several
//! layers left idle for `squash_idle_seconds` are squashed too). It serves Prometheus metrics
//! meanwhile. A failing registry is retried with a growing backoff per cache;
//! volume create and delete never wait for any of this. With API access it also discards the
//! hook's volumes whose PV is gone: local-path-provisioner deletes a PV without a teardown when
//! the PV's Node object no longer exists, and nothing else would ever free such a volume.

use super::ops;
use super::transport::remote_for;
use crate::error::{ErrorKind, Result};
use crate::host::cmd::{self, Tool};
use crate::input::config::Config;
use crate::input::names::CacheId;
use crate::k8s::client::Client;
use crate::k8s::hook::labels;
use crate::state::stats::{self, names};
use crate::Engine;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait between attempts at a failing cache.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Time between rounds.
    pub interval: Duration,
    /// Where `/metrics` listens (`None`: no endpoint).
    pub metrics_addr: Option<String>,
    /// Rounds to run (`None`: forever).
    pub rounds: Option<u64>,
    /// This node's Kubernetes name: with API access, the agent labels its Node with the caches
    /// it holds (`crate::k8s::placement`). `None`: no labels (plain runners).
    pub node_name: Option<String>,
}

struct Backoff {
    failures: u32,
    next: Instant,
}

/// The tools the agent runs with `config`: the engine's (gc and squash), and skopeo when any
/// cache has a registry.
fn required_tools(config: &Config) -> Vec<Tool> {
    let mut tools = cmd::ENGINE_TOOLS.to_vec();
    if !config.registries.is_empty() {
        tools.push(cmd::SKOPEO);
    }
    tools
}

/// Runs the agent. Checks its tools first: without skopeo every sync would fail, round after
/// round, far from where the cause is visible.
pub fn run(state_dir: PathBuf, config: Config, opts: AgentOptions) -> Result<()> {
    cmd::require(&required_tools(&config))?;
    let engine = Engine::open(&state_dir, config.clone())?;
    let rounds = Arc::new(AtomicU64::new(0));
    if let Some(addr) = &opts.metrics_addr {
        let listener = TcpListener::bind(addr).map_err(|e| {
            crate::Error::io(
                format!(
                    "listen on {addr} for /metrics (set [agent] metrics_addr or --metrics-addr)"
                ),
                e,
            )
        })?;
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics");
        let (dir, cfg, rounds) = (state_dir.clone(), config.clone(), rounds.clone());
        std::thread::spawn(move || serve(listener, dir, cfg, rounds));
    }
    let api = pv_api(&config);
    let mut labeler = match (&opts.node_name, &api) {
        (Some(node), Some(_)) => {
            pv_api(&config).map(|c| crate::k8s::placement::NodeLabeler::new(c, node.clone()))
        }
        (Some(_), None) => None,
        (None, Some(_)) => {
            tracing::info!("agent: no node name (--node-name, env KUBE_NODE_NAME): the Node is not labelled with its caches, and placement cannot prefer it");
            None
        }
        (None, None) => None,
    };
    let mut backoff: BTreeMap<CacheId, Backoff> = BTreeMap::new();
    loop {
        let started = Instant::now();
        if let Some(api) = &api {
            discard_orphans(&engine, api, Duration::from_secs(config.agent.orphan_after));
        }
        round(&engine, &mut backoff, opts.interval);
        // After the round: its pulls and the commits since the last one are what the node holds.
        if let Some(l) = &mut labeler {
            match engine.cache_list() {
                Ok(caches) => l.round(&caches),
                Err(e) => {
                    tracing::warn!(error = %e, "agent: could not list caches for the node labels")
                }
            }
        }
        let n = rounds.fetch_add(1, Ordering::Relaxed) + 1;
        if opts.rounds.is_some_and(|r| n >= r) {
            return Ok(());
        }
        std::thread::sleep(opts.interval.saturating_sub(started.elapsed()));
    }
}

/// The API client of the orphan check and the node labels, when API access is configured: a service account (in a
/// pod) or an explicit `KUBECONFIG`. Never `~/.kube/config`: a kubeconfig that happens to be
/// there may name another cluster, whose 404s would discard this node's volumes.
fn pv_api(config: &Config) -> Option<Client> {
    let configured = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if !configured {
        tracing::info!("agent: no Kubernetes API access (no service account, no KUBECONFIG): volumes whose PV was deleted without a teardown are not looked for");
        return None;
    }
    let budget = Duration::from_secs(config.kubernetes.api_timeout);
    match crate::k8s::kubeconfig::discover().and_then(|t| Client::new(t, budget)) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "agent: the Kubernetes API is configured but unusable: volumes whose PV was deleted without a teardown are not looked for");
            None
        }
    }
}

/// Discards the hook's volumes (those with a PV label) older than `grace` whose PV the API
/// answers 404 for. Any other answer (an error, a timeout) leaves everything as it is until the
/// next round: only the API's "not found" is proof.
fn discard_orphans(engine: &Engine, api: &Client, grace: Duration) {
    let volumes = match engine.volume_list() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "agent: could not list volumes for the PV check");
            return;
        }
    };
    let now = crate::state::fsutil::now();
    for v in volumes {
        let r = &v.record;
        let Some(pv) = r.labels.get(labels::PV) else {
            continue;
        };
        if r.state != crate::state::records::VolumeState::Ready
            || now.saturating_sub(r.created) < grace.as_secs()
        {
            continue;
        }
        match api.pv_exists(pv) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(pv = %pv, dir = %r.dir.display(), cache = ?r.cache.as_ref().map(|c| c.to_string()), "agent: the volume's PV no longer exists (deleted without a teardown, as the provisioner does when the PV's node object is gone): discarding the volume");
                let done = engine
                    .volume_delete(&r.dir, true)
                    .and_then(|_| crate::k8s::hook::remove_folder(&r.dir));
                if let Err(e) = done {
                    tracing::warn!(pv = %pv, dir = %r.dir.display(), error = %e, "agent: could not discard the volume of a deleted PV; trying again next round");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent: could not ask the API for PVs; checking again next round");
                return;
            }
        }
    }
}

fn round(engine: &Engine, backoff: &mut BTreeMap<CacheId, Backoff>, interval: Duration) {
    let config = engine.config();
    let mut caches: BTreeSet<CacheId> =
        engine.cache_ids().unwrap_or_default().into_iter().collect();
    for p in &config.agent.prefetch {
        match p.split_once('/').map(|(ns, n)| CacheId::new(ns, n)) {
            Some(Ok(id)) => {
                caches.insert(id);
            }
            _ => tracing::warn!(prefetch = %p, "agent.prefetch entries are <namespace>/<name>"),
        }
    }
    for id in caches {
        let remote = match remote_for(config, &id, None, None) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => continue,
            Err(e) => Err(e),
        };
        if backoff.get(&id).is_some_and(|b| Instant::now() < b.next) {
            continue;
        }
        let result = remote.and_then(|(remote, allow_devices)| {
            match ops::import(engine, &id, &remote, None, allow_devices) {
                Ok(r) if r.outcome == "imported" => {
                    tracing::info!(cache = %id, generation = r.generation, new_layers = r.new_layers, "agent: pulled")
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {} // nothing pushed yet
                Err(e) => return Err(e),
            }
            if engine.current(&id)?.layers.is_empty() {
                return Ok(());
            }
            let r = ops::export(engine, &id, &remote)?;
            if r.outcome == "pushed" {
                tracing::info!(cache = %id, generation = r.generation, new_layers = r.new_layers, rebased = r.rebased, "agent: pushed");
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                backoff.remove(&id);
            }
            Err(e) => {
                let b = backoff.entry(id.clone()).or_insert(Backoff {
                    failures: 0,
                    next: Instant::now(),
                });
                b.failures += 1;
                let wait = (interval * 2u32.saturating_pow(b.failures.min(10))).min(MAX_BACKOFF);
                b.next = Instant::now() + wait;
                tracing::warn!(cache = %id, error = %e, failures = b.failures, retry_in_s = wait.as_secs(), "agent: sync failed; backing off");
            }
        }
    }
    match engine.gc(true) {
        Ok(r) if !r.errors.is_empty() => {
            tracing::warn!(errors = ?r.errors, "agent: gc found problems")
        }
        Ok(r) if !r.squashed.is_empty() => {
            tracing::info!(squashed = ?r.squashed, "agent: drained the squash queue")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "agent: gc failed"),
    }
}

fn serve(listener: TcpListener, dir: PathBuf, config: Config, rounds: Arc<AtomicU64>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        let _ = BufReader::new(&conn).read_line(&mut line);
        let (status, body) =
            if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
                match Engine::open(&dir, config.clone()) {
                    Ok(e) => ("200 OK", metrics(&e, rounds.load(Ordering::Relaxed))),
                    Err(e) => ("500 Internal Server Error", format!("{e}\n")),
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of this node.
pub fn metrics(engine: &Engine, rounds: u64) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let caches = engine.cache_list().unwrap_or_default();
    let per_cache = |f: &dyn Fn(&crate::engine::CacheInfo) -> f64| -> Vec<(String, f64)> {
        caches
            .iter()
            .map(|c| {
                (
                    format!(
                        "{{namespace=\"{}\",name=\"{}\"}}",
                        esc(&c.namespace),
                        esc(&c.name)
                    ),
                    f(c),
                )
            })
            .collect()
    };
    type Gauge = (
        &'static str,
        &'static str,
        fn(&crate::engine::CacheInfo) -> f64,
    );
    let gauges: [Gauge; 5] = [
        (
            "jobcachefs_cache_allocated_bytes",
            "Bytes the cache's current layers occupy on the host.",
            |c| c.allocated as f64,
        ),
        (
            "jobcachefs_cache_limit_bytes",
            "The cache's size limit.",
            |c| c.cache_size as f64,
        ),
        (
            "jobcachefs_cache_generation",
            "The cache's current generation on this node.",
            |c| c.generation as f64,
        ),
        (
            "jobcachefs_cache_layers",
            "Layers of the cache's current generation.",
            |c| c.depth as f64,
        ),
        (
            "jobcachefs_cache_squash_queued",
            "1 while a squash of the cache is queued for the agent (or gc), else 0.",
            |c| c.squash_due as u8 as f64,
        ),
    ];
    for (name, help, f) in gauges {
        metric(name, "gauge", help, per_cache(&f));
    }
    // Per cache, not per scope: scope names come from CI refs, one series each would be
    // unbounded cardinality.
    let scopes: std::collections::HashMap<(String, String), (usize, u64)> = caches
        .iter()
        .filter_map(|c| {
            let id = crate::input::names::CacheId::new(&c.namespace, &c.name).ok()?;
            let list = engine.scope_list(&id).ok()?;
            Some((
                (c.namespace.clone(), c.name.clone()),
                (list.len(), list.iter().map(|s| s.allocated).sum()),
            ))
        })
        .collect();
    let scope_of = |c: &crate::engine::CacheInfo| {
        scopes
            .get(&(c.namespace.clone(), c.name.clone()))
            .copied()
            .unwrap_or_default()
    };
    metric(
        "jobcachefs_cache_scopes",
        "gauge",
        "Scopes of the cache on this node (pull-request and branch scopes).",
        per_cache(&|c| scope_of(c).0 as f64),
    );
    metric(
        "jobcachefs_cache_scope_allocated_bytes",
        "gauge",
        "Bytes all scopes of the cache allocate on this node.",
        per_cache(&|c| scope_of(c).1 as f64),
    );
    let bound = engine.config().max_depth_hard as f64;
    metric(
        "jobcachefs_cache_depth_bound",
        "gauge",
        "The hard bound on the cache's layers (max_depth_hard): past it the newest are merged.",
        per_cache(&|_| bound),
    );
    let live = engine.volume_list().map(|v| v.len()).unwrap_or(0);
    metric(
        "jobcachefs_volumes_live",
        "gauge",
        "Volumes on this node.",
        vec![(String::new(), live as f64)],
    );
    let s = stats::read(engine.layout());
    let get = |k: &str| s.get(k).copied().unwrap_or(0) as f64;
    metric(
        "jobcachefs_squashes_queued",
        "gauge",
        "Caches on this node with a squash queued.",
        vec![(
            String::new(),
            caches.iter().filter(|c| c.squash_due).count() as f64,
        )],
    );
    // Only caches that ever synced: a cache without a registry has no staleness to alert on.
    let synced: Vec<(String, f64)> = caches
        .iter()
        .filter_map(|c| {
            let id = CacheId::new(&c.namespace, &c.name).ok()?;
            let at = s.get(&stats::sync_ok_key(&id))?;
            Some((
                format!(
                    "{{namespace=\"{}\",name=\"{}\"}}",
                    esc(&c.namespace),
                    esc(&c.name)
                ),
                *at as f64,
            ))
        })
        .collect();
    metric(
        "jobcachefs_cache_last_sync_success_timestamp_seconds",
        "gauge",
        "When an import or export of the cache last reached its registry and finished (unix seconds).",
        synced,
    );
    metric(
        "jobcachefs_commits_rejected_total",
        "counter",
        "Write-back deletes that did not commit: cache_size (too large even squashed; the previous generation stays), not_committed (an image not cleanly unmounted after a crash, or a clone volume without the write lease).",
        vec![
            ("{reason=\"cache_size\"}".into(), get(names::COMMITS_REJECTED)),
            ("{reason=\"not_committed\"}".into(), get(names::COMMITS_NOT_COMMITTED)),
        ],
    );
    metric(
        "jobcachefs_admission_refusals_total",
        "counter",
        "Volume creates refused because the state dir's disk could not back them.",
        vec![(String::new(), get(names::ADMISSION_REFUSALS))],
    );
    metric(
        "jobcachefs_volumes_created_total",
        "counter",
        "Volumes created, by the state of their cache: warm (a hit), cold (a miss) or none.",
        vec![
            ("{cache=\"warm\"}".into(), get(names::VOLUMES_WARM)),
            ("{cache=\"cold\"}".into(), get(names::VOLUMES_COLD)),
            ("{cache=\"none\"}".into(), get(names::VOLUMES_PLAIN)),
        ],
    );
    for (name, key, help) in [
        (
            "jobcachefs_commits_total",
            names::COMMITS,
            "Commits published.",
        ),
        (
            "jobcachefs_scope_commits_total",
            names::SCOPE_COMMITS,
            "Commits published into a scope of a cache (pull-request and branch builds).",
        ),
        (
            "jobcachefs_commits_declined_total",
            names::COMMITS_DECLINED,
            "Write-back on-success volumes whose job left no success marker: discarded, not committed.",
        ),
        (
            "jobcachefs_squashes_total",
            names::SQUASHES,
            "Squashes published.",
        ),
        (
            "jobcachefs_clone_generations_superseded_total",
            names::CLONE_SUPERSEDED,
            "Generations of clone caches a last-writer-wins commit replaced without having started from them (their changes are not in the cache).",
        ),
        (
            "jobcachefs_pushes_total",
            names::PUSHES,
            "Pushes that changed the registry.",
        ),
        (
            "jobcachefs_push_bytes_total",
            names::PUSH_BYTES,
            "Compressed bytes of layers new to the registry.",
        ),
        (
            "jobcachefs_push_failures_total",
            names::PUSH_FAILURES,
            "Failed pushes.",
        ),
        (
            "jobcachefs_pulls_total",
            names::PULLS,
            "Pulls that changed a cache.",
        ),
        (
            "jobcachefs_pull_bytes_total",
            names::PULL_BYTES,
            "Compressed bytes of layers downloaded.",
        ),
        (
            "jobcachefs_pull_failures_total",
            names::PULL_FAILURES,
            "Failed pulls.",
        ),
    ] {
        metric(name, "counter", help, vec![(String::new(), get(key))]);
    }
    metric(
        "jobcachefs_push_seconds_total",
        "counter",
        "Time spent pushing.",
        vec![(String::new(), get(names::PUSH_MS) / 1000.0)],
    );
    metric(
        "jobcachefs_pull_seconds_total",
        "counter",
        "Time spent pulling.",
        vec![(String::new(), get(names::PULL_MS) / 1000.0)],
    );
    metric(
        "jobcachefs_csi_publish_failures_total",
        "counter",
        "CSI NodePublishVolume calls that failed (kubelet retries them).",
        vec![(String::new(), get(names::CSI_PUBLISH_FAILURES))],
    );
    metric(
        "jobcachefs_csi_unpublish_failures_total",
        "counter",
        "CSI NodeUnpublishVolume calls that failed (kubelet retries them).",
        vec![(String::new(), get(names::CSI_UNPUBLISH_FAILURES))],
    );
    metric(
        "jobcachefs_agent_rounds_total",
        "counter",
        "Sync rounds this agent process finished.",
        vec![(String::new(), rounds as f64)],
    );
    for (name, help) in stats::histograms::ALL {
        let (buckets, count, sum) = stats::histogram(&s, name);
        let full = format!("jobcachefs_{name}");
        out.push_str(&format!("# HELP {full} {help}\n# TYPE {full} histogram\n"));
        for (le, n) in buckets {
            out.push_str(&format!("{full}_bucket{{le=\"{le}\"}} {n}\n"));
        }
        out.push_str(&format!("{full}_sum {sum}\n{full}_count {count}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config::RegistryConfig;

    #[test]
    fn skopeo_is_required_only_with_a_registry() {
        let names =
            |c: &Config| -> Vec<&str> { required_tools(c).iter().map(|t| t.name).collect() };
        let mut config = Config::default();
        assert!(!names(&config).contains(&"skopeo"));
        config.registries.push(RegistryConfig {
            caches: String::new(),
            image: "r.example.com/caches".into(),
            tls_verify: true,
            allow_devices: false,
            pull_on_create: false,
            direct_blobs: true,
            timeout: 300,
        });
        assert!(names(&config).contains(&"skopeo"));
        assert!(names(&config).contains(&"mkfs.ext4"));
    }
}
