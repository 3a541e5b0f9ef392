//! Small crash-safe file helpers: atomic JSON records, file and directory fsync, idempotent
//! removal, allocated bytes, free space.

use crate::error::{Error, IoContext, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// fsyncs a directory so that a rename or create inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .at("fsync directory", dir)
}

/// fsyncs a file, so that its blocks reach the disk before any name points at them.
pub(crate) fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .at("fsync", path)
}

/// Removes the file `path`; one that is already gone is fine (a repeated or resumed step after
/// a crash finds it removed).
pub fn remove_file_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Writes `value` as JSON to `path` atomically: temp → fsync → rename → fsync dir. A crash at any
/// instant leaves either the old file or the new one.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path.parent().expect("record paths have a parent");
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let body = serde_json::to_vec_pretty(value).expect("records serialise");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("write {}", path.display()), e));
    }
    fsync_dir(dir)
}

/// Reads a JSON record; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::new(
                crate::error::ErrorKind::Corrupt,
                format!(
                    "record {} is damaged ({e}): it was truncated or not written by jobcachefs; \
                     `jobcachefs doctor` lists damaged records and what depends on them (nothing that it names is deleted by gc meanwhile)",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

/// Bytes a file really occupies on the host (sparse files count only their data).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    Ok(fs::symlink_metadata(path).at("stat", path)?.blocks() * 512)
}

/// Bytes available on the filesystem holding `path` (what df shows as Avail).
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).at("statvfs", path)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// `(used, total)` bytes of the filesystem mounted at `path`.
pub fn fs_usage(path: &Path) -> Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).at("statvfs", path)?;
    let f = st.fragment_size() as u64;
    let total = st.blocks() as u64 * f;
    Ok((total - st.blocks_free() as u64 * f, total))
}

/// Creates `dir` and its parents with mode 0700 for the state tree.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .at("create directory", dir)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A short random hex string for unique names.
pub fn random_hex() -> String {
    let mut buf = [0u8; 4];
    if let Ok(mut f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_json_round_trip_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        write_json_atomic(&p, &vec![1, 2, 3]).unwrap();
        write_json_atomic(&p, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&p).unwrap(), Some(vec![4]));
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        assert_eq!(read_json::<Vec<i32>>(&d.path().join("none")).unwrap(), None);
    }

    #[test]
    fn removing_twice_is_fine_but_other_failures_are_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"x").unwrap();
        fsync_file(&p).unwrap();
        remove_file_if_exists(&p).unwrap();
        remove_file_if_exists(&p).unwrap();
        assert!(!p.exists());
        let e = remove_file_if_exists(d.path()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("remove {}", d.path().display())),
            "{e}"
        );
        assert!(fsync_file(&p)
            .unwrap_err()
            .to_string()
            .starts_with("fsync "));
    }
}
