//! The local-path-provisioner hook: `jobcachefs hook -p PATH -s BYTES -m MODE -a create|delete`
//! with `VOL_DIR`, `VOL_SIZE_BYTES`, `VOL_MODE`, `VOL_USER`, `VOL_GROUP`, `VOL_PERM` in the
//! environment (the provisioner's contract, checked by [`crate::input::hook_args`]; see
//! docs/src/design.md).
//!
//! Setup reads the PVC and its StorageClass from the API, decides the volume (see
//! [`super::policy`]) and creates it; everything teardown needs (cache, write-back, labels naming
//! the PVC) is in the volume's record on the node, because at teardown the PVC is gone. Teardown
//! never asks the API: it unmounts and commits (a rename), leaves squash and prune queued for the
//! agent or `gc --drain`, removes the folder, and succeeds on every retry once done.

use super::client::Client;
use super::path::{parse_volume_path, VolumeIdentity};
use super::policy::{decide, ClaimFacts, ClassFacts};
use crate::engine::{CreateRequest, DeleteOutcome};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::host::mounts;
use crate::input::hook_args::{Action, HookRequest};
use crate::state::records::VolumeRecord;
use crate::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Label keys of the volume record (shown by `volume ls`/`show`).
pub mod labels {
    /// The PV's name.
    pub const PV: &str = "jobcachefs.io/pv";
    /// The PVC's namespace.
    pub const NAMESPACE: &str = "jobcachefs.io/pvc-namespace";
    /// The PVC's name.
    pub const PVC: &str = "jobcachefs.io/pvc";
    /// The PVC's UID.
    pub const PVC_UID: &str = "jobcachefs.io/pvc-uid";
    /// The StorageClass.
    pub const STORAGE_CLASS: &str = "jobcachefs.io/storage-class";
}

/// What a hook run did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum HookOutcome {
    /// A volume was created (or found created by an earlier run of the same setup).
    Created {
        /// Its record.
        volume: Box<VolumeRecord>,
        /// An earlier run had already made it.
        repeated: bool,
        /// What the operator should know.
        notes: Vec<String>,
    },
    /// A volume was deleted.
    Deleted {
        /// The folder.
        path: PathBuf,
        /// What happened to its changes.
        result: DeleteOutcome,
    },
}

/// Runs the hook. `api` makes the API client; it is called only by a setup that needs it.
pub fn run(
    engine: &Engine,
    req: &HookRequest,
    api: impl FnOnce() -> Result<Client>,
) -> Result<HookOutcome> {
    // The provisioner's clock started before this process did (it created the pod); the
    // configured deadline leaves room for that.
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_secs(engine.config().kubernetes.setup_deadline);
    for w in &req.warnings {
        tracing::warn!("{w}");
    }
    let id = parse_volume_path(&req.path, &engine.config().kubernetes.node_paths)?;
    match req.action {
        Action::Create => create(engine, req, &id, api, deadline),
        Action::Delete => delete(engine, req),
    }
}

fn create(
    engine: &Engine,
    req: &HookRequest,
    id: &VolumeIdentity,
    api: impl FnOnce() -> Result<Client>,
    deadline: std::time::Instant,
) -> Result<HookOutcome> {
    // A retried setup: the volume exists; the API need not be asked again (and the answer could
    // have changed since). The engine remounts it if the node rebooted in between.
    if let Ok(info) = engine.volume_show(&req.path) {
        let r = &info.record;
        if r.state == crate::state::records::VolumeState::Ready
            && r.labels.contains_key(labels::PVC)
        {
            let volume = engine.volume_create(&CreateRequest {
                dir: req.path.clone(),
                cache: r.cache.clone(),
                size: Some(r.size),
                write_back: r.write_back,
                on_success: r.on_success,
                scope: r.scope.clone(),
                root: r.root,
                labels: r.labels.clone(),
                unique_ids: r.identity.is_some(),
                ..Default::default()
            })?;
            return Ok(HookOutcome::Created {
                volume: Box::new(volume),
                repeated: true,
                notes: vec![],
            });
        }
    }
    let client = api()?;
    let pvc = client
        .pvc(&id.namespace, &id.pvc)
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::new(
                ErrorKind::NotFound,
                format!(
                "{e}: the PVC of volume {} must exist while it is provisioned (was it deleted?)",
                req.path.display()
            ),
            ),
            _ => e,
        })?;
    if pvc.spec.volume_mode.as_deref() == Some("Block") {
        return Err(Error::invalid(format!(
            "PVC {}/{} asks for volumeMode Block: jobcachefs provides Filesystem volumes only",
            id.namespace, id.pvc
        )));
    }
    let class_name = pvc.spec.storage_class_name.clone().ok_or_else(|| {
        Error::invalid(format!(
            "PVC {}/{} has no storageClassName: name the jobcache or jobcache-writeback class",
            id.namespace, id.pvc
        ))
    })?;
    let class = client.storage_class(&class_name).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::new(
            ErrorKind::NotFound,
            format!(
                "{e}: PVC {}/{} names an unknown StorageClass; create it (deploy/storageclasses.yaml) or fix the PVC",
                id.namespace, id.pvc
            ),
        ),
        _ => e,
    })?;
    let decision = decide(
        req.size,
        &ClaimFacts {
            namespace: id.namespace.clone(),
            name: id.pvc.clone(),
            annotations: pvc.metadata.annotations.clone(),
        },
        &ClassFacts {
            name: class_name.clone(),
            parameters: class.parameters.clone(),
        },
    )?;
    for n in &decision.notes {
        tracing::info!("{n}");
    }
    let mut l = BTreeMap::new();
    if let Some(pv) = &id.pv {
        l.insert(labels::PV.to_string(), pv.clone());
    }
    l.insert(labels::NAMESPACE.to_string(), id.namespace.clone());
    l.insert(labels::PVC.to_string(), id.pvc.clone());
    if let Some(uid) = &pvc.metadata.uid {
        l.insert(labels::PVC_UID.to_string(), uid.clone());
    }
    l.insert(labels::STORAGE_CLASS.to_string(), class_name);
    let volume = super::volumes::create(
        engine,
        &decision,
        req.path.clone(),
        Some(req.root),
        l,
        deadline,
        move || Ok(client),
    )?;
    Ok(HookOutcome::Created {
        volume: Box::new(volume),
        repeated: false,
        notes: decision.notes,
    })
}

fn delete(engine: &Engine, req: &HookRequest) -> Result<HookOutcome> {
    let result = engine.volume_delete(&req.path, false)?;
    remove_folder(&req.path)?;
    super::volumes::repair_after_delete(engine, "teardown");
    Ok(HookOutcome::Deleted {
        path: req.path.clone(),
        result,
    })
}

/// Removes the volume's folder, as the provisioner's stock teardown (`rm -rf`) does. A folder
/// that is still a mount point is left alone and reported: removing it would delete through
/// the mount.
pub(crate) fn remove_folder(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let table = mounts::mount_table()?;
    if mounts::is_mounted(&table, path) {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "volume folder {} is still a mount point after the delete: find its user with `findmnt {}` and unmount it",
                path.display(),
                path.display()
            ),
        ));
    }
    std::fs::remove_dir_all(path).at("remove volume folder", path)
}
