//! Where a file's bytes lie on its filesystem's device (`FS_IOC_FIEMAP`): what a mapped
//! metadata base ([`super::erofs`]) points its files' chunks at. A layer's filesystem sits at
//! offset 0 of its image file, so a physical offset on the (loop) device is the offset in the
//! image file, which the kernel reads directly.

use crate::error::{IoContext, Result};
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const HEADER: usize = 32;
const EXTENT: usize = 56;
/// Extents asked for per call.
const BATCH: usize = 128;

const LAST: u32 = 0x1;
const UNWRITTEN: u32 = 0x800;
/// Data whose place on the device is not (or not yet) plain blocks: unknown or delayed
/// allocation, encoded, encrypted, unaligned, inline in the inode, packed into a tail.
const UNMAPPABLE: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;

const BLOCK: u64 = 4096;

/// The extents of the regular file at `path` of `size` bytes, `[offset in the file, offset on
/// the device, length]`, 4 KiB aligned, in file order, adjacent ones joined; unwritten extents
/// and what lies past the file's last block left out (they read as zeros). `None` when a part
/// of its data has no plain place on the device (delayed allocation, inline data, encoding…)
/// or the filesystem cannot say (no FIEMAP).
pub fn extents_of(path: &Path, size: u64) -> Result<Option<Vec<[u64; 3]>>> {
    let file = std::fs::File::open(path).at("open", path)?;
    extents(&file, size, path)
}

/// [`extents_of`] an open file (`path` names it in errors).
pub fn extents(file: &std::fs::File, size: u64, path: &Path) -> Result<Option<Vec<[u64; 3]>>> {
    let end = size.div_ceil(BLOCK) * BLOCK;
    let mut out: Vec<[u64; 3]> = Vec::new();
    let mut start = 0u64;
    // A struct fiemap and BATCH extents, as bytes (the kernel copies it in and out whole).
    let mut buf = vec![0u8; HEADER + BATCH * EXTENT];
    while start < end {
        buf.fill(0);
        buf[0..8].copy_from_slice(&start.to_ne_bytes());
        buf[8..16].copy_from_slice(&(end - start).to_ne_bytes());
        buf[24..28].copy_from_slice(&(BATCH as u32).to_ne_bytes());
        // SAFETY: buf holds a struct fiemap followed by room for fm_extent_count (BATCH)
        // extents, which is all the kernel writes; it outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Ok(None),
                _ => Err(e).at("map the extents of", path),
            };
        }
        let bytes: &[u8] = &buf;
        let mapped = u32::from_ne_bytes(bytes[20..24].try_into().expect("4 bytes")) as usize;
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for i in 0..mapped.min(BATCH) {
            let x = &bytes[HEADER + i * EXTENT..HEADER + (i + 1) * EXTENT];
            let word = |at: usize| u64::from_ne_bytes(x[at..at + 8].try_into().expect("8 bytes"));
            let (logical, physical, length) = (word(0), word(8), word(16));
            let flags = u32::from_ne_bytes(x[40..44].try_into().expect("4 bytes"));
            last |= flags & LAST != 0;
            start = start.max(logical + length);
            if flags & UNMAPPABLE != 0 {
                return Ok(None);
            }
            if flags & UNWRITTEN != 0 || logical >= end {
                continue;
            }
            let length = length.min(end - logical);
            if logical % BLOCK != 0 || physical % BLOCK != 0 || length % BLOCK != 0 {
                return Ok(None);
            }
            match out.last_mut() {
                Some(p) if p[0] + p[2] == logical && p[1] + p[2] == physical => p[2] += length,
                _ => out.push([logical, physical, length]),
            }
        }
        if last {
            break;
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_maps_to_aligned_extents_with_its_holes_left_out() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        // A hole of 1 MiB, then 100 bytes.
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[9u8; 100], (1 << 20) + 8192).unwrap();
        f.sync_all().unwrap();
        let size = (1 << 20) + 8192 + 100;
        let Some(x) = extents_of(&p, size).unwrap() else {
            eprintln!("skipped: the temp dir's filesystem cannot map extents");
            return;
        };
        assert!(!x.is_empty());
        assert_eq!(x[0][0], 0, "the data starts the file");
        assert!(x.iter().all(|e| e.iter().all(|v| v % BLOCK == 0)));
        // What is mapped covers the written blocks and nothing past the last one.
        let last = x.last().unwrap();
        assert_eq!(last[0] + last[2], size.div_ceil(BLOCK) * BLOCK);
        assert!(x.iter().all(|e| !(8192..(1 << 20) + 8192).contains(&e[0])));
    }
}
