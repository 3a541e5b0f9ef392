//! Disk admission: volume images are sparse, so a volume's size is promised, not used. A create
//! is admitted only while everything promised — every live volume's size not yet allocated, plus
//! the new one — fits the state dir's free space less a reserve (times the configured overcommit
//! factor, 1.0 by default). The reserve is what deletes and commits write into on a full disk.
//!
//! The arithmetic is pure ([`DiskBudget`]); [`Engine::disk_budget`] reads the records and the
//! filesystem. Creates take `locks/admission.lock` from the check until their record is written,
//! so two creates cannot both spend the same free bytes.

use super::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::input::quantity::human_bytes;
use crate::state::fsutil;
use crate::state::records::VolumeState;
use serde::Serialize;

/// What the state dir's filesystem has and has promised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskBudget {
    /// Bytes still free on the state dir's filesystem.
    pub free: u64,
    /// Bytes creates never promise away.
    pub reserve: u64,
    /// Bytes live volumes may still write (their sizes less what they already allocated).
    pub promised: u64,
    /// Live volumes counted in `promised`.
    pub volumes: usize,
    /// The overcommit factor in percent (100: none).
    pub overcommit_percent: u32,
}

/// The reserve when the config sets none: 5% of the filesystem, at most 1 GiB.
pub fn default_reserve(total: u64) -> u64 {
    (total / 20).min(1 << 30)
}

impl DiskBudget {
    /// Bytes that may be promised in all.
    pub fn promisable(&self) -> u64 {
        let base = self.free.saturating_sub(self.reserve) as u128;
        (base * self.overcommit_percent as u128 / 100).min(u64::MAX as u128) as u64
    }

    /// Whether `size` more bytes may be promised.
    pub fn admits(&self, size: u64) -> bool {
        self.promised.saturating_add(size) <= self.promisable()
    }

    /// The refusal of a volume of `size`, with the numbers and the fixes.
    pub fn refusal(&self, what: &str, size: u64, state_dir: &std::path::Path) -> Error {
        Error::new(
            ErrorKind::Quota,
            format!(
                "{what} of {} refused: the state dir {} has {} free, keeps {} in reserve, and {} live volume(s) may still write {}; \
                 {} more would promise more disk than there is (jobs would get I/O errors instead of ENOSPC). \
                 Ask for a smaller size, delete volumes, free space on that filesystem, or raise `overcommit` in the config if you accept the risk",
                human_bytes(size),
                state_dir.display(),
                human_bytes(self.free),
                human_bytes(self.reserve),
                self.volumes,
                human_bytes(self.promised),
                human_bytes(size),
            ),
        )
    }
}

impl Engine {
    /// The state dir's free space, reserve and promises, from the records and the filesystem.
    pub fn disk_budget(&self) -> Result<DiskBudget> {
        self.budget_of(&self.volume_records()?)
    }

    /// The budget given the node's volume records (read once by a create for this and its UID).
    fn budget_of(&self, records: &[crate::state::records::VolumeRecord]) -> Result<DiskBudget> {
        let (free, total) = self.host.fs_space(self.layout.root())?;
        let mut promised = 0u64;
        let mut volumes = 0;
        for r in records {
            if r.kind == crate::state::records::VolumeKind::Clone {
                // A clone shares its blocks at first, but may come to own all of them: it
                // promises its whole size, on the state dir or in the (sparse) pool image alike.
                promised = promised.saturating_add(r.size);
                volumes += 1;
                continue;
            }
            let image = self.layout.volume_image(&r.id);
            let allocated = match fsutil::allocated_bytes(&image) {
                Ok(a) => a,
                // Not made yet (a create in progress) or already committed (a delete): a create
                // in progress promises its whole size, a delete nothing more.
                Err(_) if r.state == VolumeState::Deleting => r.size,
                Err(_) => 0,
            };
            promised = promised.saturating_add(r.size.saturating_sub(allocated));
            volumes += 1;
        }
        Ok(DiskBudget {
            free,
            reserve: self.config.disk_reserve.unwrap_or(default_reserve(total)),
            promised,
            volumes,
            overcommit_percent: self.config.overcommit_percent,
        })
    }

    /// Admits a new volume of `size` and, with `unique_ids`, gives it a free UID (both from one
    /// reading of the records): the returned lock must be held until the volume's record, which
    /// makes both count, is written.
    pub(crate) fn admit(
        &self,
        size: u64,
        unique_ids: bool,
    ) -> Result<(crate::state::lock::Lock, Option<u32>)> {
        let lock = crate::state::lock::lock(&self.layout.admission_lock())?;
        let (records, damaged) = self.volume_records_checked()?;
        let budget = self.budget_of(&records)?;
        if !budget.admits(size) {
            crate::state::stats::add(
                &self.layout,
                &[(crate::state::stats::names::ADMISSION_REFUSALS, 1)],
            );
            return Err(budget.refusal("volume", size, self.layout.root()));
        }
        let uid = unique_ids
            .then(|| self.free_uid(&records, &damaged))
            .transpose()?;
        Ok((lock, uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(free: u64, reserve: u64, promised: u64, pct: u32) -> DiskBudget {
        DiskBudget {
            free,
            reserve,
            promised,
            volumes: 1,
            overcommit_percent: pct,
        }
    }

    #[test]
    fn never_promises_a_byte_twice_by_default() {
        let mi = 1u64 << 20;
        // The scenario: 1.2 GiB free, 512 Mi admitted, then 900 Mi must be refused.
        let b = budget(1229 * mi, 61 * mi, 0, 100);
        assert!(b.admits(512 * mi));
        let b = budget(1229 * mi, 61 * mi, 512 * mi, 100);
        assert!(!b.admits(900 * mi));
        assert!(b.admits(1229 * mi - 61 * mi - 512 * mi));
        assert!(!b.admits(1229 * mi - 61 * mi - 512 * mi + 1));
    }

    #[test]
    fn overcommit_multiplies_what_may_be_promised() {
        let b = budget(1000, 0, 1500, 200);
        assert_eq!(b.promisable(), 2000);
        assert!(b.admits(500));
        assert!(!b.admits(501));
    }

    #[test]
    fn a_disk_below_its_reserve_admits_nothing() {
        let b = budget(10, 100, 0, 100);
        assert_eq!(b.promisable(), 0);
        assert!(!b.admits(1));
        assert!(b.admits(0));
    }

    #[test]
    fn default_reserve_is_five_percent_at_most_one_gib() {
        assert_eq!(default_reserve(1000), 50);
        assert_eq!(default_reserve(1 << 40), 1 << 30);
    }

    #[test]
    fn refusal_names_the_numbers_and_the_fixes() {
        let mi = 1u64 << 20;
        let e = budget(1024 * mi, 64 * mi, 512 * mi, 100).refusal(
            "volume",
            900 * mi,
            std::path::Path::new("/var/lib/jobcachefs"),
        );
        assert_eq!(e.kind(), ErrorKind::Quota);
        assert_eq!(
            e.to_string(),
            "volume of 900.0 MiB refused: the state dir /var/lib/jobcachefs has 1.0 GiB free, keeps 64.0 MiB in reserve, and 1 live volume(s) may still write 512.0 MiB; \
             900.0 MiB more would promise more disk than there is (jobs would get I/O errors instead of ENOSPC). \
             Ask for a smaller size, delete volumes, free space on that filesystem, or raise `overcommit` in the config if you accept the risk"
        );
    }
}
