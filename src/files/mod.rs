//! Directory trees: the faithful copy that squash uses ([`copy`]) and comparable snapshots of a
//! tree ([`tree`]) that tests and checks compare.

pub mod copy;
pub mod tree;
