//! Placement: what a node tells the cluster about the caches it holds, so that a build can be
//! scheduled where its cache is warm (the webhook in `crate::webhook` reads it) and an operator
//! can ask which nodes hold a cache (`cache where`).
//!
//! The contract (README "Placement"):
//! - **Label** `cache.jobcachefs.io/<namespace>.<name>` on the Node, one per cache that has a
//!   committed generation on the node; the value is that generation (decimal). Label names are
//!   at most 63 characters; when `<namespace>.<name>` is longer, the name is `h-` and the first
//!   40 hex digits of its SHA-256 instead. A plain name always has a dot and a hashed one never
//!   does, so the two cannot collide; anyone can compute either from the cache's id
//!   ([`label_key`]), which is all the webhook needs.
//! - **Annotation** `jobcachefs.io/caches` on the Node: a JSON object `{"<namespace>/<name>":
//!   {"generation", "allocated", "limit", "lastUsed", "mode"}}` with what labels cannot carry
//!   (sizes, last use), for `cache where`. Annotations are not selectable and have no length limit
//!   to speak of (256 KiB for all of a node's).
//!
//! Only the node's agent writes them, to its own Node (the name from the downward API), with a
//! JSON merge patch that carries the `resourceVersion` it read: a concurrent change answers 409
//! and the agent reads again. It writes only when something changed, so an idle node costs the
//! API server one GET every [`RESYNC`] and a busy one at most one PATCH per agent round.

use super::client::Client;
use crate::engine::CacheInfo;
use crate::error::{ErrorKind, Result};
use crate::input::names::CacheId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The label prefix of warm caches.
pub const LABEL_PREFIX: &str = "cache.jobcachefs.io/";
/// The Node annotation with the details.
pub const ANNOTATION_CACHES: &str = "jobcachefs.io/caches";
/// How often the agent reads its Node again although nothing changed here (someone may have
/// edited the labels).
pub const RESYNC: Duration = Duration::from_secs(600);
/// The longest label name Kubernetes allows (the part after the prefix).
const NAME_MAX: usize = 63;

/// The Node label of cache `id`.
pub fn label_key(id: &CacheId) -> String {
    let plain = format!("{}.{}", id.namespace, id.name);
    if plain.len() <= NAME_MAX {
        return format!("{LABEL_PREFIX}{plain}");
    }
    let digest = Sha256::digest(plain.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{LABEL_PREFIX}h-{}", &hex[..40])
}

/// What a node says about one of its caches (the annotation's entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCache {
    /// The current generation on the node.
    pub generation: u64,
    /// Bytes its layers allocate.
    pub allocated: u64,
    /// Its size limit.
    pub limit: u64,
    /// Unix seconds of the last volume made from it.
    pub last_used: u64,
    /// `overlay` or `clone`.
    pub mode: String,
}

/// Everything a node says: `"<namespace>/<name>"` → details.
pub type NodeCaches = BTreeMap<String, NodeCache>;

/// What the node should say, from its caches: those with a committed generation (a cache
/// with none holds nothing a build could use).
pub fn desired(caches: &[CacheInfo]) -> NodeCaches {
    caches
        .iter()
        .filter(|c| c.generation > 0 && !c.layers.is_empty())
        .map(|c| {
            (
                format!("{}/{}", c.namespace, c.name),
                NodeCache {
                    generation: c.generation,
                    allocated: c.allocated,
                    limit: c.cache_size,
                    last_used: c.last_used,
                    mode: c.mode.as_str().to_string(),
                },
            )
        })
        .collect()
}

/// The labels `caches` make.
fn labels_of(caches: &NodeCaches) -> BTreeMap<String, String> {
    caches
        .iter()
        .filter_map(|(k, v)| {
            let (ns, name) = k.split_once('/')?;
            let id = CacheId::new(ns, name).ok()?;
            Some((label_key(&id), v.generation.to_string()))
        })
        .collect()
}

/// The JSON merge patch that turns `node`'s labels and annotation into what `caches` say, or
/// `None` when they already do. Labels under [`LABEL_PREFIX`] that `caches` do not make are
/// removed: the state dir is the truth (a node whose state was wiped says it holds nothing).
pub fn node_patch(node: &Value, caches: &NodeCaches) -> Option<Value> {
    let meta = &node["metadata"];
    let have_labels = meta["labels"].as_object().cloned().unwrap_or_default();
    let want_labels = labels_of(caches);
    let mut labels = Map::new();
    for k in have_labels.keys() {
        if k.starts_with(LABEL_PREFIX) && !want_labels.contains_key(k) {
            labels.insert(k.clone(), Value::Null);
        }
    }
    for (k, v) in &want_labels {
        if have_labels.get(k).and_then(Value::as_str) != Some(v) {
            labels.insert(k.clone(), Value::String(v.clone()));
        }
    }
    let have_note: Option<NodeCaches> = meta["annotations"][ANNOTATION_CACHES]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok());
    let note = match (&have_note, caches.is_empty()) {
        (Some(h), _) if h == caches => None,
        (None, true) if meta["annotations"][ANNOTATION_CACHES].is_null() => None,
        (_, true) => Some(Value::Null),
        (_, false) => Some(Value::String(
            serde_json::to_string(caches).expect("plain data serializes"),
        )),
    };
    if labels.is_empty() && note.is_none() {
        return None;
    }
    let mut patch_meta = Map::new();
    // The precondition: a Node changed since it was read answers 409, and is read again.
    if let Some(rv) = meta["resourceVersion"].as_str() {
        patch_meta.insert("resourceVersion".into(), json!(rv));
    }
    if !labels.is_empty() {
        patch_meta.insert("labels".into(), Value::Object(labels));
    }
    if let Some(n) = note {
        patch_meta.insert("annotations".into(), json!({ ANNOTATION_CACHES: n }));
    }
    Some(json!({ "metadata": patch_meta }))
}

/// What one sync of the Node did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The Node already said it.
    Unchanged,
    /// One PATCH made it say it.
    Patched,
}

/// Makes Node `node` say `caches`: read, patch if needed, and on a conflict read again.
pub fn sync_node(api: &Client, node: &str, caches: &NodeCaches) -> Result<Synced> {
    let path = format!("/api/v1/nodes/{node}");
    let what = format!("Node {node}");
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let current = api.get_value(&path, &what)?.ok_or_else(|| {
            crate::Error::new(
                ErrorKind::NotFound,
                format!("{what} does not exist: check the node name the agent was given (--node-name, env KUBE_NODE_NAME from spec.nodeName)"),
            )
        })?;
        let Some(patch) = node_patch(&current, caches) else {
            return Ok(Synced::Unchanged);
        };
        match api.patch(&path, &patch, &what) {
            Ok(_) => return Ok(Synced::Patched),
            Err(e) if e.kind() == ErrorKind::Conflict && attempt < 10 => {
                tracing::info!(node, attempt, "Node changed meanwhile: reading it again");
                std::thread::sleep(Duration::from_millis(20 * attempt));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The agent's side: syncs when the node's caches changed, or every [`RESYNC`].
pub struct NodeLabeler {
    api: Client,
    node: String,
    last: Option<(NodeCaches, Instant)>,
    /// PATCHes made (for the log and the tests).
    pub patches: u64,
}

impl NodeLabeler {
    /// A labeler of Node `node`.
    pub fn new(api: Client, node: String) -> Self {
        NodeLabeler {
            api,
            node,
            last: None,
            patches: 0,
        }
    }

    /// One round: what the node holds now, published if it changed. Failures are logged and
    /// retried next round; placement is a preference, never a reason to stop syncing caches.
    pub fn round(&mut self, caches: &[CacheInfo]) {
        let want = desired(caches);
        if let Some((last, at)) = &self.last {
            if *last == want && at.elapsed() < RESYNC {
                return;
            }
        }
        match sync_node(&self.api, &self.node, &want) {
            Ok(s) => {
                if s == Synced::Patched {
                    self.patches += 1;
                    tracing::info!(node = %self.node, caches = want.len(), "agent: node labels updated");
                }
                self.last = Some((want, Instant::now()));
            }
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "agent: could not label the node with its caches; trying again next round");
                self.last = None;
            }
        }
    }
}

/// One node's entry of the cluster view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Holding {
    /// The cache, `namespace/name`.
    pub cache: String,
    /// The node.
    pub node: String,
    /// What the node says of it.
    #[serde(flatten)]
    pub details: NodeCache,
}

/// The cluster view from a NodeList: who holds what (sorted by cache, then newest generation
/// first). A node's annotation that does not parse is skipped with a log line, as is a node that
/// labels a cache its annotation lacks (it is being updated).
pub fn holdings(nodes: &Value, only: Option<&CacheId>) -> Vec<Holding> {
    let mut out = Vec::new();
    for node in nodes["items"].as_array().into_iter().flatten() {
        let name = node["metadata"]["name"].as_str().unwrap_or_default();
        let Some(text) = node["metadata"]["annotations"][ANNOTATION_CACHES].as_str() else {
            continue;
        };
        let caches: NodeCaches = match serde_json::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(node = name, error = %e, "the node's {ANNOTATION_CACHES} annotation does not parse: skipped");
                continue;
            }
        };
        for (cache, details) in caches {
            if only.is_some_and(|id| cache != format!("{}/{}", id.namespace, id.name)) {
                continue;
            }
            out.push(Holding {
                cache,
                node: name.to_string(),
                details,
            });
        }
    }
    out.sort_by(|a, b| {
        a.cache
            .cmp(&b.cache)
            .then(b.details.generation.cmp(&a.details.generation))
            .then(a.node.cmp(&b.node))
    });
    out
}

/// Reads the cluster view: every Node (or, for one cache, the Nodes labelled with it).
pub fn cluster_view(api: &Client, only: Option<&CacheId>) -> Result<Vec<Holding>> {
    let path = match only {
        Some(id) => format!(
            "/api/v1/nodes?labelSelector={}",
            label_key(id).replace('/', "%2F")
        ),
        None => "/api/v1/nodes".to_string(),
    };
    let nodes = api
        .get_value(&path, "the cluster's Nodes")?
        .unwrap_or(Value::Null);
    Ok(holdings(&nodes, only))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caches(entries: &[(&str, u64)]) -> NodeCaches {
        entries
            .iter()
            .map(|(k, g)| {
                (
                    k.to_string(),
                    NodeCache {
                        generation: *g,
                        allocated: 1 << 20,
                        limit: 1 << 30,
                        last_used: 1_700_000_000,
                        mode: "overlay".into(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn label_keys_fit_and_never_collide() {
        let short = CacheId::new("ci", "maven").unwrap();
        assert_eq!(label_key(&short), "cache.jobcachefs.io/ci.maven");
        let long = CacheId::new(&"n".repeat(40), &"c".repeat(40)).unwrap();
        let key = label_key(&long);
        let name = key.strip_prefix(LABEL_PREFIX).unwrap();
        assert!(name.len() <= 63 && name.starts_with("h-") && !name.contains('.'));
        // Deterministic, and another long id hashes elsewhere.
        assert_eq!(key, label_key(&long));
        let other = CacheId::new(&"n".repeat(40), &"d".repeat(40)).unwrap();
        assert_ne!(key, label_key(&other));
        // Exactly 63 stays plain.
        let edge = CacheId::new(&"a".repeat(31), &"b".repeat(31)).unwrap();
        assert_eq!(label_key(&edge).len(), LABEL_PREFIX.len() + 63);
        assert!(label_key(&edge).contains('.'));
    }

    #[test]
    fn the_patch_adds_updates_and_removes_only_our_labels() {
        let node = json!({"metadata": {
            "name": "n1", "resourceVersion": "7",
            "labels": {
                "kubernetes.io/hostname": "n1",
                "cache.jobcachefs.io/ci.old": "3",
                "cache.jobcachefs.io/ci.maven": "1"
            }
        }});
        let want = caches(&[("ci/maven", 2), ("ci/npm", 1)]);
        let p = node_patch(&node, &want).unwrap();
        let labels = &p["metadata"]["labels"];
        assert_eq!(labels["cache.jobcachefs.io/ci.old"], Value::Null);
        assert_eq!(labels["cache.jobcachefs.io/ci.maven"], "2");
        assert_eq!(labels["cache.jobcachefs.io/ci.npm"], "1");
        assert!(labels.get("kubernetes.io/hostname").is_none());
        assert_eq!(p["metadata"]["resourceVersion"], "7");
        let note: NodeCaches = serde_json::from_str(
            p["metadata"]["annotations"][ANNOTATION_CACHES]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(note, want);
    }

    #[test]
    fn a_node_that_says_it_already_is_not_patched() {
        let want = caches(&[("ci/maven", 2)]);
        let node = json!({"metadata": {
            "labels": {"cache.jobcachefs.io/ci.maven": "2"},
            "annotations": {ANNOTATION_CACHES: serde_json::to_string(&want).unwrap()}
        }});
        assert_eq!(node_patch(&node, &want), None);
        // Nothing held, nothing said: no patch either.
        assert_eq!(
            node_patch(&json!({"metadata": {}}), &NodeCaches::new()),
            None
        );
        // Nothing held any more: the labels and the annotation go.
        let p = node_patch(&node, &NodeCaches::new()).unwrap();
        assert_eq!(
            p["metadata"]["labels"]["cache.jobcachefs.io/ci.maven"],
            Value::Null
        );
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_CACHES], Value::Null);
    }

    #[test]
    fn the_cluster_view_reads_annotations_and_skips_bad_ones() {
        let a = caches(&[("ci/maven", 2), ("ci/npm", 1)]);
        let b = caches(&[("ci/maven", 3)]);
        let list = json!({"items": [
            {"metadata": {"name": "n1", "annotations": {ANNOTATION_CACHES: serde_json::to_string(&a).unwrap()}}},
            {"metadata": {"name": "n2", "annotations": {ANNOTATION_CACHES: serde_json::to_string(&b).unwrap()}}},
            {"metadata": {"name": "n3", "annotations": {ANNOTATION_CACHES: "{not json"}}},
            {"metadata": {"name": "n4"}}
        ]});
        let all = holdings(&list, None);
        let got: Vec<(&str, &str, u64)> = all
            .iter()
            .map(|h| (h.cache.as_str(), h.node.as_str(), h.details.generation))
            .collect();
        assert_eq!(
            got,
            [
                ("ci/maven", "n2", 3),
                ("ci/maven", "n1", 2),
                ("ci/npm", "n1", 1)
            ]
        );
        let id = CacheId::new("ci", "npm").unwrap();
        assert_eq!(holdings(&list, Some(&id)).len(), 1);
    }
}
