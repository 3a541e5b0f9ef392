//! Kubernetes: jobcachefs as the setup/teardown hook of rancher/local-path-provisioner.
//!
//! - [`path`]: the PVC a volume path belongs to (pure).
//! - [`policy`]: what a volume gets from its PVC's annotations and its class's parameters (pure).
//! - [`kubeconfig`] and [`client`]: reading the PVC and StorageClass from the API.
//! - [`hook`]: the setup/teardown entry point on top of the engine.

pub mod client;
pub mod hook;
pub mod kubeconfig;
pub mod path;
pub mod policy;
