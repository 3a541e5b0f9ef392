//! The CSI Controller service (`--controller`, beside the csi-provisioner sidecar): CreateVolume
//! checks a PVC of a `csi.jobcachefs.io` StorageClass the way the hook checks one (the same
//! [`crate::k8s::policy::decide`], reading the PVC's annotations with the same API client) and
//! returns a volume whose context carries the decision and whose topology is the node the
//! scheduler picked (WaitForFirstConsumer). The controller keeps no state: the volume is made
//! on the node at each pod's publish, so DeleteVolume has nothing to remove.
//!
//! GetCapacity answers for this node only: what disk admission would still admit here (the
//! state dir's free space less the reserve, times the overcommit factor, less what live
//! volumes may still write), capped by the class's `max-volume-size`. The csi-provisioner
//! beside each node's plugin (`--node-deployment --enable-capacity`) publishes it as the node's
//! CSIStorageCapacity, so that the scheduler does not pick a node that would refuse the volume.

use super::node::check_capability;
use super::node::Plugin;
use super::status::{invalid, status};
use super::{blocking, TOPOLOGY_NODE};
use crate::error::{Error, ErrorKind};
use crate::input::config::Config;
use crate::k8s::client::Client;
use crate::k8s::policy::{self, ClaimFacts, ClassFacts};
use bpfman_csi::v1 as csi;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The Controller service.
#[derive(Clone)]
pub struct Controller {
    config: Config,
    plugin: Arc<Plugin>,
}

impl Controller {
    /// The service of the node `plugin` serves (its engine answers GetCapacity; CreateVolume
    /// uses the node configuration's API timeout).
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Controller {
            config: plugin.engine().config().clone(),
            plugin,
        }
    }

    fn capacity(&self, r: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse, Status> {
        for cap in &r.volume_capabilities {
            check_capability(Some(cap))?;
        }
        let me = self.plugin.node_id();
        if let Some(node) = r
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(TOPOLOGY_NODE))
        {
            if node != me {
                return Err(Status::failed_precondition(format!(
                    "GetCapacity for node {node:?} asked of the plugin on node {me:?}: a node's disk is known only on that node; run the csi-provisioner with --node-deployment beside each node's plugin (deploy/csi/node.yaml)"
                )));
            }
        }
        // The class's parameters alone (no PVC here); CreateVolume checks the others.
        let max_volume = r
            .parameters
            .get(policy::PARAM_MAX_VOLUME_SIZE)
            .map(|v| crate::input::quantity::parse_size(policy::PARAM_MAX_VOLUME_SIZE, v))
            .transpose()
            .map_err(|e| status(&e))?;
        let budget = self.plugin.engine().disk_budget().map_err(|e| status(&e))?;
        let available = budget.promisable().saturating_sub(budget.promised);
        let maximum = max_volume.map_or(available, |m| m.min(available));
        Ok(csi::GetCapacityResponse {
            available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
            maximum_volume_size: Some(i64::try_from(maximum).unwrap_or(i64::MAX)),
            minimum_volume_size: None,
        })
    }

    fn client(&self) -> Result<Client, Status> {
        crate::k8s::volumes::client(&self.config).map_err(|e| status(&e))
    }

    fn create(&self, r: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        if r.name.is_empty() {
            return Err(invalid(
                "name is missing: the external-provisioner passes the PV's name",
            ));
        }
        if r.volume_capabilities.is_empty() {
            return Err(invalid(
                "volume_capabilities is empty: ask for a mount volume (volumeMode: Filesystem, ReadWriteOnce)",
            ));
        }
        for cap in &r.volume_capabilities {
            check_capability(Some(cap))?;
        }
        if r.volume_content_source.is_some() {
            return Err(invalid(
                "volume_content_source is set: jobcachefs volumes start from their cache, not from a snapshot or another PVC; drop spec.dataSource",
            ));
        }
        let params: BTreeMap<String, String> = r.parameters.clone().into_iter().collect();
        let split = policy::split_create_parameters(&params).map_err(|e| status(&e))?;
        let node = r
            .accessibility_requirements
            .as_ref()
            .and_then(|t| t.preferred.first().or(t.requisite.first()))
            .and_then(|t| t.segments.get(TOPOLOGY_NODE))
            .cloned()
            .ok_or_else(|| {
                invalid(format!(
                    "accessibility_requirements name no {TOPOLOGY_NODE}: give the StorageClass volumeBindingMode: WaitForFirstConsumer, so the volume follows the pod to its node"
                ))
            })?;
        let client = self.client()?;
        let pvc = client
            .pvc(&split.pvc_namespace, &split.pvc_name)
            .map_err(|e| status(&e))?;
        let class = pvc.spec.storage_class_name.clone().unwrap_or_default();
        let required = r
            .capacity_range
            .as_ref()
            .map(|c| c.required_bytes.max(0) as u64)
            .unwrap_or(0);
        let claim = ClaimFacts {
            namespace: split.pvc_namespace.clone(),
            name: split.pvc_name.clone(),
            annotations: pvc.metadata.annotations.clone(),
        };
        let decision = policy::decide(
            required,
            &claim,
            &ClassFacts {
                name: class.clone(),
                parameters: split.class,
            },
        )
        .map_err(|e| status(&e))?;
        if let Some(limit) = r
            .capacity_range
            .as_ref()
            .map(|c| c.limit_bytes)
            .filter(|l| *l > 0)
        {
            if decision.size > limit as u64 {
                return Err(status(&Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "capacity_range asks for {} bytes at least and {limit} at most: fix the PVC's requests and limits",
                        decision.size
                    ),
                )));
            }
        }
        for n in &decision.notes {
            tracing::info!(volume = %r.name, "{n}");
        }
        let pv = split.pv_name.unwrap_or_else(|| r.name.clone());
        let context = policy::volume_context(&decision, &claim, &class, &pv);
        tracing::info!(call = "CreateVolume", volume = %r.name, pvc = %format!("{}/{}", claim.namespace, claim.name),
            node = %node, cache = decision.cache.as_ref().map(|c| c.to_string()).unwrap_or_default(),
            write_back = decision.write_back, size = decision.size, "volume provisioned");
        Ok(csi::Volume {
            capacity_bytes: decision.size as i64,
            volume_id: r.name,
            volume_context: context.into_iter().collect(),
            content_source: None,
            accessible_topology: vec![csi::Topology {
                segments: [(TOPOLOGY_NODE.to_string(), node)].into_iter().collect(),
            }],
        })
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        tracing::info!(call = "CreateVolume", volume = %r.name, "CSI call");
        let me = self.clone();
        let volume = blocking(move || me.create(r)).await.inspect_err(
            |s| tracing::warn!(call = "CreateVolume", code = ?s.code(), "refused: {}", s.message()),
        )?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is missing: give the PV's volumeHandle"));
        }
        // Nothing is kept per PV: every pod's volume was deleted (and committed) at its
        // unpublish. The cache itself outlives its PVCs.
        tracing::info!(call = "DeleteVolume", volume = %r.volume_id, "CSI call: nothing to remove");
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(invalid("volume_id is missing: give the PV's volumeHandle"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(invalid(
                "volume_capabilities is empty: give the capabilities to check",
            ));
        }
        let bad = r
            .volume_capabilities
            .iter()
            .find_map(|c| check_capability(Some(c)).err());
        Ok(Response::new(match bad {
            Some(s) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: s.message().to_string(),
            },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::rpc::Type;
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: [Type::CreateDeleteVolume, Type::GetCapacity]
                .into_iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(
                        csi::controller_service_capability::Rpc { r#type: t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(unimplemented("ControllerPublishVolume"))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(unimplemented("ControllerUnpublishVolume"))
    }

    async fn list_volumes(
        &self,
        _request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        Err(unimplemented("ListVolumes"))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        let me = self.clone();
        let answer = blocking(move || me.capacity(r)).await.inspect_err(
            |s| tracing::warn!(call = "GetCapacity", code = ?s.code(), "refused: {}", s.message()),
        )?;
        tracing::debug!(
            call = "GetCapacity",
            available = answer.available_capacity,
            "CSI call"
        );
        Ok(Response::new(answer))
    }

    async fn create_snapshot(
        &self,
        _request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(unimplemented("CreateSnapshot"))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(unimplemented("DeleteSnapshot"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(unimplemented("ListSnapshots"))
    }

    async fn controller_expand_volume(
        &self,
        _request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        Err(unimplemented("ControllerExpandVolume"))
    }

    async fn controller_get_volume(
        &self,
        _request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(unimplemented("ControllerGetVolume"))
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(unimplemented("ControllerModifyVolume"))
    }
}

fn unimplemented(call: &str) -> Status {
    Status::unimplemented(format!(
        "{call} is not offered by jobcachefs (see ControllerGetCapabilities)"
    ))
}
