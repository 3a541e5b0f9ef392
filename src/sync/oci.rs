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
/// Media type of an OCI image config.
pub(crate) const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a zstd-compressed layer.
pub(crate) const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Layer annotation: the jobcachefs layer id.
pub(crate) const ANN_LAYER_ID: &str = "io.jobcachefs.layer.id";
/// Layer annotation: the ids a squashed base folds, comma-separated.
pub(crate) const ANN_COVERS: &str = "io.jobcachefs.layer.covers";
/// Manifest annotation: the line's generation.
pub(crate) const ANN_GENERATION: &str = "io.jobcachefs.generation";
/// Manifest annotation: the cache, `<namespace>/<name>`.
pub(crate) const ANN_CACHE: &str = "io.jobcachefs.cache";

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
        let mut compressed = HashingWriter::new(std::io::BufWriter::new(file));
        let result = (|| {
            let mut z = zstd::stream::write::Encoder::new(&mut compressed, 1)
                .ctx(|| "start compressing the layer".into())?;
            // Two workers: compression overlaps with reading the tree.
            let _ = z.multithread(2);
            let mut plain = HashingWriter::new(&mut z);
            fill(&mut plain)?;
            let diff_id = plain.finish();
            z.finish().ctx(|| "compress the layer".into())?;
            Ok(diff_id)
        })();
        let diff_id = match result {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let size = compressed.count;
        let digest = compressed.finish();
        compressed
            .inner
            .into_inner()
            .map_err(|e| Error::io("flush the layer", e.into_error()))?
            .sync_all()
            .at("fsync", &tmp)?;
        let dst = self.blob_path(&digest)?;
        std::fs::rename(&tmp, &dst).at("rename", &dst)?;
        Ok(BlobRecord {
            digest,
            size,
            diff_id,
        })
    }

    /// The blob record of local layer `layer`, if it was tarred or imported before.
    pub fn record(&self, layer: &str) -> Result<Option<BlobRecord>> {
        let r: Option<BlobRecord> = crate::state::fsutil::read_json(
            &self.dir.join("records").join(format!("{layer}.json")),
        )?;
        Ok(r.filter(|r| self.has(&r.digest)))
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
