//! Test-only fault injection at named steps; production never sets these variables.
//!
//! - `JOBCACHEFS_CRASH_AT=<step>`: the process SIGKILLs itself at that step, exactly as an OOM
//!   kill or a node drain would.
//! - `JOBCACHEFS_PAUSE_AT=<step>` with `JOBCACHEFS_PAUSE_FILE=<path>`: at that step the process
//!   creates `<path>.reached` and waits until `<path>` is removed (tests use it to run other
//!   commands while, say, a squash is copying).

use std::path::PathBuf;

/// Environment variable naming the step at which to die.
pub const CRASH_AT_ENV: &str = "JOBCACHEFS_CRASH_AT";
/// Environment variable naming the step at which to pause.
pub const PAUSE_AT_ENV: &str = "JOBCACHEFS_PAUSE_AT";
/// Environment variable naming the pause gate file.
pub const PAUSE_FILE_ENV: &str = "JOBCACHEFS_PAUSE_FILE";

#[cfg(test)]
thread_local! {
    /// Unit tests: the step at which this thread "crashes" (panics with [`CRASH_PANIC`]), so a
    /// test can look at what a SIGKILL there would leave and run the repair. Thread-local so
    /// that tests running in parallel do not crash each other.
    pub(crate) static CRASH_IN_TEST: std::cell::RefCell<Option<String>> =
        const { std::cell::RefCell::new(None) };
}

/// The panic message prefix of a crash injected by a unit test.
#[cfg(test)]
pub(crate) const CRASH_PANIC: &str = "injected crash at ";

/// Marks a step; kills or pauses the process here if the environment asks for it.
pub fn point(step: &str) {
    #[cfg(test)]
    if CRASH_IN_TEST.with(|c| c.borrow().as_deref() == Some(step)) {
        panic!("{CRASH_PANIC}{step}");
    }
    if std::env::var_os(CRASH_AT_ENV).is_some_and(|v| v == step) {
        tracing::warn!(step, "crash injected by {CRASH_AT_ENV}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    if std::env::var_os(PAUSE_AT_ENV).is_some_and(|v| v == step) {
        if let Some(gate) = std::env::var_os(PAUSE_FILE_ENV).map(PathBuf::from) {
            tracing::warn!(step, gate = %gate.display(), "paused by {PAUSE_AT_ENV}");
            let mut reached = gate.clone().into_os_string();
            reached.push(".reached");
            let _ = std::fs::write(&reached, step);
            while gate.exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}
