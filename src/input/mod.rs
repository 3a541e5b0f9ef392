//! Parsing and validation of what users and operators give: cache and namespace names
//! ([`names`]), Kubernetes quantities and durations ([`quantity`]) and the node config
//! ([`config`]). Pure: no I/O beyond reading the config file.

pub mod config;
pub mod names;
pub mod quantity;
