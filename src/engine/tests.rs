//! The engine's decisions on the fake host (`crate::host::fake`): create and its rollback, the
//! outcome of every kind of delete, commit and its crash points, what `gc` repairs, squash's
//! publish, disk admission, and that refused requests leave no trace. No root needed; crashes
//! are injected at the same named steps the SIGKILL integration tests use (`fault::point`).

use super::*;
use crate::fault::{CRASH_IN_TEST, CRASH_PANIC};
use crate::host::fake::FakeHost;
use crate::state::layout::volume_id;
use crate::state::records::{CacheMode, VolumeState};
use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

const MI: u64 = 1 << 20;

struct Rig {
    _tmp: tempfile::TempDir,
    host: Arc<FakeHost>,
    engine: Engine,
    vols: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        Self::with_config(Config::default())
    }

    /// A rig whose layer mounts go with their last volume (`layer_keep_seconds = 0`), as the
    /// tests below expect; [`Rig::build`] keeps what `config` says.
    fn with_config(config: Config) -> Rig {
        Self::build(Config {
            layer_keep_seconds: 0,
            ..config
        })
    }

    fn build(config: Config) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let host = Arc::new(FakeHost::new(&root));
        let engine = Engine::open_on(&root.join("state"), config, host.clone()).unwrap();
        let vols = root.join("vols");
        std::fs::create_dir(&vols).unwrap();
        Rig {
            _tmp: tmp,
            host,
            engine,
            vols,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.vols.join(name)
    }

    fn request(&self, name: &str, cache: Option<&str>, write_back: bool) -> CreateRequest {
        CreateRequest {
            dir: self.dir(name),
            cache: cache.map(cid),
            size: Some(64 * MI),
            write_back,
            ..Default::default()
        }
    }

    fn create(&self, name: &str, cache: Option<&str>, write_back: bool) -> VolumeRecord {
        self.engine
            .volume_create(&self.request(name, cache, write_back))
            .unwrap()
    }

    fn delete(&self, name: &str) -> DeleteOutcome {
        self.engine.volume_delete(&self.dir(name), false).unwrap()
    }

    /// A write-back job on `cache` that writes `file` = `content` and is deleted.
    fn job(&self, name: &str, cache: &str, file: &str, content: &str) -> DeleteOutcome {
        self.create(name, Some(cache), true);
        std::fs::write(self.dir(name).join(file), content).unwrap();
        self.delete(name)
    }

    /// What a new volume of `cache` would read for `file`, through the layers top first.
    fn read(&self, cache: &str, file: &str) -> Option<String> {
        let id = cid(cache);
        let current = self.engine.current(&id).unwrap();
        current.layers.iter().rev().find_map(|l| {
            let image = self.engine.layout().layer_image(&id, &l.id);
            let tree = self.host.tree_of(&image).unwrap();
            std::fs::read_to_string(tree.join("upper").join(file)).ok()
        })
    }

    /// Every file under the state dir, relative (what "no trace" compares).
    fn state_files(&self) -> BTreeSet<PathBuf> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                out.insert(p.strip_prefix(root).unwrap().to_path_buf());
                if e.file_type().unwrap().is_dir() {
                    walk(root, &p, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(
            self.engine.layout().root(),
            self.engine.layout().root(),
            &mut out,
        );
        out
    }

    fn layer_files(&self, cache: &str) -> Vec<String> {
        let dir = self.engine.layout().layers_dir(&cid(cache));
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn cid(name: &str) -> CacheId {
    CacheId::new("ns", name).unwrap()
}

/// Runs `f` with a crash injected at `step` and checks that it crashed there.
fn crash_at<T>(step: &str, f: impl FnOnce() -> T) {
    CRASH_IN_TEST.with(|c| *c.borrow_mut() = Some(step.to_string()));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    CRASH_IN_TEST.with(|c| *c.borrow_mut() = None);
    let payload = r.err().unwrap_or_else(|| panic!("did not reach {step}"));
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert_eq!(msg, format!("{CRASH_PANIC}{step}"));
}

fn committed(generation: u64) -> DeleteOutcome {
    DeleteOutcome::Committed {
        generation,
        squashed: false,
        scope: None,
    }
}

// ---- create -------------------------------------------------------------------------------

#[test]
fn create_mounts_the_upper_and_the_overlay_and_records_ready() {
    let r = Rig::new();
    let rec = r.create("a", Some("c"), false);
    assert_eq!(rec.state, VolumeState::Ready);
    let upper = r.engine.layout().upper_mount(&rec.id);
    assert_eq!(r.host.mount_points(), vec![upper, r.dir("a")]);
    let table = r.host.mount_table().unwrap();
    assert!(table[1]
        .super_options
        .contains(&format!("lowerdir={}", r.engine.layout().empty().display())));
}

#[test]
fn a_warm_volume_reads_the_generation_it_was_created_on() {
    let r = Rig::new();
    assert_eq!(r.job("a", "c", "dep.jar", "v1"), committed(1));
    let rec = r.create("b", Some("c"), false);
    assert_eq!(rec.generation, 1);
    assert_eq!(rec.layers.len(), 1);
    let layer_mount = r.engine.layout().layer_mount(&cid("c"), &rec.layers[0]);
    assert!(
        r.host.is_mounted(&layer_mount),
        "the layer is mounted once, shared"
    );
}

#[test]
fn repeating_the_same_create_does_nothing_twice() {
    let r = Rig::new();
    let first = r.create("a", Some("c"), true);
    let calls = r.host.calls().len();
    let again = r.create("a", Some("c"), true);
    assert_eq!(first, again);
    assert_eq!(r.host.calls().len(), calls, "no host step repeated");
}

#[test]
fn a_different_create_on_the_same_dir_conflicts() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    let e = r
        .engine
        .volume_create(&r.request("a", Some("c"), false))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
}

#[test]
fn create_after_a_reboot_remounts_the_same_volume() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    std::fs::write(r.dir("a").join("kept"), "x").unwrap();
    r.host.reboot();
    r.create("a", Some("c"), true);
    assert!(r.host.is_mounted(&r.dir("a")));
    assert_eq!(
        std::fs::read_to_string(r.dir("a").join("kept")).unwrap(),
        "x"
    );
    assert!(r.host.calls().iter().any(|c| c.starts_with("check_image")));
}

#[test]
fn write_back_without_a_cache_is_refused() {
    let r = Rig::new();
    let e = r
        .engine
        .volume_create(&r.request("a", None, true))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(
        e.to_string(),
        "--write-back needs a cache: add --cache NAME"
    );
}

#[test]
fn refused_dirs_leave_no_trace() {
    let r = Rig::new();
    let before = r.state_files();
    std::fs::write(r.dir("file"), "x").unwrap();
    std::fs::create_dir(r.dir("full")).unwrap();
    std::fs::write(r.dir("full").join("f"), "x").unwrap();
    for name in ["file", "full"] {
        let e = r
            .engine
            .volume_create(&r.request(name, Some("c"), true))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    let e = r
        .engine
        .volume_create(&CreateRequest {
            cache_size: Some(MI),
            ..r.request("small", Some("c"), true)
        })
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cache size 1.0 MiB is below the minimum"),
        "{e}"
    );
    assert_eq!(r.state_files(), before, "no lock, record or cache dir left");
    assert!(r.host.mount_points().is_empty());
}

#[test]
fn failed_steps_of_create_are_rolled_back() {
    for (op, needle) in [
        ("make_image", "upper.img"),
        ("mount_image", "upper.img"),
        ("mount_overlay", "vols"),
    ] {
        let r = Rig::new();
        r.job("w", "c", "f", "1");
        let before = r.state_files();
        r.host.fail_on(op, needle);
        let e = r
            .engine
            .volume_create(&r.request("a", Some("c"), true))
            .unwrap_err();
        assert!(e.to_string().contains("injected"), "{op}: {e}");
        assert!(
            r.host.mount_points().is_empty(),
            "{op}: {:?}",
            r.host.mount_points()
        );
        assert!(r.engine.volume_records().unwrap().is_empty(), "{op}");
        assert!(!r.dir("a").exists(), "{op}: the DIR it made is gone");
        let after: BTreeSet<_> = r
            .state_files()
            .into_iter()
            .filter(|p| !p.starts_with("locks") && !p.starts_with("mnt"))
            .collect();
        let before: BTreeSet<_> = before
            .into_iter()
            .filter(|p| !p.starts_with("locks") && !p.starts_with("mnt"))
            .collect();
        assert_eq!(after, before, "{op}");
        r.host.heal();
        r.create("a", Some("c"), true);
    }
}

#[test]
fn a_layer_that_cannot_be_mounted_fails_the_create_cleanly() {
    let r = Rig::new();
    r.job("w", "c", "f", "1");
    r.host.fail_on("mount_image", "layers/");
    assert!(r
        .engine
        .volume_create(&r.request("a", Some("c"), false))
        .is_err());
    assert!(r.engine.volume_records().unwrap().is_empty());
    assert!(r.host.mount_points().is_empty());
}

// ---- delete -------------------------------------------------------------------------------

#[test]
fn deleting_a_plain_volume_discards_it_and_leaves_nothing() {
    let r = Rig::new();
    r.create("a", None, false);
    std::fs::write(r.dir("a").join("f"), "x").unwrap();
    assert_eq!(r.delete("a"), DeleteOutcome::Discarded);
    assert!(r.host.mount_points().is_empty());
    assert!(r.engine.volume_records().unwrap().is_empty());
    assert!(!r.dir("a").exists());
}

#[test]
fn a_write_back_volume_commits_its_changes() {
    let r = Rig::new();
    assert_eq!(r.job("a", "c", "dep.jar", "good"), committed(1));
    assert_eq!(r.read("c", "dep.jar").as_deref(), Some("good"));
    assert_eq!(r.job("b", "c", "dep.jar", "newer"), committed(2));
    assert_eq!(r.read("c", "dep.jar").as_deref(), Some("newer"));
    assert_eq!(r.engine.current(&cid("c")).unwrap().layers.len(), 2);
    assert!(
        r.host.mount_points().is_empty(),
        "layer mounts go with the last volume"
    );
}

#[test]
fn a_volume_that_is_not_write_back_never_reaches_the_cache() {
    let r = Rig::new();
    r.create("a", Some("c"), false);
    std::fs::write(r.dir("a").join("poison"), "x").unwrap();
    assert_eq!(r.delete("a"), DeleteOutcome::Discarded);
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 0);
}

#[test]
fn discard_overrides_write_back() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    std::fs::write(r.dir("a").join("f"), "x").unwrap();
    assert_eq!(
        r.engine.volume_delete(&r.dir("a"), true).unwrap(),
        DeleteOutcome::Discarded
    );
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 0);
    assert!(r.layer_files("c").is_empty());
}

#[test]
fn an_unchanged_write_back_volume_publishes_nothing() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    assert_eq!(r.delete("a"), DeleteOutcome::Unchanged);
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 0);
}

#[test]
fn a_second_delete_finds_nothing() {
    let r = Rig::new();
    r.job("a", "c", "f", "1");
    assert_eq!(r.delete("a"), DeleteOutcome::NotFound);
}

#[test]
fn a_busy_volume_is_not_committed_half_written() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    std::fs::write(r.dir("a").join("f"), "x").unwrap();
    r.host.fail_on("unmount", "vols");
    assert!(r.engine.volume_delete(&r.dir("a"), false).is_err());
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 0);
    r.host.heal();
    assert_eq!(r.delete("a"), committed(1), "the retried delete commits");
}

#[test]
fn after_a_reboot_a_dirty_write_back_volume_is_not_committed_and_says_why() {
    let r = Rig::new();
    let rec = r.create("a", Some("c"), true);
    std::fs::write(r.dir("a").join("f"), "x").unwrap();
    r.host.reboot();
    r.host.mark_dirty(&r.engine.layout().volume_image(&rec.id));
    let DeleteOutcome::NotCommitted { reason } = r.delete("a") else {
        panic!("expected not-committed");
    };
    assert!(reason.contains("not cleanly unmounted"), "{reason}");
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 0);
    let json = serde_json::to_value(DeleteOutcome::NotCommitted { reason }).unwrap();
    assert_eq!(json["outcome"], "discarded");
}

#[test]
fn after_a_reboot_a_clean_write_back_volume_still_commits() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    std::fs::write(r.dir("a").join("f"), "x").unwrap();
    r.host.reboot();
    assert_eq!(r.delete("a"), committed(1));
    assert_eq!(r.read("c", "f").as_deref(), Some("x"));
}

// ---- crashes ------------------------------------------------------------------------------

#[test]
fn a_create_crashed_at_any_step_is_rolled_back_by_gc() {
    for step in [
        "create:recorded",
        "create:image-made",
        "create:upper-mounted",
        "create:mounted",
    ] {
        let r = Rig::new();
        r.job("w", "c", "f", "1");
        crash_at(step, || r.create("a", Some("c"), true));
        let report = r.engine.gc(false).unwrap();
        assert_eq!(report.rolled_back, vec![r.dir("a")], "{step}");
        assert!(r.engine.volume_records().unwrap().is_empty(), "{step}");
        assert!(
            r.host.mount_points().is_empty(),
            "{step}: {:?}",
            r.host.mount_points()
        );
        assert!(!r
            .engine
            .layout()
            .volume_image(&volume_id(&r.dir("a")))
            .exists());
    }
}

#[test]
fn a_create_crashed_half_way_is_finished_by_its_retry() {
    let r = Rig::new();
    crash_at("create:upper-mounted", || r.create("a", Some("c"), true));
    let rec = r.create("a", Some("c"), true);
    assert_eq!(rec.state, VolumeState::Ready);
    assert_eq!(r.host.mount_points().len(), 2);
}

#[test]
fn a_delete_crashed_at_any_step_commits_exactly_once_on_retry() {
    for step in [
        "delete:marked",
        "delete:overlay-unmounted",
        "delete:upper-unmounted",
        "commit:renamed",
        "commit:published",
        "delete:committed",
    ] {
        let r = Rig::new();
        r.create("a", Some("c"), true);
        std::fs::write(r.dir("a").join("dep.jar"), "good").unwrap();
        crash_at(step, || r.delete("a"));
        assert_eq!(r.delete("a"), committed(1), "{step}");
        let current = r.engine.current(&cid("c")).unwrap();
        assert_eq!(current.layers.len(), 1, "{step}: one layer, not two");
        assert_eq!(r.read("c", "dep.jar").as_deref(), Some("good"), "{step}");
        assert_eq!(r.layer_files("c").len(), 1, "{step}: no orphan layer");
        assert!(r.engine.volume_records().unwrap().is_empty(), "{step}");
    }
}

#[test]
fn gc_finishes_a_crashed_delete() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    std::fs::write(r.dir("a").join("f"), "x").unwrap();
    crash_at("delete:upper-unmounted", || r.delete("a"));
    let report = r.engine.gc(false).unwrap();
    assert_eq!(report.deletes_finished, vec![r.dir("a")]);
    assert_eq!(r.read("c", "f").as_deref(), Some("x"));
    assert!(r.host.mount_points().is_empty());
}

#[test]
fn a_discard_crashed_midway_never_reaches_the_cache() {
    let r = Rig::new();
    r.create("a", Some("c"), true);
    std::fs::write(r.dir("a").join("f"), "x").unwrap();
    crash_at("delete:overlay-unmounted", || {
        r.engine.volume_delete(&r.dir("a"), true).unwrap()
    });
    // The retry does not ask to discard: the first decision stands.
    assert_eq!(r.delete("a"), DeleteOutcome::Discarded);
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 0);
}

// ---- gc -----------------------------------------------------------------------------------

#[test]
fn gc_remounts_ready_volumes_after_a_reboot() {
    let r = Rig::new();
    r.job("w", "c", "f", "1");
    r.create("a", Some("c"), false);
    r.host.reboot();
    let report = r.engine.gc(false).unwrap();
    assert_eq!(report.remounted, vec![r.dir("a")]);
    assert!(r.host.is_mounted(&r.dir("a")));
}

#[test]
fn gc_keeps_layers_live_volumes_use_and_removes_the_rest() {
    let r = Rig::with_config(Config {
        keep_generations: 1,
        ..Config::default()
    });
    r.job("w1", "c", "f", "1");
    let pinned = r.create("reader", Some("c"), false);
    r.job("w2", "c", "f", "2");
    assert_eq!(
        r.engine.squash(&cid("c")).unwrap().generation(),
        Some(3),
        "two layers squashed into one base"
    );
    assert_eq!(r.read("c", "f").as_deref(), Some("2"));
    let old = format!("{}.img", pinned.layers[0]);
    assert!(
        r.layer_files("c").contains(&old),
        "still used by the reader"
    );
    r.engine.gc(false).unwrap();
    assert!(r.layer_files("c").contains(&old));
    r.delete("reader");
    assert_eq!(r.layer_files("c").len(), 1, "{:?}", r.layer_files("c"));
    assert!(!r.layer_files("c").contains(&old));
}

#[test]
fn gc_removes_an_orphan_layer_file_but_never_a_published_one() {
    let r = Rig::new();
    r.job("w", "c", "f", "1");
    let orphan = r.engine.layout().layer_image(&cid("c"), "orphan");
    std::fs::write(&orphan, "").unwrap();
    let report = r.engine.gc(false).unwrap();
    assert_eq!(report.layers_removed, vec!["ns/c/orphan".to_string()]);
    assert_eq!(r.layer_files("c").len(), 1);
    assert_eq!(r.read("c", "f").as_deref(), Some("1"));
}

#[test]
fn gc_unmounts_an_overlay_whose_volume_has_no_record() {
    let r = Rig::new();
    let rec = r.create("a", None, false);
    std::fs::remove_file(r.engine.layout().volume_record(&rec.id)).unwrap();
    let report = r.engine.gc(false).unwrap();
    assert!(report.mounts_removed.contains(&r.dir("a")), "{report:?}");
    assert!(
        r.host.mount_points().is_empty(),
        "{:?}",
        r.host.mount_points()
    );
}

#[test]
fn gc_on_a_clean_node_changes_nothing() {
    let r = Rig::new();
    r.job("w", "c", "f", "1");
    r.create("a", Some("c"), false);
    let report = r.engine.gc(true).unwrap();
    assert!(report.is_empty(), "{report:?}");
}

// ---- squash ---------------------------------------------------------------------------------

#[test]
fn squash_of_a_single_layer_has_nothing_to_do() {
    let r = Rig::new();
    r.job("w", "c", "f", "1");
    assert_eq!(
        r.engine.squash(&cid("c")).unwrap(),
        SquashOutcome::NothingToDo
    );
}

#[test]
fn squash_of_a_missing_cache_is_refused_without_a_trace() {
    let r = Rig::new();
    let before = r.state_files();
    let e = r.engine.squash(&cid("nope")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(r.state_files(), before);
}

#[test]
fn a_commit_past_the_depth_queues_a_squash_when_not_inline() {
    let r = Rig::with_config(Config {
        max_depth: 2,
        squash_inline: false,
        ..Config::default()
    });
    for (i, v) in ["a", "b", "c"].iter().enumerate() {
        r.job(v, "k", "f", &i.to_string());
    }
    assert!(r.engine.layout().squash_due(&cid("k")).exists());
    let report = r.engine.gc(true).unwrap();
    assert_eq!(report.squashed, vec!["ns/k".to_string()]);
    assert_eq!(r.engine.current(&cid("k")).unwrap().layers.len(), 1);
    assert_eq!(r.read("k", "f").as_deref(), Some("2"));
}

#[test]
fn gc_drain_squashes_a_cache_left_idle_and_leaves_a_busy_one() {
    let r = Rig::new();
    for c in ["idle", "busy"] {
        r.job("a", c, "f", "1");
        r.job("b", c, "g", "2");
    }
    // The idle cache's last create was squash_idle_seconds ago; the busy one's just now.
    let old = std::time::SystemTime::now()
        - std::time::Duration::from_secs(Config::default().squash_idle_seconds + 5);
    std::fs::File::options()
        .write(true)
        .open(r.engine.layout().last_used(&cid("idle")))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let report = r.engine.gc(true).unwrap();
    assert_eq!(report.squashed, vec!["ns/idle".to_string()]);
    assert_eq!(r.engine.current(&cid("idle")).unwrap().layers.len(), 1);
    assert_eq!(r.engine.current(&cid("busy")).unwrap().layers.len(), 2);
    assert_eq!(r.read("idle", "f").as_deref(), Some("1"));
    assert_eq!(r.read("idle", "g").as_deref(), Some("2"));
    // gc without --drain (the hook's cheap pass) never copies.
    std::fs::File::options()
        .write(true)
        .open(r.engine.layout().last_used(&cid("busy")))
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert!(r.engine.gc(false).unwrap().squashed.is_empty());
}

#[test]
fn a_crashed_squash_leaves_the_old_generation_and_gc_clears_its_scratch() {
    let r = Rig::new();
    r.job("a", "c", "f", "1");
    r.job("b", "c", "f", "2");
    crash_at("squash:copied", || r.engine.squash(&cid("c")));
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 2);
    r.engine.gc(false).unwrap();
    assert!(
        r.host.mount_points().is_empty(),
        "{:?}",
        r.host.mount_points()
    );
    assert!(std::fs::read_dir(r.engine.layout().cache_tmp(&cid("c")))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
    assert_eq!(r.read("c", "f").as_deref(), Some("2"));
}

// ---- disk admission ---------------------------------------------------------------------------

#[test]
fn creates_are_refused_once_the_disk_is_promised() {
    let r = Rig::with_config(Config {
        disk_reserve: Some(0),
        ..Config::default()
    });
    r.host.set_space(100 * MI, 1000 * MI);
    r.create("a", Some("c"), true); // 64 Mi promised
    let before = r.state_files();
    let e = r
        .engine
        .volume_create(&r.request("b", Some("c"), true))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Quota);
    assert!(
        e.to_string().starts_with("volume of 64.0 MiB refused"),
        "{e}"
    );
    assert_eq!(r.state_files(), before, "nothing made for a refused create");
    // Deleting the first gives its promise back.
    r.delete("a");
    r.create("b", Some("c"), true);
}

#[test]
fn overcommit_lets_operators_promise_more() {
    let r = Rig::with_config(Config {
        disk_reserve: Some(0),
        overcommit_percent: 200,
        ..Config::default()
    });
    r.host.set_space(100 * MI, 1000 * MI);
    r.create("a", None, false);
    r.create("b", None, false);
    let budget = r.engine.disk_budget().unwrap();
    assert_eq!(budget.promised, 128 * MI);
    assert_eq!(budget.volumes, 2);
}

// ---- clone mode -----------------------------------------------------------------------------

impl Rig {
    fn clone_request(&self, name: &str, cache: &str, write_back: bool) -> CreateRequest {
        CreateRequest {
            dir: self.dir(name),
            cache: Some(cid(cache)),
            size: None,
            write_back,
            cache_size: Some(64 * MI),
            cache_mode: Some(CacheMode::Clone),
            ..Default::default()
        }
    }

    fn clone_job(&self, name: &str, cache: &str, file: &str, content: &str) -> DeleteOutcome {
        self.engine
            .volume_create(&self.clone_request(name, cache, true))
            .unwrap();
        std::fs::write(self.dir(name).join(file), content).unwrap();
        self.delete(name)
    }
}

#[test]
fn a_clone_volume_is_its_generation_mounted_directly_and_commits_by_rename() {
    for pool in [false, true] {
        let r = Rig::new();
        if pool {
            r.host.without_reflink();
        }
        assert_eq!(
            r.clone_job("a", "img", "layer.tar", "v1"),
            committed(1),
            "pool {pool}"
        );
        let rec = r
            .engine
            .volume_create(&r.clone_request("b", "img", false))
            .unwrap();
        assert_eq!(rec.kind, crate::state::records::VolumeKind::Clone);
        assert_eq!(rec.size, 64 * MI, "a clone is the cache's size");
        assert_eq!(
            std::fs::read_to_string(r.dir("b").join("layer.tar")).unwrap(),
            "v1"
        );
        let table = r.host.mount_table().unwrap();
        let at_dir = table.iter().find(|m| m.mount_point == r.dir("b")).unwrap();
        assert_eq!(at_dir.fstype, "ext4", "no overlay in a clone volume");
        assert_eq!(
            r.engine.clone_store_kind(),
            Some(if pool {
                CloneStoreKind::Pool
            } else {
                CloneStoreKind::Reflink
            })
        );
        assert_eq!(r.delete("b"), DeleteOutcome::Discarded);
        assert_eq!(r.engine.current(&cid("img")).unwrap().layers.len(), 1);
    }
}

#[test]
fn a_second_write_back_clone_runs_as_discard_while_the_lease_is_held() {
    let r = Rig::new();
    r.engine
        .volume_create(&r.clone_request("a", "img", true))
        .unwrap();
    let b = r
        .engine
        .volume_create(&r.clone_request("b", "img", true))
        .unwrap();
    assert!(!b.lease);
    assert!(
        b.note
            .as_deref()
            .unwrap()
            .contains("write lease of cache ns/img is held"),
        "{:?}",
        b.note
    );
    std::fs::write(r.dir("a").join("f"), "a").unwrap();
    std::fs::write(r.dir("b").join("f"), "b").unwrap();
    let DeleteOutcome::NotCommitted { reason } = r.delete("b") else {
        panic!("b must not commit");
    };
    assert!(reason.contains("runs as a discard volume"), "{reason}");
    assert_eq!(r.delete("a"), committed(1));
    // The lease is free again.
    let c = r
        .engine
        .volume_create(&r.clone_request("c", "img", true))
        .unwrap();
    assert!(c.lease);
    assert_eq!(std::fs::read_to_string(r.dir("c").join("f")).unwrap(), "a");
}

#[test]
fn last_writer_wins_commits_both_and_counts_what_was_superseded() {
    let r = Rig::with_config(Config {
        clone_writers: crate::input::config::CloneWriters::LastWriterWins,
        ..Config::default()
    });
    r.engine
        .volume_create(&r.clone_request("a", "img", true))
        .unwrap();
    r.engine
        .volume_create(&r.clone_request("b", "img", true))
        .unwrap();
    std::fs::write(r.dir("a").join("f"), "a").unwrap();
    std::fs::write(r.dir("b").join("f"), "b").unwrap();
    assert_eq!(r.delete("a"), committed(1));
    assert_eq!(r.delete("b"), committed(2));
    let stats = crate::state::stats::read(r.engine.layout());
    assert_eq!(
        stats.get(crate::state::stats::names::CLONE_SUPERSEDED),
        Some(&1)
    );
}

#[test]
fn a_request_for_another_mode_than_the_caches_is_refused_with_the_way_out() {
    let r = Rig::new();
    r.job("a", "c", "f", "1");
    let e = r
        .engine
        .volume_create(&r.clone_request("b", "c", false))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(
        e.to_string(),
        "cache ns/c has cache mode overlay, but the request asks for clone: a cache's mode is fixed when it is created. \
         Ask for overlay (or no mode), use another cache name, or remove the cache (`jobcachefs cache rm c --namespace ns`) and create it again as clone"
    );
}

#[test]
fn a_clone_larger_than_its_cache_is_refused_with_both_sizes() {
    let r = Rig::new();
    let e = r
        .engine
        .volume_create(&CreateRequest {
            size: Some(128 * MI),
            ..r.clone_request("a", "img", false)
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Quota);
    assert!(
        e.to_string()
            .contains("128.0 MiB asked, but the cache-size is 64.0 MiB"),
        "{e}"
    );
}

#[test]
fn a_clone_commit_crashed_at_any_step_publishes_exactly_once() {
    for step in [
        "clone-delete:unmounted",
        "clone-commit:renamed",
        "clone-commit:published",
        "delete:committed",
    ] {
        let r = Rig::new();
        r.engine
            .volume_create(&r.clone_request("a", "img", true))
            .unwrap();
        std::fs::write(r.dir("a").join("f"), "x").unwrap();
        crash_at(step, || r.delete("a"));
        r.engine.gc(false).unwrap();
        let current = r.engine.current(&cid("img")).unwrap();
        assert_eq!(current.generation, 1, "{step}");
        assert!(r.engine.volume_records().unwrap().is_empty(), "{step}");
        assert!(
            !r.engine.layout().lease(&cid("img")).exists(),
            "{step}: lease released"
        );
        let c = r
            .engine
            .volume_create(&r.clone_request("c", "img", false))
            .unwrap();
        assert_eq!(c.generation, 1);
        assert_eq!(
            std::fs::read_to_string(r.dir("c").join("f")).unwrap(),
            "x",
            "{step}"
        );
    }
}

#[test]
fn a_clone_create_crashed_is_rolled_back_and_its_lease_freed() {
    for step in ["clone:cloned", "clone:mounted"] {
        let r = Rig::new();
        crash_at(step, || {
            r.engine.volume_create(&r.clone_request("a", "img", true))
        });
        let report = r.engine.gc(false).unwrap();
        assert_eq!(report.rolled_back, vec![r.dir("a")], "{step}");
        assert!(
            r.host
                .mount_points()
                .iter()
                .all(|m| !m.starts_with(&r.vols)),
            "{step}"
        );
        let b = r
            .engine
            .volume_create(&r.clone_request("b", "img", true))
            .unwrap();
        assert!(b.lease, "{step}: the crashed volume's lease is free");
    }
}

// ---- history and rollback -------------------------------------------------------------------

#[test]
fn history_names_what_produced_each_generation_and_rollback_restores_one() {
    let r = Rig::new();
    r.job("job-a", "c", "dep.jar", "good");
    r.job("job-b", "c", "dep.jar", "poison");
    let h = r.engine.cache_history(&cid("c"), None).unwrap();
    assert_eq!(
        h.iter().map(|e| e.generation).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(h[0].kind, "commit");
    assert_eq!(h[0].source, r.dir("job-b").display().to_string());
    assert_eq!(h[1].source, r.dir("job-a").display().to_string());
    assert_eq!(h[0].layers_added.len(), 1);
    assert!(h[0].current && h[1].restorable);
    let g = r.engine.cache_rollback(&cid("c"), 1).unwrap();
    assert_eq!(g.generation, 3);
    assert_eq!(r.read("c", "dep.jar").as_deref(), Some("good"));
    let h = r.engine.cache_history(&cid("c"), Some(1)).unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(
        (h[0].kind.as_str(), h[0].source.as_str()),
        ("rollback", "generation 1")
    );
    // The undone layer stays while the generation that had it is among the kept ones.
    r.engine.gc(false).unwrap();
    assert_eq!(r.layer_files("c").len(), 2);
}

#[test]
fn only_the_kept_generations_can_be_rolled_back_to() {
    let r = Rig::with_config(Config {
        keep_generations: 2,
        ..Config::default()
    });
    for (i, v) in ["a", "b", "c"].iter().enumerate() {
        r.job(v, "k", &format!("f{i}"), "x");
    }
    r.engine.squash(&cid("k")).unwrap(); // generation 4: one base
    r.job("d", "k", "f3", "x"); // generation 5: base + d
    r.engine.squash(&cid("k")).unwrap(); // generation 6: a new base
    r.engine.gc(false).unwrap();
    // Kept: 6 and 5. Generation 3's layers (a, b, c) are gone; 5's (base of 4, d) are not.
    let e = r.engine.cache_rollback(&cid("k"), 3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("can no longer be restored"), "{e}");
    let h = r.engine.cache_history(&cid("k"), None).unwrap();
    let restorable: Vec<u64> = h
        .iter()
        .filter(|e| e.restorable)
        .map(|e| e.generation)
        .collect();
    assert_eq!(restorable, vec![6, 5, 4]);
    r.engine.cache_rollback(&cid("k"), 5).unwrap();
    assert_eq!(r.read("k", "f3").as_deref(), Some("x"));
    let e = r.engine.cache_rollback(&cid("k"), 99).unwrap_err();
    assert!(e.to_string().contains("has no generation 99"), "{e}");
}

#[test]
fn a_publish_crashed_between_history_and_current_leaves_the_old_generation() {
    let r = Rig::new();
    r.job("a", "c", "f", "1");
    r.create("b", Some("c"), true);
    std::fs::write(r.dir("b").join("f"), "2").unwrap();
    crash_at("publish:history-written", || r.delete("b"));
    assert_eq!(r.engine.current(&cid("c")).unwrap().generation, 1);
    let h = r.engine.cache_history(&cid("c"), None).unwrap();
    assert_eq!(h.len(), 1, "the void entry is not shown");
    assert_eq!(r.delete("b"), committed(2), "the retry publishes over it");
    assert_eq!(r.engine.cache_history(&cid("c"), None).unwrap().len(), 2);
    assert_eq!(r.read("c", "f").as_deref(), Some("2"));
}

#[test]
fn squash_and_clone_commits_are_in_the_history_too() {
    let r = Rig::new();
    r.job("a", "c", "f", "1");
    r.job("b", "c", "f", "2");
    r.engine.squash(&cid("c")).unwrap();
    let h = r.engine.cache_history(&cid("c"), None).unwrap();
    assert_eq!(
        (h[0].kind.as_str(), h[0].source.as_str()),
        ("squash", "generation 2")
    );
    r.clone_job("x", "img", "f", "1");
    let h = r.engine.cache_history(&cid("img"), None).unwrap();
    assert_eq!(h[0].kind, "commit");
    assert_eq!(h[0].details.get("volume").map(|v| v.len()), Some(20));
}

// ---- damaged state ----------------------------------------------------------------------------

#[test]
fn a_damaged_volume_record_stops_no_other_volume_and_gc_removes_nothing_it_could_pin() {
    let r = Rig::with_config(Config {
        keep_generations: 1,
        ..Config::default()
    });
    r.job("w1", "c", "f", "1");
    let pinned = r.create("reader", Some("c"), false);
    r.job("w2", "c", "f", "2");
    r.engine.squash(&cid("c")).unwrap();
    std::fs::write(
        r.engine.layout().volume_record(&pinned.id),
        b"{\"id\": \"trunc",
    )
    .unwrap();
    // Other volumes keep working.
    r.create("other", Some("d"), false);
    assert_eq!(r.delete("other"), DeleteOutcome::Discarded);
    // gc reports the damage and removes no layer of the cache the record could pin.
    let before = r.layer_files("c");
    let report = r.engine.gc(false).unwrap();
    assert!(
        report.errors.iter().any(|e| e.contains("cannot be read")),
        "{report:?}"
    );
    assert_eq!(r.layer_files("c"), before);
    let damaged = r.engine.damaged_records().unwrap();
    assert_eq!(damaged.len(), 1);
    assert!(damaged[0].1.contains("is damaged"), "{}", damaged[0].1);
}

#[test]
fn a_state_dir_of_a_newer_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("format"), "99\n").unwrap();
    let host = Arc::new(FakeHost::new(tmp.path()));
    let e = Engine::open_on(&state, Config::default(), host).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.to_string()
            .contains("written by a newer jobcachefs (format 99"),
        "{e}"
    );
}

// ---- identities -------------------------------------------------------------------------------

#[test]
fn unique_ids_give_each_live_volume_its_uid_and_each_cache_its_gid() {
    let r = Rig::new();
    let req = |name: &str, cache: &str| CreateRequest {
        unique_ids: true,
        ..r.request(name, Some(cache), true)
    };
    let a = r.engine.volume_create(&req("a", "maven")).unwrap();
    let b = r.engine.volume_create(&req("b", "maven")).unwrap();
    let c = r.engine.volume_create(&req("c", "npm")).unwrap();
    let (ia, ib, ic) = (
        a.identity.unwrap(),
        b.identity.unwrap(),
        c.identity.unwrap(),
    );
    assert_eq!((ia.uid, ib.uid, ic.uid), (2_000_000, 2_000_001, 2_000_002));
    assert_eq!(ia.gid, ib.gid, "one cache, one GID");
    assert_ne!(ia.gid, ic.gid);
    assert_eq!(a.root.unwrap().mode, 0o2700);
    assert_eq!((a.root.unwrap().uid, a.root.unwrap().gid), (ia.uid, ia.gid));
    r.delete("a");
    let d = r.engine.volume_create(&req("d", "maven")).unwrap();
    assert_eq!(
        d.identity.unwrap().uid,
        ia.uid,
        "a deleted volume's UID is free again"
    );
    assert_eq!(d.identity.unwrap().gid, ia.gid, "the cache keeps its GID");
    // The repeated create is the same volume, not a new identity.
    assert_eq!(r.engine.volume_create(&req("d", "maven")).unwrap(), d);
}

#[test]
fn a_crash_during_create_neither_loses_nor_duplicates_a_uid() {
    let r = Rig::new();
    let req = |name: &str| CreateRequest {
        unique_ids: true,
        ..r.request(name, Some("c"), false)
    };
    crash_at("create:recorded", || r.engine.volume_create(&req("a")));
    let b = r.engine.volume_create(&req("b")).unwrap();
    assert_eq!(
        b.identity.unwrap().uid,
        2_000_001,
        "the crashed create's UID is still held"
    );
    r.engine.gc(false).unwrap();
    let c = r.engine.volume_create(&req("c")).unwrap();
    assert_eq!(
        c.identity.unwrap().uid,
        2_000_000,
        "gc rolled it back: free again"
    );
}

#[test]
fn a_cache_gid_given_by_the_cluster_is_kept_by_the_cache() {
    let r = Rig::new();
    let v = r
        .engine
        .volume_create(&CreateRequest {
            unique_ids: true,
            cache_gid: Some(3_000_042),
            ..r.request("a", Some("c"), false)
        })
        .unwrap();
    assert_eq!(v.identity.unwrap().gid, 3_000_042);
    assert_eq!(
        r.engine.cache_record(&cid("c")).unwrap().unwrap().gid,
        Some(3_000_042)
    );
}

#[test]
fn a_rollback_crashed_at_any_step_leaves_the_old_or_the_new_generation() {
    for step in ["publish:history-written", "rollback:published"] {
        let r = Rig::new();
        r.job("a", "c", "dep.jar", "good");
        r.job("b", "c", "dep.jar", "poison");
        crash_at(step, || r.engine.cache_rollback(&cid("c"), 1));
        let g = r.engine.current(&cid("c")).unwrap().generation;
        let seen = r.read("c", "dep.jar").unwrap();
        assert!(
            (g == 2 && seen == "poison") || (g == 3 && seen == "good"),
            "{step}: generation {g} reads {seen}"
        );
        if g == 2 {
            r.engine.cache_rollback(&cid("c"), 1).unwrap();
        }
        assert_eq!(r.read("c", "dep.jar").as_deref(), Some("good"), "{step}");
        let h = r.engine.cache_history(&cid("c"), None).unwrap();
        assert_eq!(
            h.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            ["rollback", "commit", "commit"],
            "{step}"
        );
    }
}

#[test]
fn a_rollback_records_what_it_undid_and_later_publishes_carry_it() {
    let r = Rig::new();
    r.job("a", "c", "dep.jar", "good");
    r.job("b", "c", "dep.jar", "poison");
    let poison = r.engine.current(&cid("c")).unwrap().layers[1].id.clone();
    let g = r.engine.cache_rollback(&cid("c"), 1).unwrap();
    assert_eq!(g.undone, vec![poison.clone()]);
    r.job("d", "c", "other", "x");
    assert_eq!(r.engine.current(&cid("c")).unwrap().undone, vec![poison]);
}

#[test]
fn layer_mounts_stay_a_while_after_their_last_volume() {
    let r = Rig::build(Config {
        layer_keep_seconds: 600,
        ..Config::default()
    });
    assert_eq!(r.job("a", "c", "dep.jar", "good"), committed(1));
    r.create("b", Some("c"), false);
    r.delete("b");
    assert_eq!(
        r.host.mount_points().len(),
        1,
        "the current layer stays mounted after its last volume"
    );
    let attaches = |r: &Rig| {
        r.host
            .calls()
            .iter()
            .filter(|c| c.starts_with("mount_image") && c.contains("/layers/"))
            .count()
    };
    let before = attaches(&r);
    r.create("c", Some("c"), false);
    assert_eq!(attaches(&r), before, "the next create finds it mounted");
    assert_eq!(r.read("c", "dep.jar").as_deref(), Some("good"));
    r.delete("c");
    r.engine.gc(false).unwrap();
    assert_eq!(r.host.mount_points().len(), 1, "gc keeps it while recent");

    // Once the cache's last create is older than the keep, the next gc releases it.
    let last_used = r.engine.layout().last_used(&cid("c"));
    let old = nix::sys::time::TimeSpec::new(1_000_000, 0);
    nix::sys::stat::utimensat(
        None,
        &last_used,
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    )
    .unwrap();
    r.engine.gc(false).unwrap();
    assert!(r.host.mount_points().is_empty(), "released after the keep");

    // A removed cache keeps nothing mounted.
    r.create("d", Some("c"), false);
    r.delete("d");
    assert_eq!(r.host.mount_points().len(), 1);
    r.engine.cache_rm(&cid("c")).unwrap();
    assert!(r.host.mount_points().is_empty(), "cache rm releases it");
}

#[test]
fn gc_removes_what_a_dead_process_left_written_aside_in_the_state_root() {
    let r = Rig::new();
    let root = r.engine.layout().root().to_path_buf();
    std::fs::write(root.join("format.tmp-999999999"), "1\n").unwrap();
    let mine = root.join(format!("ballast.tmp-{}", std::process::id()));
    std::fs::write(&mine, "").unwrap();
    let report = r.engine.gc(false).unwrap();
    assert_eq!(report.tmp_removed, vec![root.join("format.tmp-999999999")]);
    assert!(mine.exists(), "a live process's file stays");
}
