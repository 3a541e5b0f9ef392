//! `cache export` and `cache import`: a cache's generation ⇄ its registry line.
//!
//! Export tars each local layer once (a blob per layer, recorded so it is never tarred again),
//! writes a manifest for the merged line (see [`super::line`]), and pushes it as `:<generation>`
//! and `:latest`. Over the direct path ([`super::registry`]) the tar streams straight into the
//! upload and no local copy is kept; through skopeo it is written to the OCI layout first. Before pushing it checks that `:latest` has not moved since it was read; if it
//! has, another node won the race and the push is re-based on the newer line. A push that was
//! overwritten in the remaining window is found by the next export (the agent runs one every
//! interval): its layers are still news, and it is stacked on top again — never dropped.
//!
//! Import downloads only the blobs the node lacks, rebuilds each new layer as a local ext4 image
//! from its tar (every entry validated; no filesystem image from the network is ever mounted),
//! and publishes the merged line atomically. Over the direct path the layer is built while it
//! downloads, each entry checked before it is written and the digests once it has arrived, in
//! a temporary image that a failed check throws away; through skopeo the blob is downloaded,
//! scanned whole, then built. Layers the node has (by id) are reused.
//! Import reads any standard image too (OCI or Docker schema 2, plain/gzip/zstd layers, an index
//! resolved to the node's platform): layers without a jobcachefs id get a chain id derived from
//! their diff_ids, and their blobs are kept as they are (an export pushes them unchanged).
//!
//! A rollback travels with the line: the layer ids it undid (the generation's `undone`) go out
//! as a manifest annotation ([`oci::ANN_UNDONE`]), and both directions merge with both sides'
//! tombstones (see [`super::line`]). So the next export replaces a line that still holds an
//! undone layer, an import drops it from a node that still has it (and takes the tombstones on),
//! and no merge brings it back. The exported generation's provenance goes out as annotations
//! too ([`oci::generation_annotations`]); an import records it as the `origin.*` details of its
//! own provenance, with the image's digest.
//!
//! Clone-mode caches have their own line (one full layer, then deltas): see [`clone`].
//!
//! Both run under one node-wide lock (`<state>/sync/lock`): the OCI layout is shared.

mod clone;

use super::line::{self, LineLayer, Src};
use super::oci::{self, BlobRecord, Compression, Descriptor, Manifest, ManifestKind, Store};
use super::registry::Direct;
use super::tarlayer::{self, refuse, ImportPolicy};
use super::transport::{Remote, LATEST};
use crate::engine::progress::Meter;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::host::{image, mounts};
use crate::input::names::{is_layer_id, CacheId};
use crate::state::fsutil::{self, ensure_dir};
use crate::state::records::{CacheMode, Generation, LayerInfo, Provenance};
use crate::state::{lock, stats};
use crate::{fault, Engine};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How many times a push re-bases after losing a race before giving up (the agent retries later).
const PUSH_ATTEMPTS: usize = 5;

/// What an export did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// `pushed` or `up-to-date`.
    pub outcome: &'static str,
    /// The image.
    pub image: String,
    /// The line's generation now.
    pub generation: u64,
    /// Layers of the line.
    pub layers: usize,
    /// Layers this push added to the line (uploaded unless the registry had the blob).
    pub new_layers: usize,
    /// Compressed bytes of those layers.
    pub new_bytes: u64,
    /// Whether the push was stacked on another node's newer line.
    pub rebased: bool,
    /// Push attempts (more than one: lost a race and re-based).
    pub attempts: usize,
    /// Seconds.
    pub seconds: f64,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// `imported` or `up-to-date`.
    pub outcome: &'static str,
    /// The image.
    pub image: String,
    /// The cache's local generation now.
    pub generation: u64,
    /// Layers rebuilt locally from downloaded blobs.
    pub new_layers: usize,
    /// Compressed bytes of those layers' blobs.
    pub new_bytes: u64,
    /// Local layers stacked on the remote line (this node's unpushed commits).
    pub kept_local: usize,
    /// Seconds.
    pub seconds: f64,
}

/// A remote line as read from the registry.
struct RemoteLine {
    /// Digest of what the reference names (an index, for a multi-platform image): what a push
    /// compares to see whether the line moved meanwhile.
    digest: Option<String>,
    /// Digest of the image manifest (the node's platform's, in an index): what is pulled.
    manifest: String,
    generation: u64,
    layers: Vec<Descriptor>,
    compression: Vec<Compression>,
    line: Vec<LineLayer>,
    diff_ids: Vec<String>,
    /// The cache mode the line was exported from (`clone`; none: an overlay cache's line or an
    /// image jobcachefs did not make).
    mode: Option<String>,
    /// The cache-size a clone line was exported with.
    cache_size: Option<u64>,
    /// Layer ids a rollback undid, somewhere (see [`oci::ANN_UNDONE`]).
    undone: Vec<String>,
    /// The manifest's annotations (the exported generation's provenance).
    annotations: BTreeMap<String, String>,
}

impl RemoteLine {
    /// What the node records of the line's layer `i` (which blob holds it, and how).
    fn blob_record(&self, i: usize) -> Result<BlobRecord> {
        Ok(BlobRecord {
            digest: self.layers[i].digest.clone(),
            size: self.layers[i].size,
            diff_id: self.diff_ids[i].clone(),
            media_type: oci::layer_type(&self.layers[i].media_type, &self.layers[i].digest)?
                .1
                .into(),
        })
    }
}

/// The id of a layer that carries no jobcachefs id (an image jobcachefs did not make): a
/// chain id, as Docker's, of the id below it and its diff_id. The same image gives the same ids
/// on every node (a second import finds it up to date; an image built on it brings only its
/// new layers), and the same content at another place in another stack gets another id (layer
/// images hold one layer of one stack). Commit ids (`<8 hex>-<hex>`) never start with `oci-`.
fn derived_layer_id(below: Option<&str>, diff_id: &str) -> String {
    let h = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        format!("{}\n{diff_id}", below.unwrap_or("")),
    ));
    format!("oci-{}", &format!("{h:x}")[..40])
}

/// Reads the image the remote names (`:latest` of the line unless the user named a tag or a
/// digest) and its config; an empty line when there is none. An index is resolved to the
/// node's platform; layers without a jobcachefs id get one derived from their content.
fn read_remote(remote: &Remote, store: &Store) -> Result<RemoteLine> {
    let reference = remote
        .reference
        .clone()
        .unwrap_or_else(|| format!(":{LATEST}"));
    let name = remote.image_name();
    let Some(raw) = remote.manifest_at(&reference)? else {
        return Ok(RemoteLine {
            digest: None,
            manifest: String::new(),
            generation: 0,
            layers: vec![],
            compression: vec![],
            line: vec![],
            diff_ids: vec![],
            mode: None,
            cache_size: None,
            undone: vec![],
            annotations: BTreeMap::new(),
        });
    };
    let digest = oci::digest_of(&raw);
    let (raw, manifest_digest, what) = match oci::manifest_kind(&raw, &name)? {
        ManifestKind::Image => (raw, digest.clone(), name.clone()),
        ManifestKind::Index => {
            let index: oci::Index = serde_json::from_slice(&raw)
                .map_err(|e| refuse(format!("{name} is not a well-formed image index ({e})")))?;
            let entry = oci::pick_platform(&index, &oci::node_platform(), &name)?;
            store.blob_path(&entry.digest)?;
            let what = format!("{name} ({})", entry.platform.clone().unwrap_or_default());
            let m = remote
                .manifest_at(&format!("@{}", entry.digest))?
                .ok_or_else(|| {
                    refuse(format!(
                        "the index {name} names {}, which the registry does not have",
                        entry.digest
                    ))
                })?;
            if oci::digest_of(&m) != entry.digest {
                return Err(refuse(format!(
                    "the manifest of {what} does not match its digest {}",
                    entry.digest
                )));
            }
            if oci::manifest_kind(&m, &what)? != ManifestKind::Image {
                return Err(refuse(format!(
                    "{what} is an index inside an index: import the inner image by its digest (--image REPO@sha256:...)"
                )));
            }
            (m, entry.digest.clone(), what)
        }
    };
    let m: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| refuse(format!("{what} is not a well-formed image manifest ({e})")))?;
    // Every layer's type is checked before anything is downloaded.
    let mut compression = Vec::new();
    for l in &m.layers {
        compression.push(oci::layer_type(&l.media_type, &l.digest)?.0);
        store.blob_path(&l.digest)?;
    }
    let config_raw = remote.config(&manifest_digest)?;
    let config: serde_json::Value = serde_json::from_slice(&config_raw)
        .map_err(|e| refuse(format!("the config of {what} is not JSON ({e})")))?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != m.layers.len() {
        return Err(refuse(format!(
            "the config of {what} lists {} diff_ids for {} layers",
            diff_ids.len(),
            m.layers.len()
        )));
    }
    let mut line: Vec<LineLayer> = Vec::new();
    for (l, diff_id) in m.layers.iter().zip(&diff_ids) {
        let id = match l.annotations.get(oci::ANN_LAYER_ID) {
            Some(id) if is_layer_id(id) => id.clone(),
            Some(_) => {
                return Err(refuse(format!(
                    "layer {} has an invalid {} annotation",
                    l.digest,
                    oci::ANN_LAYER_ID
                )))
            }
            None => derived_layer_id(line.last().map(|x| x.id.as_str()), diff_id),
        };
        let covers: Vec<String> = l
            .annotations
            .get(oci::ANN_COVERS)
            .map(|c| {
                c.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if line.iter().any(|x: &LineLayer| x.id == id) {
            return Err(refuse(format!("layer id {id} appears twice in the line")));
        }
        if covers.iter().any(|c| !is_layer_id(c)) {
            return Err(refuse(format!(
                "layer {} has an invalid covers annotation",
                l.digest
            )));
        }
        line.push(LineLayer { id, covers });
    }
    let undone: Vec<String> = m
        .annotations
        .get(oci::ANN_UNDONE)
        .map(|u| {
            u.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if undone.iter().any(|u| !is_layer_id(u)) {
        return Err(refuse(format!(
            "{what} has an invalid {} annotation",
            oci::ANN_UNDONE
        )));
    }
    Ok(RemoteLine {
        digest: Some(digest),
        manifest: manifest_digest,
        generation: m
            .annotations
            .get(oci::ANN_GENERATION)
            .and_then(|g| g.parse().ok())
            .unwrap_or(0),
        mode: m.annotations.get(oci::ANN_MODE).cloned(),
        cache_size: m
            .annotations
            .get(oci::ANN_CACHE_SIZE)
            .and_then(|s| s.parse().ok()),
        layers: m.layers,
        compression,
        line,
        diff_ids,
        undone,
        annotations: m.annotations,
    })
}

/// The tombstones a merge of `r` with generation `g` honours: both sides'.
fn tombstones(g: &Generation, r: &RemoteLine) -> BTreeSet<String> {
    g.undone.iter().chain(&r.undone).cloned().collect()
}

/// The provenance of an import of `r` from `remote`: the image and its digest, and as
/// `origin.*` what produced the generation the other node exported (its kind, source, details
/// and time), so a poisoned cache can be traced across nodes.
fn import_provenance(remote: &Remote, r: &RemoteLine) -> Provenance {
    let mut p = Provenance::new("import", remote.repo.clone()).with("digest", r.manifest.clone());
    if let Some(reference) = &remote.reference {
        p = p.with("reference", reference.clone());
    }
    if r.generation > 0 {
        p = p.with("line-generation", r.generation.to_string());
    }
    if let Some(o) = oci::annotated_provenance(&r.annotations) {
        p = p
            .with("origin.kind", o.kind)
            .with("origin.source", o.source);
        // One hop: an import of an import names the first node's origin, not a chain.
        for (k, v) in o.details {
            if !k.starts_with("origin.") {
                p.details.insert(format!("origin.{k}"), v);
            }
        }
    }
    if let Some(c) = r.annotations.get(oci::ANN_CREATED) {
        p = p.with("origin.created", c.clone());
    }
    p
}

fn local_line(g: &Generation) -> Vec<LineLayer> {
    g.layers
        .iter()
        .map(|l| LineLayer {
            id: l.id.clone(),
            covers: l.covers.clone(),
        })
        .collect()
}

/// A read-only or writable mount of a local image that the node's gc can tell from a live one:
/// it holds `<state>/mnt/sync/<token>.lock` while mounted.
struct PrivateMount {
    target: PathBuf,
    _lock: lock::Lock,
}

impl PrivateMount {
    fn new(engine: &Engine, image: &Path, read_only: bool) -> Result<PrivateMount> {
        let base = engine.layout().mnt().join("sync");
        ensure_dir(&base)?;
        let token = fsutil::random_hex();
        let l = lock::lock(&base.join(format!("{token}.lock")))?;
        let target = base.join(&token);
        ensure_dir(&target)?;
        if let Err(e) = mounts::mount_image(image, &target, read_only) {
            let _ = std::fs::remove_dir(&target);
            return Err(e);
        }
        Ok(PrivateMount { target, _lock: l })
    }

    fn unmount(self) -> Result<()> {
        mounts::unmount(&self.target, false)?;
        Ok(())
    }
}

impl Drop for PrivateMount {
    fn drop(&mut self) {
        let _ = mounts::unmount(&self.target, true);
        let _ = std::fs::remove_dir(&self.target);
        let lockfile = self.target.with_extension("lock");
        let _ = std::fs::remove_file(lockfile);
    }
}

/// The node-wide sync lock and the OCI layout.
fn open_store(engine: &Engine) -> Result<(lock::Lock, Store)> {
    open_store_with(engine, true)
}

/// Like [`open_store`]; with `wait` false, a busy lock is a Conflict error instead of a wait.
fn open_store_with(engine: &Engine, wait: bool) -> Result<(lock::Lock, Store)> {
    let dir = engine.layout().root().join("sync");
    ensure_dir(&dir)?;
    let l = if wait {
        lock::lock(&dir.join("lock"))?
    } else {
        lock::try_lock(&dir.join("lock"))?.ok_or_else(|| {
            Error::new(
                ErrorKind::Conflict,
                "another export or import runs on this node (the agent?)",
            )
        })?
    };
    let tmp = dir.join("tmp");
    // Half-built images of a crashed import: ours to remove, we hold the lock.
    let _ = std::fs::remove_dir_all(&tmp);
    ensure_dir(&tmp)?;
    Ok((l, Store::open(&dir.join("oci"))?))
}

/// The blob of local layer `layer`, tarring it the first time. `estimate`: the bytes `meter`
/// expects of its tar (see [`export_estimate`]), replaced by what it really was.
fn layer_blob(
    engine: &Engine,
    store: &Store,
    id: &CacheId,
    layer: &str,
    (meter, estimate): (&Meter, u64),
) -> Result<BlobRecord> {
    if let Some(r) = store.record(layer)? {
        meter.set_total(meter.total().saturating_sub(estimate));
        return Ok(r);
    }
    let img = engine.layout().layer_image(id, layer);
    let m = PrivateMount::new(engine, &img, true)?;
    let upper = m.target.join("upper");
    let before = meter.done();
    let r = store.put_layer(|w| tarlayer::write_layer(&upper, meter.writer(w)).map(|_| ()))?;
    meter.set_total(meter.total().saturating_sub(estimate) + (meter.done() - before));
    m.unmount()?;
    store.set_record(layer, &r)?;
    Ok(r)
}

/// What an export's meter expects a local layer's tar to be: the bytes its image holds (the
/// files and ext4's own metadata: near enough for a bar; each layer's figure is replaced by
/// its tar's once it is written).
fn export_estimate(info: &LayerInfo) -> u64 {
    info.allocated
}

/// Makes sure the registry has the blob of local layer `layer` and returns its record: a blob
/// the registry has is not sent again, one the store has is uploaded from it, and otherwise the
/// layer is tarred straight into the upload (compressed and hashed on the way, no local copy;
/// the record is kept, so the next export only asks the registry).
fn layer_pushed(
    engine: &Engine,
    store: &Store,
    direct: &Direct,
    id: &CacheId,
    layer: &str,
    remote_has: &HashSet<&str>,
    (meter, estimate): (&Meter, u64),
) -> Result<BlobRecord> {
    let rest = meter.total().saturating_sub(estimate);
    if let Some(r) = store.record_any(layer)? {
        if remote_has.contains(r.digest.as_str()) || direct.has_blob(&r.digest)? {
            meter.set_total(rest);
            return Ok(r);
        }
        if store.has(&r.digest) {
            meter.set_total(rest + r.size);
            let p = store.blob_path(&r.digest)?;
            let f = std::fs::File::open(&p).at("open", &p)?;
            let body = std::io::BufReader::with_capacity(1 << 20, meter.reader(f));
            direct.upload(body, || Ok(r.digest.clone()))?;
            return Ok(r);
        }
    }
    let before = meter.done();
    let img = engine.layout().layer_image(id, layer);
    let m = PrivateMount::new(engine, &img, true)?;
    let upper = m.target.join("upper");
    let (body, pipe) = std::io::pipe().ctx(|| "make a pipe".into())?;
    let (done, record) = std::sync::mpsc::channel();
    let upload = std::thread::scope(|s| {
        let upper = &upper;
        // `done` moves in: if the thread panics, the channel closes and `recv` returns.
        s.spawn(move || {
            let out = std::io::BufWriter::with_capacity(1 << 20, pipe);
            let r = oci::encode_layer(out, |w| {
                tarlayer::write_layer(upper, meter.writer(w)).map(|_| ())
            })
            .and_then(|(out, r)| {
                out.into_inner()
                    .map_err(|e| Error::io("send the layer", e.into_error()))?;
                Ok(r)
            });
            // The pipe is closed here: the upload's body ends, then it asks for the digest.
            let _ = done.send(r);
        });
        let mut sent = None;
        let result = direct.upload(body, || {
            let r = record.recv().map_err(|_| {
                Error::new(ErrorKind::Io, "the layer's tar ended without a result")
            })??;
            let digest = r.digest.clone();
            sent = Some(r);
            Ok(digest)
        });
        result.map(|()| sent)
    });
    meter.set_total(rest + (meter.done() - before));
    m.unmount()?;
    let r = upload?
        .ok_or_else(|| Error::new(ErrorKind::Io, "the layer's upload ended without a digest"))?;
    store.set_record(layer, &r)?;
    Ok(r)
}

/// Pushes cache `id`'s generation to `remote`, re-basing on a newer line when needed.
pub fn export(engine: &Engine, id: &CacheId, remote: &Remote) -> Result<ExportReport> {
    let result = export_inner(engine, id, remote);
    let moved = result.as_ref().ok().filter(|r| r.outcome == "pushed");
    count(
        engine,
        id,
        &PUSH_COUNTERS,
        moved.map(|r| (r.new_bytes, r.seconds)),
        result.is_err(),
    );
    result
}

/// The node counters of one direction (see [`crate::state::stats`]).
struct Counters {
    done: &'static str,
    bytes: &'static str,
    ms: &'static str,
    failures: &'static str,
    histogram: &'static str,
}

const PUSH_COUNTERS: Counters = Counters {
    done: stats::names::PUSHES,
    bytes: stats::names::PUSH_BYTES,
    ms: stats::names::PUSH_MS,
    failures: stats::names::PUSH_FAILURES,
    histogram: stats::histograms::EXPORT,
};

const PULL_COUNTERS: Counters = Counters {
    done: stats::names::PULLS,
    bytes: stats::names::PULL_BYTES,
    ms: stats::names::PULL_MS,
    failures: stats::names::PULL_FAILURES,
    histogram: stats::histograms::IMPORT,
};

/// Counts a transfer that moved `(bytes, seconds)`, or one that failed. Anything but a failure
/// (a transfer, nothing to do, no image yet) proves the registry answered: the cache's last
/// successful sync, which the staleness alert watches, moves on.
fn count(engine: &Engine, id: &CacheId, c: &Counters, moved: Option<(u64, f64)>, failed: bool) {
    let ok_key = stats::sync_ok_key(id);
    let now = [(ok_key.as_str(), crate::state::fsutil::now())];
    let latest: &[(&str, u64)] = if failed { &[] } else { &now };
    if let Some((bytes, seconds)) = moved {
        let ms = (seconds * 1000.0) as u64;
        let obs = stats::observation(c.histogram, seconds);
        let mut deltas: Vec<(&str, u64)> = obs.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        deltas.extend([(c.done, 1), (c.bytes, bytes), (c.ms, ms)]);
        stats::update(engine.layout(), &deltas, latest);
    } else if failed {
        stats::add(engine.layout(), &[(c.failures, 1)]);
    } else {
        stats::update(engine.layout(), &[], latest);
    }
}

fn export_inner(engine: &Engine, id: &CacheId, remote: &Remote) -> Result<ExportReport> {
    let started = Instant::now();
    if let Some(r) = &remote.reference {
        return Err(Error::invalid(format!(
            "cache export pushes to a repository and tags each generation itself: drop {r:?} from --image {}{r}",
            remote.repo
        )));
    }
    materialize(engine, id)?;
    let (_l, store) = open_store(engine)?;
    let remote = &remote
        .clone()
        .with_tmpdir(engine.layout().root().join("sync/tmp"));
    match engine.cache_record(id)? {
        None => {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("cache {id} does not exist on this node: see `jobcachefs cache ls`"),
            ))
        }
        Some(c) if c.mode == CacheMode::Clone => {
            return clone::export(engine, id, remote, &store, started)
        }
        Some(_) => {}
    }
    let direct = Direct::probe(remote, true);
    for attempt in 1..=PUSH_ATTEMPTS {
        let r = read_remote(remote, &store)?;
        if r.mode.as_deref() == Some(CacheMode::Clone.as_str()) {
            return Err(clone::mode_mismatch(remote, id, CacheMode::Overlay));
        }
        let current = engine.current(id)?;
        let local = local_line(&current);
        // The line pushed carries both sides' tombstones on.
        let undone = tombstones(&current, &r);
        let dead: HashSet<String> = undone.iter().cloned().collect();
        let report = |outcome, generation, layers, new_layers, new_bytes, rebased| ExportReport {
            outcome,
            image: remote.repo.clone(),
            generation,
            layers,
            new_layers,
            new_bytes,
            rebased,
            attempts: attempt,
            seconds: started.elapsed().as_secs_f64(),
        };
        let Some(plan) = line::plan_push(&r.line, &local, &dead, engine.config().max_depth) else {
            return Ok(report(
                "up-to-date",
                r.generation,
                r.layers.len(),
                0,
                0,
                false,
            ));
        };
        let rebased = line::remote_has_news(&r.line, &local, &dead);
        // Counted as the tar is written (before compression): what the node reads and sends.
        let to_tar = plan
            .iter()
            .filter_map(|s| match *s {
                Src::Local(i) => Some(export_estimate(&current.layers[i])),
                Src::Remote(_) => None,
            })
            .sum();
        let meter = engine.meter(format!("export {id}"), to_tar);
        let remote_digests: HashSet<&str> = r.layers.iter().map(|d| d.digest.as_str()).collect();
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        let (mut new_layers, mut new_bytes) = (0, 0);
        for s in &plan {
            match *s {
                Src::Remote(i) => {
                    // An OCI manifest names OCI layer types (the blob is the same).
                    let mut d = r.layers[i].clone();
                    d.media_type = oci::layer_type(&d.media_type, &d.digest)?.1.into();
                    layers.push(d);
                    diff_ids.push(r.diff_ids[i].clone());
                }
                Src::Local(i) => {
                    let info = &current.layers[i];
                    let m = (&meter, export_estimate(info));
                    let b = match &direct {
                        Some(d) => {
                            layer_pushed(engine, &store, d, id, &info.id, &remote_digests, m)?
                        }
                        None => layer_blob(engine, &store, id, &info.id, m)?,
                    };
                    let mut annotations = BTreeMap::new();
                    annotations.insert(oci::ANN_LAYER_ID.to_string(), info.id.clone());
                    if !info.covers.is_empty() {
                        annotations.insert(oci::ANN_COVERS.to_string(), info.covers.join(","));
                    }
                    if !remote_digests.contains(b.digest.as_str()) {
                        new_layers += 1;
                        new_bytes += b.size;
                    }
                    layers.push(Descriptor {
                        media_type: b.media_type.clone(),
                        digest: b.digest.clone(),
                        size: b.size,
                        annotations,
                    });
                    diff_ids.push(b.diff_id);
                }
            }
        }
        meter.finish();
        let generation = r.generation + 1;
        let config = serde_json::json!({
            "architecture": oci::node_platform().architecture,
            "os": "linux",
            "config": {"Labels": {"io.jobcachefs.cache": id.to_string()}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config = store.put(oci::CONFIG, &config_bytes)?;
        let mut annotations = oci::generation_annotations(&current, &undone);
        annotations.insert(oci::ANN_GENERATION.to_string(), generation.to_string());
        annotations.insert(oci::ANN_CACHE.to_string(), id.to_string());
        let manifest = Manifest {
            schema_version: 2,
            media_type: oci::MANIFEST.into(),
            config,
            layers,
            annotations,
        };
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let desc = store.put(oci::MANIFEST, &bytes)?;
        store.tag("push", &desc)?;
        fault::point("sync:before-push");
        // The line moved while this push was prepared: another node pushed. Re-base on it.
        let now = remote.manifest(LATEST)?.map(|b| oci::digest_of(&b));
        if now != r.digest {
            tracing::info!(cache = %id, attempt, "the registry's line moved during the push: re-basing");
            continue;
        }
        match &direct {
            Some(d) => {
                d.upload_bytes(&config_bytes, &manifest.config.digest)?;
                d.put_manifest(&generation.to_string(), oci::MANIFEST, &bytes)?;
                d.put_manifest(LATEST, oci::MANIFEST, &bytes)?;
            }
            None => {
                remote.push(store.dir(), "push", &generation.to_string())?;
                remote.push(store.dir(), "push", LATEST)?;
            }
        }
        let n = plan.len();
        tracing::info!(cache = %id, image = %remote.repo, generation, layers = n, new_layers, new_bytes, rebased, "exported");
        tidy(engine, &store)?;
        return Ok(report(
            "pushed", generation, n, new_layers, new_bytes, rebased,
        ));
    }
    Err(Error::new(
        ErrorKind::Conflict,
        format!(
            "{} kept moving: lost the push race {PUSH_ATTEMPTS} times; the next export (or the agent) tries again",
            remote.repo
        ),
    ))
}

/// Pulls `remote`'s line into cache `id` (created with `cache_size` if new).
pub fn import(
    engine: &Engine,
    id: &CacheId,
    remote: &Remote,
    cache_size: Option<u64>,
    allow_devices: bool,
) -> Result<ImportReport> {
    import_with(engine, id, remote, cache_size, allow_devices, true)
}

/// [`import`], counted in the node's stats; `wait` false skips when another sync runs.
fn import_with(
    engine: &Engine,
    id: &CacheId,
    remote: &Remote,
    cache_size: Option<u64>,
    allow_devices: bool,
    wait: bool,
) -> Result<ImportReport> {
    let result = import_inner(engine, id, remote, cache_size, allow_devices, wait);
    let moved = result.as_ref().ok().filter(|r| r.outcome == "imported");
    // No image yet, or skipped because another sync ran: not failures.
    let failed =
        matches!(&result, Err(e) if !matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Conflict));
    count(
        engine,
        id,
        &PULL_COUNTERS,
        moved.map(|r| (r.new_bytes, r.seconds)),
        failed,
    );
    result
}

/// A metadata base (its files' data in data-only layers) never travels: the registry line holds
/// real layers, and a line's layers are stacked in any order on the other side. Such a base
/// (made before a registry was configured for the cache) is squashed fully first.
fn materialize(engine: &Engine, id: &CacheId) -> Result<()> {
    if engine.cache_record(id)?.is_some() && !engine.current(id)?.data_ids().is_empty() {
        tracing::info!(cache = %id, "a metadata base is squashed fully before it is synced");
        engine.squash_full(id)?;
    }
    Ok(())
}

fn import_inner(
    engine: &Engine,
    id: &CacheId,
    remote: &Remote,
    cache_size: Option<u64>,
    allow_devices: bool,
    wait: bool,
) -> Result<ImportReport> {
    let started = Instant::now();
    materialize(engine, id)?;
    let (_l, store) = open_store_with(engine, wait)?;
    let remote = &remote
        .clone()
        .with_tmpdir(engine.layout().root().join("sync/tmp"));
    let r = read_remote(remote, &store)?;
    if r.digest.is_none() {
        let fix = match remote.reference {
            None => "export one first",
            Some(_) => "check the tag or digest",
        };
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("no image at {}: {fix}", remote.image_name()),
        ));
    }
    let local_mode = engine.cache_record(id)?.map(|c| c.mode);
    let remote_clone = r.mode.as_deref() == Some(CacheMode::Clone.as_str());
    match (local_mode, remote_clone) {
        (Some(CacheMode::Clone), _) | (None, true) => {
            return clone::import(
                engine,
                id,
                remote,
                &store,
                r,
                cache_size,
                allow_devices,
                started,
            )
        }
        (Some(CacheMode::Overlay), true) => {
            return Err(clone::mode_mismatch(remote, id, CacheMode::Overlay))
        }
        _ => {}
    }
    let digest = r.manifest.clone();
    let source = format!(
        "import {}{}",
        remote.repo,
        remote.reference.as_deref().unwrap_or("")
    );
    let limit = match engine.cache_record(id)? {
        Some(c) => c.cache_size,
        None => cache_size.unwrap_or(engine.config().default_cache_size),
    };
    let current = engine.current(id)?;
    let report = |outcome, generation, new_layers, new_bytes, kept_local| ImportReport {
        outcome,
        image: remote.repo.clone(),
        generation,
        new_layers,
        new_bytes,
        kept_local,
        seconds: started.elapsed().as_secs_f64(),
    };
    let dead = |g: &Generation| -> HashSet<String> { tombstones(g, &r).into_iter().collect() };
    let Some(plan) = line::plan_pull(&r.line, &local_line(&current), &dead(&current)) else {
        return Ok(report("up-to-date", current.generation, 0, 0, 0));
    };
    // Layers of the merged line this node does not hold: download their blobs (only those) and
    // rebuild. A layer of the line that a tombstone kills is never downloaded.
    let missing: Vec<usize> = plan
        .iter()
        .filter_map(|s| match *s {
            Src::Remote(i) => Some(i),
            Src::Local(_) => None,
        })
        .filter(|&i| !engine.layout().layer_image(id, &r.line[i].id).exists())
        .collect();
    let policy = ImportPolicy {
        allow_devices,
        max_bytes: limit,
        clone: false,
    };
    let mut built = Vec::new();
    let mut new_bytes = 0;
    // Counted as the compressed blobs are read: downloaded and built in one go (the direct
    // path), or built from the store after skopeo pulled them.
    let meter = engine.meter(
        format!("import {id}"),
        missing.iter().map(|&i| r.layers[i].size).sum(),
    );
    let direct = if missing.iter().any(|&i| !store.has(&r.layers[i].digest)) {
        Direct::probe(remote, false)
    } else {
        None
    };
    if let Some(direct) = &direct {
        // Each layer is checked while it is built, in `sync/tmp`: one that fails leaves nothing
        // but that temporary image (removed by the next sync), as the check-first path below.
        for &i in &missing {
            remote.time_left("download and build the layers of")?;
            let layer = (&r.layers[i], r.compression[i]);
            // The blob of an image jobcachefs did not make (or one named with --image) is kept
            // as it is, so that an export pushes it unchanged to the cache's own repository; a
            // blob of the cache's own line is the registry's to keep.
            let keep = (remote.reference.is_some()
                || !r.layers[i].annotations.contains_key(oci::ANN_LAYER_ID))
            .then_some(&store);
            let before = meter.done();
            let streamed = if store.has(&r.layers[i].digest) {
                None // already here (a foreign image imported before): built from the store
            } else {
                build_layer_streamed(
                    engine,
                    direct,
                    layer,
                    &r.diff_ids[i],
                    &r.line[i],
                    &policy,
                    &source,
                    keep,
                    &meter,
                )?
            };
            let (img, info) = match streamed {
                Some(b) => b,
                None => {
                    // Its files did not fit the image sized from the blob's size (or the blob
                    // is here already): fetch it, then check and build it sized from what it
                    // holds. Its bytes are counted again from the start.
                    meter.rewind(before);
                    fetch_blob(direct, &store, &r.layers[i], &meter)?;
                    let stats = scan(
                        &store,
                        &r.layers[i],
                        r.compression[i],
                        &r.diff_ids[i],
                        &policy,
                    )?;
                    // A blob that was in the store already is counted as it is built.
                    let m = (meter.done() == before).then_some(&meter);
                    build_layer(
                        engine, &store, layer, &r.line[i], &stats, &policy, &source, m,
                    )?
                }
            };
            new_bytes += r.layers[i].size;
            built.push((img, info));
        }
    } else if !missing.is_empty() {
        if missing.iter().any(|&i| !store.has(&r.layers[i].digest)) {
            remote.pull(&digest, store.dir(), "pull")?;
        }
        // Nothing is created before every new layer has been checked.
        remote.time_left("check and build the layers pulled from")?;
        let mut checked = Vec::new();
        for &i in &missing {
            checked.push(scan(
                &store,
                &r.layers[i],
                r.compression[i],
                &r.diff_ids[i],
                &policy,
            )?);
        }
        for (&i, stats) in missing.iter().zip(checked) {
            remote.time_left("build the layers pulled from")?;
            let (img, info) = build_layer(
                engine,
                &store,
                (&r.layers[i], r.compression[i]),
                &r.line[i],
                &stats,
                &policy,
                &source,
                Some(&meter),
            )?;
            new_bytes += r.layers[i].size;
            built.push((img, info));
        }
    }
    meter.finish();
    fault::point("sync:layers-built");
    let _c = engine.lock_cache(id)?;
    let now = engine.current(id)?;
    let local = local_line(&now);
    let Some(plan) = line::plan_pull(&r.line, &local, &dead(&now)) else {
        return Ok(report("up-to-date", now.generation, 0, 0, 0));
    };
    // First the new generation and its size; nothing on disk changes until it fits.
    let mut layers = Vec::new();
    let mut renames = Vec::new();
    let mut kept = 0;
    for s in plan {
        match s {
            Src::Remote(i) => {
                let lid = &r.line[i].id;
                let dst = engine.layout().layer_image(id, lid);
                if let Some((img, info)) = built.iter().find(|(_, info)| &info.id == lid) {
                    renames.push((img, dst, i));
                    layers.push(info.clone());
                } else if let Some(l) = now.layers.iter().find(|l| &l.id == lid) {
                    layers.push(l.clone());
                } else {
                    // Held by an older generation (still on disk for its volumes).
                    let size = std::fs::metadata(&dst).at("stat", &dst)?.len();
                    layers.push(LayerInfo {
                        data: Vec::new(),
                        data_usage: Default::default(),
                        id: lid.clone(),
                        created: fsutil::now(),
                        source: source.clone(),
                        size,
                        allocated: fsutil::allocated_bytes(&dst)?,
                        covers: r.line[i].covers.clone(),
                    });
                }
            }
            Src::Local(i) => {
                kept += 1;
                layers.push(now.layers[i].clone());
            }
        }
    }
    let next_allocated: u64 = layers.iter().map(|l| l.allocated).sum();
    let cache_size = engine
        .cache_record(id)?
        .map(|c| c.cache_size)
        .unwrap_or(limit);
    if next_allocated > cache_size {
        return Err(Error::new(
            ErrorKind::Quota,
            format!(
                "importing {} into cache {id} would allocate {} bytes, over its cache-size of {cache_size}: raise it with `jobcachefs cache resize`",
                remote.repo,
                next_allocated,
            ),
        ));
    }
    // A crash from here on leaves at most unreferenced layer images, which gc removes.
    engine.ensure_cache(id, Some(limit), Some(CacheMode::Overlay))?;
    for (img, dst, i) in renames {
        std::fs::rename(img, &dst).at("rename into the cache", &dst)?;
        store.set_record(&r.line[i].id, &r.blob_record(i)?)?;
    }
    fsutil::fsync_dir(&engine.layout().layers_dir(id))?;
    // The remote's tombstones become this node's: a later merge never takes those layers back.
    let next = engine.publish_undoing(id, layers, import_provenance(remote, &r), &r.undone)?;
    fault::point("sync:imported");
    engine.collect_layers(id)?;
    drop(_c);
    tracing::info!(cache = %id, image = %remote.repo, generation = next.generation, new_layers = built.len(), new_bytes, kept, "imported");
    engine.after_commit(id)?;
    tidy(engine, &store)?;
    Ok(report(
        "imported",
        next.generation,
        built.len(),
        new_bytes,
        kept,
    ))
}

/// With `pull_on_create` set for its registry, pulls a cold cache (no layers on this node)
/// before a volume is made on it. A failure is logged, never fatal: the volume starts cold. It
/// does not queue behind another export or import (which may take minutes): then it skips.
/// `deadline`: when the pull must have given up (the hook's setup must end inside the
/// provisioner's `cmdTimeoutSeconds`, or the helper pod is deleted mid-setup); past it the
/// volume starts cold and a log line says why.
pub fn pull_if_cold(engine: &Engine, id: &CacheId, deadline: Option<Instant>) {
    let Some(rule) = engine.config().registry_for(id) else {
        return;
    };
    if !rule.pull_on_create
        || !engine
            .current(id)
            .map(|g| g.layers.is_empty())
            .unwrap_or(false)
    {
        return;
    }
    match super::transport::remote_for(engine.config(), id, None, None) {
        Ok(Some((remote, allow_devices))) => {
            let remote = match deadline {
                Some(d) => remote.with_deadline(d),
                None => remote,
            };
            let started = Instant::now();
            match import_with(engine, id, &remote, None, allow_devices, false) {
                Ok(r) => {
                    tracing::info!(cache = %id, outcome = r.outcome, generation = r.generation, "pulled a cold cache before creating the volume")
                }
                Err(e)
                    if deadline.is_some_and(|d| {
                        Instant::now() + std::time::Duration::from_secs(1) >= d
                    }) =>
                {
                    tracing::warn!(cache = %id, error = %e, waited_s = started.elapsed().as_secs(), "the pull of the cold cache did not finish before the setup deadline (kubernetes.setup_deadline); the volume starts cold and the agent pulls later")
                }
                Err(e) => {
                    tracing::warn!(cache = %id, error = %e, "could not pull the cold cache; the volume starts cold")
                }
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(cache = %id, error = %e, "registry settings unusable"),
    }
}

/// A downloaded layer blob, decompressed.
fn open_blob(store: &Store, d: &Descriptor, c: Compression) -> Result<Box<dyn std::io::Read>> {
    let p = store.blob_path(&d.digest)?;
    decompress(std::fs::File::open(&p).at("open", &p)?, c, &d.digest)
}

/// The plain tar of layer blob `digest`, whose bytes `input` gives.
fn decompress<'a>(
    input: impl std::io::Read + 'a,
    c: Compression,
    digest: &str,
) -> Result<Box<dyn std::io::Read + 'a>> {
    let f = std::io::BufReader::with_capacity(1 << 20, input);
    Ok(match c {
        Compression::None => Box::new(f),
        // Several members are valid gzip (pigz and some registries' tools write them).
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(f)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(f)
                .ctx(|| format!("decompress layer {digest}"))?,
        ),
    })
}

/// Checks a downloaded layer: every entry, the total it claims, and its diff_id.
fn scan(
    store: &Store,
    d: &Descriptor,
    c: Compression,
    diff_id: &str,
    policy: &ImportPolicy,
) -> Result<tarlayer::LayerStats> {
    let p = store.blob_path(&d.digest)?;
    let mut hashed = HashingReader::new(open_blob(store, d, c)?);
    let stats = tarlayer::scan_layer(&mut hashed, policy)?;
    std::io::copy(&mut hashed, &mut std::io::sink()).map_err(|e| {
        refuse(format!(
            "layer {} ({}) does not decompress ({e})",
            d.digest,
            p.display()
        ))
    })?;
    let got = hashed.finish();
    if got != diff_id {
        return Err(refuse(format!(
            "layer {} decompresses to {got}, but the image's config says {diff_id}",
            d.digest
        )));
    }
    Ok(stats)
}

/// Builds a local layer image from a checked blob, in `<state>/sync/tmp`; `meter` counts the
/// blob's bytes as they are read, when its download was not counted.
#[allow(clippy::too_many_arguments)]
fn build_layer(
    engine: &Engine,
    store: &Store,
    (d, c): (&Descriptor, Compression),
    l: &LineLayer,
    stats: &tarlayer::LayerStats,
    policy: &ImportPolicy,
    source: &str,
    meter: Option<&Meter>,
) -> Result<(PathBuf, LayerInfo)> {
    // Room for the content, one inode per entry (the images have one per 8 KiB) and ext4's own
    // metadata; the image is sparse, so what it does not use costs nothing.
    let size = (stats.bytes + stats.bytes / 8 + stats.entries * 8192 + (64 << 20))
        .div_ceil(1 << 20)
        * (1 << 20);
    let (img, m, upper) = new_tmp_layer(engine, l, size.max(image::MIN_IMAGE_SIZE))?;
    let p = store.blob_path(&d.digest)?;
    let blob = std::fs::File::open(&p).at("open", &p)?;
    let tar = match meter {
        Some(m) => decompress(m.reader(blob), c, &d.digest)?,
        None => decompress(blob, c, &d.digest)?,
    };
    tarlayer::extract_layer(tar, &upper, policy)?;
    fault::point("sync:layer-mounted");
    m.unmount()?;
    fsutil::fsync_file(&img)?;
    let info = built_info(&img, l, source, size)?;
    Ok((img, info))
}

/// A new, empty image of `size` for line layer `l` in `<state>/sync/tmp`, mounted privately,
/// with `upper/` and `work/` made: the image, its mount and `upper/`.
fn new_tmp_layer(
    engine: &Engine,
    l: &LineLayer,
    size: u64,
) -> Result<(PathBuf, PrivateMount, PathBuf)> {
    let img = tmp_layer_image(engine, l);
    image::create(&img, size, 0, 0)?;
    let m = PrivateMount::new(engine, &img, false)?;
    let upper = m.target.join("upper");
    std::fs::create_dir(&upper).at("create", &upper)?;
    std::fs::create_dir(m.target.join("work")).at("create", &m.target)?;
    Ok((img, m, upper))
}

/// Where line layer `l`'s image is built before it is renamed into the cache.
fn tmp_layer_image(engine: &Engine, l: &LineLayer) -> PathBuf {
    engine
        .layout()
        .root()
        .join("sync/tmp")
        .join(format!("{}.img", l.id))
}

/// What the cache records of `img`, built for line layer `l` with `size`.
fn built_info(img: &Path, l: &LineLayer, source: &str, size: u64) -> Result<LayerInfo> {
    Ok(LayerInfo {
        data: Vec::new(),
        data_usage: Default::default(),
        id: l.id.clone(),
        created: fsutil::now(),
        source: source.to_string(),
        size,
        allocated: fsutil::allocated_bytes(img)?,
        covers: l.covers.clone(),
    })
}

/// The size of an image built while its blob downloads, before anything says how much the
/// blob holds: four times its compressed size and 256 MiB, at most what the cache-size allows
/// (and the ext4 metadata around it). Sparse, so what the layer leaves unused costs nothing
/// but the mkfs's own metadata (0.4 MiB per GiB). A layer that does not fit is fetched and
/// built again from a scan (see [`build_layer_streamed`]).
fn streamed_image_size(compressed: u64, limit: u64) -> u64 {
    let cap = limit.saturating_add(limit / 8).saturating_add(64 << 20);
    let guess = compressed.saturating_mul(4).saturating_add(256 << 20);
    (guess.min(cap).div_ceil(1 << 20) * (1 << 20)).max(image::MIN_IMAGE_SIZE)
}

/// Builds a local layer image, in `<state>/sync/tmp`, from blob `d` as it downloads: the tar
/// is checked entry by entry as it is extracted, and the blob's digest and its diff_id once
/// it has all arrived. `Ok(None)`: the layer's files did not fit the image (see
/// [`streamed_image_size`]); nothing is left of the attempt. With `keep`, the blob is written
/// into that store too as it arrives (kept once it is checked).
#[allow(clippy::too_many_arguments)]
fn build_layer_streamed(
    engine: &Engine,
    direct: &Direct,
    (d, c): (&Descriptor, Compression),
    diff_id: &str,
    l: &LineLayer,
    policy: &ImportPolicy,
    source: &str,
    keep: Option<&Store>,
    meter: &Meter,
) -> Result<Option<(PathBuf, LayerInfo)>> {
    let kept = match keep {
        Some(store) => Some(store.blob_path(&d.digest)?.with_extension("download")),
        None => None,
    };
    let size = streamed_image_size(d.size, policy.max_bytes);
    let built = (|| -> Result<PathBuf> {
        let (img, m, upper) = new_tmp_layer(engine, l, size)?;
        let body = Box::new(meter.reader(direct.blob(&d.digest, d.size)?));
        let body: Box<dyn std::io::Read + Send> = match &kept {
            Some(p) => Box::new(Tee(body, std::fs::File::create(p).at("create", p)?)),
            None => body,
        };
        let mut packed = HashingReader::new(body);
        let mut plain = HashingReader::new(decompress(&mut packed, c, &d.digest)?);
        tarlayer::extract_layer(&mut plain, &upper, policy)?;
        // What follows the tar's end (padding), then what follows the compressed stream.
        let rest = std::io::copy(&mut plain, &mut std::io::sink());
        let unpacked = plain.finish();
        let rest = rest.and_then(|_| std::io::copy(&mut packed, &mut std::io::sink()));
        rest.map_err(|e| refuse(format!("layer {} does not decompress ({e})", d.digest)))?;
        if unpacked != diff_id {
            return Err(refuse(format!(
                "layer {} decompresses to {unpacked}, but the image's config says {diff_id}",
                d.digest
            )));
        }
        let got = packed.finish();
        if got != d.digest {
            return Err(refuse(format!(
                "layer {} arrived as {got}: the download is corrupt",
                d.digest
            )));
        }
        fault::point("sync:layer-mounted");
        m.unmount()?;
        fsutil::fsync_file(&img)?;
        if let Some(p) = &kept {
            fsutil::fsync_file(p)?;
            let dst = p.with_extension("");
            std::fs::rename(p, &dst).at("rename", &dst)?;
        }
        Ok(img)
    })();
    match built {
        Ok(img) => {
            let info = built_info(&img, l, source, size)?;
            Ok(Some((img, info)))
        }
        Err(e) => {
            // The mount went with the closure; the files are all that is left.
            let _ = std::fs::remove_file(tmp_layer_image(engine, l));
            if let Some(p) = &kept {
                let _ = std::fs::remove_file(p);
            }
            if e.is_enospc() {
                tracing::info!(layer = %l.id, image_size = size, "the layer did not fit the image sized from its blob: fetching it to size it");
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// Makes sure the store has the blobs of `layers` (of the image manifest `manifest`): each
/// downloaded directly where that applies (see [`super::registry`]), else skopeo pulls them.
fn pull_blobs(
    remote: &Remote,
    store: &Store,
    manifest: &str,
    layers: &[&Descriptor],
    meter: &Meter,
) -> Result<()> {
    if layers.iter().all(|d| store.has(&d.digest)) {
        return Ok(());
    }
    match Direct::probe(remote, false) {
        Some(direct) => {
            for d in layers {
                remote.time_left("download the layers of")?;
                fetch_blob(&direct, store, d, meter)?;
            }
            meter.finish();
            Ok(())
        }
        None => remote.pull(manifest, store.dir(), "pull"),
    }
}

/// Pushes the image manifest `desc` of the store (its config and layer blobs with it: those
/// the registry lacks) as each of `tags`: directly where that applies, else through skopeo.
fn push_manifest(remote: &Remote, store: &Store, desc: &Descriptor, tags: &[&str]) -> Result<()> {
    store.tag("push", desc)?;
    let Some(direct) = Direct::probe(remote, true) else {
        for tag in tags {
            remote.push(store.dir(), "push", tag)?;
        }
        return Ok(());
    };
    let read = |digest: &str| -> Result<Vec<u8>> {
        let p = store.blob_path(digest)?;
        std::fs::read(&p).at("read", &p)
    };
    let bytes = read(&desc.digest)?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("manifest {} in the store: {e}", desc.digest),
        )
    })?;
    for l in &m.layers {
        if !direct.has_blob(&l.digest)? {
            let p = store.blob_path(&l.digest)?;
            let f = std::fs::File::open(&p).at("open", &p)?;
            direct.upload(std::io::BufReader::new(f), || Ok(l.digest.clone()))?;
        }
    }
    direct.upload_bytes(&read(&m.config.digest)?, &m.config.digest)?;
    for tag in tags {
        direct.put_manifest(tag, &desc.media_type, &bytes)?;
    }
    Ok(())
}

/// Downloads blob `d` into the store (hashed on the way; a corrupt download is not kept),
/// counted by `meter`.
fn fetch_blob(direct: &Direct, store: &Store, d: &Descriptor, meter: &Meter) -> Result<()> {
    let dst = store.blob_path(&d.digest)?;
    if dst.exists() {
        return Ok(());
    }
    let tmp = dst.with_extension("download");
    let result = (|| {
        let mut body = HashingReader::new(meter.reader(direct.blob(&d.digest, d.size)?));
        let mut f = std::fs::File::create(&tmp).at("create", &tmp)?;
        std::io::copy(&mut body, &mut f).ctx(|| format!("download layer {}", d.digest))?;
        let got = body.finish();
        if got != d.digest {
            return Err(refuse(format!(
                "layer {} arrived as {got}: the download is corrupt",
                d.digest
            )));
        }
        // A blob in the store is trusted by its name: it must be whole before it has one.
        f.sync_all().at("fsync", &tmp)?;
        std::fs::rename(&tmp, &dst).at("rename", &dst)?;
        fsutil::fsync_dir(dst.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Drops blobs no local layer needs any more.
fn tidy(engine: &Engine, store: &Store) -> Result<()> {
    // The layers of clone caches' lines: their blobs are what the next delta is stacked on.
    let mut live = clone::live_line_layers(engine, store)?;
    for id in engine.cache_ids()? {
        if let Ok(entries) = std::fs::read_dir(engine.layout().layers_dir(&id)) {
            for e in entries.flatten() {
                if let Some(stem) = e.file_name().to_string_lossy().strip_suffix(".img") {
                    live.insert(stem.to_string());
                }
            }
        }
    }
    store.collect(&live)?;
    Ok(())
}

/// A reader that writes what it reads into a file too.
struct Tee<R>(R, std::fs::File);

impl<R: std::io::Read> std::io::Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        std::io::Write::write_all(&mut self.1, &buf[..n])?;
        Ok(n)
    }
}

struct HashingReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: std::io::Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: sha2::Digest::new(),
        }
    }
    fn finish(self) -> String {
        format!("sha256:{:x}", sha2::Digest::finalize(self.hash))
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_chain_ids() {
        let (a, b) = ("sha256:aa", "sha256:bb");
        let ida = derived_layer_id(None, a);
        let idab = derived_layer_id(Some(&ida), b);
        assert!(is_layer_id(&ida) && is_layer_id(&idab), "{ida} {idab}");
        assert!(ida.starts_with("oci-") && ida.len() == 44);
        // Stable, and the same content elsewhere in a stack is another layer.
        assert_eq!(ida, derived_layer_id(None, a));
        assert_ne!(derived_layer_id(None, b), idab);
        assert_ne!(derived_layer_id(Some(&ida), a), ida);
    }
}
