//! The data extents of a sparse file, as `SEEK_DATA`/`SEEK_HOLE` report them: what a copy must
//! write and a snapshot compares (holes cost nothing in an image and must stay holes).

use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The `(offset, end)` ranges of `file` (of length `len`, at `path` for errors) that hold data,
/// in order. A file system without hole support reports the whole file as one extent.
pub(crate) fn data_extents(file: &File, len: u64, path: &Path) -> Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let len = len as i64;
    let mut out = Vec::new();
    let mut offset = 0i64;
    while offset < len {
        let data = match lseek(fd, offset, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break, // only a hole remains
            Err(e) => {
                return Err(Error::io(
                    format!("seek data in {}", path.display()),
                    e.into(),
                ))
            }
        };
        let end = lseek(fd, data, Whence::SeekHole).unwrap_or(len);
        out.push((data as u64, end as u64));
        offset = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_are_not_extents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"x", 4 << 20).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&p).unwrap();
        let ext = data_extents(&f, 8 << 20, &p).unwrap();
        // The file system decides the granularity; the data is inside one extent, the start and
        // the end of the file are holes (unless the file system has no holes at all).
        if ext != [(0, 8 << 20)] {
            assert_eq!(ext.len(), 1, "{ext:?}");
            assert!(ext[0].0 <= 4 << 20 && ext[0].1 > 4 << 20, "{ext:?}");
            assert!(ext[0].0 > 0 && ext[0].1 < 8 << 20, "{ext:?}");
        }
        let empty = File::create(d.path().join("e")).unwrap();
        assert!(data_extents(&empty, 0, &p).unwrap().is_empty());
    }
}
