//! The one mapping from the library's [`ErrorKind`] to the CSI spec's gRPC status codes. The
//! message stays the library's (it names the value and the fix); the code tells kubelet and the
//! external-provisioner whether a retry can help.

use crate::error::{Error, ErrorKind};
use tonic::{Code, Status};

/// The status code of a failure of `kind`.
pub fn code_for(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidInput => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        // A volume busy or half-deleted at the path: the operation is pending, retry later.
        ErrorKind::Conflict => Code::Aborted,
        ErrorKind::Quota => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// A library error as a gRPC status.
pub fn status(e: &Error) -> Status {
    Status::new(code_for(e.kind()), e.to_string())
}

/// INVALID_ARGUMENT for a missing or bad field: names it and the fix.
pub fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_the_spec_code() {
        for (kind, code) in [
            (ErrorKind::InvalidInput, Code::InvalidArgument),
            (ErrorKind::NotFound, Code::NotFound),
            (ErrorKind::Conflict, Code::Aborted),
            (ErrorKind::Quota, Code::ResourceExhausted),
            (ErrorKind::Unavailable, Code::Unavailable),
            (ErrorKind::Tool, Code::Internal),
            (ErrorKind::Io, Code::Internal),
            (ErrorKind::Corrupt, Code::Internal),
        ] {
            assert_eq!(code_for(kind), code, "{kind:?}");
            let s = status(&Error::new(kind, "cache \"x\" is bad: fix it"));
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), "cache \"x\" is bad: fix it");
        }
    }
}
