//! The engine's side of `jobcachefs run` (a volume for the life of one command): who owns a
//! run's volume, and the repair of a run that was killed (SIGKILL, OOM, a node agent stopping
//! the runner) before it could delete its volume.
//!
//! A run holds `locks/runs/<volume-id>.lock` (flock) from before its volume is made until after
//! it is deleted, and labels the volume [`RUN_LABEL`]. The lock file holds the job's process
//! group ([`RunOwner`]). The kernel drops the flock when the run dies, so a volume with the label
//! whose lock is free belongs to a dead run: the next run of the same DIR, and `gc`, kill what is
//! left of the job's process group and discard the volume (a killed job's changes may be
//! half-written; they are never committed). Lock order: run → volume → squash → cache.

use super::volume::{resolve_dir, DeleteOutcome};
use super::Engine;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::state::fsutil::{ensure_dir, read_json};
use crate::state::layout::volume_id;
use crate::state::records::VolumeRecord;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The label on a volume made by `jobcachefs run`: its run lock tells whether the run lives.
pub const RUN_LABEL: &str = "jobcachefs.io/run";

/// Who runs the job of a run's volume: written into the run lock once CMD has started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOwner {
    /// The `jobcachefs run` process.
    pub pid: u32,
    /// CMD's process group (CMD is its leader).
    pub pgid: i32,
    /// CMD's start time (clock ticks since boot, /proc/PID/stat field 22): tells CMD from a
    /// later process that got the same pid.
    pub start: u64,
}

/// A held run lock on one DIR. Dropping it removes the lock file and releases the lock.
#[derive(Debug)]
pub struct RunClaim {
    file: Flock<File>,
    path: PathBuf,
    dir: PathBuf,
}

impl RunClaim {
    /// The canonical DIR claimed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records the job's process group, so that a repair after this run is killed can stop
    /// what is left of the job before it discards the volume.
    pub fn record_owner(&mut self, owner: &RunOwner) -> Result<()> {
        let text = serde_json::to_vec(owner).expect("serialisable");
        let f: &mut File = &mut self.file;
        f.set_len(0)
            .and_then(|_| f.rewind())
            .and_then(|_| f.write_all(&text))
            .at("write", &self.path)
    }

    fn owner(&self) -> Option<RunOwner> {
        read_owner(&self.path)
    }
}

impl Drop for RunClaim {
    fn drop(&mut self) {
        // Removed while held: whoever opened the old file meanwhile finds, once it has the lock,
        // that the path no longer names it and opens the new one (see `take`).
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_owner(path: &Path) -> Option<RunOwner> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Takes the run lock at `path` if it is free.
fn take(path: &Path, dir: &Path) -> Result<Option<RunClaim>> {
    if let Some(parent) = path.parent() {
        ensure_dir(parent)?;
    }
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .at("open lock", path)?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(e).at("lock", path),
        };
        let held = file.metadata().at("stat", path)?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                return Ok(Some(RunClaim {
                    file,
                    path: path.to_path_buf(),
                    dir: dir.to_path_buf(),
                }))
            }
            // Its last holder removed it between our open and our lock: try the new one.
            _ => continue,
        }
    }
}

/// The start time of process `pid` (field 22 of /proc/PID/stat), if it exists.
pub fn process_start(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills what is left of a dead run's job (its process group), if it is still the job's.
/// A process group keeps its id allocated while any member lives, so a group without a leader
/// is still the job's; a leader whose start time differs is a later process with a reused pid.
fn kill_leftovers(owner: &RunOwner) {
    use nix::sys::signal::{kill, Signal};
    if owner.pgid <= 1 {
        return;
    }
    let group = nix::unistd::Pid::from_raw(-owner.pgid);
    if kill(group, None).is_err() {
        return; // nothing left
    }
    if process_start(owner.pgid).is_some_and(|s| s != owner.start) {
        return;
    }
    tracing::warn!(
        pgid = owner.pgid,
        "killing what is left of a killed run's job"
    );
    let _ = kill(group, Signal::SIGKILL);
    for _ in 0..40 {
        if kill(group, None).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

impl Engine {
    /// Claims `dir` for a run: takes its run lock and repairs what a killed run left there (its
    /// job's processes are killed, its volume discarded). Refused with a conflict when another
    /// run holds `dir`, or when `dir` is a volume that no run made. Nothing else is made.
    pub fn run_claim(&self, dir: &Path) -> Result<RunClaim> {
        let dir = resolve_dir(dir)?;
        let vol = volume_id(&dir);
        let path = self.layout.run_lock(&vol);
        let Some(claim) = take(&path, &dir)? else {
            let who = read_owner(&path)
                .map(|o| format!(" (pid {})", o.pid))
                .unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "volume DIR {:?} is in use by a running `jobcachefs run`{who}: wait for it to end or use another DIR",
                    dir.display().to_string()
                ),
            ));
        };
        if let Some(record) = read_json::<VolumeRecord>(&self.layout.volume_record(&vol))? {
            if !record.labels.contains_key(RUN_LABEL) {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "volume DIR {:?} is a volume made by `volume create` or Kubernetes, not by a run: delete it (`jobcachefs volume delete {}`) or use another DIR",
                        dir.display().to_string(),
                        dir.display()
                    ),
                ));
            }
            self.repair_run(&record, claim.owner())?;
        }
        Ok(claim)
    }

    /// Discards the volume of a run that died, after killing what is left of its job. Called
    /// with the run lock held.
    fn repair_run(&self, record: &VolumeRecord, owner: Option<RunOwner>) -> Result<DeleteOutcome> {
        tracing::warn!(dir = %record.dir.display(), "the `jobcachefs run` that owned this volume was killed: discarding the volume");
        if let Some(o) = owner {
            kill_leftovers(&o);
        }
        self.volume_delete(&record.dir, true)
    }

    /// gc's repair of a run's volume: `Ok(true)` when its run was dead and the volume was
    /// discarded, `Ok(false)` when the run still lives.
    pub(crate) fn gc_run_volume(&self, record: &VolumeRecord) -> Result<bool> {
        let path = self.layout.run_lock(&record.id);
        let Some(claim) = take(&path, &record.dir)? else {
            return Ok(false);
        };
        self.repair_run(record, claim.owner())?;
        Ok(true)
    }

    /// Removes run locks that no run holds and no volume needs (a run killed before it made
    /// its volume).
    pub(crate) fn gc_run_locks(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(self.layout.run_locks()) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(vol) = name.strip_suffix(".lock") else {
                continue;
            };
            if self.layout.volume_record(vol).exists() {
                continue; // gc_volumes decides about it
            }
            // Dropping the claim removes the file.
            drop(take(&e.path(), Path::new(""))?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_start_time_of_a_process() {
        let me = std::process::id() as i32;
        let a = process_start(me).expect("own stat is readable");
        assert_eq!(process_start(me), Some(a));
        assert_eq!(process_start(i32::MAX), None);
    }

    #[test]
    fn a_run_lock_is_exclusive_and_removed_on_release() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("runs/x.lock");
        let mut c = take(&p, t.path()).unwrap().expect("free");
        let owner = RunOwner {
            pid: 1,
            pgid: 2,
            start: 3,
        };
        c.record_owner(&owner).unwrap();
        assert_eq!(read_owner(&p), Some(owner));
        assert!(take(&p, t.path()).unwrap().is_none(), "held");
        drop(c);
        assert!(!p.exists());
        assert!(take(&p, t.path()).unwrap().is_some(), "free again");
    }
}
