//! Sparse ext4 image files: creation sized exactly, with lazy init and no reserved blocks, check
//! and resize. An image's root holds `upper/` (the tree, in overlayfs upper format) and `work/`.

use crate::error::{Error, IoContext, Result};
use crate::host::cmd::{self, E2FSCK, MKFS_EXT4, RESIZE2FS};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::Path;

/// Smallest image jobcachefs makes: below this ext4's own metadata dominates.
pub const MIN_IMAGE_SIZE: u64 = 16 << 20;

/// Creates a sparse ext4 image of exactly `size` bytes at `path` (which must not exist), its root
/// owned by `uid:gid`. No journal: layers, squash targets and clone generations are written once
/// by jobcachefs and only ever committed after a clean unmount, and a journal would put up to
/// tens of MiB of allocated blocks into each of them. A volume's upper gets one:
/// [`create_volume`].
pub fn create(path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
    make(path, size, uid, gid, None, None)
}

/// Creates a metadata base's image: [`create`] with 512-byte inodes, so that a stub's
/// `trusted.overlay.metacopy` and `trusted.overlay.redirect` (and the file's own few xattrs) fit
/// in the inode. In ext4's default 256-byte inode only 88 bytes are free for xattrs, which a
/// redirect of more than 24 bytes overflows into a 4 KiB block of its own: 16,000 stubs then
/// allocated 77 MiB (as much as the full squash's data) and a cold walk read a block per file
/// (4.2x the host dir). 512 leaves 340 bytes: a redirect of up to about 250 bytes.
pub fn create_metadata(path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
    make(path, size, uid, gid, None, Some(512))
}

/// Creates a volume's upper image: [`create`] with a small journal ([`volume_journal_mib`]),
/// because a job deletes and writes again where a squash never does. Without a journal ext4
/// skips, for every inode it allocates, each free inode deleted less than 60 s before (6 min
/// while its inode table block is dirty), rescanning the group from its start each time
/// (`recently_deleted()` in fs/ext4/ialloc.c: a guard for journal-less crash consistency that
/// jobcachefs does not need, since only a cleanly unmounted image is ever committed). A job that
/// cleans a tree of N files and writes it again thus pays O(N^2) buffer lookups: untarring 12k
/// small files into a volume after `rm -rf` of the same tree took 1.6-1.7x the host dir with
/// caches dropped in between, and 5.9 s instead of 0.3 s without (bare image, same run). With a
/// journal ext4 does not look ([`release_journal`] gives its blocks back at commit).
///
/// The journal's blocks are reserved in the host file ([`reserve_journal`]) for the volume's
/// life, so that a journal commit never needs a new block of the host disk: on a disk that
/// fills up while the job runs, the job's `fsync`s keep working as they did without a journal.
/// (What the journal does not cover, the metadata's later write-back to its home blocks, a
/// delete checks: `write_failure` and `is_clean` in `engine/volume.rs`.)
pub fn create_volume(path: &Path, size: u64, uid: u32, gid: u32) -> Result<()> {
    make(path, size, uid, gid, volume_journal_mib(size), None)?;
    reserve_journal(path)?;
    Ok(())
}

/// Allocates (without writing: unwritten extents, which read as zeros like the holes they
/// replace) the host blocks of the image's journal, so that writing the journal never needs room
/// on the host disk. Returns the bytes reserved (0 without a journal this reads).
pub fn reserve_journal(path: &Path) -> Result<u64> {
    let (f, sb) = open_superblock(path, true)?;
    let Some(extents) = journal_extents(&sb) else {
        return Ok(0);
    };
    let block = block_size(&sb);
    let mut reserved = 0;
    for (_, physical, len) in extents {
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        match nix::fcntl::fallocate(fd, flags, (physical * block) as i64, (len * block) as i64) {
            Ok(()) => reserved += len * block,
            // A host filesystem without preallocation: the journal stays sparse, and a write
            // error when the disk fills up keeps the volume from committing (see volume.rs).
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                tracing::warn!(image = %path.display(), "the host filesystem cannot preallocate: the volume's journal is not reserved");
                return Ok(reserved);
            }
            Err(e) => {
                return Err(std::io::Error::from(e)).at("reserve the journal's blocks in", path)
            }
        }
    }
    Ok(reserved)
}

/// Opens an image (for writing too if `write`) and reads its primary superblock.
fn open_superblock(path: &Path, write: bool) -> Result<(std::fs::File, [u8; 1024])> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .at("open", path)?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024)
        .at("read superblock of", path)?;
    Ok((f, sb))
}

/// The filesystem's block size, from its superblock (s_log_block_size at 0x18).
fn block_size(sb: &[u8]) -> u64 {
    1024u64 << u32::from_le_bytes(sb[0x18..0x1C].try_into().unwrap())
}

/// `fallocate` of `len` bytes at `offset` of the image `f` (at `path`) with `flags`, for `what`.
fn fallocate(
    f: &std::fs::File,
    flags: nix::fcntl::FallocateFlags,
    offset: u64,
    len: u64,
    what: &str,
    path: &Path,
) -> Result<()> {
    nix::fcntl::fallocate(
        std::os::fd::AsRawFd::as_raw_fd(f),
        flags,
        offset as i64,
        len as i64,
    )
    .map_err(std::io::Error::from)
    .at(what, path)
}

/// The journal of a volume's image of `size` bytes, in MiB: a 32nd of the image, at least 4 MiB
/// (jbd2's least) and at most 64 MiB (mke2fs's own choice for 2 to 16 GiB; one extent, which
/// [`release_journal`] needs); none below 128 MiB, where 4 MiB would be 3% or more of the volume
/// and the few inodes bound what a rescan costs.
pub fn volume_journal_mib(size: u64) -> Option<u64> {
    (size >= 128 << 20).then(|| ((size >> 20) / 32).clamp(4, 64))
}

fn make(
    path: &Path,
    size: u64,
    uid: u32,
    gid: u32,
    journal_mib: Option<u64>,
    inode_size: Option<u32>,
) -> Result<()> {
    if size < MIN_IMAGE_SIZE {
        return Err(Error::invalid(format!(
            "size {size} bytes is too small: use at least {}",
            crate::input::quantity::human_bytes(MIN_IMAGE_SIZE)
        )));
    }
    let size = size / 4096 * 4096;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .at("create image", path)?;
    file.set_len(size).at("size image", path)?;
    drop(file);
    let mut args: Vec<OsString> = ["-q", "-F", "-b", "4096", "-m", "0", "-i", "8192"]
        .iter()
        .map(OsString::from)
        .collect();
    if let Some(bytes) = inode_size {
        args.extend(["-I".into(), bytes.to_string().into()]);
    }
    match journal_mib {
        None => args.extend(["-O", "^has_journal"].map(OsString::from)),
        Some(mib) => {
            args.extend(["-O", "has_journal", "-J"].map(OsString::from));
            args.push(format!("size={mib}").into());
        }
    }
    // One flex group for the whole image: its bitmaps and inode tables packed together at the
    // start, whatever the size. A squashed base is as large as its cache-size (10Gi by default:
    // 80 block groups, 5 flex groups of the default 16), and ext4 spreads directories over the
    // flex groups, so a cold read of a tree of small files seeks between them. Measured (16,000
    // small files copied into an image, read through a buffered loop device, medians of 5): cold
    // tar 0.51x the host dir in a 2 GiB image, 0.79x in 8 GiB, 0.55x in 8 GiB with one flex
    // group.
    args.extend(["-G", "4096", "-E"].map(OsString::from));
    // lazy_journal_init: the file is new and sparse, so the journal already reads as zeros;
    // without it mke2fs writes all of it (64 MiB allocated in a fresh 2 GiB volume).
    args.push(
        format!("lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={uid}:{gid}").into(),
    );
    args.extend(["-L", "jobcachefs"].map(OsString::from));
    args.push(path.as_os_str().to_owned());
    cmd::run(&MKFS_EXT4, &args)?;
    Ok(())
}

/// Checks and repairs an image non-interactively (after a crash). Returns e2fsck's exit code:
/// 0 clean, 1 repaired; anything above is returned as an error.
pub fn check(path: &Path) -> Result<i32> {
    let (code, out) = cmd::run_status(&E2FSCK, ["-p".as_ref(), "-f".as_ref(), path.as_os_str()])?;
    if code > 1 {
        return Err(Error::new(
            crate::error::ErrorKind::Tool,
            format!(
                "e2fsck -p -f {} failed with exit code {code}: {}",
                path.display(),
                out.trim()
            ),
        ));
    }
    Ok(code)
}

/// Grows or shrinks an unmounted image to `size` bytes (the file is resized to match).
pub fn resize(path: &Path, size: u64) -> Result<()> {
    let size = size / 4096 * 4096;
    let current = std::fs::metadata(path).at("stat", path)?.len();
    if size > current {
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(size))
            .at("grow image", path)?;
    }
    check(path)?;
    cmd::run(
        &RESIZE2FS,
        [path.as_os_str(), format!("{}K", size / 1024).as_ref()],
    )?;
    if size < current {
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(size))
            .at("shrink image", path)?;
    }
    Ok(())
}

/// Whether an unmounted ext4 image's superblock says it was cleanly unmounted. A missing image
/// counts as clean (a commit already renamed it into the cache).
pub fn is_clean(path: &Path) -> Result<bool> {
    if !path.exists() {
        return Ok(true);
    }
    let (_, sb) = open_superblock(path, false)?;
    Ok(superblock_clean(&sb))
}

/// s_state (u16 at 0x3A) bit 0: cleanly unmounted — which a journaled filesystem keeps set while
/// mounted (the journal vouches for it), setting `needs_recovery` (bit 2 of s_feature_incompat,
/// u32 at 0x60) instead until it is cleanly unmounted — and bit 1 clear: no error recorded (a
/// failed metadata write, which ext4 notes there and unmounts "cleanly" over).
fn superblock_clean(sb: &[u8]) -> bool {
    let state = u16::from_le_bytes([sb[0x3A], sb[0x3B]]);
    let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().unwrap());
    state & 0b11 == 1 && incompat & INCOMPAT_RECOVER == 0
}

/// Whether the ext4 filesystem on `image` has a journal (false if it is not ext4 or cannot be
/// read).
pub fn has_journal(image: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(image) else {
        return false;
    };
    let mut sb = [0u8; 0x60];
    if f.read_exact_at(&mut sb, 1024).is_err() {
        return false;
    }
    let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
    let compat = u32::from_le_bytes(sb[0x5C..0x60].try_into().unwrap());
    magic == 0xEF53 && compat & COMPAT_HAS_JOURNAL != 0
}

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const INCOMPAT_RECOVER: u32 = 0x4;
const JBD2_MAGIC: u32 = 0xC03B_3998;

/// Gives back to the host the blocks of the journal of a cleanly unmounted image (the journal of
/// [`create_volume`]): every block but the journal's superblock is punched out of the sparse
/// file, which the journal of a clean filesystem never reads again (its log starts afresh at the
/// next mount). Returns the bytes punched (0 when there is nothing to give back: no journal, one
/// that needs recovery, or one laid out in a way this does not read — the layer is then only
/// bigger). The journal's place comes from the superblock's copy of its inode's extents
/// (`s_jnl_blocks`), checked against the journal superblock found there.
pub fn release_journal(path: &Path) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let (f, sb) = open_superblock(path, true)?;
    if !superblock_clean(&sb) {
        return Ok(0);
    }
    let Some(extents) = journal_extents(&sb) else {
        return Ok(0);
    };
    let block = block_size(&sb);
    let Some(&(_, first, _)) = extents.iter().find(|(logical, _, _)| *logical == 0) else {
        return Ok(0);
    };
    let mut jsb = [0u8; 32];
    f.read_exact_at(&mut jsb, first * block)
        .at("read journal superblock of", path)?;
    let be = |o: usize| u32::from_be_bytes(jsb[o..o + 4].try_into().unwrap());
    // h_magic, h_blocktype (3 or 4: a v1 or v2 journal superblock), s_start (0: nothing to replay).
    if be(0) != JBD2_MAGIC || !matches!(be(4), 3 | 4) || be(28) != 0 {
        return Ok(0);
    }
    let mut punched = 0;
    for (logical, physical, len) in extents {
        let (physical, len) = if logical == 0 {
            (physical + 1, len - 1)
        } else {
            (physical, len)
        };
        if len == 0 {
            continue;
        }
        fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            physical * block,
            len * block,
            "punch the journal out of",
            path,
        )?;
        punched += len * block;
    }
    Ok(punched)
}

/// Bytes of the image's host file allocated within its journal (0 without a journal, or one
/// [`release_journal`] could not read): what a commit gives back, less the journal superblock.
pub fn journal_allocated(path: &Path) -> Result<u64> {
    use nix::unistd::{lseek, Whence};
    let (f, sb) = open_superblock(path, false)?;
    let Some(extents) = journal_extents(&sb) else {
        return Ok(0);
    };
    let block = block_size(&sb);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut allocated = 0;
    for (_, physical, len) in extents {
        let (start, end) = ((physical * block) as i64, ((physical + len) * block) as i64);
        let mut at = start;
        while at < end {
            // ENXIO: no data after `at`.
            let Ok(data) = lseek(fd, at, Whence::SeekData) else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = lseek(fd, data, Whence::SeekHole)
                .map_err(std::io::Error::from)
                .at("seek in", path)?;
            allocated += (hole.min(end) - data) as u64;
            at = hole;
        }
    }
    Ok(allocated)
}

/// The extents `(logical, physical, length)` in blocks of the internal journal of the filesystem
/// whose superblock is `sb`: `None` without a journal, or unless the superblock keeps a copy of
/// the journal inode's blocks holding a depth-0 extent tree whose extents add up to the
/// journal's size.
fn journal_extents(sb: &[u8]) -> Option<Vec<(u64, u64, u64)>> {
    let le16 = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let le32 = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap());
    // s_magic, s_feature_compat, s_journal_inum (8: internal), s_journal_dev (0),
    // s_jnl_backup_type (1: EXT3_JNL_BACKUP_BLOCKS).
    if le16(0x38) != 0xEF53
        || le32(0x5C) & COMPAT_HAS_JOURNAL == 0
        || le32(0xE0) != 8
        || le32(0xE4) != 0
        || sb[0xFD] != 1
    {
        return None;
    }
    let block = 1024u64 << le32(0x18);
    // s_jnl_blocks: the journal inode's i_block[15], then i_size_high and i_size.
    let blocks = 0x10C;
    let size = (u64::from(le32(blocks + 15 * 4)) << 32) | u64::from(le32(blocks + 16 * 4));
    // The extent header: magic, entries, max, depth.
    if le16(blocks) != 0xF30A || le16(blocks + 6) != 0 {
        return None;
    }
    let entries = usize::from(le16(blocks + 2));
    if entries == 0 || entries > 4 {
        return None;
    }
    let mut extents = Vec::with_capacity(entries);
    for i in 0..entries {
        let e = blocks + 12 + 12 * i;
        let logical = u64::from(le32(e));
        let len = u64::from(le16(e + 4));
        // Above 32768 an extent is unwritten, its length less that.
        let len = if len > 32768 { len - 32768 } else { len };
        let physical = (u64::from(le16(e + 6)) << 32) | u64::from(le32(e + 8));
        extents.push((logical, physical, len));
    }
    let total: u64 = extents.iter().map(|(_, _, len)| len).sum();
    (total * block == size && size > 0).then_some(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn allocated(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn volume_journals_scale_with_the_image() {
        assert_eq!(volume_journal_mib(64 << 20), None);
        assert_eq!(volume_journal_mib(128 << 20), Some(4));
        assert_eq!(volume_journal_mib(1 << 30), Some(32));
        assert_eq!(volume_journal_mib(2 << 30), Some(64));
        assert_eq!(volume_journal_mib(100 << 30), Some(64));
    }

    #[test]
    fn a_clean_journal_is_punched_out_but_its_superblock() {
        if cmd::which(&MKFS_EXT4).is_none() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("v.img");
        create_volume(&img, 256 << 20, 0, 0).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut sb = [0u8; 1024];
        f.read_exact_at(&mut sb, 1024).unwrap();
        let extents = journal_extents(&sb).expect("a journal in one readable extent");
        let (_, first, len) = extents[0];
        assert_eq!(len, 8 << 20 >> 12, "an 8 MiB journal in a 256 MiB image");
        // The journal is reserved in the host file from the start (unwritten extents, which
        // SEEK_DATA counts as holes: the file's blocks tell).
        assert!(
            allocated(&img) >= len * 4096,
            "the journal is reserved in the host file from the start: {} bytes allocated",
            allocated(&img)
        );
        // What a job leaves: the whole log written, the journal superblock clean.
        let used = vec![0x5au8; 4096];
        for b in 1..len {
            f.write_all_at(&used, (first + b) * 4096).unwrap();
        }
        f.sync_all().unwrap();
        let before = allocated(&img);
        assert_eq!(journal_allocated(&img).unwrap(), len * 4096);
        assert_eq!(release_journal(&img).unwrap(), (len - 1) * 4096);
        assert!(before - allocated(&img) >= (len - 1) * 4096);
        assert_eq!(journal_allocated(&img).unwrap(), 4096);
        let mut jsb = [0u8; 4];
        f.read_exact_at(&mut jsb, first * 4096).unwrap();
        assert_eq!(
            u32::from_be_bytes(jsb),
            JBD2_MAGIC,
            "the journal superblock stays"
        );
        assert!(is_clean(&img).unwrap());
        // e2fsck finds it clean and whole.
        let (code, out) =
            cmd::run_status(&E2FSCK, ["-f".as_ref(), "-n".as_ref(), img.as_os_str()]).unwrap();
        assert_eq!(code, 0, "{out}");
    }

    #[test]
    fn a_journal_to_replay_is_left_alone_and_not_clean() {
        if cmd::which(&MKFS_EXT4).is_none() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("v.img");
        create_volume(&img, 256 << 20, 0, 0).unwrap();
        assert!(is_clean(&img).unwrap());
        // What a crash leaves: needs_recovery set, s_state still valid.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 1024 + 0x60).unwrap();
        let incompat = u32::from_le_bytes(b) | INCOMPAT_RECOVER;
        f.write_all_at(&incompat.to_le_bytes(), 1024 + 0x60)
            .unwrap();
        assert!(!is_clean(&img).unwrap());
        assert_eq!(release_journal(&img).unwrap(), 0);
        // What a write error leaves behind a "clean" unmount: s_state valid, with the error bit.
        f.write_all_at(&(incompat & !INCOMPAT_RECOVER).to_le_bytes(), 1024 + 0x60)
            .unwrap();
        assert!(is_clean(&img).unwrap());
        f.write_all_at(&3u16.to_le_bytes(), 1024 + 0x3A).unwrap();
        assert!(!is_clean(&img).unwrap(), "an image with an error recorded");
    }

    #[test]
    fn images_without_a_journal_have_nothing_to_give_back() {
        if cmd::which(&MKFS_EXT4).is_none() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        for (name, size) in [("layer", 256u64 << 20), ("small", 64 << 20)] {
            let img = t.path().join(name);
            if name == "layer" {
                create(&img, size, 0, 0).unwrap();
            } else {
                create_volume(&img, size, 0, 0).unwrap();
            }
            assert!(is_clean(&img).unwrap());
            assert_eq!(release_journal(&img).unwrap(), 0, "{name}");
        }
    }
}
