//! Registry sync: a cache's layers as an OCI image in a registry, so that nodes share caches.
//!
//! - [`tarlayer`]: an overlay upper tree ⇄ an OCI layer tar (whiteouts, xattrs, hardlinks).
//! - [`line`]: the registry's layer line and a node's generation, merged (pure).
//! - [`oci`]: the node's OCI layout (blob store) and OCI JSON.
//! - [`transport`]: the registry, through skopeo.
//! - [`ops`]: `cache export` and `cache import`.
//! - [`agent`]: the node agent and its `/metrics`.

pub mod agent;
pub mod line;
pub mod oci;
pub mod ops;
pub(crate) mod registry;
pub mod tarlayer;
pub mod transport;
