//! `hook`: local-path-provisioner's setup/teardown. The arguments and the `VOL_*` environment
//! are checked by the library ([`jobcachefs::input::hook_args`]), the same code the hook's own
//! tests run; this file only gathers them and prints the outcome.

use super::exit;
use super::output::{describe_delete, print_json};
use anyhow::Result;
use clap::Args;
use jobcachefs::input::hook_args::{env_from, resolve, Accounts, RawInputs};
use jobcachefs::input::quantity::human_bytes;
use jobcachefs::k8s::hook::{self, HookOutcome};
use jobcachefs::Engine;

#[derive(Args)]
pub(super) struct HookArgs {
    /// The volume's folder (env VOL_DIR).
    #[arg(short = 'p')]
    path: Option<String>,
    /// Requested size in bytes (env VOL_SIZE_BYTES).
    #[arg(short = 's', allow_hyphen_values = true)]
    size: Option<String>,
    /// Volume mode: Filesystem (Block is refused) (env VOL_MODE).
    #[arg(short = 'm')]
    mode: Option<String>,
    /// create (setup) or delete (teardown). deploy/'s scripts pass it and so does the
    /// provisioner: it may be given twice if both agree.
    #[arg(short = 'a', action = clap::ArgAction::Append)]
    action: Vec<String>,
}

pub(super) fn run(engine: &Engine, args: &HookArgs, json: bool) -> Result<u8> {
    let req = resolve(
        &RawInputs {
            path: args.path.clone(),
            size: args.size.clone(),
            mode: args.mode.clone(),
            actions: args.action.clone(),
            env: env_from(|k| std::env::var(k).ok()),
        },
        &Accounts::from_system(),
    )?;
    let outcome = hook::run(engine, &req, || {
        jobcachefs::k8s::volumes::client(engine.config())
    })?;
    if json {
        print_json(&outcome);
        return Ok(exit::OK);
    }
    match outcome {
        HookOutcome::Created {
            volume,
            repeated,
            notes,
        } => {
            let cache = match &volume.cache {
                Some(c) => format!(
                    "cache {c} generation {}{}",
                    volume.generation,
                    match (volume.write_back, volume.on_success, &volume.scope) {
                        (true, false, None) => ", write-back".to_string(),
                        (true, true, None) => ", write-back on success".to_string(),
                        (true, on_success, Some(s)) => format!(
                            ", scope {s}, write-back into the scope{}",
                            if on_success { " on success" } else { "" }
                        ),
                        (false, _, Some(s)) => {
                            format!(", scope {s}, read-only for the cache and the scope")
                        }
                        (false, _, None) => ", read-only for the cache".to_string(),
                    }
                ),
                None => "no cache (plain volume)".to_string(),
            };
            println!(
                "{} volume {}: {cache}, size {}",
                if repeated {
                    "already set up:"
                } else {
                    "created"
                },
                volume.dir.display(),
                human_bytes(volume.size)
            );
            for n in notes {
                println!("note: {n}");
            }
        }
        HookOutcome::Deleted { path, result } => {
            println!(
                "deleted volume {}: {}",
                path.display(),
                describe_delete(&result)
            );
        }
    }
    Ok(exit::OK)
}
