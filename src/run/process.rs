//! Running CMD for `jobcachefs run`: its own process group, stop signals passed on to that
//! group, and nothing of the job left running once the volume goes.
//!
//! - **Own process group.** A CI runner stops a job by signalling the `jobcachefs run` process
//!   (or its group). Passed to CMD's group, the signal reaches the whole job — `sh -c` and the
//!   build tools it started, not only the shell — exactly once (the runner's group signal does
//!   not reach CMD's group directly, so nothing gets it twice). On a terminal the group is made
//!   the foreground group for CMD's life, so an interactive CMD reads the terminal and Ctrl-C
//!   reaches it as usual.
//! - **Signals** SIGINT, SIGTERM and SIGHUP are blocked from the start of the run and taken with
//!   `sigwait` (no handler runs anywhere): one arriving while the volumes are made is held, CMD
//!   is then not started and the volumes are discarded; one arriving while CMD runs is passed on;
//!   one arriving during the delete changes nothing but the commit decision (discard). A blocked
//!   signal is queued even when its disposition is "ignore", so a run under `nohup` still takes
//!   SIGHUP; CMD starts with the three at their default action whatever the run inherited, so
//!   the signal passed on stops it.
//! - **Nothing left behind.** CMD gets `PR_SET_PDEATHSIG` = SIGKILL, so a `jobcachefs run`
//!   killed with SIGKILL takes CMD with it; what CMD's group still holds is killed by the repair
//!   (engine/runs.rs). When CMD exits, members of its group still running (a daemon it started
//!   without a session of its own) get SIGTERM, then SIGKILL after [`LEFTOVER_GRACE`]: the
//!   volume they would use is about to be deleted.

use super::Ended;
use crate::error::{Error, Result};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::time::Duration;

/// The signals a run passes on to CMD's group.
pub const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// How long CMD's leftover group members get between SIGTERM and SIGKILL.
pub const LEFTOVER_GRACE: Duration = Duration::from_secs(3);

/// The stop signals (and SIGCHLD) blocked in this thread for the run's life.
#[derive(Debug)]
pub struct Signals {
    set: SigSet,
}

impl Signals {
    /// Blocks the stop signals and SIGCHLD; from now on they wait to be taken.
    pub fn block() -> Result<Self> {
        let mut set = SigSet::empty();
        for s in STOP_SIGNALS {
            set.add(s);
        }
        set.add(Signal::SIGCHLD);
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
            .map_err(|e| Error::io("block signals", e.into()))?;
        Ok(Signals { set })
    }

    /// A stop signal received and not taken yet (it is taken now).
    pub fn take_pending_stop(&self) -> Option<Signal> {
        let mut pending = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigpending only writes the set it is given, which lives across the call.
        let ok = unsafe { libc::sigpending(pending.as_mut_ptr()) } == 0;
        if !ok {
            return None;
        }
        // SAFETY: initialised by the successful sigpending above.
        let pending = unsafe { pending.assume_init() };
        let sig = STOP_SIGNALS.into_iter().find(|s| {
            // SAFETY: sigismember reads the initialised set.
            unsafe { libc::sigismember(&pending, *s as libc::c_int) == 1 }
        })?;
        let mut only = SigSet::empty();
        only.add(sig);
        let _ = only.wait(); // pending: returns at once
        Some(sig)
    }
}

/// How CMD's run went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// How CMD ended.
    pub ended: Ended,
    /// The first stop signal passed on to CMD, if the run was told to stop.
    pub stopped_by: Option<Signal>,
}

/// Runs `program` with `args` and `env` added, in a process group of its own, passing stop
/// signals on; `started(pgid)` is called once it runs. Stdio is inherited.
pub fn run(
    signals: &Signals,
    program: &Path,
    argv0: &OsString,
    args: &[OsString],
    env: &[(String, OsString)],
    started: impl FnOnce(i32),
) -> std::io::Result<Finished> {
    let mut cmd = std::process::Command::new(program);
    cmd.arg0(argv0).args(args).process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let stdin = std::io::stdin();
    // The terminal goes to CMD only when this run is in its foreground now.
    // SAFETY: tcgetpgrp only reads the foreground group of the terminal on fd 0.
    let tty =
        stdin.is_terminal() && unsafe { libc::tcgetpgrp(0) } == nix::unistd::getpgrp().as_raw();
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, raise, signal, tcsetpgrp, getpid); it
    // allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            // The stop signals this run passes on must stop CMD: a runner started under
            // `nohup` (or by a supervisor that ignores SIGINT) hands its ignored dispositions
            // down through exec, and a shell may not even trap a signal ignored at its start.
            // The mask is std's to reset (it empties it before exec).
            for s in STOP_SIGNALS {
                libc::signal(s as libc::c_int, libc::SIG_DFL);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if libc::getppid() != parent {
                // The run died before the death signal was set: it would not come.
                libc::raise(libc::SIGKILL);
            }
            if tty {
                // From a background group tcsetpgrp raises SIGTTOU: ignore it meanwhile.
                libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                libc::tcsetpgrp(0, libc::getpid());
                libc::signal(libc::SIGTTOU, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pgid = child.id() as i32;
    if tty {
        give_terminal(pgid);
    }
    started(pgid);
    let mut stopped_by = None;
    let status = loop {
        let sig = signals.set.wait().map_err(std::io::Error::from)?;
        if sig == Signal::SIGCHLD {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            continue;
        }
        tracing::warn!(signal = %sig, pgid, "passing the signal on to CMD's process group");
        stopped_by.get_or_insert(sig);
        let _ = kill(Pid::from_raw(-pgid), sig);
    };
    if tty {
        give_terminal(nix::unistd::getpgrp().as_raw());
    }
    end_leftovers(pgid);
    let ended = match (status.code(), status.signal()) {
        (Some(c), _) => Ended::Exited(c),
        (None, Some(s)) => Ended::Signalled(s),
        (None, None) => Ended::Exited(1),
    };
    Ok(Finished { ended, stopped_by })
}

/// Makes `pgid` the terminal's foreground group (SIGTTOU ignored meanwhile: this process may be
/// in a background group by now).
fn give_terminal(pgid: i32) {
    // SAFETY: changes this process's SIGTTOU disposition and back, and asks the kernel to change
    // the foreground group of stdin's terminal; no memory is shared.
    unsafe {
        let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::tcsetpgrp(0, pgid);
        libc::signal(libc::SIGTTOU, old);
    }
}

/// Ends what is left of CMD's process group: SIGTERM, then SIGKILL after [`LEFTOVER_GRACE`].
fn end_leftovers(pgid: i32) {
    let group = Pid::from_raw(-pgid);
    if kill(group, None).is_err() {
        return;
    }
    tracing::warn!(
        pgid,
        "CMD left processes running in its group: stopping them before the volume goes"
    );
    let _ = kill(group, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + LEFTOVER_GRACE;
    while std::time::Instant::now() < deadline {
        if kill(group, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(group, Signal::SIGKILL);
    for _ in 0..40 {
        if kill(group, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
