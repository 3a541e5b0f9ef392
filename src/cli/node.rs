//! The node-wide commands: `gc`, `doctor`, `agent` and `node release`.

use super::exit;
use super::output::{self, json_or, print_json};
use anyhow::Result;
use jobcachefs::doctor::{self, Status};
use jobcachefs::input::quantity::parse_duration;
use jobcachefs::sync::agent::{self, AgentOptions};
use jobcachefs::Engine;
use std::path::Path;
use std::time::Duration;

#[derive(clap::Subcommand)]
pub(super) enum NodeCmd {
    /// Unmount what this node keeps mounted between volumes (the kept layer mounts, the reflink
    /// pool of clone-mode caches) and detach their loop devices, when no volume is live: before
    /// an upgrade or an uninstall. Refused (exit 5, nothing changed) while volumes are live,
    /// naming them. Nothing is lost: the next create mounts what it needs. Idempotent.
    Release,
}

pub(super) fn run(engine: &Engine, cmd: &NodeCmd, json: bool) -> Result<u8> {
    match cmd {
        NodeCmd::Release => {
            let report = engine.node_release()?;
            if json {
                print_json(&report);
            } else if report.is_empty() {
                println!("nothing to release: no layer mount, pool or loop device of this state dir is left");
            } else {
                for m in &report.unmounted {
                    println!("unmounted: {}", m.display());
                }
                for l in &report.loops_released {
                    println!("loop device released: {}", l.display());
                }
                println!(
                    "node released: {} mount(s), {} loop device(s)",
                    report.unmounted.len(),
                    report.loops_released.len()
                );
            }
            Ok(exit::OK)
        }
    }
}

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
