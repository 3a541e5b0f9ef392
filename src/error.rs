//! The library's error type: a small kind that callers branch on (exit codes, hook retries) plus
//! a message written for the operator: what, which value, and what to do.

use crate::host::cmd::ToolError;
use std::io;
use std::path::Path;

/// What went wrong, as far as a caller needs to know to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request itself is wrong (bad name, size, path): retrying cannot help.
    InvalidInput,
    /// The named thing does not exist.
    NotFound,
    /// The request conflicts with what exists (same DIR created with other settings, busy mount).
    Conflict,
    /// A size limit would be exceeded (cache-size, volume size, free space).
    Quota,
    /// An external tool failed.
    Tool,
    /// A system call failed.
    Io,
    /// On-disk state is damaged (a truncated or foreign record) or from a newer version.
    Corrupt,
    /// A service this depends on (the Kubernetes API, a registry) could not be reached or kept
    /// failing within the time allowed: retrying later may help.
    Unavailable,
}

/// An error with its kind and an operator-facing message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    // Not a `#[source]`: the message already ends with it, and error chains would print it twice.
    os: Option<io::Error>,
    // Boxed: errors travel in every `Result`, tool failures are rare.
    tool: Option<Box<ToolError>>,
}

/// Result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            os: None,
            tool: None,
        }
    }

    /// Bad input: the message must name the value and the fix.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// A system call failure with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        let what = what.into();
        Error {
            kind: ErrorKind::Io,
            message: format!("{what}: {source}"),
            os: Some(source),
            tool: None,
        }
    }

    /// Whether a system call failed because the disk was full.
    pub fn is_enospc(&self) -> bool {
        self.os
            .as_ref()
            .and_then(|e| e.raw_os_error())
            .is_some_and(|c| c == libc::ENOSPC)
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Attaches how an external tool failed (see [`crate::host::cmd`]).
    pub fn with_tool(mut self, failure: ToolError) -> Self {
        self.tool = Some(Box::new(failure));
        self
    }

    /// Carries over `other`'s tool failure, if it has one (when an error is rewrapped).
    pub fn with_tool_of(mut self, other: &Error) -> Self {
        self.tool = other.tool.clone();
        self
    }

    /// How an external tool failed, when this error is a tool's failure.
    pub fn tool(&self) -> Option<&ToolError> {
        self.tool.as_deref()
    }

    /// The OS error number, when the error came from a system call.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.os.as_ref().and_then(|e| e.raw_os_error())
    }
}

/// Attaches what was being done (and to which path) to an `io::Result`.
pub trait IoContext<T> {
    /// Wraps the error with a description of the operation.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
    /// Wraps the error with `verb` and the path it was applied to.
    fn at(self, verb: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }

    fn at(self, verb: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(format!("{verb} {}", path.display()), e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), io::Error::from(e)))
    }

    fn at(self, verb: &str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(format!("{verb} {}", path.display()), io::Error::from(e)))
    }
}
