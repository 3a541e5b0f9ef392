//! jobcachefs: build-cache volumes for Kubernetes and CI runners.
//!
//! A cache is a stack of immutable sparse ext4 layer images; a volume is an overlay of that stack
//! under a per-volume, size-limited writable image; deleting a write-back volume makes its image
//! the cache's new top layer by a rename. See README.md for the picture and the on-disk layout.

#![warn(missing_docs)]

pub mod csi;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod fault;
pub mod files;
pub mod host;
pub mod input;
pub mod k8s;
pub mod run;
pub mod state;
pub mod sync;
pub mod webhook;

pub use engine::{Engine, ProgressHook};
pub use error::{Error, ErrorKind, Result};
