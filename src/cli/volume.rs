//! `volume create|delete|ls|show`: what plain Linux CI runners use directly.

use super::exit;
use super::output::{self, describe_delete, json_or, print_json};
use anyhow::Result;
use clap::{Args, Subcommand};
use jobcachefs::engine::{CreateRequest, DeleteOutcome};
use jobcachefs::input::names::{validate_label, CacheId, DEFAULT_NAMESPACE};
use jobcachefs::input::quantity::human_bytes;
use jobcachefs::input::write_back::WriteBack;
use jobcachefs::state::records::CacheMode;
use jobcachefs::Engine;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(super) enum VolumeCmd {
    /// Create a volume at DIR: the cache's layers below, a fresh writable image above.
    Create(CreateArgs),
    /// Delete the volume at DIR: commit it into its cache if created with --write-back.
    Delete {
        /// The volume's directory.
        dir: PathBuf,
        /// Throw the volume's changes away even if it was created with --write-back.
        #[arg(long)]
        discard: bool,
    },
    /// List live volumes.
    Ls,
    /// Show one volume.
    Show {
        /// The volume's directory.
        dir: PathBuf,
    },
}

#[derive(Args)]
pub(super) struct CreateArgs {
    /// Directory to mount the volume at (created if missing; must be empty).
    dir: PathBuf,
    /// Cache to read from (a DNS-1123 label). Without it the volume starts empty.
    #[arg(long)]
    cache: Option<String>,
    /// Namespace of the cache.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Size limit of the volume's writes (e.g. 2Gi); writes beyond it get ENOSPC.
    #[arg(long, allow_hyphen_values = true)]
    size: Option<String>,
    /// Commit the volume when it is deleted: true (what --write-back alone means), on-success
    /// (only if the job left .jobcachefs-success at the volume's root; the marker never reaches
    /// the cache) or false. A scoped volume commits into its scope, never into the cache.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "WHEN")]
    write_back: Option<String>,
    /// Read the cache with this scope's own layers on top (a pull request's or a branch's), and
    /// write back into the scope only (a DNS-1123 label; overlay caches).
    #[arg(long)]
    scope: Option<String>,
    /// Size limit of the cache, if this creates it (e.g. 20Gi).
    #[arg(long, allow_hyphen_values = true)]
    cache_size: Option<String>,
    /// Mode of the cache, if this creates it: overlay (layers shared by many jobs) or clone
    /// (a copy-on-write clone mounted directly: container storage, user-namespaced pods).
    #[arg(long)]
    cache_mode: Option<String>,
    /// Give the volume its own UID (unique among this node's live volumes) and its cache's GID
    /// (one per cache), and its root to them: the job switches to them (see README).
    #[arg(long)]
    unique_ids: bool,
}

pub(super) fn run(engine: &Engine, cmd: &VolumeCmd, json: bool) -> Result<u8> {
    match cmd {
        VolumeCmd::Create(a) => create(engine, a, json),
        VolumeCmd::Delete { dir, discard } => delete(engine, dir, *discard, json),
        VolumeCmd::Ls => {
            json_or(json, &engine.volume_list()?, |v| output::print_volumes(v));
            Ok(exit::OK)
        }
        VolumeCmd::Show { dir } => {
            json_or(json, &engine.volume_show(dir)?, |v| {
                output::print_volumes(std::slice::from_ref(v))
            });
            Ok(exit::OK)
        }
    }
}

/// Checks every argument of `volume create` (pure: before anything touches the disk).
fn request(a: &CreateArgs) -> jobcachefs::Result<CreateRequest> {
    let cache = match &a.cache {
        Some(name) => Some(CacheId::new(&a.namespace, name)?),
        None => {
            validate_label("namespace", &a.namespace)?;
            None
        }
    };
    let size = super::optional_size("--size", a.size.as_deref())?;
    let cache_size = super::optional_size("--cache-size", a.cache_size.as_deref())?;
    if cache_size.is_some() && cache.is_none() {
        return Err(jobcachefs::Error::invalid(
            "--cache-size needs --cache NAME",
        ));
    }
    let cache_mode = a
        .cache_mode
        .as_deref()
        .map(|m| CacheMode::parse("--cache-mode", m))
        .transpose()?;
    let policy = a
        .write_back
        .as_deref()
        .map(|w| WriteBack::parse("--write-back", w))
        .transpose()?
        .unwrap_or_default();
    if let Some(scope) = &a.scope {
        validate_label("--scope", scope)?;
        if cache.is_none() {
            return Err(jobcachefs::Error::invalid(format!(
                "--scope {scope} needs --cache NAME: a scope is a child of a cache"
            )));
        }
    }
    let (write_back, on_success) = policy.flags();
    Ok(CreateRequest {
        dir: a.dir.clone(),
        cache,
        size,
        write_back,
        on_success,
        scope: a.scope.clone(),
        cache_size,
        cache_mode,
        unique_ids: a.unique_ids,
        ..Default::default()
    })
}

fn create(engine: &Engine, a: &CreateArgs, json: bool) -> Result<u8> {
    let req = request(a)?;
    if let Some(id) = &req.cache {
        // No provisioner waits here: the registry's own timeout bounds the pull.
        jobcachefs::sync::ops::pull_if_cold(engine, id, None);
    }
    let record = engine.volume_create(&req)?;
    if json {
        print_json(&record);
    } else {
        if let Some(note) = &record.note {
            eprintln!("note: {note}");
        }
        if let Some(i) = &record.identity {
            println!(
                "identity: uid {} gid {} (owner of the volume's root)",
                i.uid, i.gid
            );
        }
        println!(
            "volume {} ready: cache {}{} generation {} ({} layers), size {}, write-back {}",
            record.dir.display(),
            record
                .cache
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "(none)".into()),
            record
                .scope
                .as_ref()
                .map(|s| format!(" scope {s}"))
                .unwrap_or_default(),
            record.generation,
            record.layers.len(),
            human_bytes(record.size),
            match (record.write_back, record.on_success, &record.scope) {
                (true, true, Some(s)) => format!("on-success (into scope {s})"),
                (true, false, Some(s)) => format!("true (into scope {s})"),
                (true, true, None) => "on-success".to_string(),
                (w, _, _) => w.to_string(),
            }
        );
    }
    Ok(exit::OK)
}

/// A delete whose commit was refused (over the cache-size) says so on stderr and exits 3.
fn delete(engine: &Engine, dir: &Path, discard: bool, json: bool) -> Result<u8> {
    let outcome = engine.volume_delete(dir, discard)?;
    if json {
        print_json(&outcome);
    } else {
        let text = format!("volume {}: {}", dir.display(), describe_delete(&outcome));
        match outcome {
            DeleteOutcome::Rejected { .. } => eprintln!("{text}"),
            _ => println!("{text}"),
        }
    }
    Ok(match outcome {
        DeleteOutcome::Rejected { .. } => exit::QUOTA,
        _ => exit::OK,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: CreateArgs,
    }

    fn check(args: &[&str]) -> jobcachefs::Result<CreateRequest> {
        request(&T::parse_from(std::iter::once("t").chain(args.iter().copied())).a)
    }

    #[test]
    fn create_arguments_are_checked_before_anything_else() {
        let r = check(&["/v", "--cache", "maven", "--size", "2Gi", "--write-back"]).unwrap();
        assert_eq!(r.cache, Some(CacheId::new("default", "maven").unwrap()));
        assert_eq!(r.size, Some(2 << 30));
        assert!(r.write_back && !r.on_success && r.scope.is_none());
        let r = check(&[
            "/v",
            "--cache",
            "m",
            "--write-back",
            "on-success",
            "--scope",
            "pr-7",
        ])
        .unwrap();
        assert!(r.write_back && r.on_success);
        assert_eq!(r.scope.as_deref(), Some("pr-7"));
        let r = check(&["/v", "--cache", "m", "--write-back=false"]).unwrap();
        assert!(!r.write_back);
        for (args, msg) in [
            (
                &["/v", "--cache", "m", "--write-back", "yes"][..],
                "--write-back is \"yes\": use \"true\", \"on-success\" or \"false\"",
            ),
            (&["/v", "--scope", "pr-1"][..], "--scope pr-1 needs --cache NAME: a scope is a child of a cache"),
            (
                &["/v", "--cache", "m", "--scope", "PR_1"][..],
                "--scope \"PR_1\" is invalid: use lower-case letters, digits and '-', starting and ending with a letter or digit (at most 63)",
            ),
            (&["/v", "--cache-size", "1Gi"][..], "--cache-size needs --cache NAME"),
            (
                &["/v", "--namespace", "Bad"][..],
                "namespace \"Bad\" is invalid: use lower-case letters, digits and '-', starting and ending with a letter or digit (at most 63)",
            ),
            (
                &["/v", "--size", "-1"][..],
                "--size \"-1\" is not a valid size: use a positive Kubernetes quantity such as 512Mi, 20Gi or 1G",
            ),
        ] {
            assert_eq!(check(args).unwrap_err().to_string(), msg);
        }
    }
}
