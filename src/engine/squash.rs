//! Squash: a new base image built from the kernel's merged, read-only overlay view of a
//! generation's stack (the kernel resolves whiteouts and opaque dirs), published atomically.
//!
//! The copy runs without the cache lock: `volume create` of the same cache waits at most for the
//! few mounts at the start and the rename at the end. Publishing re-reads the current generation:
//! layers committed meanwhile stay on top of the new base; if the squashed layers are no longer
//! the bottom of the stack (the cache was removed or squashed otherwise), the result is dropped.
//!
//! Crash points: before the publish the cache is untouched and `tmp/` holds a half-built image
//! that `gc` removes; after it, the old layers are unreferenced and `gc` removes them.

use super::Engine;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fault;
use crate::files::copy::copy_tree;
use crate::host::ImageMount;
use crate::input::names::CacheId;
use crate::input::quantity::human_bytes;
use crate::state::fsutil::{self, ensure_dir};
use crate::state::lock;
use crate::state::records::{DataUsage, LayerInfo, Provenance};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What a squash did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum SquashOutcome {
    /// The generation had at most one layer.
    NothingToDo,
    /// A new base was published.
    Squashed {
        /// The new generation.
        generation: u64,
        /// How many layers were folded into the base.
        folded: usize,
        /// Allocated bytes of the new base.
        allocated: u64,
        /// Allocated bytes of the folded layers.
        before: u64,
    },
}

impl SquashOutcome {
    /// The published generation, if any.
    pub fn generation(&self) -> Option<u64> {
        match self {
            SquashOutcome::Squashed { generation, .. } => Some(*generation),
            SquashOutcome::NothingToDo => None,
        }
    }
}

/// Unmounts the squash's mounts and removes its half-built image on every exit path, panics
/// included.
pub(super) struct Scratch {
    pub(super) host: std::sync::Arc<dyn crate::host::Host>,
    pub(super) mounts: Vec<PathBuf>,
    pub(super) image: Option<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            if let Err(e) = self.host.unmount(m, true) {
                tracing::warn!(mount = %m.display(), error = %e, "could not unmount squash scratch");
            }
        }
        if let Some(i) = self.image.take() {
            let _ = std::fs::remove_file(i);
        }
    }
}

impl Engine {
    /// Makes a new layer image at `image` (sparse ext4 of `size` bytes) and mounts it at `mnt`
    /// for `fill` to write its `upper/` tree; then unmounts every scratch mount (the new image
    /// first, so that its blocks are flushed) and fsyncs the image. Returns what `fill` copied
    /// and the image's allocated bytes; `what` names the tree when it does not fit (a `Quota`
    /// error). The image stays in `scratch` until the caller renames it into place. A
    /// `metadata` image (a metadata base's stubs) gets inodes that hold their xattrs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn build_image(
        &self,
        scratch: &mut Scratch,
        image: &Path,
        size: u64,
        metadata: bool,
        mnt: &Path,
        what: &str,
        fill: impl FnOnce(&Path) -> Result<crate::files::copy::CopyStats>,
    ) -> Result<(crate::files::copy::CopyStats, u64)> {
        if metadata {
            self.host.make_metadata_image(image, size, 0, 0)?;
        } else {
            self.host.make_image(image, size, 0, 0)?;
        }
        scratch.image = Some(image.to_path_buf());
        ensure_dir(mnt)?;
        self.host
            .mount_image(image, mnt, ImageMount { read_only: false })?;
        scratch.mounts.push(mnt.to_path_buf());
        let target = mnt.join("upper");
        std::fs::create_dir(&target).at("create", &target)?;
        std::fs::create_dir(mnt.join("work")).at("create", &mnt.join("work"))?;
        let stats = fill(&target).map_err(|e| {
            if e.is_enospc() {
                Error::new(
                    ErrorKind::Quota,
                    format!("{what} does not fit in {}", human_bytes(size)),
                )
            } else {
                e
            }
        })?;
        for m in scratch.mounts.drain(..).rev() {
            self.host.unmount(&m, false)?;
        }
        fsutil::fsync_file(image)?;
        Ok((stats, fsutil::allocated_bytes(image)?))
    }

    /// Squashes the cache's current generation into a single base layer: a metadata base when
    /// `squash_method = "metadata"` allows it here ([`Engine::metadata_squash_refusal`]), else
    /// a full one.
    pub fn squash(&self, id: &CacheId) -> Result<SquashOutcome> {
        // A clone cache has one image per generation: its "squash" rebuilds that image.
        if self
            .cache_record(id)?
            .is_some_and(|c| c.mode == crate::state::records::CacheMode::Clone)
        {
            return self.clone_rebuild(id);
        }
        if self.config.squash_method == crate::input::config::SquashMethod::Metadata {
            match self.metadata_squash_refusal(id)? {
                None => match self.squash_metadata(id) {
                    // What the tree holds cannot go in a metadata base (an xattr namespace EROFS
                    // has no index for): a due squash is made full rather than failing forever.
                    Err(e) if e.kind() == ErrorKind::InvalidInput => {
                        tracing::warn!(cache = %id, error = %e, "full squash instead of a metadata squash")
                    }
                    result => return result,
                },
                Some(why) => {
                    tracing::info!(cache = %id, why, "full squash instead of a metadata squash")
                }
            }
        }
        self.squash_with(id, None, None)
    }

    /// A full squash whatever `squash_method` says: one base holding every file's data.
    pub fn squash_full(&self, id: &CacheId) -> Result<SquashOutcome> {
        self.squash_with(id, None, None)
    }

    /// A metadata squash (issue 31): one base layer of the merged tree's metadata whose regular
    /// files are stubs redirecting into the generation's old layers, now mounted as data-only
    /// layers below it. O(files), not O(bytes): nothing is copied but metadata. Refused, with
    /// the reason, where [`Engine::metadata_squash_refusal`] says so.
    pub fn squash_metadata(&self, id: &CacheId) -> Result<SquashOutcome> {
        if let Some(why) = self.metadata_squash_refusal(id)? {
            return Err(Error::invalid(format!(
                "cache {id} cannot be metadata-squashed: {why}; `jobcachefs cache squash {} --namespace {}` makes a full one",
                id.name, id.namespace
            )));
        }
        let result = self.squash_inner(id, None, None, true);
        if result.is_err() && self.cache_record(id)?.is_some() {
            let _clock = self.lock_cache(id)?;
            self.unmount_unused_layers(id)?;
        }
        result
    }

    /// Why cache `id` cannot take a metadata squash here, if it cannot: the kernel lacks
    /// data-only layers for `metacopy=off` mounts (before 6.16), the cache is a clone cache, or
    /// a registry syncs it (exports ship real data; a metadata base is squashed fully first).
    pub fn metadata_squash_refusal(&self, id: &CacheId) -> Result<Option<String>> {
        let cache = self.require_cache(id)?;
        if cache.mode == crate::state::records::CacheMode::Clone {
            return Ok(Some(
                "it is a clone cache (one image per generation)".into(),
            ));
        }
        if self.config.registry_for(id).is_some() {
            return Ok(Some(
                "a registry syncs it, and exports ship whole files".into(),
            ));
        }
        if !self.host.erofs_mapped(self.layout.root()) && !self.host.data_layers_supported() {
            return Ok(Some(
                "this kernel neither mounts an EROFS image file with its data layers' images as devices (Linux 6.12+, CONFIG_EROFS_FS_BACKED_BY_FILE) nor serves a lower layer's metacopy stubs from data-only layers on a metacopy=off mount (Linux 6.16+)".into(),
            ));
        }
        if let Some(base) = self.current(id)?.layers.first() {
            let usage = base.data_usage;
            if usage.too_shadowed() {
                return Ok(Some(format!(
                    "its data layers hold {} of files that later layers replaced or deleted ({} live): a full squash gives that back",
                    human_bytes(usage.shadowed()),
                    human_bytes(usage.live)
                )));
            }
        }
        let depth = self.current(id)?.layers.len();
        if depth + self.current(id)?.data_ids().len() >= crate::host::mounts::MAX_OVERLAY_LOWERS / 2
        {
            return Ok(Some(format!(
                "its {depth} layers and their data layers would pass half the {} layers one overlay holds",
                crate::host::mounts::MAX_OVERLAY_LOWERS
            )));
        }
        Ok(None)
    }

    /// Rebuilds the cache's stack into a single base of `size` bytes (shrinking a cache).
    pub(crate) fn squash_into(&self, id: &CacheId, size: u64) -> Result<SquashOutcome> {
        self.squash_with(id, None, Some(size))
    }

    /// Squashes, optionally with one extra unpublished image on top (an over-size commit; its
    /// layer id is `extra.1`, so a retried commit sees it published). `size` rebuilds even a
    /// single-layer generation into a base of that size (resize); otherwise the cache-size.
    pub(crate) fn squash_with(
        &self,
        id: &CacheId,
        extra: Option<(&Path, &str)>,
        size: Option<u64>,
    ) -> Result<SquashOutcome> {
        let result = self.squash_inner(id, extra, size, false);
        // Layer mounts made only for this squash go, whatever the outcome.
        if result.is_err() && self.cache_record(id)?.is_some() {
            let _clock = self.lock_cache(id)?;
            self.unmount_unused_layers(id)?;
        }
        result
    }

    /// Mounts the read-only merged view of `g` (and `extra` on top) at `view` for a squash to
    /// copy from. Called with the cache lock held.
    fn mount_squash_view(
        &self,
        id: &CacheId,
        g: &crate::state::records::Generation,
        extra: Option<(&Path, &str)>,
        scratch: &mut Scratch,
        extra_mnt: &Path,
        view: &Path,
    ) -> Result<()> {
        // Over a stub metadata base, its data-only layers below: the view shows whole files.
        let data = self.ensure_layers_mounted(
            id,
            &self.overlay_data_layers(id, &g.layer_ids(), &g.data_ids()),
        )?;
        let mut lowers = self.ensure_layers_mounted(id, &g.layer_ids())?;
        if let Some((img, _)) = extra {
            ensure_dir(extra_mnt)?;
            self.host
                .mount_image(img, extra_mnt, ImageMount { read_only: true })?;
            scratch.mounts.push(extra_mnt.to_path_buf());
            lowers.push(extra_mnt.join("upper"));
        }
        // A read-only overlay needs two lowers at least: the empty dir makes up the count, on
        // top (a metadata base must stay the lowest normal layer: a stub's data is looked up in
        // the data-only layers only from there).
        while lowers.len() < 2 {
            lowers.push(self.layout.empty());
        }
        ensure_dir(view)?;
        self.host
            .mount_overlay_with_data(&lowers, &data, None, view)?;
        scratch.mounts.push(view.to_path_buf());
        Ok(())
    }

    /// Maps every regular file of `tree` without extents onto its data layer's image (FIEMAP
    /// through the layer's mount): the layer its entry names, else the first of `data` (newest
    /// first) holding a regular file at its path, the one the merged view took it from. A file
    /// found nowhere, of another size there, or whose bytes have no plain place in the image is
    /// an InvalidInput error (the squash is then made full).
    fn map_files(
        &self,
        id: &CacheId,
        tree: &mut crate::files::manifest::Manifest,
        data: &[String],
    ) -> Result<()> {
        use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let todo: Vec<usize> = (0..tree.entries.len())
            .filter(|&i| tree.entries[i].is_file() && tree.entries[i].extents.is_none())
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let named: std::collections::HashSet<&str> = todo
            .iter()
            .filter_map(|&i| tree.entries[i].layer.as_deref())
            .collect();
        let anywhere = todo.iter().any(|&i| tree.entries[i].layer.is_none());
        let needed: Vec<String> = data
            .iter()
            .filter(|l| anywhere || named.contains(l.as_str()))
            .cloned()
            .collect();
        // Mounted under the cache lock, each layer's tree held open: the lookups below go
        // through the descriptors, so a gc unmounting a layer meanwhile (lazily) cannot make a
        // file seem absent from it and send the lookup on to an older layer.
        let roots = {
            let _clock = self.lock_cache(id)?;
            let dirs = self.ensure_layers_mounted(id, &needed)?;
            needed
                .iter()
                .zip(dirs)
                .map(|(l, d)| {
                    let fd = rustix::fs::open(
                        &d,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(std::io::Error::from)
                    .at("open", &d)?;
                    Ok((l.as_str(), fd))
                })
                .collect::<Result<Vec<_>>>()?
        };
        for i in todo {
            let e = &mut tree.entries[i];
            let rel = Path::new(OsStr::from_bytes(e.path.as_bytes()));
            let mut found = None;
            for (layer, root) in &roots {
                if e.layer.as_deref().is_some_and(|l| l != *layer) {
                    continue;
                }
                match openat2(
                    root,
                    rel,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_XDEV,
                ) {
                    Ok(fd) => {
                        found = Some((*layer, std::fs::File::from(fd)));
                        break;
                    }
                    Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => continue,
                    Err(err) => {
                        return Err(Error::io(
                            format!("open {} in data layer {layer}", rel.display()),
                            err.into(),
                        ))
                    }
                }
            }
            let invalid = |why: String| {
                Error::invalid(format!(
                    "{}: {why}; a metadata base cannot point at it (cache squash NAME --full)",
                    rel.display()
                ))
            };
            let (layer, file) =
                found.ok_or_else(|| invalid("in none of the data layers".into()))?;
            let md = file.metadata().at("stat", rel)?;
            if !md.is_file() || md.len() != e.size {
                return Err(invalid(format!(
                    "data layer {layer} holds no regular file of {} bytes there",
                    e.size
                )));
            }
            let extents = crate::files::fiemap::extents(&file, e.size, rel)?
                .ok_or_else(|| invalid(format!("its bytes have no plain place in {layer}")))?;
            e.extents = Some(extents);
            e.layer = Some(layer.to_string());
        }
        Ok(())
    }

    fn squash_inner(
        &self,
        id: &CacheId,
        extra: Option<(&Path, &str)>,
        size: Option<u64>,
        metadata: bool,
    ) -> Result<SquashOutcome> {
        let cache = self.require_cache(id)?;
        let limit = size.unwrap_or(cache.cache_size);
        let _slock = lock::lock(&self.layout.squash_lock(id))?;
        let work = self.layout.squash_mnt(id);
        let (view, extra_mnt, new_mnt) = (work.join("view"), work.join("extra"), work.join("new"));
        // Leftovers of a squash that crashed are ours to clear: we hold the squash lock.
        for m in [&new_mnt, &extra_mnt, &view] {
            self.host.unmount(m, true)?;
        }
        let tmp = self.layout.cache_tmp(id);
        let _ = std::fs::remove_dir_all(&tmp);
        ensure_dir(&tmp)?;
        let mut scratch = Scratch {
            host: self.host.clone(),
            mounts: Vec::new(),
            image: None,
        };

        // A metadata base is a mapped EROFS image where the kernel mounts one, else an EROFS (or
        // ext4) image of stubs over data-only layers.
        let mapped = metadata && self.host.erofs_mapped(self.layout.root());
        let erofs = metadata && (mapped || self.host.erofs_metadata());
        let base = {
            let _clock = self.lock_cache(id)?;
            let current = self.current(id)?;
            // A lone metadata base still has its data to fold (a full squash materialises it).
            let lone_meta =
                !metadata && current.layers.len() == 1 && !current.data_ids().is_empty();
            if extra.is_none()
                && current.layers.len() <= 1
                && !lone_meta
                && !(size.is_some() && current.layers.len() == 1)
            {
                let _ = std::fs::remove_file(self.layout.squash_due(id));
                return Ok(SquashOutcome::NothingToDo);
            }
            if !erofs {
                self.mount_squash_view(id, &current, extra, &mut scratch, &extra_mnt, &view)?;
            }
            current
        };
        // An EROFS metadata base is made from the folded layers' manifests when every one has a
        // readable one (commits under squash_method = "metadata" and metadata bases write
        // them): then no layer is mounted or read. They are parsed without the cache lock
        // (O(files)); the publish below checks that the cache still starts with `base`.
        // Each with its layer's id, but a metadata base's: its files' bytes are in its data
        // layers (a mapped base's manifest names them; a stub base's does not).
        let manifests: Option<Vec<(&str, crate::files::manifest::Manifest)>> =
            if erofs && extra.is_none() {
                base.layers
                    .iter()
                    .map(|l| {
                        let id_of = if l.data.is_empty() { l.id.as_str() } else { "" };
                        crate::files::manifest::read_for(
                            &self.layout.layer_manifest(id, &l.id),
                            &self.layout.layer_image(id, &l.id),
                        )
                        .map(|m| (id_of, m))
                    })
                    .collect()
            } else {
                None
            };
        if erofs && manifests.is_none() {
            // Layers of `base` collected meanwhile (a merge past the hard bound) fail the mount
            // and this squash; the next one starts over.
            let _clock = self.lock_cache(id)?;
            self.mount_squash_view(id, &base, extra, &mut scratch, &extra_mnt, &view)?;
        }
        fault::point("squash:view-mounted");

        let image_path = tmp.join(format!("base-{}.img", fsutil::random_hex()));
        tracing::info!(cache = %id, layers = base.layers.len() + extra.is_some() as usize, "squash: copying the merged view");
        let started = std::time::Instant::now();
        let progress = self.progress.clone().map(|h| {
            let name = format!("squash {id}");
            Box::new(move |s: &crate::files::copy::CopyStats| {
                (h.0)(&name, super::Progress::Copy(s))
            }) as crate::files::copy::Progress
        });
        let mut manifest_path = None;
        let (stats, allocated) = if erofs {
            // An EROFS image written straight from the tree: no mkfs, no mount, a few MiB.
            use crate::files::manifest;
            scratch.image = Some(image_path.clone());
            let from_manifests = manifests.is_some();
            let mut tree = match manifests {
                Some(m) => manifest::merge(&m),
                None => manifest::of_tree(&view, manifest::Names::View)?,
            };
            let stats = if mapped {
                let data = metadata_data_layers(&base);
                self.map_files(id, &mut tree, &data)?;
                let devices = data
                    .iter()
                    .map(|l| {
                        let image = self.layout.layer_image(id, l);
                        Ok(crate::files::erofs::Device {
                            layer: l.clone(),
                            file: image
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                            size: std::fs::metadata(&image).at("stat", &image)?.len(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                crate::files::erofs::write_mapped_image(&tree, &devices, &image_path)?
            } else {
                crate::files::erofs::write_stub_image(&tree, &image_path)?
            };
            let mpath = image_path.with_extension("manifest");
            tree.image = manifest::image_uuid(&image_path);
            manifest::write(&tree, &mpath)?;
            manifest_path = Some(mpath);
            tracing::info!(cache = %id, from_manifests, entries = stats.entries, "metadata base written");
            fault::point("squash:copied");
            for m in scratch.mounts.drain(..).rev() {
                self.host.unmount(&m, false)?;
            }
            (stats, fsutil::allocated_bytes(&image_path)?)
        } else {
            self.build_image(
                &mut scratch,
                &image_path,
                limit,
                metadata,
                &new_mnt,
                "the merged tree",
                |target| {
                    let stats = if metadata {
                        crate::files::copy::stub_tree(&view, target, progress)?
                    } else {
                        copy_tree(&view, target, progress)?
                    };
                    fault::point("squash:copied");
                    Ok(stats)
                },
            )?
        };
        // What the data layers hold: a folded layer's image, or a folded metadata base's data.
        let data_usage = if metadata {
            DataUsage {
                allocated: base
                    .layers
                    .iter()
                    .map(|l| {
                        if l.data.is_empty() {
                            l.allocated
                        } else {
                            l.data_usage.allocated
                        }
                    })
                    .sum(),
                live: stats.referenced,
            }
        } else {
            DataUsage::default()
        };
        // A metadata base's data layers stay: they count against the cache-size with it.
        if allocated + data_usage.allocated > limit {
            return Err(Error::new(
                ErrorKind::Quota,
                format!(
                    "the squashed cache allocates {} which is over its cache-size {}",
                    human_bytes(allocated + data_usage.allocated),
                    human_bytes(limit)
                ),
            ));
        }

        let _clock = self.lock_cache(id)?;
        if self.cache_record(id)?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("cache {id} was removed during the squash"),
            ));
        }
        let now = self.current(id)?;
        let base_ids = base.layer_ids();
        if now.layer_ids().get(..base_ids.len()) != Some(&base_ids[..]) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("cache {id} changed under the squash (squashed or resized meanwhile): nothing published"),
            ));
        }
        let layer_id = match extra {
            Some((_, l)) => l.to_string(),
            None if metadata => format!("meta-{}", fsutil::random_hex()),
            None => format!("base-{}", fsutil::random_hex()),
        };
        let data: Vec<String> = if metadata {
            metadata_data_layers(&base)
        } else {
            Vec::new()
        };
        let dst = self.layout.layer_image(id, &layer_id);
        // The manifest first: one left alone by a crash is gc's (no generation names it).
        if let Some(m) = &manifest_path {
            let to = self.layout.layer_manifest(id, &layer_id);
            std::fs::rename(m, &to).at("rename into the cache", &to)?;
        }
        std::fs::rename(&image_path, &dst).at("rename into the cache", &dst)?;
        scratch.image = None;
        fsutil::fsync_dir(&self.layout.layers_dir(id))?;
        fault::point("squash:renamed");
        let mut layers = vec![LayerInfo {
            data,
            data_usage,
            id: layer_id,
            created: fsutil::now(),
            source: if extra.is_some() {
                "commit+squash".into()
            } else if metadata {
                "metadata squash".into()
            } else {
                "squash".into()
            },
            size: std::fs::metadata(&dst).at("stat", &dst)?.len(),
            allocated,
            covers: base
                .layers
                .iter()
                .flat_map(|l| l.known_ids().cloned())
                .collect(),
        }];
        layers.extend(now.layers[base_ids.len()..].iter().cloned());
        let provenance = match (extra, size) {
            (Some((_, l)), _) => {
                let mut p = Provenance::new("commit", "(squashed to fit the cache-size)");
                p.details.insert("layer".into(), l.to_string());
                p
            }
            (None, Some(s)) => Provenance::new("resize", format!("generation {}", now.generation))
                .with("cache-size", s.to_string()),
            (None, None) => Provenance::new(
                if metadata {
                    "metadata-squash"
                } else {
                    "squash"
                },
                format!("generation {}", now.generation),
            )
            .with("folded", base_ids.len().to_string()),
        };
        let next = self.publish(id, layers, provenance)?;
        fault::point("squash:published");
        crate::state::stats::observe(
            &self.layout,
            crate::state::stats::histograms::SQUASH,
            started.elapsed(),
            &[(crate::state::stats::names::SQUASHES, 1)],
        );
        // A metadata base may leave a squash due at once: its data layers mostly shadowed.
        if super::commit::squash_due(&self.config, &next) {
            let marker = self.layout.squash_due(id);
            std::fs::write(&marker, b"").at("queue squash", &marker)?;
            tracing::info!(cache = %id, "squash queued: the data layers hold more shadowed bytes than live ones");
        } else {
            let _ = std::fs::remove_file(self.layout.squash_due(id));
        }
        self.collect_layers(id)?;
        tracing::info!(cache = %id, generation = next.generation, folded = base_ids.len(),
            entries = stats.entries, bytes = stats.bytes, allocated, secs = started.elapsed().as_secs_f64(), "squash published");
        Ok(SquashOutcome::Squashed {
            generation: next.generation,
            folded: base_ids.len() + extra.is_some() as usize,
            allocated,
            before: base.allocated(),
        })
    }
}

/// A metadata base's data layers: the folded layers newest first, a folded metadata base
/// giving its own data layers instead (its base is superseded). The first data layer with a
/// regular file at a path is the layer the merged view took that path from: every layer above
/// it had no entry there, nor a non-directory on the way (either would have hidden it).
fn metadata_data_layers(base: &crate::state::records::Generation) -> Vec<String> {
    base.layers
        .iter()
        .rev()
        .flat_map(|l| {
            if l.data.is_empty() {
                vec![l.id.clone()]
            } else {
                l.data.clone()
            }
        })
        .collect()
}
