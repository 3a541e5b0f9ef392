//! Kubernetes, for both front ends: the policy that turns a PVC and its StorageClass (or an inline
//! CSI volume's attributes) into a volume, the API client, and placement. Both front ends are
//! built on them: the provisioner hook (`hook`, in this module) and the CSI plugin (`crate::csi`).
//!
//! - [`path`]: the PVC a volume path belongs to (pure).
//! - [`policy`]: what a volume gets from its PVC's annotations and its class's parameters (pure).
//! - [`kubeconfig`] and [`client`]: reading the PVC and StorageClass from the API.
//! - [`gids`]: the cluster-wide table of cache GIDs (a ConfigMap, optimistic concurrency).
//! - [`placement`]: the Node labels and annotation that say which caches a node holds.
//! - [`hook`]: the setup/teardown entry point on top of the engine.
//! - [`volumes`]: what the hook and the CSI plugin do around the engine's create and delete.

pub mod client;
pub mod gids;
pub mod hook;
pub mod kubeconfig;
pub mod path;
pub mod placement;
pub mod policy;
pub mod volumes;
