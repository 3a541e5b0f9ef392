//! Parsing and validation of what users and operators give: cache and namespace names
//! ([`names`]), Kubernetes quantities and durations ([`quantity`]), the provisioner hook's
//! arguments and environment ([`hook_args`]) and the node config ([`config`]). Pure: no I/O
//! beyond reading the config file.

pub mod config;
pub mod hook_args;
pub mod names;
pub mod quantity;
pub mod write_back;
