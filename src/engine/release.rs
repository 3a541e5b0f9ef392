//! `node release`: lets go of everything a node keeps mounted between volumes — the layer
//! mounts kept for the next create (`layer_keep_seconds`) and the reflink pool of clone-mode
//! caches — and of their loop devices, so that the state dir can be upgraded, moved or removed.
//!
//! Only when no volume is live: a live volume's overlay uses its layers, and its clone lives in
//! the pool. A refusal names the live volumes and changes nothing. Nothing is lost by a release:
//! the next create mounts what it needs again. Idempotent: a second release finds nothing to do.

use super::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::host::mounts;
use crate::input::names::CacheId;
use crate::state::lock;
use crate::state::records::VolumeKind;
use serde::Serialize;
use std::path::PathBuf;

/// What a release let go of.
#[derive(Debug, Default, Serialize)]
pub struct ReleaseReport {
    /// Mount points unmounted (layer mounts, the pool, and stale ones gc repaired).
    pub unmounted: Vec<PathBuf>,
    /// Loop devices that were attached to files of the state dir and no longer are.
    pub loops_released: Vec<PathBuf>,
}

impl ReleaseReport {
    /// Whether there was nothing to release.
    pub fn is_empty(&self) -> bool {
        self.unmounted.is_empty() && self.loops_released.is_empty()
    }
}

impl Engine {
    /// Unmounts the kept layer mounts and the reflink pool and detaches their loop devices
    /// when no volume is live; refuses (a conflict naming them) otherwise.
    pub fn node_release(&self) -> Result<ReleaseReport> {
        self.refuse_if_live("")?;
        let root = self.layout.root().to_path_buf();
        let loops_before = self.state_loops();
        // Repairs first (stale mounts, half-built images, loops nothing mounts): what is left
        // after it is what the node keeps on purpose.
        let gc = self.gc_shared()?;
        let mut report = ReleaseReport {
            unmounted: gc.mounts_removed,
            ..Default::default()
        };
        let layers = self.layout.mnt().join("layers");
        for m in self.host.mount_table()? {
            let Ok(rest) = m.mount_point.strip_prefix(&layers) else {
                continue;
            };
            let parts: Vec<String> = rest
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let [ns, name, _layer] = &parts[..] else {
                continue;
            };
            // Under the cache lock: a create mounts its layers under it, after its record is
            // written, so a create that got in since the check above is seen here.
            let _clock = match CacheId::new(ns, name) {
                Ok(id) => {
                    let l = self.lock_cache(&id)?;
                    if !self.layers_in_use(&id)?.is_empty() {
                        return Err(self.live_error(&id.to_string()));
                    }
                    Some(l)
                }
                Err(_) => None,
            };
            self.host.unmount(&m.mount_point, false)?;
            let _ = std::fs::remove_dir(&m.mount_point);
            report.unmounted.push(m.mount_point.clone());
        }
        let pool = self.layout.pool_mount();
        if mounts::is_mounted(&self.host.mount_table()?, &pool) {
            let _plock = lock::lock(&self.layout.pool_lock())?;
            if self
                .volume_records()?
                .iter()
                .any(|r| r.kind == VolumeKind::Clone)
            {
                return Err(self.live_error("clone"));
            }
            self.host.unmount(&pool, false)?;
            report.unmounted.push(pool);
        }
        // Autoclear releases a device right after its last unmount; wait for that, then detach
        // what no mount holds (gc's rule), and say what is still attached.
        let mut still = self.state_loops();
        for _ in 0..50 {
            if still.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(40));
            still = self.state_loops();
        }
        let table = self.host.mount_table()?;
        for b in &still {
            let dev = b.device.display().to_string();
            if !table.iter().any(|m| m.source == dev) {
                let _ = self.host.detach(&b.device);
            }
        }
        let after = self.state_loops();
        report.loops_released = loops_before
            .iter()
            .filter(|b| !after.iter().any(|a| a.device == b.device))
            .map(|b| b.device.clone())
            .collect();
        let left: Vec<String> = self
            .host
            .mount_table()?
            .into_iter()
            .filter(|m| m.mount_point.starts_with(&root))
            .map(|m| m.mount_point.display().to_string())
            .chain(
                after
                    .iter()
                    .map(|b| format!("{} ({})", b.device.display(), b.file.display())),
            )
            .collect();
        if !left.is_empty() {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "still in use under the state dir {}: {} (a squash or a registry sync in progress?): retry when it has ended",
                    root.display(),
                    left.join(", ")
                ),
            ));
        }
        tracing::info!(
            unmounted = report.unmounted.len(),
            loops = report.loops_released.len(),
            "node released"
        );
        Ok(report)
    }

    /// Refuses while any volume (of any state: a half-made or half-deleted one counts) is on
    /// this node, or a record cannot be read.
    fn refuse_if_live(&self, what: &str) -> Result<()> {
        let (records, damaged) = self.volume_records_checked()?;
        if !damaged.is_empty() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "volume record(s) {} cannot be read, so no volume can be proven gone: nothing was released (see `jobcachefs doctor`)",
                    damaged.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if records.is_empty() {
            return Ok(());
        }
        let dirs: Vec<String> = records
            .iter()
            .map(|r| {
                format!(
                    "{} ({})",
                    r.dir.display(),
                    format!("{:?}", r.state).to_lowercase()
                )
            })
            .collect();
        Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "{} {what}volume(s) live on this node: {}. Nothing was released: delete them (`jobcachefs volume delete DIR`; Kubernetes: let their pods end) and run `jobcachefs node release` again",
                records.len(),
                dirs.join(", ")
            ),
        ))
    }

    /// The refusal when a volume appeared while releasing (`what`: the cache or "clone").
    fn live_error(&self, what: &str) -> Error {
        match self.refuse_if_live(&format!("{what} ")) {
            Err(e) => e,
            Ok(()) => Error::new(
                ErrorKind::Conflict,
                format!("a {what} volume was created while releasing: retry when it is deleted"),
            ),
        }
    }

    /// Loop devices backed by files under the state dir.
    fn state_loops(&self) -> Vec<crate::host::loopback::Backing> {
        let root = self.layout.root();
        self.host
            .loop_devices()
            .into_iter()
            .filter(|b| {
                PathBuf::from(b.file.to_string_lossy().trim_end_matches(" (deleted)"))
                    .starts_with(root)
            })
            .collect()
    }
}
