//! The CSI Node service: NodePublishVolume makes one job volume at the target path from the
//! cache's current generation, NodeUnpublishVolume deletes it (commit if it may write back,
//! discard otherwise). Both are the engine's `volume create/delete`: the same records, locks and
//! crash rules, so a call retried after a crash or a restart of the plugin finishes or undoes
//! what the first one started.
//!
//! Idempotency (the spec's): the same volume published again at the same target with the same
//! decision → OK (remounted if the node rebooted); another volume or another decision at that
//! target → ALREADY_EXISTS; an unpublish of a target with no volume → OK.

use super::status::{invalid, status};
use super::{blocking, TOPOLOGY_NODE};
use crate::engine::DeleteOutcome;
use crate::k8s::policy::{self, Decision, PodFacts};
use crate::state::stats;
use crate::Engine;
use bpfman_csi::v1 as csi;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// Labels of a CSI volume's record (shown by `volume ls`, kept in the commit's history).
pub mod labels {
    /// Which front end made the volume: `csi`.
    pub const FRONT_END: &str = "jobcachefs.io/front-end";
    /// The CSI volume id.
    pub const VOLUME_ID: &str = "jobcachefs.io/csi-volume";
    /// `inline` or `persistent`.
    pub const LIFECYCLE: &str = "jobcachefs.io/csi-lifecycle";
    /// The pod's namespace.
    pub const POD_NAMESPACE: &str = "jobcachefs.io/pod-namespace";
    /// The pod's name.
    pub const POD: &str = "jobcachefs.io/pod";
    /// The pod's UID.
    pub const POD_UID: &str = "jobcachefs.io/pod-uid";
    /// The pod's service account.
    pub const SERVICE_ACCOUNT: &str = "jobcachefs.io/service-account";
    /// The node.
    pub const NODE: &str = "jobcachefs.io/node";
    /// Why the volume's changes will be discarded although it asked to write back.
    pub const WRITE_BACK_REFUSED: &str = "jobcachefs.io/write-back-refused";
    /// The PVC's namespace, name, the PV's name and the class (persistent volumes).
    pub const PVC_NAMESPACE: &str = "jobcachefs.io/pvc-namespace";
    /// The PVC's name.
    pub const PVC: &str = "jobcachefs.io/pvc";
    /// The PV's name (not `jobcachefs.io/pv`: the agent's orphan check of hook volumes reads
    /// that one, and a CSI volume is unpublished by kubelet, never orphaned by its PV).
    pub const PV: &str = "jobcachefs.io/csi-pv";
    /// The StorageClass.
    pub const STORAGE_CLASS: &str = "jobcachefs.io/storage-class";
}

/// kubelet's pod-info keys (CSIDriver `podInfoOnMount: true`) and its ephemeral marker.
mod kubelet {
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
}

/// The Node service over one engine.
#[derive(Debug)]
pub struct Plugin {
    engine: Engine,
    node_id: String,
}

impl Plugin {
    /// The service for node `node_id`.
    pub fn new(engine: Engine, node_id: String) -> Self {
        Plugin { engine, node_id }
    }

    /// The engine it runs.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The node it serves.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }
}

/// The Node service as gRPC serves it: the plugin shared with the blocking pool's calls.
#[derive(Debug, Clone)]
pub struct NodeService(pub Arc<Plugin>);

/// What one publish asks for, checked.
#[derive(Debug, Clone)]
struct Publish {
    volume_id: String,
    target: PathBuf,
    pod: PodFacts,
    inline: bool,
    decision: Decision,
    context: BTreeMap<String, String>,
}

fn required<'a>(value: &'a str, field: &str, fix: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is missing: {fix}")));
    }
    Ok(value)
}

fn target_path(value: &str, field: &str) -> Result<PathBuf, Status> {
    required(
        value,
        field,
        "give the absolute path kubelet mounts the volume at",
    )?;
    let p = PathBuf::from(value);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(invalid(format!(
            "{field} {value:?} is not a plain absolute path: give the absolute path kubelet mounts the volume at"
        )));
    }
    Ok(p)
}

/// Checks a volume capability: a mounted filesystem (any fs_type the volume really is: ext4 or
/// empty) on one node.
pub(crate) fn check_capability(cap: Option<&csi::VolumeCapability>) -> Result<(), Status> {
    use csi::volume_capability::access_mode::Mode;
    let cap = cap.ok_or_else(|| {
        invalid("volume_capability is missing: ask for a mount volume (volumeMode: Filesystem)")
    })?;
    match &cap.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && m.fs_type != "ext4" {
                return Err(invalid(format!(
                    "volume_capability.mount.fs_type {:?} is not offered: jobcachefs volumes are overlayfs over ext4 or ext4 clones; leave fsType empty (or ext4)",
                    m.fs_type
                )));
            }
        }
        Some(csi::volume_capability::AccessType::Block(_)) => {
            return Err(invalid(
                "volume_capability asks for a block volume: jobcachefs provides Filesystem volumes only (volumeMode: Filesystem)",
            ))
        }
        None => {
            return Err(invalid(
                "volume_capability has no access_type: ask for a mount volume (volumeMode: Filesystem)",
            ))
        }
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            Ok(())
        }
        other => Err(invalid(format!(
            "volume_capability.access_mode {} is not offered: a jobcachefs volume lives on one node; use ReadWriteOnce or ReadWriteOncePod",
            other.as_str_name()
        ))),
    }
}

fn pod_facts(ctx: &BTreeMap<String, String>) -> Result<PodFacts, Status> {
    let get = |k: &str| ctx.get(k).cloned().unwrap_or_default();
    let pod = PodFacts {
        namespace: get(kubelet::POD_NAMESPACE),
        name: get(kubelet::POD_NAME),
        uid: get(kubelet::POD_UID),
        service_account: get(kubelet::SERVICE_ACCOUNT),
    };
    if pod.namespace.is_empty() || pod.name.is_empty() {
        return Err(invalid(format!(
            "volume_context lacks {} and {}: the CSIDriver {} must have podInfoOnMount: true (deploy/csi does), so that kubelet tells whose volume it is",
            kubelet::POD_NAMESPACE,
            kubelet::POD_NAME,
            super::DRIVER_NAME
        )));
    }
    Ok(pod)
}

impl Plugin {
    fn check_publish(&self, r: &csi::NodePublishVolumeRequest) -> Result<Publish, Status> {
        let volume_id = required(
            &r.volume_id,
            "volume_id",
            "kubelet passes the PV's volumeHandle or the inline volume's id",
        )?
        .to_string();
        let target = target_path(&r.target_path, "target_path")?;
        // A capability the volume cannot have: the spec's FAILED_PRECONDITION for publish.
        check_capability(r.volume_capability.as_ref()).map_err(|s| {
            if r.volume_capability.is_none() {
                s
            } else {
                Status::failed_precondition(s.message())
            }
        })?;
        if r.readonly {
            return Err(Status::failed_precondition(
                "readonly is true: a jobcachefs volume is the job's writable view of its cache (changes stay out of the cache unless it writes back); drop readOnly from the pod's volume (writeBack unset, or the jobcache-csi class, keeps the cache unchanged)",
            ));
        }
        let context: BTreeMap<String, String> = r
            .volume_context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let pod = pod_facts(&context)?;
        // kubelet sets the marker itself (over whatever the pod's author wrote) once
        // podInfoOnMount is on, which pod_facts just checked.
        let inline = context.get(kubelet::EPHEMERAL).map(String::as_str) == Some("true");
        let decision = if inline {
            policy::decide_inline(&context, &pod, &self.engine.config().csi)
        } else {
            policy::decide_from_context(&volume_id, &context, &pod.namespace)
        }
        .map_err(|e| status(&e))?;
        Ok(Publish {
            volume_id,
            target,
            pod,
            inline,
            decision,
            context,
        })
    }

    fn labels(&self, p: &Publish) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            if !v.is_empty() {
                l.insert(k.to_string(), v.to_string());
            }
        };
        put(labels::FRONT_END, "csi");
        put(labels::VOLUME_ID, &p.volume_id);
        put(
            labels::LIFECYCLE,
            if p.inline { "inline" } else { "persistent" },
        );
        put(labels::POD_NAMESPACE, &p.pod.namespace);
        put(labels::POD, &p.pod.name);
        put(labels::POD_UID, &p.pod.uid);
        put(labels::SERVICE_ACCOUNT, &p.pod.service_account);
        put(labels::NODE, &self.node_id);
        if !p.inline {
            let ctx = |k: &str| p.context.get(k).cloned().unwrap_or_default();
            put(labels::PVC_NAMESPACE, &ctx(policy::CTX_NAMESPACE));
            put(labels::PVC, &ctx(policy::CTX_PVC));
            put(labels::PV, &ctx(policy::CTX_PV));
            put(labels::STORAGE_CLASS, &ctx(policy::CTX_STORAGE_CLASS));
        }
        for n in &p.decision.notes {
            put(labels::WRITE_BACK_REFUSED, n);
        }
        l
    }

    /// The publish, on the blocking pool.
    fn publish(&self, p: &Publish) -> Result<(), Status> {
        let engine = &self.engine;
        if let Ok(Some(existing)) = engine.volume_record_at(&p.target) {
            let theirs = existing.labels.get(labels::VOLUME_ID);
            if theirs.map(String::as_str) != Some(p.volume_id.as_str()) {
                return Err(Status::already_exists(format!(
                    "target_path {} already holds volume {}: unpublish it first",
                    p.target.display(),
                    theirs
                        .map(|s| format!("{s:?}"))
                        .unwrap_or_else(|| "(not a CSI volume)".into())
                )));
            }
        }
        for n in &p.decision.notes {
            tracing::warn!(volume = %p.volume_id, pod = %format!("{}/{}", p.pod.namespace, p.pod.name), "{n}");
        }
        let deadline =
            Instant::now() + std::time::Duration::from_secs(engine.config().csi.publish_deadline);
        let created = crate::k8s::volumes::create(
            engine,
            &p.decision,
            p.target.clone(),
            None,
            self.labels(p),
            deadline,
            || crate::k8s::volumes::client(engine.config()),
        );
        match created {
            Ok(_) => Ok(()),
            // The same target holds this volume with another decision (a retry after the node's
            // config or the attributes changed): the spec's incompatible re-publish.
            Err(e)
                if e.kind() == crate::ErrorKind::Conflict
                    && engine.volume_record_at(&p.target).is_ok_and(|v| {
                        v.is_some_and(|v| v.state == crate::state::records::VolumeState::Ready)
                    }) =>
            {
                Err(Status::already_exists(e.to_string()))
            }
            Err(e) => Err(status(&e)),
        }
    }

    /// The unpublish, on the blocking pool.
    fn unpublish(&self, volume_id: &str, target: &Path) -> Result<DeleteOutcome, Status> {
        let engine = &self.engine;
        let mut refused = None;
        if let Ok(Some(existing)) = engine.volume_record_at(target) {
            let theirs = existing.labels.get(labels::VOLUME_ID);
            if theirs.is_some_and(|t| t != volume_id) {
                return Err(Status::not_found(format!(
                    "target_path {} holds volume {:?}, not {volume_id:?}: nothing unpublished",
                    target.display(),
                    theirs.cloned().unwrap_or_default()
                )));
            }
            refused = existing.labels.get(labels::WRITE_BACK_REFUSED).cloned();
        }
        let outcome = engine
            .volume_delete(target, false)
            .map_err(|e| status(&e))?;
        if let (Some(why), DeleteOutcome::Discarded) = (&refused, &outcome) {
            tracing::warn!(volume = %volume_id, "changes discarded: {why}");
        }
        remove_target(target)?;
        crate::k8s::volumes::repair_after_delete(engine, "unpublish");
        Ok(outcome)
    }
}

/// Removes the target directory (the spec: the plugin deletes what it created at the path),
/// unless something is still mounted there or it is not empty.
fn remove_target(target: &Path) -> Result<(), Status> {
    if std::fs::symlink_metadata(target).is_err() {
        return Ok(());
    }
    let mounted = crate::host::mounts::mount_table()
        .map(|t| crate::host::mounts::is_mounted(&t, target))
        .map_err(|e| status(&e))?;
    if mounted {
        return Err(Status::failed_precondition(format!(
            "target_path {} is still a mount point of something else: find it with `findmnt {}` and unmount it",
            target.display(),
            target.display()
        )));
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            tracing::warn!(target = %target.display(), error = %e, "target_path left in place");
            Ok(())
        }
    }
}

fn describe(o: &DeleteOutcome) -> String {
    match o {
        DeleteOutcome::Committed {
            generation,
            scope: Some(scope),
            ..
        } => format!("committed into scope {scope} as its generation {generation}"),
        DeleteOutcome::Committed { generation, .. } => {
            format!("committed as generation {generation}")
        }
        DeleteOutcome::Declined { reason } => format!("discarded: {reason}"),
        DeleteOutcome::NotCommitted { reason } | DeleteOutcome::Rejected { reason } => {
            format!("not committed: {reason}")
        }
        other => format!("{other:?}").to_lowercase(),
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        tracing::info!(call = "NodePublishVolume", volume = %r.volume_id, target = %r.target_path, "CSI call");
        let me = self.0.clone();
        let result = blocking(move || {
            let p = me.check_publish(&r)?;
            me.publish(&p).map(|()| p)
        })
        .await;
        let layout = self.0.engine.layout();
        match result {
            Ok(p) => {
                stats::observe(
                    layout,
                    stats::histograms::CSI_PUBLISH,
                    started.elapsed(),
                    &[],
                );
                tracing::info!(call = "NodePublishVolume", volume = %p.volume_id, target = %p.target.display(),
                    pod = %format!("{}/{}", p.pod.namespace, p.pod.name),
                    cache = p.decision.cache.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                    write_back = p.decision.write_back, ms = started.elapsed().as_millis() as u64, "published");
                Ok(Response::new(csi::NodePublishVolumeResponse {}))
            }
            Err(s) => {
                stats::add(layout, &[(stats::names::CSI_PUBLISH_FAILURES, 1)]);
                tracing::warn!(call = "NodePublishVolume", code = ?s.code(), "refused: {}", s.message());
                Err(s)
            }
        }
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        tracing::info!(call = "NodeUnpublishVolume", volume = %r.volume_id, target = %r.target_path, "CSI call");
        let me = self.0.clone();
        let volume_id = r.volume_id.clone();
        let result = blocking(move || {
            required(
                &r.volume_id,
                "volume_id",
                "kubelet passes the id it published",
            )?;
            let target = target_path(&r.target_path, "target_path")?;
            me.unpublish(&r.volume_id, &target)
        })
        .await;
        let layout = self.0.engine.layout();
        match result {
            Ok(outcome) => {
                stats::observe(
                    layout,
                    stats::histograms::CSI_UNPUBLISH,
                    started.elapsed(),
                    &[],
                );
                tracing::info!(call = "NodeUnpublishVolume", volume = %volume_id,
                    ms = started.elapsed().as_millis() as u64, "unpublished: {}", describe(&outcome));
                Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
            }
            Err(s) => {
                stats::add(layout, &[(stats::names::CSI_UNPUBLISH_FAILURES, 1)]);
                tracing::warn!(call = "NodeUnpublishVolume", volume = %volume_id, code = ?s.code(), "failed: {}", s.message());
                Err(s)
            }
        }
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let me = self.0.clone();
        blocking(move || {
            required(&r.volume_id, "volume_id", "kubelet passes the id it published")?;
            let path = target_path(&r.volume_path, "volume_path")?;
            let info = me.engine.volume_show(&path).map_err(|_| {
                Status::not_found(format!(
                    "no volume is published at volume_path {}",
                    path.display()
                ))
            })?;
            if info.record.labels.get(labels::VOLUME_ID) != Some(&r.volume_id) {
                return Err(Status::not_found(format!(
                    "volume_path {} does not hold volume {:?}",
                    path.display(),
                    r.volume_id
                )));
            }
            let ready = info.record.state == crate::state::records::VolumeState::Ready;
            let condition = |abnormal: bool, message: String| csi::VolumeCondition { abnormal, message };
            if !ready || !info.mounted {
                return Ok(Response::new(csi::NodeGetVolumeStatsResponse {
                    usage: vec![],
                    volume_condition: Some(condition(
                        true,
                        format!(
                            "the volume is not mounted at {} (state {:?}): the node may have rebooted; restart the pod, or run `jobcachefs gc` on the node",
                            path.display(),
                            info.record.state
                        ),
                    )),
                }));
            }
            // statfs of the overlay reports its upper (the volume's own image), of a clone the
            // clone: what the job may still write.
            let st = nix::sys::statvfs::statvfs(&path)
                .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
            let f = st.fragment_size() as i64;
            let total = st.blocks() as i64 * f;
            let available = st.blocks_available() as i64 * f;
            let used = total - st.blocks_free() as i64 * f;
            let inodes = st.files() as i64;
            let inodes_free = st.files_available() as i64;
            use csi::volume_usage::Unit;
            Ok(Response::new(csi::NodeGetVolumeStatsResponse {
                usage: vec![
                    csi::VolumeUsage { available, total, used, unit: Unit::Bytes as i32 },
                    csi::VolumeUsage {
                        available: inodes_free,
                        total: inodes,
                        used: inodes - st.files_free() as i64,
                        unit: Unit::Inodes as i32,
                    },
                ],
                volume_condition: Some(condition(false, "mounted".into())),
            }))
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::rpc::Type;
        let cap = |t: Type| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        // No STAGE_UNSTAGE: every publish is its own volume, made when the pod starts.
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![cap(Type::GetVolumeStats), cap(Type::VolumeCondition)],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        tracing::info!(call = "NodeGetInfo", node = %self.0.node_id, "CSI call");
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: [(TOPOLOGY_NODE.to_string(), self.0.node_id.clone())]
                    .into_iter()
                    .collect(),
            }),
        }))
    }

    async fn node_stage_volume(
        &self,
        _request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "jobcachefs has no STAGE_UNSTAGE_VOLUME: kubelet publishes directly",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "jobcachefs has no STAGE_UNSTAGE_VOLUME: kubelet publishes directly",
        ))
    }

    async fn node_expand_volume(
        &self,
        _request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "jobcachefs volumes are not expanded: each pod gets a new volume of the size asked",
        ))
    }
}
