//! flock-based locks on files under the state dir. The kernel drops a flock when its holder dies,
//! so a SIGKILLed hook never leaves a lock behind.

use crate::error::{IoContext, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::path::Path;

/// A held exclusive lock; released on drop.
#[derive(Debug)]
pub struct Lock {
    _flock: Flock<File>,
}

fn open(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        crate::state::fsutil::ensure_dir(parent)?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .at("open lock", path)
}

/// Waits for and takes the exclusive lock at `path`.
pub fn lock(path: &Path) -> Result<Lock> {
    let file = open(path)?;
    let flock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .at("lock", path)?;
    Ok(Lock { _flock: flock })
}

/// Takes the lock at `path` if nobody holds it.
pub(crate) fn try_lock(path: &Path) -> Result<Option<Lock>> {
    let file = open(path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(flock) => Ok(Some(Lock { _flock: flock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).at("lock", path),
    }
}
