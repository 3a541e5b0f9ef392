//! Scopes and write-back on success (issue 27), on real loop devices, ext4 and overlayfs: a
//! scoped volume shows the cache's layers with the scope's on top, exactly as a model in this
//! file computes it over random sequences of cache and scope commits; commits land where they
//! belong under concurrency and SIGKILL; the success marker decides and never reaches a layer;
//! bad input changes nothing.

mod common;

use common::{root_or_skip, sh, Node, Rng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a path shows: a directory, or a file with its content and its `user.k` xattr.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shown {
    Dir,
    File(String, Option<String>),
}

/// A view: relative path → what it shows.
type Tree = BTreeMap<String, Shown>;

/// One entry of a layer in overlay upper format, as the model needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Dir,
    OpaqueDir,
    File(String, Option<String>),
    Whiteout,
}

type Delta = BTreeMap<String, Change>;

fn under(p: &str, q: &str) -> bool {
    q == p || q.starts_with(&format!("{p}/"))
}

fn remove_subtree<V>(map: &mut BTreeMap<String, V>, p: &str) {
    map.retain(|k, _| !under(p, k));
}

/// The view of `layers` (bottom first) with overlayfs's rules: a whiteout hides the path, an
/// opaque dir hides what was below it, a dir over a file replaces it, a file replaces the path.
fn view(layers: &[&Delta]) -> Tree {
    let mut t = Tree::new();
    for d in layers {
        for (p, c) in d.iter() {
            match c {
                Change::Whiteout => remove_subtree(&mut t, p),
                Change::OpaqueDir => {
                    remove_subtree(&mut t, p);
                    t.insert(p.clone(), Shown::Dir);
                }
                Change::Dir => {
                    if t.get(p) != Some(&Shown::Dir) {
                        remove_subtree(&mut t, p);
                        t.insert(p.clone(), Shown::Dir);
                    }
                }
                Change::File(s, x) => {
                    remove_subtree(&mut t, p);
                    t.insert(p.clone(), Shown::File(s.clone(), x.clone()));
                }
            }
        }
    }
    t
}

/// What the kernel shows at `dir`, in the model's terms.
fn actual(dir: &Path) -> Tree {
    common::snap(dir)
        .into_iter()
        .filter(|(p, _)| !p.starts_with("lost+found"))
        .map(|(p, e)| {
            let shown = match e.kind {
                'd' => Shown::Dir,
                'f' => Shown::File(
                    std::fs::read_to_string(dir.join(&p)).unwrap(),
                    e.xattrs
                        .get("user.k")
                        .map(|v| String::from_utf8_lossy(v).into_owned()),
                ),
                k => panic!("unexpected {k} at {}", p.display()),
            };
            (p.display().to_string(), shown)
        })
        .collect()
}

/// One job: its view at the start (`base`), the view it makes (`now`), its upper (`delta`).
struct Job<'a> {
    dir: &'a Path,
    base: Tree,
    now: Tree,
    delta: Delta,
}

impl Job<'_> {
    /// Records `c` at `p` in the upper. Like the kernel, which copies a path's parent dirs up
    /// before it creates anything below them (a whiteout included), the upper then holds p's
    /// ancestors as dirs: a scope's dirs stay even where the cache later deletes them.
    fn record(&mut self, p: &str, c: Change) {
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            self.delta
                .entry(parts[..i].join("/"))
                .or_insert(Change::Dir);
        }
        self.delta.insert(p.to_string(), c);
    }

    fn ensure_parents(&mut self, p: &str) {
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            let a = parts[..i].join("/");
            if self.now.get(&a) != Some(&Shown::Dir) {
                self.now.insert(a.clone(), Shown::Dir);
                let c = if self.delta.get(&a) == Some(&Change::Whiteout) {
                    Change::OpaqueDir
                } else {
                    Change::Dir
                };
                self.record(&a, c);
            }
        }
    }

    fn write(&mut self, p: &str, body: &str) {
        self.ensure_parents(p);
        let full = self.dir.join(p);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, body).unwrap();
        // An overwritten file keeps its xattrs (copy-up copies them).
        let x = match self.now.get(p) {
            Some(Shown::File(_, x)) => x.clone(),
            _ => None,
        };
        self.now
            .insert(p.to_string(), Shown::File(body.into(), x.clone()));
        self.record(p, Change::File(body.into(), x));
    }

    fn remove(&mut self, p: &str) {
        let full = self.dir.join(p);
        if full.is_dir() {
            std::fs::remove_dir_all(&full).unwrap();
        } else {
            std::fs::remove_file(&full).unwrap();
        }
        remove_subtree(&mut self.now, p);
        remove_subtree(&mut self.delta, p);
        if self.base.contains_key(p) {
            self.record(p, Change::Whiteout);
        }
    }

    /// `rm -rf d; mkdir d; echo > d/x`: an opaque dir when d was there before.
    fn replace_dir(&mut self, d: &str, x: &str, body: &str) {
        self.remove(d);
        std::fs::create_dir(self.dir.join(d)).unwrap();
        self.now.insert(d.to_string(), Shown::Dir);
        let c = if self.delta.get(d) == Some(&Change::Whiteout) {
            Change::OpaqueDir
        } else {
            Change::Dir
        };
        self.record(d, c);
        self.write(&format!("{d}/{x}"), body);
    }

    /// `mv a b` of a directory. A dir the layers below have is copied (redirect_dir=off makes
    /// its rename(2) EXDEV): a plain new dir. A dir only this job's upper has is renamed, and
    /// overlayfs marks it opaque when it lands in a merged parent (the root here), so that
    /// nothing a lower layer has, or later gains, under its new name shows through.
    fn rename_dir(&mut self, a: &str, b: &str) {
        let renamed = !self.base.contains_key(a);
        sh(&format!("cd {} && mv {a} {b}", self.dir.display()));
        let moved: Vec<(String, Shown)> = self
            .now
            .iter()
            .filter(|(k, _)| under(a, k))
            .map(|(k, v)| (format!("{b}{}", &k[a.len()..]), v.clone()))
            .collect();
        // The source goes as `remove` would record it (mv already removed it on disk).
        remove_subtree(&mut self.now, a);
        remove_subtree(&mut self.delta, a);
        if self.base.contains_key(a) {
            self.record(a, Change::Whiteout);
        }
        for (k, v) in moved {
            let c = match &v {
                Shown::Dir
                    if k == b && (renamed || self.delta.get(&k) == Some(&Change::Whiteout)) =>
                {
                    Change::OpaqueDir
                }
                Shown::Dir => Change::Dir,
                Shown::File(s, x) => Change::File(s.clone(), x.clone()),
            };
            self.record(&k, c);
            self.now.insert(k, v);
        }
    }

    fn set_xattr(&mut self, p: &str, v: &str) {
        xattr::set(self.dir.join(p), "user.k", v.as_bytes()).unwrap();
        if let Some(Shown::File(s, _)) = self.now.get(p).cloned() {
            self.now
                .insert(p.to_string(), Shown::File(s.clone(), Some(v.into())));
            self.record(p, Change::File(s, Some(v.into())));
        }
    }

    /// `ln p q` as the job's last step (later writes to either would change both).
    fn hardlink(&mut self, p: &str, q: &str) {
        self.ensure_parents(q);
        std::fs::hard_link(self.dir.join(p), self.dir.join(q)).unwrap();
        let shown = self.now[p].clone();
        if let Shown::File(s, x) = &shown {
            self.record(p, Change::File(s.clone(), x.clone()));
            self.record(q, Change::File(s.clone(), x.clone()));
        }
        self.now.insert(q.to_string(), shown);
    }
}

fn files_of(t: &Tree) -> Vec<String> {
    t.iter()
        .filter(|(_, v)| matches!(v, Shown::File(..)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Random cache and scope commits, each job's view checked against the model before it
/// writes, and the cache's view checked after every step: the cache never sees a scope.
/// `JOBCACHEFS_SCOPE_CASES` (default 40) and `JOBCACHEFS_SCOPE_SEED` make it longer or other.
#[test]
fn real_scoped_views_match_the_model_over_random_commits() {
    if !root_or_skip("real_scoped_views_match_the_model_over_random_commits") {
        return;
    }
    let steps: usize = std::env::var("JOBCACHEFS_SCOPE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("JOBCACHEFS_SCOPE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_2026_1206);
    // Shallow bounds: scope merges and cache squashes happen within the run; the cache's are
    // metadata squashes where the kernel has data-only layers (scopes then stack on a metadata
    // base), and now and then a full one.
    let node = Node::with_config(
        &std::env::var("JOBCACHEFS_SCOPE_CONFIG")
            .unwrap_or("max_depth = 3\nsquash_method = \"metadata\"\n".into()),
    );
    let mut rng = Rng(seed);
    let mut cache: Vec<Delta> = Vec::new();
    let mut scopes: BTreeMap<&str, Vec<Delta>> = BTreeMap::new();
    let names = ["pr-1", "pr-2", "feature-x"];
    let dirs = ["d0", "d1", "d2/e"];
    for step in 0..steps {
        let scope = match rng.below(5) {
            0 | 1 => None,
            k => Some(names[k - 2]),
        };
        let layers = |scope: Option<&str>| -> Vec<Delta> {
            let mut l = cache.clone();
            if let Some(s) = scope {
                l.extend(scopes.get(s).cloned().unwrap_or_default());
            }
            l
        };
        let base = view(&layers(scope).iter().collect::<Vec<_>>());
        let mut args = vec!["--size", "64Mi", "--write-back"];
        if let Some(s) = scope {
            args.extend(["--scope", s]);
        }
        let dir = node.create("job", "c", &args);
        let what = format!("step {step} (seed {seed}, scope {scope:?})");
        assert_eq!(
            actual(&dir),
            base,
            "{what}: the volume is not the model's view"
        );
        let mut job = Job {
            dir: &dir,
            now: base.clone(),
            base,
            delta: Delta::new(),
        };
        let n_ops = 1 + rng.below(4);
        for op in 0..n_ops {
            let existing = files_of(&job.now);
            let pick = |rng: &mut Rng, v: &[String]| v[rng.below(v.len())].clone();
            match rng.below(if op + 1 == n_ops { 7 } else { 6 }) {
                0 | 1 => {
                    let d = dirs[rng.below(dirs.len())];
                    let p = format!("{d}/f{}", rng.below(4));
                    // A path whose parent is now a file cannot be written: write at the root.
                    let p = if files_of(&job.now).iter().any(|f| under(f, &p) && f != &p) {
                        format!("r{}", rng.below(4))
                    } else {
                        p
                    };
                    job.write(&p, &format!("s{step}o{op}"));
                }
                2 if !existing.is_empty() => {
                    let p = pick(&mut rng, &existing);
                    job.remove(&p);
                }
                3 => {
                    let d = dirs[rng.below(2)];
                    if job.now.get(d).is_some_and(|s| *s != Shown::Dir) {
                        continue;
                    }
                    if job.now.contains_key(d) {
                        job.replace_dir(d, "x", &format!("opaque{step}"));
                    } else {
                        job.write(&format!("{d}/x"), &format!("new{step}"));
                    }
                }
                4 => {
                    // Only a dir the layers below have (copied by mv, as redirect_dir=off
                    // makes rename(2) EXDEV): a rename of the job's own new dir is a real
                    // rename whose opacity rules the model leaves to the fidelity tests.
                    let (a, b) = ("d0", format!("moved{}", rng.below(3)));
                    if job.now.get(a) == Some(&Shown::Dir)
                        && job.base.get(a) == Some(&Shown::Dir)
                        && !job.delta.contains_key(a)
                        && !job.now.contains_key(&b)
                    {
                        job.rename_dir(a, &b);
                    }
                }
                5 if !existing.is_empty() => {
                    let p = pick(&mut rng, &existing);
                    job.set_xattr(&p, &format!("x{step}"));
                }
                6 if !existing.is_empty() => {
                    let p = pick(&mut rng, &existing);
                    let q = format!("link{step}");
                    if !job.now.contains_key(&q) {
                        job.hardlink(&p, &q);
                    }
                }
                _ => job.write(&format!("r{}", rng.below(4)), &format!("root{step}")),
            }
        }
        assert_eq!(
            actual(&dir),
            job.now,
            "{what}: the job's own view drifted from the model"
        );
        let delta = job.delta;
        let r = node.delete(&dir, &["-o", "json"]).ok().json();
        if delta.is_empty() {
            // Nothing left in the upper (a file made and removed, or every op skipped).
            assert_eq!(r["outcome"], "unchanged", "{what}: {r}");
            continue;
        }
        assert_eq!(r["outcome"], "committed", "{what}: {r}");
        assert_eq!(r["scope"].as_str(), scope, "{what}: {r}");
        match scope {
            Some(s) => scopes.entry(s).or_default().push(delta),
            None => cache.push(delta),
        }
        if rng.below(8) == 0 {
            node.run(&["cache", "squash", "c", "--full"]).ok();
        }
        // The cache alone, whatever the scopes did.
        let c = node.create("cache-view", "c", &[]);
        assert_eq!(
            actual(&c),
            view(&cache.iter().collect::<Vec<_>>()),
            "{what}: the cache's view"
        );
        node.delete(&c, &[]).ok();
    }
    // Every scope once more, over the newest cache.
    for s in names {
        let v = node.create("final", "c", &["--scope", s]);
        let mut l: Vec<&Delta> = cache.iter().collect();
        l.extend(scopes.get(s).into_iter().flatten());
        assert_eq!(actual(&v), view(&l), "scope {s} at the end");
        node.delete(&v, &[]).ok();
    }
    // The run went past max_depth in some scope: a merge was checked along the way.
    let merges: usize = names
        .iter()
        .filter(|s| scopes.contains_key(*s))
        .map(|s| {
            let h = node
                .run(&["cache", "history", "c", "--scope", s, "-o", "json"])
                .ok()
                .json();
            h.as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == "merge")
                .count()
        })
        .sum();
    assert!(
        merges > 0 || steps < 20,
        "no scope was merged in {steps} steps"
    );
    node.run(&["gc"]).ok();
    node.assert_clean();
}

#[test]
fn real_sixteen_scope_and_sixteen_cache_commits_at_once_land_in_their_places() {
    if !root_or_skip("real_sixteen_scope_and_sixteen_cache_commits_at_once_land_in_their_places") {
        return;
    }
    let node = Node::with_config("squash_inline = false\n");
    let seed = node.create("seed", "c", &["--write-back"]);
    std::fs::write(seed.join("shared"), "cache").unwrap();
    node.delete(&seed, &[]).ok();
    let mut dirs = Vec::new();
    for i in 0..32 {
        let scoped = i % 2 == 0;
        let mut args = vec!["--size", "64Mi", "--write-back"];
        if scoped {
            args.extend(["--scope", "pr-16"]);
        }
        let d = node.create(&format!("v{i}"), "c", &args);
        std::fs::write(d.join(format!("f{i}")), format!("{i}")).unwrap();
        if scoped {
            std::fs::write(d.join("shared"), "scope").unwrap();
        }
        dirs.push((d, scoped));
    }
    std::thread::scope(|s| {
        for (d, scoped) in &dirs {
            s.spawn(|| {
                let r = node.delete(d, &["-o", "json"]).ok().json();
                assert_eq!(r["outcome"], "committed", "{r}");
                assert_eq!(r["scope"].as_str(), scoped.then_some("pr-16"), "{r}");
            });
        }
    });
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('f'))
            .collect();
        v.sort_by_key(|n| n[1..].parse::<u32>().unwrap());
        v
    };
    let c = node.create("cache", "c", &[]);
    let want_cache: Vec<String> = (0..32)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("f{i}"))
        .collect();
    assert_eq!(names(&c), want_cache);
    assert_eq!(std::fs::read_to_string(c.join("shared")).unwrap(), "cache");
    node.delete(&c, &[]).ok();
    let s = node.create("scope", "c", &["--scope", "pr-16"]);
    let want_all: Vec<String> = (0..32).map(|i| format!("f{i}")).collect();
    assert_eq!(
        names(&s),
        want_all,
        "the scope shows its 16 and the cache's 16"
    );
    assert_eq!(std::fs::read_to_string(s.join("shared")).unwrap(), "scope");
    node.delete(&s, &[]).ok();
    let show = node.show("c");
    assert_eq!(show["scopes"][0]["scope"], "pr-16");
    // 16 commits, merged whenever past max_depth: never more than max_depth + 1 layers.
    assert!(show["scopes"][0]["layers"].as_u64().unwrap() <= 9, "{show}");
    node.assert_clean();
}

const SCOPE_COMMIT_STEPS: [&str; 5] = [
    "delete:marked",
    "delete:upper-unmounted",
    "scope-commit:renamed",
    "scope-commit:published",
    "delete:committed",
];

#[test]
fn real_a_killed_scoped_commit_or_merge_leaves_old_or_new_and_gc_repairs() {
    if !root_or_skip("real_a_killed_scoped_commit_or_merge_leaves_old_or_new_and_gc_repairs") {
        return;
    }
    let node = Node::with_config("max_depth = 64\n");
    let seed = node.create("seed", "c", &["--write-back"]);
    std::fs::write(seed.join("base"), "b").unwrap();
    node.delete(&seed, &[]).ok();
    let layers = |node: &Node| -> u64 {
        node.show("c")["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["scope"] == "pr-1")
            .map_or(0, |s| s["layers"].as_u64().unwrap())
    };
    for (i, step) in SCOPE_COMMIT_STEPS.iter().enumerate() {
        for finish_with_gc in [true, false] {
            let before = layers(&node);
            let name = format!("{}-{finish_with_gc}", step.replace(':', "-"));
            let dir = node.create(
                &name,
                "c",
                &["--size", "64Mi", "--write-back", "--scope", "pr-1"],
            );
            std::fs::write(dir.join(&name), format!("{i}")).unwrap();
            let r = node.run_env(
                &["volume", "delete", dir.to_str().unwrap()],
                &[("JOBCACHEFS_CRASH_AT", step)],
            );
            assert_eq!(r.code, 128 + 9, "{step}: {}", r.stderr);
            let after = layers(&node);
            assert!(
                after == before || after == before + 1,
                "{step}: {before} → {after}"
            );
            if finish_with_gc {
                node.run(&["gc"]).ok();
            } else {
                node.delete(&dir, &[]).ok();
            }
            assert_eq!(
                layers(&node),
                before + 1,
                "{step} (gc: {finish_with_gc}): committed once"
            );
            let check = node.create("check", "c", &["--scope", "pr-1"]);
            assert!(
                check.join(&name).exists(),
                "{step}: the scope lost the commit"
            );
            node.delete(&check, &[]).ok();
            let plain = node.create("plain", "c", &[]);
            assert!(
                !plain.join(&name).exists(),
                "{step}: the commit reached the cache"
            );
            node.delete(&plain, &[]).ok();
            node.assert_clean();
        }
    }
    // A merge killed at each of its steps: the scope shows the same files before and after,
    // and the next commit (or gc) carries on.
    let strict = node.tmp.path().join("merge.toml");
    std::fs::write(&strict, "layer_keep_seconds = 0\nmax_depth = 2\n").unwrap();
    let env = |step: &'static str| {
        [
            ("JOBCACHEFS_CONFIG", strict.to_str().unwrap().to_string()),
            ("JOBCACHEFS_CRASH_AT", step.to_string()),
        ]
    };
    for step in [
        "scope-merge:copied",
        "scope-merge:renamed",
        "scope-merge:published",
    ] {
        let v = node.create("before", "c", &["--scope", "pr-1"]);
        let want = common::snap(&v);
        node.delete(&v, &[]).ok();
        let dir = node.create(
            "m",
            "c",
            &["--size", "64Mi", "--write-back", "--scope", "pr-1"],
        );
        std::fs::write(dir.join(step.replace(':', "-")), "m").unwrap();
        let e = env(step);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = node.run_env(&["volume", "delete", dir.to_str().unwrap()], &e);
        assert_eq!(r.code, 128 + 9, "{step}: {}{}", r.stdout, r.stderr);
        node.run_env(&["gc"], &[("JOBCACHEFS_CONFIG", strict.to_str().unwrap())])
            .ok();
        let v = node.create("after", "c", &["--scope", "pr-1"]);
        let mut got = common::snap(&v);
        got.remove(Path::new(&step.replace(':', "-")));
        node.delete(&v, &[]).ok();
        let d = jobcachefs::files::tree::diff(&want, &got);
        assert!(d.is_empty(), "{step}:\n{}", d.join("\n"));
        node.assert_clean();
    }
    node.assert_clean();
}

/// The job's marker decides an on-success volume, through the CLI and through `run`.
#[test]
fn real_on_success_commits_only_with_the_marker_which_never_reaches_a_layer() {
    if !root_or_skip("real_on_success_commits_only_with_the_marker_which_never_reaches_a_layer") {
        return;
    }
    let node = Node::new();
    for scope in [None, Some("pr-3")] {
        let mut args = vec!["--size", "64Mi", "--write-back", "on-success"];
        if let Some(s) = scope {
            args.extend(["--scope", s]);
        }
        let tag = scope.unwrap_or("cache");
        // Failed job: no marker, nothing committed, the reason says why.
        let v = node.create(&format!("fail-{tag}"), "c", &args);
        std::fs::write(v.join(format!("failed-{tag}")), "half").unwrap();
        let r = node.delete(&v, &["-o", "json"]).ok().json();
        assert_eq!(r["outcome"], "discarded", "{r}");
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .contains(".jobcachefs-success"),
            "{r}"
        );
        // Good job: the marker commits it, and is gone.
        let v = node.create(&format!("ok-{tag}"), "c", &args);
        std::fs::write(v.join(format!("good-{tag}")), "whole").unwrap();
        std::fs::write(v.join(".jobcachefs-success"), "").unwrap();
        let r = node.delete(&v, &["-o", "json"]).ok().json();
        assert_eq!(r["outcome"], "committed", "{r}");
        let mut check = vec!["--size", "64Mi"];
        if let Some(s) = scope {
            check.extend(["--scope", s]);
        }
        let c = node.create("check", "c", &check);
        assert!(c.join(format!("good-{tag}")).exists());
        assert!(!c.join(format!("failed-{tag}")).exists());
        assert!(
            !c.join(".jobcachefs-success").exists(),
            "the marker reached a layer"
        );
        node.delete(&c, &[]).ok();
    }
    // No layer file holds the marker: every layer image, mounted read-only, checked.
    let layers = node.state().join("caches/default/c/layers");
    for e in std::fs::read_dir(&layers).unwrap() {
        let img = e.unwrap().path();
        let m = node.tmp.path().join("inspect");
        std::fs::create_dir_all(&m).unwrap();
        sh(&format!(
            "mount -o ro,loop {} {}",
            img.display(),
            m.display()
        ));
        let found = m.join("upper/.jobcachefs-success").exists();
        sh(&format!("umount {}", m.display()));
        assert!(!found, "{} holds the marker", img.display());
    }
    // `run` keeps deciding by CMD's exit code, into the scope.
    let dir = node.vol("run");
    let r = node.run(&[
        "run",
        "--cache",
        "c",
        "--dir",
        dir.to_str().unwrap(),
        "--scope",
        "pr-4",
        "--write-back",
        "--",
        "sh",
        "-c",
        "echo r > $JOBCACHEFS_DIR/ran",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("of scope pr-4"), "{}", r.stderr);
    let r = node.run(&[
        "run",
        "--cache",
        "c",
        "--dir",
        dir.to_str().unwrap(),
        "--scope",
        "pr-4",
        "--write-back",
        "--",
        "sh",
        "-c",
        "echo x > $JOBCACHEFS_DIR/failed-run; exit 3",
    ]);
    assert_eq!(r.code, 3);
    let c = node.create("check-run", "c", &["--scope", "pr-4"]);
    assert!(c.join("ran").exists() && !c.join("failed-run").exists());
    node.delete(&c, &[]).ok();
    let c = node.create("check-cache", "c", &[]);
    assert!(!c.join("ran").exists(), "a scoped run reached the cache");
    node.delete(&c, &[]).ok();
    node.assert_clean();
}

#[test]
fn real_bad_scopes_are_refused_by_name_and_change_nothing() {
    if !root_or_skip("real_bad_scopes_are_refused_by_name_and_change_nothing") {
        return;
    }
    let node = Node::new();
    let v = node.create("seed", "c", &["--write-back"]);
    std::fs::write(v.join("a"), "a").unwrap();
    node.delete(&v, &[]).ok();
    let clone = node.create("cl", "img", &["--cache-mode", "clone", "--size", "64Mi"]);
    node.delete(&clone, &[]).ok();
    let state_before = listing(&node.state());
    // The reflink pool stays mounted between clone volumes (node infrastructure).
    let (mounts_before, loops_before) = (node.mounts(), node.loops());
    let sixty_four = "s".repeat(64);
    for (scope, cache, needle) in [
        ("PR-1", "c", "--scope \"PR-1\" is invalid"),
        ("pr_1", "c", "--scope \"pr_1\" is invalid"),
        (sixty_four.as_str(), "c", "is 64 characters long"),
        ("pr/1", "c", "--scope \"pr/1\" is invalid"),
        ("", "c", "--scope is empty"),
        ("pr-1", "img", "clone caches have no scopes"),
    ] {
        let dir = node.vol("bad");
        let r = node.run(&[
            "volume",
            "create",
            dir.to_str().unwrap(),
            "--cache",
            cache,
            "--scope",
            scope,
            "--write-back",
        ]);
        assert_eq!(r.code, 2, "{scope:?}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(needle), "{scope:?}: {}", r.stderr);
        assert!(!dir.exists(), "{scope:?}: DIR was made");
        assert_eq!(
            listing(&node.state()),
            state_before,
            "{scope:?}: the state dir changed"
        );
        assert_eq!(
            (node.mounts(), node.loops()),
            (mounts_before.clone(), loops_before.clone())
        );
    }
    for args in [
        vec!["cache", "rm", "c", "--scope", "nope"],
        vec!["cache", "history", "c", "--scope", "nope"],
    ] {
        let r = node.run(&args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("has no scope \"nope\""), "{}", r.stderr);
    }
    node.assert_clean_volumes();
}

/// Every file and dir under `root` but locks, and the sizes of records (a refused request may
/// not even leave a lock file, but lock files of earlier commands are fine).
fn listing(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in walk(root) {
        if !e.to_string_lossy().ends_with(".lock") {
            out.push(e.strip_prefix(root).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn real_idle_scopes_go_with_gc_and_prune_removes_scopes_before_caches() {
    if !root_or_skip("real_idle_scopes_go_with_gc_and_prune_removes_scopes_before_caches") {
        return;
    }
    let node = Node::new();
    let commit = |scope: Option<&str>, file: &str, mib: usize| {
        let mut args = vec!["--size", "256Mi", "--write-back"];
        if let Some(s) = scope {
            args.extend(["--scope", s]);
        }
        let v = node.create("w", "c", &args);
        sh(&format!(
            "head -c {} /dev/urandom > {}",
            mib << 20,
            v.join(file).display()
        ));
        node.delete(&v, &[]).ok();
    };
    commit(None, "base", 8);
    commit(Some("pr-1"), "one", 16);
    commit(Some("pr-2"), "two", 16);
    commit(Some("pr-2"), "two-b", 1);
    let show = node.show("c");
    assert_eq!(show["scopes"].as_array().unwrap().len(), 2, "{show}");
    let h = node
        .run(&["cache", "history", "c", "--scope", "pr-2", "-o", "json"])
        .ok()
        .json();
    assert_eq!(h.as_array().unwrap().len(), 2, "{h}");
    assert_eq!(h[0]["generation"], 2);
    assert_eq!(h[0]["kind"], "commit");
    let text = node.run(&["cache", "ls"]).ok().stdout;
    assert!(text.contains("SCOPES"), "{text}");

    // prune --max-total takes the least recently used scope first, not the cache.
    let on_disk = show["on_disk"].as_u64().unwrap();
    let budget = format!("{}", on_disk - (4 << 20));
    let plan = node
        .run(&[
            "cache",
            "prune",
            "--max-total",
            &budget,
            "--dry-run",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(plan.as_array().unwrap().len(), 1, "{plan}");
    assert_eq!(plan[0]["scope"], "pr-1", "{plan}");
    node.run(&["cache", "prune", "--max-total", &budget]).ok();
    let names: Vec<String> = node.show("c")["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scope"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["pr-2"]);
    let v = node.create("look", "c", &["--scope", "pr-1"]);
    assert!(
        v.join("base").exists() && !v.join("one").exists(),
        "pruned scope still shows"
    );
    node.delete(&v, &[]).ok();

    // cache rm --scope frees its layers at once.
    let layers_dir = node.state().join("caches/default/c/layers");
    let before = std::fs::read_dir(&layers_dir).unwrap().count();
    let r = node
        .run(&["cache", "rm", "c", "--scope", "pr-2", "-o", "json"])
        .ok()
        .json();
    assert!(r["freed"].as_u64().unwrap() > 16 << 20, "{r}");
    assert_eq!(std::fs::read_dir(&layers_dir).unwrap().count(), before - 2);

    // scope_idle: an idle scope goes with gc; one with a live volume stays.
    let idle = node.tmp.path().join("idle.toml");
    std::fs::write(&idle, "layer_keep_seconds = 0\nscope_idle = \"1s\"\n").unwrap();
    commit(Some("pr-3"), "three", 1);
    commit(Some("pr-4"), "four", 1);
    let live = node.create("live", "c", &["--scope", "pr-4"]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let gc = node
        .run_env(
            &["gc", "-o", "json"],
            &[("JOBCACHEFS_CONFIG", idle.to_str().unwrap())],
        )
        .ok()
        .json();
    assert_eq!(
        gc["scopes_removed"],
        serde_json::json!(["default/c/pr-3"]),
        "{gc}"
    );
    node.delete(&live, &[]).ok();
    let names: Vec<String> = node.show("c")["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scope"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["pr-4"]);
    // Removing the cache takes its scopes along: nothing of it stays on disk.
    node.run(&["cache", "rm", "c", "--yes"]).ok();
    assert!(
        !node.state().join("caches/default/c").exists(),
        "the cache's scopes stayed"
    );
    node.assert_clean();
}
