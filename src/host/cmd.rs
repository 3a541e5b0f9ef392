//! Every external tool jobcachefs runs, in one place: names, the package that provides each, a
//! start-up check, and one runner that turns a failure into an error carrying a [`ToolError`]:
//! the tool, its exit code, stdout and stderr as data, so that callers branch on fields (a
//! missing tool is not a failed run) and never parse the message.

use crate::error::{Error, ErrorKind, Result};
use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// An external tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// Binary name, looked up in PATH.
    pub name: &'static str,
    /// Debian/Ubuntu package providing it.
    pub package: &'static str,
}

/// Creates ext4 images.
pub const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
};
/// Checks ext4 images after a crash.
pub const E2FSCK: Tool = Tool {
    name: "e2fsck",
    package: "e2fsprogs",
};
/// Grows and shrinks ext4 images.
pub const RESIZE2FS: Tool = Tool {
    name: "resize2fs",
    package: "e2fsprogs",
};
/// Copies OCI images between registries and layouts (registry sync).
pub const SKOPEO: Tool = Tool {
    name: "skopeo",
    package: "skopeo",
};

/// The tools every volume operation needs.
pub const ENGINE_TOOLS: &[Tool] = &[MKFS_EXT4, E2FSCK, RESIZE2FS];

/// How running an external tool failed, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolError {
    /// The tool is not in PATH: install `package`. Nothing was run.
    Missing {
        /// Binary name.
        tool: &'static str,
        /// Debian/Ubuntu package providing it.
        package: &'static str,
    },
    /// The tool ran and failed.
    Failed {
        /// Binary name.
        tool: &'static str,
        /// Exit code (`None`: killed by a signal).
        code: Option<i32>,
        /// What it printed on stdout.
        stdout: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

impl ToolError {
    /// The tool's stderr, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            ToolError::Failed { stderr, .. } => Some(stderr),
            ToolError::Missing { .. } => None,
        }
    }
}

fn missing(tool: &Tool) -> Error {
    Error::new(
        ErrorKind::Tool,
        format!(
            "{} not found in PATH: install the {} package",
            tool.name, tool.package
        ),
    )
    .with_tool(ToolError::Missing {
        tool: tool.name,
        package: tool.package,
    })
}

/// Finds `tool` in PATH.
pub fn which(tool: &Tool) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool.name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Fails with a message naming each missing tool and its package.
pub fn require(tools: &[Tool]) -> Result<()> {
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| which(t).is_none())
        .map(|t| {
            format!(
                "{} (install the {} package: apt-get install {})",
                t.name, t.package, t.package
            )
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Tool,
            format!("required tool not found in PATH: {}", missing.join(", ")),
        ))
    }
}

/// Runs `tool` with `args`, returning its stdout; a non-zero exit becomes an error with stderr.
pub fn run<I, S>(tool: &Tool, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(tool = tool.name, args = %shown, "run");
    let out = Command::new(tool.name)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                missing(tool)
            } else {
                Error::io(format!("run {}", tool.name), e)
            }
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        return Err(Error::new(
            ErrorKind::Tool,
            format!(
                "{} {} failed ({}): {}",
                tool.name,
                shown,
                out.status,
                stderr.trim()
            ),
        )
        .with_tool(ToolError::Failed {
            tool: tool.name,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `tool` and returns its exit code and combined output without failing on non-zero.
pub fn run_status<I, S>(tool: &Tool, args: I) -> Result<(i32, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(tool.name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            let missing = e.kind() == std::io::ErrorKind::NotFound;
            let err = Error::io(
                format!("run {} (install the {} package)", tool.name, tool.package),
                e,
            );
            if missing {
                err.with_tool(ToolError::Missing {
                    tool: tool.name,
                    package: tool.package,
                })
            } else {
                err
            }
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABSENT: Tool = Tool {
        name: "jobcachefs-no-such-tool",
        package: "no-such-package",
    };
    const FALSE: Tool = Tool {
        name: "false",
        package: "coreutils",
    };

    #[test]
    fn a_missing_tool_is_not_a_failed_run() {
        let e = run(&ABSENT, ["x"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tool);
        assert_eq!(
            e.tool(),
            Some(&ToolError::Missing {
                tool: ABSENT.name,
                package: ABSENT.package
            })
        );
        assert_eq!(
            e.to_string(),
            "jobcachefs-no-such-tool not found in PATH: install the no-such-package package"
        );
        let e = run_status(&ABSENT, ["x"]).unwrap_err();
        assert!(matches!(e.tool(), Some(ToolError::Missing { .. })));
    }

    #[test]
    fn a_failed_run_carries_code_and_output() {
        if which(&FALSE).is_none() {
            eprintln!("SKIPPED: no `false` in PATH");
            return;
        }
        let e = run(&FALSE, [] as [&str; 0]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tool);
        match e.tool() {
            Some(ToolError::Failed {
                tool, code, stderr, ..
            }) => {
                assert_eq!(*tool, "false");
                assert_eq!(*code, Some(1));
                assert!(stderr.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
}
