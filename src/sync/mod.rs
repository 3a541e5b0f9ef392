//! Registry sync: a cache's layers as an OCI image in a registry, so that nodes share caches.
//!
//! - [`tarlayer`]: an overlay upper tree ⇄ an OCI layer tar (whiteouts, xattrs, hardlinks).
pub mod line;
pub mod oci;
pub mod ops;
pub mod tarlayer;
pub mod transport;
