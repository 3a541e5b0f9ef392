//! Test-only crash injection: with `JOBCACHEFS_CRASH_AT=<step>` in the environment, the process
//! SIGKILLs itself when it reaches that named step, exactly as an OOM kill or node drain would.
//! Steps are listed in the integration tests; production never sets the variable.

/// Environment variable naming the step at which to die.
pub const CRASH_AT_ENV: &str = "JOBCACHEFS_CRASH_AT";

/// Marks a step; kills the process here if the environment asks for it.
pub fn point(step: &str) {
    if let Some(v) = std::env::var_os(CRASH_AT_ENV) {
        if v == step {
            tracing::warn!(step, "crash injected by {CRASH_AT_ENV}");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}
