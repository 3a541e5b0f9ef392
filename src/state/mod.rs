//! The on-disk state under the state dir: where everything lives ([`layout`]), the records
//! ([`records`]), crash-safe file helpers ([`fsutil`]), flock locks ([`lock`]) and the node's
//! counters ([`stats`]).

pub mod fsutil;
pub mod layout;
pub mod lock;
pub mod records;
pub mod stats;
