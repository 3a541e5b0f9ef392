//! Directory trees: the one sorted walk of a tree ([`walk`]), the data extents of sparse files
//! ([`sparse`]), the faithful copy that squash uses ([`copy`]) and comparable snapshots of a tree
//! ([`tree`]) that tests compare.

pub mod copy;
pub mod erofs;
pub mod fiemap;
pub mod manifest;
pub mod merge;
pub mod sparse;
pub mod tree;
pub mod walk;

/// Prefix of overlayfs's private xattrs (whiteouts, opaque dirs, origins). They describe one
/// overlay's upper layer and never travel with the files: copies, snapshots and layer tars drop
/// them.
pub(crate) const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";

/// Whether `name` is one of overlayfs's private xattrs.
pub(crate) fn is_overlay_xattr(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes()
        .starts_with(OVERLAY_XATTR_PREFIX.as_bytes())
}
