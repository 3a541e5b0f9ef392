//! Registry sync of clone-mode caches: a clone cache's generation (one ext4 image) ⇄ a line
//! of tar layers of its file tree — never a filesystem image from the network.
//!
//! The first export pushes the whole tree as one layer. Each later export pushes one *delta*:
//! the entries that differ between the current generation's tree and the tree of the last
//! exported (or imported) generation, plus `.wh.` whiteouts for what was deleted. That older
//! tree may be gone from this node (old generations are collected), so what a delta needs of it
//! is recorded when it is pushed or pulled: a per-file manifest (path, type, size, mtime in ns,
//! mode, owner, device number, a hash of the xattrs and of the content, the hardlink group) in
//! `<state>/sync/oci/records/clone/<ns>/<name>.json`, with the line it describes. A line deeper
//! than `max_depth`, a line another node pushed meanwhile, or no record: a full layer again.
//!
//! Several nodes: the last writer wins, as between two clone volumes of one node with
//! `clone_writers = "last-writer-wins"`. An export of new local commits replaces a line another
//! node pushed (logged); an import onto a node with commits it has not exported keeps them
//! (outcome `kept-local`, the next export pushes them).
//!
//! Import rebuilds the generation image in the clone store from the layers in order — from a
//! fresh ext4 image of the cache-size, or from a reflink clone of this node's image of the
//! recorded line when the registry's line extends it (only the new deltas are downloaded and
//! applied) — checks it (e2fsck) and publishes it atomically. Whiteout devices and
//! `trusted.overlay.*` xattrs in the tree are data and round-trip exactly (see
//! [`super::tarlayer`]).
//!
//! Crash points: a half-built image is in `<clone store>/sync`, removed by the next import; a
//! crash between the rename into the cache and the publish leaves an unreferenced image, which
//! gc removes; a crash before the record is written makes the next export push a full layer.

use super::{
    open_blob, pull_blobs, push_manifest, read_remote, scan, ExportReport, ImportReport,
    PrivateMount, RemoteLine, PUSH_ATTEMPTS,
};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::files::walk::{walk_sorted, Step};
use crate::input::names::CacheId;
use crate::state::fsutil::{self, ensure_dir, read_json, write_json_atomic};
use crate::state::layout::clone_store;
use crate::state::records::{CacheMode, Generation, LayerInfo};
use crate::sync::oci::{self, BlobRecord, Descriptor, Manifest, Store};
use crate::sync::tarlayer::{self, ImportPolicy};
use crate::sync::transport::{Remote, LATEST};
use crate::{fault, Engine};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One entry of a tree manifest: what decides whether an entry changed between two trees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileRecord {
    /// `f` file, `d` dir, `l` symlink, `c`/`b` device, `p` fifo, `s` socket.
    pub kind: char,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size of a file.
    pub size: u64,
    /// mtime: seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Device number of a device node.
    pub rdev: u64,
    /// SHA-256 of the xattrs (names and values, in name order), overlay xattrs included.
    pub xattrs: String,
    /// SHA-256 of a file's content, or a symlink's target.
    pub content: String,
    /// For a hardlinked file that is not its group's first path (walk order): that path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// A tree manifest, keyed by path relative to the root.
pub(crate) type TreeManifest = BTreeMap<String, FileRecord>;

fn hex(h: Sha256) -> String {
    format!("{:x}", h.finalize())
}

/// Takes the manifest of the tree under `root` (reads every file: content hashes).
pub(crate) fn tree_manifest(root: &Path) -> Result<TreeManifest> {
    let mut out = TreeManifest::new();
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    walk_sorted(root, &mut |step| {
        let Step::Entry(e) = step else { return Ok(()) };
        let (p, md) = (e.path, e.md);
        let rel = e.rel.to_string_lossy().into_owned();
        let ft = md.file_type();
        let kind = crate::files::tree::kind_char(&ft);
        let mut xh = Sha256::new();
        let mut names: Vec<_> = xattr::list(p).at("list xattrs of", p)?.collect();
        names.sort();
        for n in names {
            let v = xattr::get(p, &n)
                .at("read xattr of", p)?
                .unwrap_or_default();
            xh.update(n.as_encoded_bytes());
            xh.update([0]);
            xh.update((v.len() as u64).to_le_bytes());
            xh.update(&v);
        }
        let mut ch = Sha256::new();
        let mut link = None;
        if kind == 'f' {
            if md.nlink() > 1 {
                match links.get(&(md.dev(), md.ino())) {
                    Some(first) => link = Some(first.clone()),
                    None => {
                        links.insert((md.dev(), md.ino()), rel.clone());
                    }
                }
            }
            let mut f = std::fs::File::open(p).at("open", p)?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).at("read", p)?;
                if n == 0 {
                    break;
                }
                ch.update(&buf[..n]);
            }
        } else if kind == 'l' {
            ch.update(
                std::fs::read_link(p)
                    .at("read link", p)?
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        }
        out.insert(
            rel,
            FileRecord {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if kind == 'f' { md.len() } else { 0 },
                mtime: (md.mtime(), md.mtime_nsec()),
                rdev: if matches!(kind, 'c' | 'b') {
                    md.rdev()
                } else {
                    0
                },
                xattrs: hex(xh),
                content: hex(ch),
                link,
            },
        );
        Ok(())
    })?;
    Ok(out)
}

/// What a delta layer from `old` to `new` holds: the paths to write (changed entries, whole
/// hardlink groups, the parents of both and of what was deleted, so their mtimes come out
/// right) and the paths to white out (deleted entries whose parent is still a directory:
/// deleting a directory deletes what it held; one that became a file is replaced whole).
pub(crate) fn plan_delta(
    old: &TreeManifest,
    new: &TreeManifest,
) -> (HashSet<PathBuf>, Vec<PathBuf>) {
    let mut groups: HashMap<&str, Vec<&str>> = HashMap::new();
    for (p, r) in new {
        if r.kind == 'f' {
            groups
                .entry(r.link.as_deref().unwrap_or(p))
                .or_default()
                .push(p);
        }
    }
    let mut include: HashSet<PathBuf> = HashSet::new();
    for (p, r) in new {
        if old.get(p) == Some(r) {
            continue;
        }
        if r.kind == 'f' {
            let first = r.link.as_deref().unwrap_or(p);
            include.extend(groups[first].iter().map(PathBuf::from));
        }
        include.insert(PathBuf::from(p));
    }
    let parent_is_dir = |p: &Path| match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => new
            .get(q.to_string_lossy().as_ref())
            .is_some_and(|r| r.kind == 'd'),
        _ => true,
    };
    let deleted: Vec<PathBuf> = old
        .keys()
        .filter(|p| !new.contains_key(*p))
        .map(PathBuf::from)
        .filter(|p| parent_is_dir(p))
        .collect();
    let mut parents = Vec::new();
    for p in include.iter().chain(&deleted) {
        let mut q = p.parent();
        while let Some(d) = q.filter(|d| !d.as_os_str().is_empty()) {
            parents.push(d.to_path_buf());
            q = d.parent();
        }
    }
    include.extend(parents);
    (include, deleted)
}

/// One layer of a clone line, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RecordedLayer {
    id: String,
    blob: BlobRecord,
}

/// What this node knows of its clone cache's line: the local generation image whose tree the
/// line rebuilds, the line's layers, and that tree's manifest (what the next delta is taken
/// against).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SyncRecord {
    /// The repository.
    image: String,
    /// The local generation layer (image) the line's tree is.
    layer: String,
    /// The line, bottom first.
    line: Vec<RecordedLayer>,
    /// The tree's manifest.
    files: TreeManifest,
}

impl SyncRecord {
    fn ids(&self) -> Vec<&str> {
        self.line.iter().map(|l| l.id.as_str()).collect()
    }
}

fn record_path(store: &Store, id: &CacheId) -> PathBuf {
    store
        .dir()
        .join("records/clone")
        .join(&id.namespace)
        .join(format!("{}.json", id.name))
}

/// The record of `id`'s line in `repo`, if there is one.
fn load(store: &Store, id: &CacheId, repo: &str) -> Result<Option<SyncRecord>> {
    let r: Option<SyncRecord> = read_json(&record_path(store, id))?;
    Ok(r.filter(|r| r.image == repo))
}

fn save(store: &Store, id: &CacheId, r: &SyncRecord) -> Result<()> {
    let p = record_path(store, id);
    ensure_dir(p.parent().unwrap())?;
    for l in &r.line {
        store.set_record(&l.id, &l.blob)?;
    }
    write_json_atomic(&p, r)
}

/// Layer ids of the recorded lines of the clone caches this node has (their blobs are kept);
/// records of caches that are gone are removed.
pub(super) fn live_line_layers(engine: &Engine, store: &Store) -> Result<HashSet<String>> {
    let mut live = HashSet::new();
    let base = store.dir().join("records/clone");
    let Ok(namespaces) = std::fs::read_dir(&base) else {
        return Ok(live);
    };
    for ns in namespaces.flatten() {
        for f in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let cache = CacheId::new(&ns.file_name().to_string_lossy(), stem).ok();
            let exists = match &cache {
                Some(c) => engine.cache_record(c)?.is_some(),
                None => false,
            };
            if !exists {
                let _ = std::fs::remove_file(f.path());
                continue;
            }
            if let Some(r) = read_json::<SyncRecord>(&f.path())? {
                live.extend(r.line.into_iter().map(|l| l.id));
            }
        }
    }
    Ok(live)
}

/// The refusal for a line of the other mode than cache `id`'s.
pub(super) fn mode_mismatch(remote: &Remote, id: &CacheId, local: CacheMode) -> Error {
    let (theirs, ours) = match local {
        CacheMode::Overlay => ("a clone-mode", "an overlay-mode"),
        CacheMode::Clone => ("an overlay-mode cache or another", "a clone-mode"),
    };
    Error::invalid(format!(
        "{} holds {theirs} image, and cache {id} is {ours} cache: a line keeps one mode. \
         Use another image for this cache, or import into a new cache of the line's mode",
        remote.repo
    ))
}

fn new_line_layer_id() -> String {
    format!("cx-{}", fsutil::random_hex())
}

/// The generation image of layer `layer` of clone cache `id`.
fn generation_image(engine: &Engine, id: &CacheId, layer: &str) -> Result<PathBuf> {
    Ok(clone_store::layer_image(&engine.clone_store()?, id, layer))
}

/// Pushes clone cache `id`'s current generation: a delta on the recorded line, or a full layer.
pub(super) fn export(
    engine: &Engine,
    id: &CacheId,
    remote: &Remote,
    store: &Store,
    started: Instant,
) -> Result<ExportReport> {
    for attempt in 1..=PUSH_ATTEMPTS {
        let r = read_remote(remote, store)?;
        if r.digest.is_some() && r.mode.as_deref() != Some(CacheMode::Clone.as_str()) {
            return Err(mode_mismatch(remote, id, CacheMode::Clone));
        }
        let report = |outcome, generation, layers, new_layers, new_bytes| ExportReport {
            outcome,
            image: remote.repo.clone(),
            generation,
            layers,
            new_layers,
            new_bytes,
            rebased: false,
            attempts: attempt,
            seconds: started.elapsed().as_secs_f64(),
        };
        let current = engine.current(id)?;
        let Some(top) = current.layers.last() else {
            return Ok(report("up-to-date", r.generation, r.layers.len(), 0, 0));
        };
        let rec = load(store, id, &remote.repo)?;
        // Nothing committed here since the last sync (if the registry moved on, import it).
        if rec.as_ref().is_some_and(|x| x.layer == top.id) {
            return Ok(report("up-to-date", r.generation, r.layers.len(), 0, 0));
        }
        let remote_ids: Vec<&str> = r.line.iter().map(|l| l.id.as_str()).collect();
        let base = rec.as_ref().filter(|x| {
            !remote_ids.is_empty()
                && x.ids() == remote_ids
                && remote_ids.len() < engine.config().max_depth
        });
        if base.is_none()
            && rec.as_ref().is_none_or(|x| x.ids() != remote_ids)
            && r.digest.is_some()
        {
            tracing::warn!(cache = %id, image = %remote.repo, remote_generation = r.generation,
                "the registry's line holds a generation this node never synced: this export replaces it (clone caches: the last writer wins)");
        }
        // Read the generation under the cache lock only while attaching: an image that is
        // mounted stays readable even if a newer commit lets gc remove its file.
        let image = generation_image(engine, id, &top.id)?;
        let m = {
            let _c = engine.lock_cache(id)?;
            PrivateMount::new(engine, &image, true)?
        };
        let files = tree_manifest(&m.target)?;
        let (include, deleted) = match base {
            Some(b) => {
                let (i, d) = plan_delta(&b.files, &files);
                (Some(i), d)
            }
            None => (None, Vec::new()),
        };
        let blob = store.put_layer(|w| {
            tarlayer::write_clone_layer(&m.target, w, include.as_ref(), &deleted).map(|_| ())
        })?;
        m.unmount()?;
        let layer_id = new_line_layer_id();
        let mut line: Vec<RecordedLayer> = Vec::new();
        if base.is_some() {
            for (i, l) in r.line.iter().enumerate() {
                line.push(RecordedLayer {
                    id: l.id.clone(),
                    blob: r.blob_record(i)?,
                });
            }
        }
        line.push(RecordedLayer {
            id: layer_id.clone(),
            blob: blob.clone(),
        });
        let generation = r.generation + 1;
        let cache_size = engine.cache_record(id)?.map_or(0, |c| c.cache_size);
        let desc = put_manifest(store, id, &line, generation, cache_size, &current)?;
        fault::point("sync:before-push");
        let now = remote.manifest(LATEST)?.map(|b| oci::digest_of(&b));
        if now != r.digest {
            tracing::info!(cache = %id, attempt, "the registry's line moved during the push: starting again");
            continue;
        }
        push_manifest(remote, store, &desc, &[&generation.to_string(), LATEST])?;
        let n = line.len();
        save(
            store,
            id,
            &SyncRecord {
                image: remote.repo.clone(),
                layer: top.id.clone(),
                line,
                files,
            },
        )?;
        tracing::info!(cache = %id, image = %remote.repo, generation, layers = n, delta = base.is_some(),
            new_bytes = blob.size, "exported a clone cache");
        super::tidy(engine, store)?;
        return Ok(report("pushed", generation, n, 1, blob.size));
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "{} kept moving: lost the push race {PUSH_ATTEMPTS} times; the next export (or the agent) tries again",
            remote.repo
        ),
    ))
}

/// Writes the config and manifest of a clone line into the store.
fn put_manifest(
    store: &Store,
    id: &CacheId,
    line: &[RecordedLayer],
    generation: u64,
    cache_size: u64,
    exported: &Generation,
) -> Result<Descriptor> {
    let config = serde_json::json!({
        "architecture": oci::node_platform().architecture,
        "os": "linux",
        "config": {"Labels": {"io.jobcachefs.cache": id.to_string()}},
        "rootfs": {"type": "layers", "diff_ids": line.iter().map(|l| l.blob.diff_id.clone()).collect::<Vec<_>>()},
    });
    let config = store.put(oci::CONFIG, &serde_json::to_vec(&config).unwrap())?;
    let layers = line
        .iter()
        .map(|l| Descriptor {
            media_type: l.blob.media_type.clone(),
            digest: l.blob.digest.clone(),
            size: l.blob.size,
            annotations: BTreeMap::from([(oci::ANN_LAYER_ID.to_string(), l.id.clone())]),
        })
        .collect();
    // A clone line is the whole tree each time (no merge): it carries provenance, no tombstones.
    let mut annotations = oci::generation_annotations(exported, &Default::default());
    annotations.extend([
        (oci::ANN_GENERATION.to_string(), generation.to_string()),
        (oci::ANN_CACHE.to_string(), id.to_string()),
        (
            oci::ANN_MODE.to_string(),
            CacheMode::Clone.as_str().to_string(),
        ),
        (oci::ANN_CACHE_SIZE.to_string(), cache_size.to_string()),
    ]);
    let manifest = Manifest {
        schema_version: 2,
        media_type: oci::MANIFEST.into(),
        config,
        layers,
        annotations,
    };
    store.put(oci::MANIFEST, &serde_json::to_vec(&manifest).unwrap())
}

/// Pulls a clone line into clone cache `id` (created in clone mode, of the line's cache-size
/// unless `cache_size` says otherwise, if new).
#[allow(clippy::too_many_arguments)]
pub(super) fn import(
    engine: &Engine,
    id: &CacheId,
    remote: &Remote,
    store: &Store,
    r: RemoteLine,
    cache_size: Option<u64>,
    allow_devices: bool,
    started: Instant,
) -> Result<ImportReport> {
    if r.mode.as_deref() != Some(CacheMode::Clone.as_str()) {
        return Err(mode_mismatch(remote, id, CacheMode::Clone));
    }
    let limit = match engine.cache_record(id)? {
        Some(c) => c.cache_size,
        None => cache_size
            .or(r.cache_size)
            .unwrap_or(engine.config().default_cache_size),
    };
    let report = |outcome, generation, new_layers, new_bytes, kept_local| ImportReport {
        outcome,
        image: remote.repo.clone(),
        generation,
        new_layers,
        new_bytes,
        kept_local,
        seconds: started.elapsed().as_secs_f64(),
    };
    let current = engine.current(id)?;
    let top = current.layers.last().map(|l| l.id.clone());
    let rec = load(store, id, &remote.repo)?;
    let remote_ids: Vec<&str> = r.line.iter().map(|l| l.id.as_str()).collect();
    if rec.as_ref().is_some_and(|x| x.ids() == remote_ids) {
        return Ok(report("up-to-date", current.generation, 0, 0, 0));
    }
    if top.is_some() && rec.as_ref().map(|x| &x.layer) != top.as_ref() {
        tracing::warn!(cache = %id, image = %remote.repo, generation = current.generation,
            "this node has clone commits it has not exported: kept; the next export pushes them and replaces the registry's line (the last writer wins)");
        return Ok(report("kept-local", current.generation, 0, 0, 1));
    }
    let cstore = engine.clone_store()?;
    // Start from this node's image of the recorded line when the registry's line extends it.
    let from = rec
        .as_ref()
        .filter(|x| remote_ids.starts_with(&x.ids()))
        .map(|x| {
            (
                clone_store::layer_image(&cstore, id, &x.layer),
                x.line.len(),
            )
        })
        .filter(|(img, _)| img.exists());
    let start = from.as_ref().map_or(0, |(_, n)| *n);
    let todo: Vec<usize> = (start..r.layers.len()).collect();
    let needed: Vec<&Descriptor> = todo.iter().map(|&i| &r.layers[i]).collect();
    let to_download = needed
        .iter()
        .filter(|d| !store.has(&d.digest))
        .map(|d| d.size)
        .sum();
    let meter = engine.meter(format!("import {id}"), to_download);
    pull_blobs(remote, store, &r.manifest, &needed, &meter)?;
    let policy = ImportPolicy {
        allow_devices,
        max_bytes: limit,
        clone: true,
    };
    remote.time_left("check the layers pulled from")?;
    for &i in &todo {
        scan(
            store,
            &r.layers[i],
            r.compression[i],
            &r.diff_ids[i],
            &policy,
        )?;
    }
    // Built under another name in the clone store (same filesystem: the publish is a rename);
    // what a crashed import left there is ours to remove, we hold the sync lock.
    let tmp_dir = cstore.join("sync");
    let _ = std::fs::remove_dir_all(&tmp_dir);
    ensure_dir(&tmp_dir)?;
    let layer = new_line_layer_id();
    let tmp = tmp_dir.join(format!("{layer}.img"));
    match &from {
        Some((img, _)) => engine.host().reflink(img, &tmp)?,
        None => engine.host().make_image(&tmp, limit, 0, 0)?,
    }
    let built = (|| {
        let m = PrivateMount::new(engine, &tmp, false)?;
        for &i in &todo {
            remote.time_left("build the layers pulled from")?;
            tarlayer::extract_layer(
                open_blob(store, &r.layers[i], r.compression[i])?,
                &m.target,
                &policy,
            )?;
        }
        let files = tree_manifest(&m.target)?;
        m.unmount()?;
        engine.host().check_image(&tmp)?;
        fsutil::fsync_file(&tmp)?;
        Ok(files)
    })();
    let files = match built {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fault::point("sync:layers-built");
    let new_bytes: u64 = todo.iter().map(|&i| r.layers[i].size).sum();
    let _c = engine.lock_cache(id)?;
    engine.ensure_cache(id, Some(limit), Some(CacheMode::Clone))?;
    let now = engine.current(id)?;
    if now.layers.last().map(|l| &l.id) != top.as_ref() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::new(
            ErrorKind::Conflict,
            format!("a volume of cache {id} committed while the import ran: its commit is kept; export it, or import again"),
        ));
    }
    let dst = clone_store::layer_image(&cstore, id, &layer);
    ensure_dir(&clone_store::layers_dir(&cstore, id))?;
    std::fs::rename(&tmp, &dst).at("rename into the cache", &dst)?;
    fsutil::fsync_dir(&clone_store::layers_dir(&cstore, id))?;
    let next = engine.publish(
        id,
        vec![LayerInfo {
            data: Vec::new(),
            data_usage: Default::default(),
            id: layer.clone(),
            created: fsutil::now(),
            source: format!("import {}", remote.repo),
            size: std::fs::metadata(&dst).at("stat", &dst)?.len(),
            allocated: fsutil::allocated_bytes(&dst)?,
            covers: Vec::new(),
        }],
        super::import_provenance(remote, &r),
    )?;
    fault::point("sync:imported");
    let mut line = Vec::new();
    for (i, l) in r.line.iter().enumerate() {
        line.push(RecordedLayer {
            id: l.id.clone(),
            blob: r.blob_record(i)?,
        });
    }
    save(
        store,
        id,
        &SyncRecord {
            image: remote.repo.clone(),
            layer,
            line,
            files,
        },
    )?;
    if let Err(e) = engine.collect_layers(id) {
        tracing::warn!(cache = %id, error = %e, "layers not collected");
    }
    drop(_c);
    tracing::info!(cache = %id, image = %remote.repo, generation = next.generation, new_layers = todo.len(), new_bytes,
        from_local = from.is_some(), "imported a clone cache");
    super::tidy(engine, store)?;
    Ok(report(
        "imported",
        next.generation,
        todo.len(),
        new_bytes,
        0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: char, content: &str, link: Option<&str>) -> FileRecord {
        FileRecord {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: (1, 0),
            rdev: 0,
            xattrs: String::new(),
            content: content.into(),
            link: link.map(str::to_string),
        }
    }

    fn m(entries: &[(&str, FileRecord)]) -> TreeManifest {
        entries
            .iter()
            .map(|(p, r)| (p.to_string(), r.clone()))
            .collect()
    }

    fn sorted(s: &HashSet<PathBuf>) -> Vec<String> {
        let mut v: Vec<String> = s.iter().map(|p| p.display().to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_delta_holds_what_changed_its_parents_and_whole_link_groups() {
        let old = m(&[
            ("a", rec('d', "", None)),
            ("a/x", rec('f', "1", None)),
            ("a/y", rec('f', "1", Some("a/x"))),
            ("b", rec('d', "", None)),
            ("b/gone", rec('f', "g", None)),
            ("c", rec('d', "", None)),
            ("c/deep", rec('d', "", None)),
            ("c/deep/f", rec('f', "f", None)),
            ("keep", rec('f', "k", None)),
        ]);
        let new = m(&[
            ("a", rec('d', "", None)),
            ("a/x", rec('f', "2", None)),
            ("a/y", rec('f', "2", Some("a/x"))),
            ("b", rec('d', "", None)),
            ("c", rec('f', "now a file", None)),
            ("keep", rec('f', "k", None)),
        ]);
        let (inc, del) = plan_delta(&old, &new);
        assert_eq!(sorted(&inc), ["a", "a/x", "a/y", "b", "c"]);
        // c/deep went with c (replaced by a file); b/gone is whited out.
        assert_eq!(del, [PathBuf::from("b/gone")]);
    }

    #[test]
    fn a_new_hardlink_to_an_unchanged_file_brings_its_group() {
        let old = m(&[("f", rec('f', "1", None))]);
        let new = m(&[("f", rec('f', "1", None)), ("g", rec('f', "1", Some("f")))]);
        let (inc, del) = plan_delta(&old, &new);
        assert_eq!(sorted(&inc), ["f", "g"]);
        assert!(del.is_empty());
        let (inc, del) = plan_delta(&new, &new);
        assert!(inc.is_empty() && del.is_empty());
    }

    #[test]
    fn a_deleted_directory_is_one_whiteout() {
        let old = m(&[
            ("d", rec('d', "", None)),
            ("d/e", rec('d', "", None)),
            ("d/e/f", rec('f', "", None)),
        ]);
        let (inc, del) = plan_delta(&old, &TreeManifest::new());
        assert!(inc.is_empty());
        assert_eq!(del, [PathBuf::from("d")]);
    }

    #[test]
    fn clone_layers_keep_whiteout_devices_and_overlay_xattrs_apart_from_oci_whiteouts() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root (mknod, trusted.* xattrs)");
            return;
        }
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        std::fs::create_dir_all(s.join("l/diff/opq")).unwrap();
        nix::sys::stat::mknod(
            &s.join("l/diff/wh"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        xattr::set(s.join("l/diff/opq"), "trusted.overlay.opaque", b"y").unwrap();
        std::fs::write(s.join("l/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", s.join("abs")).unwrap();
        let old = tree_manifest(s).unwrap();
        let mut full = Vec::new();
        tarlayer::write_clone_layer(s, &mut full, None, &[]).unwrap();
        std::fs::remove_file(s.join("l/f")).unwrap();
        std::fs::write(s.join("l/g"), "y").unwrap();
        let new = tree_manifest(s).unwrap();
        let (inc, del) = plan_delta(&old, &new);
        let mut delta = Vec::new();
        tarlayer::write_clone_layer(s, &mut delta, Some(&inc), &del).unwrap();
        let policy = ImportPolicy {
            allow_devices: false,
            max_bytes: 1 << 30,
            clone: true,
        };
        // The overlay import refuses what a clone layer holds.
        let overlay = ImportPolicy {
            clone: false,
            ..policy
        };
        assert!(tarlayer::scan_layer(&full[..], &overlay).is_err());
        let dst = tempfile::tempdir().unwrap();
        for layer in [&full, &delta] {
            tarlayer::scan_layer(&layer[..], &policy).unwrap();
            tarlayer::extract_layer(&layer[..], dst.path(), &policy).unwrap();
        }
        let got = tree_manifest(dst.path()).unwrap();
        assert_eq!(got, new, "the tree after full + delta");
        assert!(!dst.path().join("l/f").exists());
        assert_eq!(
            xattr::get(dst.path().join("l/diff/opq"), "trusted.overlay.opaque")
                .unwrap()
                .as_deref(),
            Some(&b"y"[..])
        );
    }
}
