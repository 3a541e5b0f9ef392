//! The one walk of a directory tree: children in name order, directories before what they hold
//! and once more after it. The order makes the same tree always give the same result (a layer
//! tar has the same bytes and digest; two snapshots compare entry by entry), and the second
//! visit lets a copy set a directory's mtime after creating its children.

use crate::error::{IoContext, Result};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::Path;

/// One entry below the root (the root itself is not visited).
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Its path (the root joined with `rel`).
    pub path: &'a Path,
    /// Its path relative to the root.
    pub rel: &'a Path,
    /// Its file name.
    pub name: &'a OsStr,
    /// Its `lstat` (symlinks are not followed).
    pub md: &'a fs::Metadata,
}

/// A step of the walk.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// An entry, before the contents if it is a directory.
    Entry(Entry<'a>),
    /// A directory, after all its contents.
    DirDone(Entry<'a>),
}

/// Walks the tree under `root` in name order, calling `visit` for each step; the first error
/// stops the walk.
pub(crate) fn walk_sorted<F>(root: &Path, visit: &mut F) -> Result<()>
where
    F: FnMut(Step<'_>) -> Result<()>,
{
    walk_dir(root, Path::new(""), visit)
}

fn walk_dir<F>(dir: &Path, rel: &Path, visit: &mut F) -> Result<()>
where
    F: FnMut(Step<'_>) -> Result<()>,
{
    let mut names: Vec<OsString> = fs::read_dir(dir)
        .at("read directory", dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .at("read directory", dir)?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let md = fs::symlink_metadata(&path).at("stat", &path)?;
        let entry = Entry {
            path: &path,
            rel: &rel,
            name: &name,
            md: &md,
        };
        visit(Step::Entry(entry))?;
        if md.is_dir() {
            walk_dir(&path, &rel, visit)?;
            visit(Step::DirDone(entry))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visits_in_name_order_with_directories_closed_after_their_contents() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("b/y")).unwrap();
        fs::write(d.path().join("b/x"), b"").unwrap();
        fs::write(d.path().join("a"), b"").unwrap();
        fs::write(d.path().join("c"), b"").unwrap();
        let mut seen = Vec::new();
        walk_sorted(d.path(), &mut |s| {
            seen.push(match s {
                Step::Entry(e) => format!("+{}", e.rel.display()),
                Step::DirDone(e) => format!("-{}", e.rel.display()),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, ["+a", "+b", "+b/x", "+b/y", "-b/y", "-b", "+c"]);
    }

    #[test]
    fn a_missing_root_names_the_path() {
        let e = walk_sorted(Path::new("/nonexistent-jcfs"), &mut |_| Ok(())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("read directory /nonexistent-jcfs"),
            "{e}"
        );
    }
}
