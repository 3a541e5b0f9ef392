//! `run --cache NAME --dir PATH [--write-back on-success|always|never] -- CMD…`: a volume for
//! the life of one command. The decisions are in `jobcachefs::run`; this file orders the steps
//! and says what happened (on stderr: stdout is CMD's).

use super::exit;
use super::output::describe_delete;
use anyhow::Result;
use clap::{Args, ValueEnum};
use jobcachefs::engine::{CreateRequest, DeleteOutcome, RunOwner, RUN_LABEL};
use jobcachefs::input::names::DEFAULT_NAMESPACE;
use jobcachefs::run::{self, process, WriteBack};
use jobcachefs::state::records::{CacheMode, VolumeRecord};
use jobcachefs::Engine;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Args)]
pub(super) struct RunArgs {
    /// Cache to mount (a DNS-1123 label) at --dir; or NAME:PATH, repeatable, for several caches.
    #[arg(long = "cache", required = true, value_name = "NAME[:PATH]")]
    caches: Vec<String>,
    /// Where the volume is mounted (absolute; created if missing, must be empty). CMD gets it as
    /// JOBCACHEFS_DIR.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
    /// Namespace of the caches.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Size limit of each volume's writes (e.g. 2Gi).
    #[arg(long, allow_hyphen_values = true)]
    size: Option<String>,
    /// Size limit of a cache this run creates (e.g. 20Gi).
    #[arg(long, allow_hyphen_values = true)]
    cache_size: Option<String>,
    /// Mode of a cache this run creates: overlay or clone.
    #[arg(long)]
    cache_mode: Option<String>,
    /// When to commit the volume into its cache: on-success (CMD exited 0; what --write-back
    /// alone means), always (any exit code), never (the default: read the cache only). A run
    /// told to stop, or a CMD killed by a signal, never commits.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "on-success", value_name = "WHEN")]
    write_back: Option<WriteBackArg>,
    /// Read the caches with this scope's own layers on top, and write back into the scope only
    /// (a pull request's or a branch's: see `volume create --scope`).
    #[arg(long)]
    scope: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

#[derive(Clone, Copy, ValueEnum)]
enum WriteBackArg {
    OnSuccess,
    Always,
    Never,
}

impl From<WriteBackArg> for WriteBack {
    fn from(w: WriteBackArg) -> Self {
        match w {
            WriteBackArg::OnSuccess => WriteBack::OnSuccess,
            WriteBackArg::Always => WriteBack::Always,
            WriteBackArg::Never => WriteBack::Never,
        }
    }
}

/// Every argument checked, before the state dir is touched.
fn requests(a: &RunArgs) -> jobcachefs::Result<(Vec<CreateRequest>, WriteBack)> {
    let policy: WriteBack = a.write_back.map(Into::into).unwrap_or_default();
    let caches = run::parse_caches(&a.namespace, &a.caches, a.dir.as_deref())?;
    let size = super::optional_size("--size", a.size.as_deref())?;
    let cache_size = super::optional_size("--cache-size", a.cache_size.as_deref())?;
    let cache_mode = a
        .cache_mode
        .as_deref()
        .map(|m| CacheMode::parse("--cache-mode", m))
        .transpose()?;
    if let Some(scope) = &a.scope {
        jobcachefs::input::names::validate_label("--scope", scope)?;
    }
    let reqs = caches
        .into_iter()
        .map(|c| CreateRequest {
            dir: c.dir,
            cache: Some(c.cache),
            scope: a.scope.clone(),
            size,
            write_back: policy != WriteBack::Never,
            cache_size,
            cache_mode,
            labels: [(RUN_LABEL.to_string(), "true".to_string())].into(),
            ..Default::default()
        })
        .collect();
    Ok((reqs, policy))
}

/// Discards the volumes made so far (a failed setup, a stop before CMD started).
fn discard_all(engine: &Engine, made: &[VolumeRecord]) {
    for r in made {
        if let Err(e) = engine.volume_delete(&r.dir, true) {
            eprintln!(
                "jobcachefs run: volume {} not deleted ({e:#}): the next run of this DIR or `jobcachefs gc` removes it",
                r.dir.display()
            );
        }
    }
}

pub(super) fn run(engine: &Engine, a: &RunArgs) -> Result<u8> {
    // First: a stop signal from now on waits to be taken, and none is lost while volumes are
    // being made.
    let signals = process::Signals::block()?;
    let (reqs, policy) = requests(a)?;
    let program = match run::find_command(&a.cmd[0], std::env::var_os("PATH").as_deref()) {
        Ok(p) => p,
        Err(problem) => {
            eprintln!("error: {}", problem.message);
            return Ok(problem.code);
        }
    };
    // Claims (repairing what a killed run left at a DIR) and checks, for every volume before
    // the first is made.
    let mut claims = Vec::new();
    for r in &reqs {
        claims.push(engine.run_claim(&r.dir)?);
    }
    for r in &reqs {
        engine.volume_check(r)?;
    }
    let mut made: Vec<VolumeRecord> = Vec::new();
    for r in &reqs {
        if let Some(id) = &r.cache {
            jobcachefs::sync::ops::pull_if_cold(engine, id, None);
        }
        match engine.volume_create(r) {
            Ok(record) => {
                if let Some(note) = &record.note {
                    eprintln!("note: {note}");
                }
                made.push(record)
            }
            Err(e) => {
                discard_all(engine, &made);
                return Err(e.into());
            }
        }
    }
    if let Some(sig) = signals.take_pending_stop() {
        eprintln!("jobcachefs run: {sig} before CMD started: not started, volumes discarded");
        discard_all(engine, &made);
        return Ok(128 + sig as u8);
    }
    let mut env: Vec<(String, OsString)> = vec![(
        "JOBCACHEFS_DIR".into(),
        made[0].dir.clone().into_os_string(),
    )];
    if made.len() > 1 {
        for r in &made {
            let id = r.cache.as_ref().expect("run volumes have a cache");
            env.push((run::dir_env_name(id), r.dir.clone().into_os_string()));
        }
    }
    let finished = process::run(&signals, &program, &a.cmd[0], &a.cmd[1..], &env, |pgid| {
        let owner = RunOwner {
            pid: std::process::id(),
            pgid,
            start: jobcachefs::engine::process_start(pgid).unwrap_or(0),
        };
        for c in &mut claims {
            if let Err(e) = c.record_owner(&owner) {
                tracing::warn!(error = %e, "run owner not recorded: a repair after a SIGKILL cannot stop the job's leftovers");
            }
        }
    });
    let finished = match finished {
        Ok(f) => f,
        Err(e) => {
            // Found before but gone or refused now (a race with the runner's own cleanup).
            eprintln!("error: cannot start {}: {e}", program.display());
            discard_all(engine, &made);
            return Ok(if e.kind() == std::io::ErrorKind::NotFound {
                run::EXIT_NOT_FOUND
            } else {
                run::EXIT_NOT_EXECUTABLE
            });
        }
    };
    let stopped = finished.stopped_by.is_some() || signals.take_pending_stop().is_some();
    let commit = run::should_commit(policy, finished.ended, stopped);
    let cmd_code = finished.ended.exit_code();
    // jobcachefs' own failure after CMD: its exit code when CMD succeeded (a CI job must see
    // that its cache was not written back), CMD's otherwise (the build's failure comes first).
    let mut own_code = None;
    for r in &made {
        match engine.volume_delete(&r.dir, !commit) {
            Ok(outcome) => {
                eprintln!(
                    "jobcachefs run: volume {}: {}",
                    r.dir.display(),
                    describe_delete(&outcome)
                );
                if let DeleteOutcome::Rejected { .. } = outcome {
                    own_code.get_or_insert(exit::QUOTA);
                }
            }
            Err(e) => {
                let e = anyhow::Error::from(e);
                eprintln!(
                    "error: volume {} not deleted: {e:#} (the next run of this DIR or `jobcachefs gc` finishes it)",
                    r.dir.display()
                );
                own_code.get_or_insert(super::exit_code(&e));
            }
        }
    }
    drop(claims);
    Ok(match own_code {
        Some(code) if cmd_code == 0 => code,
        _ => cmd_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn write_back_defaults_to_never_and_alone_means_on_success() {
        let a = parse(&["--cache", "m", "--dir", "/x", "--", "true"]).unwrap();
        assert_eq!(requests(&a).unwrap().1, WriteBack::Never);
        assert!(!requests(&a).unwrap().0[0].write_back);
        let a = parse(&["--cache", "m", "--dir", "/x", "--write-back", "--", "true"]).unwrap();
        assert_eq!(requests(&a).unwrap().1, WriteBack::OnSuccess);
        assert!(requests(&a).unwrap().0[0].write_back);
        let a = parse(&[
            "--cache",
            "m",
            "--dir",
            "/x",
            "--write-back",
            "always",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(requests(&a).unwrap().1, WriteBack::Always);
    }

    #[test]
    fn cmd_is_required_after_the_double_dash() {
        assert!(parse(&["--cache", "m", "--dir", "/x"]).is_err());
        assert!(parse(&["--cache", "m", "--dir", "/x", "--"]).is_err());
        assert!(parse(&["--cache", "m", "--dir", "/x", "make"]).is_err());
        let a = parse(&["--cache", "m", "--dir", "/x", "--", "make", "--jobs", "4"]).unwrap();
        assert_eq!(a.cmd, ["make", "--jobs", "4"]);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let a = parse(&[
            "--cache", "m", "--dir", "/x", "--size", "lots", "--", "true",
        ])
        .unwrap();
        assert!(requests(&a).unwrap_err().to_string().contains("--size"));
    }
}
