//! One GID per cache, the same on every node and never given to another cache of the cluster:
//! a table in the ConfigMap `jobcachefs-gids` (namespace `jobcachefs-system`), key
//! `<namespace>.<name>` (both DNS labels, so the dot is unambiguous), value the GID. Updated
//! with optimistic concurrency: a write carries the `resourceVersion` it read, the API answers
//! 409 to a stale one, and the allocation is re-read and retried. Entries are never removed, so
//! a GID never moves to another cache.

use super::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::input::names::CacheId;
use serde_json::{json, Value};

/// Namespace of the table (where deploy/ installs jobcachefs).
pub const NAMESPACE: &str = "jobcachefs-system";
/// Name of the table.
pub const CONFIGMAP: &str = "jobcachefs-gids";

/// The table's key of a cache.
pub fn key(id: &CacheId) -> String {
    format!("{}.{}", id.namespace, id.name)
}

/// The lowest GID of `range` that `data` does not give to any cache.
pub fn lowest_free(data: &serde_json::Map<String, Value>, range: (u32, u32)) -> Option<u32> {
    let used: std::collections::HashSet<u32> = data
        .values()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect();
    (range.0..=range.1).find(|g| !used.contains(g))
}

/// The GID of cache `id`, allocating it in the cluster's table if it has none.
pub fn cache_gid(client: &Client, id: &CacheId, range: (u32, u32)) -> Result<u32> {
    let path = format!("/api/v1/namespaces/{NAMESPACE}/configmaps/{CONFIGMAP}");
    let what = format!("ConfigMap {NAMESPACE}/{CONFIGMAP}");
    let key = key(id);
    for attempt in 1..=20 {
        let result = match client.get_value(&path, &what)? {
            None => {
                let gid = range.0;
                let body = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": CONFIGMAP, "namespace": NAMESPACE},
                    "data": {key.clone(): gid.to_string()},
                });
                client
                    .write(
                        "POST",
                        &format!("/api/v1/namespaces/{NAMESPACE}/configmaps"),
                        &body,
                        &what,
                    )
                    .map(|_| gid)
            }
            Some(mut cm) => {
                let data = cm["data"].as_object().cloned().unwrap_or_default();
                if let Some(g) = data.get(&key).and_then(|v| v.as_str()) {
                    return g.parse().map_err(|_| {
                        Error::new(
                            ErrorKind::Corrupt,
                            format!("{what} gives cache {id} the GID {g:?}, which is not a number: fix or remove that entry"),
                        )
                    });
                }
                let gid = lowest_free(&data, range).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Quota,
                        format!(
                            "every GID of cache_gids {}-{} is given to a cache in {what}: widen cache_gids",
                            range.0, range.1
                        ),
                    )
                })?;
                if !cm["data"].is_object() {
                    cm["data"] = json!({});
                }
                cm["data"][&key] = Value::String(gid.to_string());
                // The resourceVersion read stays in the body: a concurrent writer makes it stale.
                client.write("PUT", &path, &cm, &what).map(|_| gid)
            }
        };
        match result {
            Ok(gid) => {
                tracing::info!(cache = %id, gid, "cache GID allocated in the cluster");
                return Ok(gid);
            }
            Err(e) if e.kind() == ErrorKind::Conflict => {
                tracing::info!(cache = %id, attempt, "GID table changed meanwhile: reading it again");
                std::thread::sleep(std::time::Duration::from_millis(10 * attempt));
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!("{what} kept changing while allocating a GID for cache {id}: retry the setup"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_gid_no_cache_has_is_given() {
        let mut data = serde_json::Map::new();
        assert_eq!(lowest_free(&data, (10, 12)), Some(10));
        data.insert("a.x".into(), json!("10"));
        data.insert("b.y".into(), json!("12"));
        assert_eq!(lowest_free(&data, (10, 12)), Some(11));
        data.insert("c.z".into(), json!("11"));
        assert_eq!(lowest_free(&data, (10, 12)), None);
    }

    #[test]
    fn keys_cannot_collide() {
        let a = CacheId::new("a-b", "c").unwrap();
        let b = CacheId::new("a", "b-c").unwrap();
        assert_ne!(key(&a), key(&b));
    }
}
