//! The local-path-provisioner hook: `jobcachefs hook -p PATH -s BYTES -m MODE -a create|delete`
//! with `VOL_DIR`, `VOL_SIZE_BYTES`, `VOL_MODE`, `VOL_USER`, `VOL_GROUP`, `VOL_PERM` in the
//! environment (the provisioner's contract; see DESIGN.md).
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
use crate::input::quantity::parse_size;
use crate::state::records::{RootOwner, VolumeRecord};
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

/// The root of a hook volume when `VOL_USER`/`VOL_GROUP`/`VOL_PERM` are not set: root-owned and
/// world-writable, as the provisioner's stock `mkdir -m 0777` makes it, so that build pods
/// running as any user can write.
pub const DEFAULT_ROOT: RootOwner = RootOwner {
    uid: 0,
    gid: 0,
    mode: 0o777,
};

/// `-a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Setup.
    Create,
    /// Teardown.
    Delete,
}

/// The hook's inputs as given: command-line values and environment values.
#[derive(Debug, Clone, Default)]
pub struct RawInputs {
    /// `-p`.
    pub path: Option<String>,
    /// `-s`.
    pub size: Option<String>,
    /// `-m`.
    pub mode: Option<String>,
    /// `-a`.
    pub action: Option<String>,
    /// The `VOL_*` environment, by name.
    pub env: BTreeMap<String, String>,
}

/// The hook's request after checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRequest {
    /// The volume's folder.
    pub path: PathBuf,
    /// Requested bytes.
    pub size: u64,
    /// Setup or teardown.
    pub action: Action,
    /// Owner and mode of the volume's root.
    pub root: RootOwner,
    /// Where arguments and environment disagreed (the arguments won).
    pub warnings: Vec<String>,
}

/// Takes the argument if given, else the environment variable; says so when both are given and
/// disagree.
fn pick(
    flag: &str,
    arg: &Option<String>,
    var: &str,
    env: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> Option<String> {
    let from_env = env.get(var).filter(|v| !v.is_empty());
    match (arg.as_ref().filter(|v| !v.is_empty()), from_env) {
        (Some(a), Some(e)) if a != e => {
            warnings.push(format!(
                "{flag} {a:?} and {var}={e:?} disagree: using {flag} {a:?}"
            ));
            Some(a.clone())
        }
        (Some(a), _) => Some(a.clone()),
        (None, Some(e)) => Some(e.clone()),
        (None, None) => None,
    }
}

fn parse_id(var: &str, value: &str) -> Result<u32> {
    value.parse().map_err(|_| {
        Error::invalid(format!(
            "{var}={value:?} is not a numeric id: the provisioner passes numbers (e.g. 1000)"
        ))
    })
}

/// Checks the inputs (pure): arguments win over the environment.
pub fn resolve(raw: &RawInputs) -> Result<HookRequest> {
    let mut warnings = Vec::new();
    let env = &raw.env;
    let path = pick("-p", &raw.path, "VOL_DIR", env, &mut warnings).ok_or_else(|| {
        Error::invalid(
            "no volume path: pass -p PATH (or set VOL_DIR), as local-path-provisioner does",
        )
    })?;
    let action = match raw.action.as_deref() {
        Some("create") => Action::Create,
        Some("delete") => Action::Delete,
        Some(other) => {
            return Err(Error::invalid(format!(
                "-a {other:?} is not an action: use -a create (setup) or -a delete (teardown)"
            )))
        }
        None => {
            return Err(Error::invalid(
                "no action: pass -a create (setup) or -a delete (teardown)",
            ))
        }
    };
    let mode = pick("-m", &raw.mode, "VOL_MODE", env, &mut warnings)
        .unwrap_or_else(|| "Filesystem".to_string());
    match mode.as_str() {
        "Filesystem" => {}
        "Block" => {
            return Err(Error::invalid(format!(
                "volume {path}: volumeMode Block is not supported: jobcachefs provides Filesystem volumes; set volumeMode: Filesystem on the PVC"
            )))
        }
        other => {
            return Err(Error::invalid(format!(
                "-m {other:?} is not a volume mode: the provisioner passes Filesystem or Block"
            )))
        }
    }
    let size =
        match pick("-s", &raw.size, "VOL_SIZE_BYTES", env, &mut warnings) {
            // Teardown needs no size: what was made is in the volume's record.
            _ if action == Action::Delete => 0,
            Some(s) => parse_size("-s (VOL_SIZE_BYTES)", &s)?,
            None => return Err(Error::invalid(
                "no size: pass -s BYTES (or set VOL_SIZE_BYTES), as local-path-provisioner does",
            )),
        };
    let var = |k: &str| env.get(k).filter(|v| !v.is_empty());
    let mut root = DEFAULT_ROOT;
    if let Some(u) = var("VOL_USER") {
        root.uid = parse_id("VOL_USER", u)?;
    }
    if let Some(g) = var("VOL_GROUP") {
        root.gid = parse_id("VOL_GROUP", g)?;
    }
    if let Some(p) = var("VOL_PERM") {
        let digits = p.trim_start_matches("0o");
        root.mode = u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "VOL_PERM={p:?} is not an octal mode: use e.g. 0775"
                ))
            })?;
    }
    Ok(HookRequest {
        path: PathBuf::from(path),
        size,
        action,
        root,
        warnings,
    })
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
    for w in &req.warnings {
        tracing::warn!("{w}");
    }
    let id = parse_volume_path(&req.path, &engine.config().kubernetes.node_paths)?;
    match req.action {
        Action::Create => create(engine, req, &id, api),
        Action::Delete => delete(engine, req),
    }
}

fn create(
    engine: &Engine,
    req: &HookRequest,
    id: &VolumeIdentity,
    api: impl FnOnce() -> Result<Client>,
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
                root: r.root,
                labels: r.labels.clone(),
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
    if let Some(id) = &decision.cache {
        crate::sync::ops::pull_if_cold(engine, id);
    }
    let volume = engine.volume_create(&CreateRequest {
        dir: req.path.clone(),
        cache: decision.cache,
        size: Some(decision.size),
        write_back: decision.write_back,
        cache_size: decision.cache_size,
        root: Some(req.root),
        labels: l,
        cache_mode: decision.cache_mode,
    })?;
    Ok(HookOutcome::Created {
        volume: Box::new(volume),
        repeated: false,
        notes: decision.notes,
    })
}

fn delete(engine: &Engine, req: &HookRequest) -> Result<HookOutcome> {
    let result = engine.volume_delete(&req.path, false)?;
    remove_folder(&req.path)?;
    // Cheap repair of what crashed runs left in the state dir; it never fails the teardown, whose
    // own work is done. Squashes stay queued for the node agent (`squash_inline = false` here).
    match engine.gc_shared() {
        Ok(report) if !report.errors.is_empty() => {
            tracing::warn!(errors = ?report.errors, "gc after teardown found problems")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "gc after teardown failed"),
    }
    Ok(HookOutcome::Deleted {
        path: req.path.clone(),
        result,
    })
}

/// Removes the volume's folder, as the provisioner's stock teardown (`rm -rf`) does. A folder
/// that is still a mount point is left alone and reported: removing it would delete through
/// the mount.
fn remove_folder(path: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(args: [Option<&str>; 4], env: &[(&str, &str)]) -> RawInputs {
        RawInputs {
            path: args[0].map(str::to_string),
            size: args[1].map(str::to_string),
            mode: args[2].map(str::to_string),
            action: args[3].map(str::to_string),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn args_win_and_say_so() {
        let r = resolve(&raw(
            [
                Some("/n/a_b_c"),
                Some("1024"),
                Some("Filesystem"),
                Some("create"),
            ],
            &[("VOL_DIR", "/n/x_y_z"), ("VOL_SIZE_BYTES", "1024")],
        ))
        .unwrap();
        assert_eq!(r.path, PathBuf::from("/n/a_b_c"));
        assert_eq!(r.size, 1024);
        assert_eq!(r.warnings.len(), 1);
        assert!(r.warnings[0].contains("VOL_DIR"), "{:?}", r.warnings);
        assert_eq!(r.root, DEFAULT_ROOT);
    }

    #[test]
    fn env_fills_in() {
        let r = resolve(&raw(
            [None, None, None, Some("create")],
            &[
                ("VOL_DIR", "/n/a_b_c"),
                ("VOL_SIZE_BYTES", "2147483648"),
                ("VOL_MODE", "Filesystem"),
                ("VOL_USER", "1000"),
                ("VOL_GROUP", "2000"),
                ("VOL_PERM", "0750"),
            ],
        ))
        .unwrap();
        assert_eq!(r.size, 2 << 30);
        assert_eq!(
            r.root,
            RootOwner {
                uid: 1000,
                gid: 2000,
                mode: 0o750
            }
        );
        assert!(r.warnings.is_empty());
        // On delete the provisioner leaves VOL_USER & co empty.
        let r = resolve(&raw(
            [
                Some("/n/a_b_c"),
                Some("0"),
                Some("Filesystem"),
                Some("delete"),
            ],
            &[("VOL_USER", ""), ("VOL_PERM", "")],
        ))
        .unwrap();
        assert_eq!(r.action, Action::Delete);
    }

    #[test]
    fn bad_inputs_name_the_value() {
        for (args, env, needle) in [
            ([None, Some("1"), None, Some("create")], &[][..], "-p PATH"),
            (
                [Some("/n/a_b_c"), Some("1"), Some("Block"), Some("create")],
                &[][..],
                "Block is not supported",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                &[("VOL_MODE", "Block")][..],
                "Block is not supported",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), Some("Raw"), Some("create")],
                &[][..],
                "\"Raw\"",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("mount")],
                &[][..],
                "\"mount\"",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, None],
                &[][..],
                "-a create",
            ),
            (
                [Some("/n/a_b_c"), None, None, Some("create")],
                &[][..],
                "-s BYTES",
            ),
            (
                [Some("/n/a_b_c"), Some("ten"), None, Some("create")],
                &[][..],
                "\"ten\"",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                &[("VOL_USER", "bob")][..],
                "VOL_USER=\"bob\"",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                &[("VOL_PERM", "0999")][..],
                "VOL_PERM",
            ),
            (
                [Some("/n/a_b_c"), Some("1"), None, Some("create")],
                &[("VOL_PERM", "17777")][..],
                "VOL_PERM",
            ),
        ] {
            let e = resolve(&raw(args, env)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }
}
