//! The node's OCI image layout under `<state>/sync/oci` (the blob store both directions go
//! through) and the OCI JSON it holds. Blobs are content-addressed, so a layer tarred once is
//! never tarred again, and a blob already here is not downloaded again.

use crate::error::{Error, IoContext, Result};
use crate::state::fsutil::write_json_atomic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Media type of an OCI image manifest.
pub(crate) const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of a Docker schema 2 image manifest (buildah's `--format docker`).
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of an OCI image index (one manifest per platform).
pub(crate) const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of a Docker manifest list (one manifest per platform).
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of an OCI image config.
pub(crate) const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed layer.
pub(crate) const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip-compressed layer.
pub(crate) const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd-compressed layer (what export writes).
pub(crate) const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker's gzip-compressed layer (the default of buildah and docker).
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker's uncompressed layer (what `buildah push --disable-compression` writes in docker format).
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Layer annotation: the jobcachefs layer id.
pub(crate) const ANN_LAYER_ID: &str = "io.jobcachefs.layer.id";
/// Layer annotation: the ids a squashed base folds, comma-separated.
pub(crate) const ANN_COVERS: &str = "io.jobcachefs.layer.covers";
/// Manifest annotation: the line's generation.
pub(crate) const ANN_GENERATION: &str = "io.jobcachefs.generation";
/// Manifest annotation: the cache, `<namespace>/<name>`.
pub(crate) const ANN_CACHE: &str = "io.jobcachefs.cache";
/// Manifest annotation: the mode of the cache the line was exported from (`clone`; absent for
/// an overlay cache's line, whose layers are overlay layers).
pub(crate) const ANN_MODE: &str = "io.jobcachefs.cache-mode";
/// Manifest annotation of a clone line: the cache-size in bytes (a clone image is that size;
/// a node that imports the line into a new cache takes it).
pub(crate) const ANN_CACHE_SIZE: &str = "io.jobcachefs.cache-size";

/// Manifest annotation: the layer ids a rollback undid (on any node that pushed this line),
/// comma-separated. Every node merges them into its own and never takes those layers back.
pub(crate) const ANN_UNDONE: &str = "io.jobcachefs.undone";
/// Manifest annotation (OCI's): when the exported generation was published, RFC 3339.
pub(crate) const ANN_CREATED: &str = "org.opencontainers.image.created";
/// Manifest annotation (OCI's): the exported generation's provenance, for a person.
pub(crate) const ANN_DESCRIPTION: &str = "org.opencontainers.image.description";
/// Manifest annotations: the exported generation's provenance — `kind`, `source`,
/// `generation` (the node's), and `detail.<key>` for each detail.
pub(crate) const ANN_PROVENANCE: &str = "io.jobcachefs.provenance.";

/// The manifest annotations that carry generation `g`'s provenance and tombstones; `undone`:
/// the tombstones of the line pushed (this node's and the registry's).
pub(crate) fn generation_annotations(
    g: &crate::state::records::Generation,
    undone: &std::collections::BTreeSet<String>,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    if !undone.is_empty() {
        let ids: Vec<&str> = undone.iter().map(String::as_str).collect();
        a.insert(ANN_UNDONE.to_string(), ids.join(","));
    }
    if g.published > 0 {
        a.insert(ANN_CREATED.to_string(), rfc3339(g.published));
    }
    if let Some(p) = &g.provenance {
        a.insert(
            ANN_DESCRIPTION.to_string(),
            format!(
                "jobcachefs cache generation {}: {} {}",
                g.generation, p.kind, p.source
            ),
        );
        a.insert(format!("{ANN_PROVENANCE}kind"), p.kind.clone());
        a.insert(format!("{ANN_PROVENANCE}source"), p.source.clone());
        for (k, v) in &p.details {
            a.insert(format!("{ANN_PROVENANCE}detail.{k}"), v.clone());
        }
    }
    a.insert(
        format!("{ANN_PROVENANCE}generation"),
        g.generation.to_string(),
    );
    a
}

/// The provenance a manifest's annotations carry (see [`generation_annotations`]): `None` for
/// an image that carries none (one jobcachefs did not make, or exported before provenance).
pub(crate) fn annotated_provenance(
    a: &BTreeMap<String, String>,
) -> Option<crate::state::records::Provenance> {
    let kind = a.get(&format!("{ANN_PROVENANCE}kind"))?;
    let mut p = crate::state::records::Provenance::new(
        kind,
        a.get(&format!("{ANN_PROVENANCE}source"))
            .cloned()
            .unwrap_or_default(),
    );
    let detail = format!("{ANN_PROVENANCE}detail.");
    for (k, v) in a {
        if let Some(key) = k.strip_prefix(&detail) {
            p.details.insert(key.to_string(), v.clone());
        }
    }
    if let Some(g) = a.get(&format!("{ANN_PROVENANCE}generation")) {
        p.details
            .entry("generation".into())
            .or_insert_with(|| g.clone());
    }
    Some(p)
}

/// Unix seconds as RFC 3339 in UTC (`2026-11-03T09:15:00Z`).
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // The civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// An OCI content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`MANIFEST`].
    #[serde(default)]
    pub media_type: String,
    /// The image config.
    pub config: Descriptor,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The store's record of one local layer's blob.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobRecord {
    /// Compressed digest.
    pub digest: String,
    /// Compressed size.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
    /// The blob's OCI layer media type: a layer imported from an image jobcachefs did not make
    /// keeps its blob (gzip, say), and an export pushes that blob again, under this type.
    /// Records written before imports kept foreign blobs are all zstd.
    #[serde(default = "zstd_media_type")]
    pub media_type: String,
}

fn zstd_media_type() -> String {
    LAYER_ZSTD.to_string()
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// tar+gzip (possibly several gzip members).
    Gzip,
    /// tar+zstd.
    Zstd,
}

/// The compression of a layer of media type `media_type` and its OCI media type (Docker's
/// types have OCI twins: an OCI manifest that export writes names the OCI one), or a refusal
/// that says what is unsupported and what to do. `digest` names the layer in the refusal.
pub(crate) fn layer_type(media_type: &str, digest: &str) -> Result<(Compression, &'static str)> {
    Ok(match media_type {
        LAYER_TAR | DOCKER_LAYER_TAR => (Compression::None, LAYER_TAR),
        LAYER_GZIP | DOCKER_LAYER_GZIP => (Compression::Gzip, LAYER_GZIP),
        LAYER_ZSTD => (Compression::Zstd, LAYER_ZSTD),
        t if t.contains("foreign") || t.contains("nondistributable") => {
            return Err(crate::sync::tarlayer::refuse(format!(
                "layer {digest} is a non-distributable layer ({t}), which registries do not serve: \
                 jobcachefs imports Linux file trees; use an image without foreign layers"
            )))
        }
        t if t.contains("encrypted") => {
            return Err(crate::sync::tarlayer::refuse(format!(
                "layer {digest} is encrypted ({t}): decrypt the image first \
                 (`skopeo copy --decryption-key ...`) and import the copy"
            )))
        }
        t => {
            return Err(crate::sync::tarlayer::refuse(format!(
                "layer {digest} has media type {t:?}, which is not a layer jobcachefs can read: \
                 layers must be tar, tar+gzip or tar+zstd (OCI or Docker types); re-push the image \
                 with `skopeo copy --format oci` (or `buildah push`)"
            )))
        }
    })
}

/// The kinds of top-level JSON a registry serves for a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ManifestKind {
    /// An OCI or Docker schema 2 image manifest.
    Image,
    /// An OCI index or a Docker manifest list.
    Index,
}

/// What `raw` is, by its `mediaType` (or, when it has none — optional in OCI — by its
/// fields); a refusal for anything else (Docker schema 1, an artifact, not JSON at all).
pub(crate) fn manifest_kind(raw: &[u8], what: &str) -> Result<ManifestKind> {
    let v: serde_json::Value = serde_json::from_slice(raw).map_err(|e| {
        crate::sync::tarlayer::refuse(format!("{what} is not a JSON image manifest ({e})"))
    })?;
    let mt = v["mediaType"].as_str().unwrap_or("");
    let kind = match mt {
        MANIFEST | DOCKER_MANIFEST => ManifestKind::Image,
        INDEX | DOCKER_LIST => ManifestKind::Index,
        "" if v["schemaVersion"] == 1 || v.get("fsLayers").is_some() => {
            return Err(crate::sync::tarlayer::refuse(format!(
                "{what} is a Docker schema 1 manifest, which is deprecated and carries no layer \
                 digests of its content: re-push it as schema 2 or OCI \
                 (`skopeo copy --format v2s2 ...` or `--format oci`)"
            )))
        }
        "" if v.get("manifests").is_some() => ManifestKind::Index,
        "" if v.get("layers").is_some() => ManifestKind::Image,
        t if t.starts_with("application/vnd.docker.distribution.manifest.v1") => {
            return Err(crate::sync::tarlayer::refuse(format!(
                "{what} is a Docker schema 1 manifest ({t}), which is deprecated: re-push it as \
                 schema 2 or OCI (`skopeo copy --format v2s2 ...` or `--format oci`)"
            )))
        }
        t => {
            return Err(crate::sync::tarlayer::refuse(format!(
                "{what} has media type {t:?}: jobcachefs imports OCI and Docker schema 2 images \
                 and image indexes / manifest lists"
            )))
        }
    };
    if v["schemaVersion"] != 2 {
        return Err(crate::sync::tarlayer::refuse(format!(
            "{what} has schemaVersion {}, not 2",
            v["schemaVersion"]
        )));
    }
    Ok(kind)
}

/// A platform in an image index.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// GOARCH spelling: `amd64`, `arm64`, …
    #[serde(default)]
    pub architecture: String,
    /// GOOS spelling: `linux`, …
    #[serde(default)]
    pub os: String,
    /// `v7`, `v8`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One entry of an image index.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexEntry {
    /// Media type of the manifest it points to.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size.
    #[serde(default)]
    pub size: u64,
    /// The platform it is for (absent for attestations and other artifacts).
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// An OCI image index or a Docker manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// The manifests.
    #[serde(default)]
    pub manifests: Vec<IndexEntry>,
}

/// The node's platform in the spelling of image indexes (GOOS/GOARCH).
pub(crate) fn node_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        other => other, // arm, s390x, riscv64: the same in both spellings
    };
    Platform {
        architecture: arch.to_string(),
        os: std::env::consts::OS.to_string(),
        variant: None,
    }
}

/// The image manifest of `index` for `platform` (OS and architecture; the first one when
/// several variants are listed), or a refusal naming the platforms the index has.
pub(crate) fn pick_platform<'a>(
    index: &'a Index,
    platform: &Platform,
    what: &str,
) -> Result<&'a IndexEntry> {
    let images = || {
        index
            .manifests
            .iter()
            .filter(|m| matches!(m.media_type.as_str(), MANIFEST | DOCKER_MANIFEST | ""))
    };
    if let Some(m) = images().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
    }) {
        return Ok(m);
    }
    let present: Vec<String> = images()
        .filter_map(|m| m.platform.as_ref().map(|p| p.to_string()))
        .collect();
    Err(crate::sync::tarlayer::refuse(format!(
        "{what} is a multi-platform image with no {} image (it has: {}): push one for {} \
         to the index, or import a single-platform image by its digest (--image REPO@sha256:...)",
        format_args!("{}/{}", platform.os, platform.architecture),
        if present.is_empty() {
            "no image manifests".to_string()
        } else {
            present.join(", ")
        },
        format_args!("{}/{}", platform.os, platform.architecture),
    )))
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// The layout directory.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the layout at `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir.join("blobs/sha256")).at("create", dir)?;
        let layout = dir.join("oci-layout");
        if !layout.exists() {
            std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).at("write", &layout)?;
        }
        let index = dir.join("index.json");
        if !index.exists() {
            write_json_atomic(
                &index,
                &serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}),
            )?;
        }
        std::fs::create_dir_all(dir.join("records")).at("create", dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// The layout's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `digest` lives.
    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest.strip_prefix("sha256:").filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        });
        match hex {
            Some(h) => Ok(self.dir.join("blobs/sha256").join(h)),
            None => Err(Error::invalid(format!(
                "refusing the image: {digest:?} is not a sha256 digest"
            ))),
        }
    }

    /// Whether the blob is here.
    pub fn has(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.exists()).unwrap_or(false)
    }

    /// Stores `bytes` as a blob; returns its descriptor.
    pub fn put(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let digest = digest_of(bytes);
        let p = self.blob_path(&digest)?;
        if !p.exists() {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, bytes).at("write", &tmp)?;
            std::fs::rename(&tmp, &p).at("rename", &p)?;
        }
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
        })
    }

    /// Writes a layer blob produced by `fill` (which writes the plain tar): returns its record.
    pub(crate) fn put_layer(
        &self,
        fill: impl FnOnce(&mut dyn Write) -> Result<()>,
    ) -> Result<BlobRecord> {
        let tmp = self
            .dir
            .join("blobs/sha256")
            .join(format!("layer-{}.tmp", crate::state::fsutil::random_hex()));
        let file = std::fs::File::create(&tmp).at("create", &tmp)?;
        let (file, record) = match encode_layer(std::io::BufWriter::new(file), fill) {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        file.into_inner()
            .map_err(|e| Error::io("flush the layer", e.into_error()))?
            .sync_all()
            .at("fsync", &tmp)?;
        let dst = self.blob_path(&record.digest)?;
        std::fs::rename(&tmp, &dst).at("rename", &dst)?;
        Ok(record)
    }

    /// The blob record of local layer `layer`, if it was tarred or imported before.
    pub fn record(&self, layer: &str) -> Result<Option<BlobRecord>> {
        let r: Option<BlobRecord> = crate::state::fsutil::read_json(
            &self.dir.join("records").join(format!("{layer}.json")),
        )?;
        Ok(r.filter(|r| self.has(&r.digest)))
    }

    /// The blob record of local layer `layer`, whether or not the blob is here (a direct push or
    /// pull keeps no copy: the registry has it).
    pub(crate) fn record_any(&self, layer: &str) -> Result<Option<BlobRecord>> {
        crate::state::fsutil::read_json(&self.dir.join("records").join(format!("{layer}.json")))
    }

    /// Remembers which blob holds local layer `layer`.
    pub(crate) fn set_record(&self, layer: &str, r: &BlobRecord) -> Result<()> {
        write_json_atomic(&self.dir.join("records").join(format!("{layer}.json")), r)
    }

    /// Names `manifest` `name` in index.json (what `oci:<dir>:<name>` refers to).
    pub fn tag(&self, name: &str, manifest: &Descriptor) -> Result<()> {
        let mut d = manifest.clone();
        d.annotations
            .insert("org.opencontainers.image.ref.name".into(), name.into());
        write_json_atomic(
            &self.dir.join("index.json"),
            &serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [d]}),
        )
    }

    /// Removes blobs no layer record names, and records of layers no cache holds any more.
    pub fn collect(&self, live_layers: &std::collections::HashSet<String>) -> Result<usize> {
        let mut keep = std::collections::HashSet::new();
        for e in std::fs::read_dir(self.dir.join("records")).at("read", &self.dir)? {
            let e = e.at("read", &self.dir)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(layer) = name.strip_suffix(".json") else {
                continue;
            };
            if !live_layers.contains(layer) {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            if let Some(r) = crate::state::fsutil::read_json::<BlobRecord>(&e.path())? {
                keep.insert(r.digest.trim_start_matches("sha256:").to_string());
            }
        }
        let mut removed = 0;
        for e in std::fs::read_dir(self.dir.join("blobs/sha256")).at("read", &self.dir)? {
            let e = e.at("read", &self.dir)?;
            if !keep.contains(&*e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Compresses the plain tar that `fill` writes into `out` (zstd, the layer type jobcachefs
/// pushes), hashing both sides on the way: returns `out` and the blob's record.
pub(crate) fn encode_layer<W: Write>(
    out: W,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<(W, BlobRecord)> {
    let mut compressed = HashingWriter::new(out);
    let mut z = zstd::stream::write::Encoder::new(&mut compressed, 1)
        .ctx(|| "start compressing the layer".into())?;
    // Two workers: compression overlaps with reading the tree.
    let _ = z.multithread(2);
    let mut plain = HashingWriter::new(&mut z);
    fill(&mut plain)?;
    let diff_id = plain.finish();
    z.finish().ctx(|| "compress the layer".into())?;
    let size = compressed.count;
    let digest = compressed.finish();
    Ok((
        compressed.inner,
        BlobRecord {
            digest,
            size,
            diff_id,
            media_type: LAYER_ZSTD.into(),
        },
    ))
}

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }

    fn finish(&mut self) -> String {
        format!("sha256:{:x}", std::mem::take(&mut self.hash).finalize())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_standard_layer_type_is_read_and_others_are_refused_with_a_fix() {
        for (t, c, oci) in [
            (LAYER_TAR, Compression::None, LAYER_TAR),
            (LAYER_GZIP, Compression::Gzip, LAYER_GZIP),
            (LAYER_ZSTD, Compression::Zstd, LAYER_ZSTD),
            (DOCKER_LAYER_GZIP, Compression::Gzip, LAYER_GZIP),
            (DOCKER_LAYER_TAR, Compression::None, LAYER_TAR),
        ] {
            assert_eq!(layer_type(t, "sha256:x").unwrap(), (c, oci), "{t}");
        }
        for (t, needle) in [
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                "non-distributable",
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                "decrypt",
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+bzip2",
                "skopeo copy",
            ),
            (
                "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                "tar+gzip",
            ),
        ] {
            let e = layer_type(t, "sha256:x").unwrap_err().to_string();
            assert!(e.starts_with("refusing the image: layer sha256:x"), "{e}");
            assert!(e.contains(needle), "{t}: {e}");
        }
    }

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        for (raw, kind) in [
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#,
                ManifestKind::Image,
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#,
                ManifestKind::Image,
            ),
            (r#"{"schemaVersion":2,"layers":[]}"#, ManifestKind::Image),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
                ManifestKind::Index,
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#,
                ManifestKind::Index,
            ),
            (r#"{"schemaVersion":2,"manifests":[]}"#, ManifestKind::Index),
        ] {
            assert_eq!(manifest_kind(raw.as_bytes(), "img").unwrap(), kind, "{raw}");
        }
        for (raw, needle) in [
            (r#"{"schemaVersion":1,"fsLayers":[]}"#, "schema 1"),
            (
                r#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#,
                "schema 1",
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#,
                "jobcachefs imports OCI and Docker",
            ),
            ("<html>", "not a JSON image manifest"),
        ] {
            let e = manifest_kind(raw.as_bytes(), "img")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{raw}: {e}");
        }
    }

    fn index(platforms: &[(&str, &str, &str)]) -> Index {
        Index {
            manifests: platforms
                .iter()
                .enumerate()
                .map(|(i, (mt, os, arch))| IndexEntry {
                    media_type: mt.to_string(),
                    digest: format!("sha256:{i}"),
                    size: 1,
                    platform: (!os.is_empty()).then(|| Platform {
                        architecture: arch.to_string(),
                        os: os.to_string(),
                        variant: None,
                    }),
                })
                .collect(),
        }
    }

    #[test]
    fn an_index_gives_the_nodes_platform_or_names_what_it_has() {
        let node = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: None,
        };
        let i = index(&[
            (MANIFEST, "unknown", "unknown"),
            (MANIFEST, "linux", "amd64"),
            (DOCKER_MANIFEST, "linux", "arm64"),
            (MANIFEST, "linux", "arm64"),
        ]);
        assert_eq!(pick_platform(&i, &node, "img").unwrap().digest, "sha256:2");
        let i = index(&[
            (MANIFEST, "linux", "amd64"),
            (INDEX, "linux", "arm64"),
            (MANIFEST, "windows", "arm64"),
            (MANIFEST, "", ""),
        ]);
        let e = pick_platform(&i, &node, "r.example.com/x:1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.example.com/x:1 is a multi-platform image with no linux/arm64 image (it has: linux/amd64, windows/arm64)"),
            "{e}"
        );
        assert!(e.contains("push one for linux/arm64"), "{e}");
        assert_eq!(node_platform().os, "linux");
    }

    #[test]
    fn old_blob_records_are_zstd() {
        let r: BlobRecord =
            serde_json::from_str(r#"{"digest":"sha256:a","size":1,"diff_id":"sha256:b"}"#).unwrap();
        assert_eq!(r.media_type, LAYER_ZSTD);
    }

    #[test]
    fn provenance_round_trips_through_annotations() {
        use crate::state::records::{Generation, Provenance};
        let g = Generation {
            generation: 7,
            published: 1_700_000_000,
            provenance: Some(
                Provenance::new("commit", "/builds/x/cache")
                    .with("pvc-name", "maven")
                    .with("node", "n1"),
            ),
            ..Default::default()
        };
        let undone = ["b".to_string(), "a".to_string()].into_iter().collect();
        let a = generation_annotations(&g, &undone);
        assert_eq!(a[ANN_UNDONE], "a,b");
        assert_eq!(a[ANN_CREATED], "2023-11-14T22:13:20Z");
        assert_eq!(a["io.jobcachefs.provenance.kind"], "commit");
        assert_eq!(a["io.jobcachefs.provenance.detail.pvc-name"], "maven");
        let p = annotated_provenance(&a).unwrap();
        assert_eq!(p.kind, "commit");
        assert_eq!(p.source, "/builds/x/cache");
        assert_eq!(p.details["pvc-name"], "maven");
        assert_eq!(p.details["node"], "n1");
        assert_eq!(p.details["generation"], "7");
        assert_eq!(annotated_provenance(&BTreeMap::new()), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
