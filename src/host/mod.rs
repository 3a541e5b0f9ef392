//! The privileged shell: everything that touches the kernel or runs an external tool — loop
//! devices, mounts and the mount table, ext4 images and the tools that make and check them.
//! The engine reaches the host only through here.

pub mod cmd;
pub mod image;
pub mod loopback;
pub mod mounts;
