//! Write-back policies, as every front end names them: `true` (commit when the volume is
//! deleted), `on-success` (commit only if the job left the success marker at the volume's root:
//! for CI systems that end the job's pod whatever its result), `false` (discard).

use crate::error::{Error, Result};

/// A volume's write-back policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub enum WriteBack {
    /// Discard on delete.
    #[default]
    Never,
    /// Commit only if the job left `.jobcachefs-success` at the volume's root.
    OnSuccess,
    /// Commit on delete.
    Always,
}

impl WriteBack {
    /// Parses `true`, `on-success` or `false`; `what` names where the value came from.
    pub fn parse(what: &str, value: &str) -> Result<Self> {
        match value {
            "true" => Ok(WriteBack::Always),
            "on-success" => Ok(WriteBack::OnSuccess),
            "false" => Ok(WriteBack::Never),
            other => Err(Error::invalid(format!(
                "{what} is {other:?}: use \"true\", \"on-success\" or \"false\""
            ))),
        }
    }

    /// The value as users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteBack::Always => "true",
            WriteBack::OnSuccess => "on-success",
            WriteBack::Never => "false",
        }
    }

    /// Whether the volume may commit at all.
    pub fn writes(self) -> bool {
        self != WriteBack::Never
    }

    /// The narrower of two policies (`Never` < `OnSuccess` < `Always`): what a PVC's own
    /// annotation can do to its class's policy — narrow it, never widen it.
    pub fn narrowed_by(self, other: WriteBack) -> WriteBack {
        self.min(other)
    }

    /// The engine's request fields: `(write_back, on_success)`.
    pub fn flags(self) -> (bool, bool) {
        (self.writes(), self == WriteBack::OnSuccess)
    }
}

impl std::fmt::Display for WriteBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_policies_and_names_a_bad_value() {
        for w in [WriteBack::Always, WriteBack::OnSuccess, WriteBack::Never] {
            assert_eq!(WriteBack::parse("x", w.as_str()).unwrap(), w);
        }
        let e = WriteBack::parse("volumeAttributes.writeBack", "yes").unwrap_err();
        assert_eq!(
            e.to_string(),
            "volumeAttributes.writeBack is \"yes\": use \"true\", \"on-success\" or \"false\""
        );
        assert_eq!(WriteBack::Always.flags(), (true, false));
        assert_eq!(WriteBack::OnSuccess.flags(), (true, true));
        assert_eq!(WriteBack::Never.flags(), (false, false));
        assert_eq!(
            WriteBack::Always.narrowed_by(WriteBack::OnSuccess),
            WriteBack::OnSuccess
        );
        assert_eq!(
            WriteBack::OnSuccess.narrowed_by(WriteBack::Always),
            WriteBack::OnSuccess
        );
        assert_eq!(
            WriteBack::Never.narrowed_by(WriteBack::Always),
            WriteBack::Never
        );
    }
}
