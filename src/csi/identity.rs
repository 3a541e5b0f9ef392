//! The CSI Identity service: who the plugin is and what it offers.

use super::DRIVER_NAME;
use bpfman_csi::v1 as csi;
use csi::plugin_capability::service::Type as ServiceType;
use tonic::{Request, Response, Status};

/// The Identity service.
#[derive(Debug)]
pub struct Identity {
    controller: bool,
}

impl Identity {
    /// `controller`: whether this process also serves the Controller service.
    pub fn new(controller: bool) -> Self {
        Identity { controller }
    }
}

fn service(t: ServiceType) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(
            csi::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        tracing::debug!(call = "GetPluginInfo", "CSI call");
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // Volumes live on one node: the topology tells the scheduler and the provisioner.
        let mut capabilities = vec![service(ServiceType::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(service(ServiceType::ControllerService));
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // The state dir was opened before the socket was served: a serving plugin is ready.
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
