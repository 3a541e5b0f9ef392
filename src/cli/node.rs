//! The node-wide commands: `gc`, `doctor` and `agent`.

use super::exit;
use super::output::{self, json_or, print_json};
use anyhow::Result;
use jobcachefs::doctor::{self, Status};
use jobcachefs::input::quantity::parse_duration;
use jobcachefs::sync::agent::{self, AgentOptions};
use jobcachefs::Engine;
use std::path::Path;
use std::time::Duration;

/// `doctor`: fails (exit 1) when any finding is a failure.
pub(super) fn doctor(engine: &Engine, json: bool) -> u8 {
    let findings = doctor::run(engine);
    json_or(json, &findings, |f| output::print_doctor(f));
    if findings.iter().any(|f| f.status == Status::Fail) {
        exit::FAILURE
    } else {
        exit::OK
    }
}

/// `gc [--drain]`: fails (exit 1) when anything could not be repaired.
pub(super) fn gc(engine: &Engine, drain: bool, json: bool) -> Result<u8> {
    let report = engine.gc(drain)?;
    if json {
        print_json(&report);
    } else if report.is_empty() && report.errors.is_empty() {
        println!("nothing to repair or collect");
    } else {
        output::print_gc(&report);
    }
    Ok(if report.errors.is_empty() {
        exit::OK
    } else {
        exit::FAILURE
    })
}

/// `agent`: the flags override the config's `[agent]` settings.
pub(super) fn agent(
    engine: &Engine,
    state_dir: &Path,
    interval: Option<&str>,
    metrics_addr: Option<&str>,
    rounds: Option<u64>,
    node_name: Option<&str>,
) -> Result<u8> {
    let config = engine.config().clone();
    let interval = match interval {
        Some(i) => parse_duration("--interval", i)?,
        None => config.agent.interval,
    };
    let addr = metrics_addr.map_or_else(|| config.agent.metrics_addr.clone(), str::to_string);
    agent::run(
        state_dir.to_path_buf(),
        config,
        AgentOptions {
            interval: Duration::from_secs(interval),
            metrics_addr: (addr != "off").then_some(addr),
            rounds,
            node_name: node_name.filter(|n| !n.is_empty()).map(str::to_string),
        },
    )?;
    Ok(exit::OK)
}
