//! Deep stacks (issue 30): volumes over stacks deeper than a page of mount options holds, with
//! the longest names, are exactly the cache; the hard depth bound holds on every path that adds
//! layers and repairs a stack made past it; a mount that is not what was asked is refused and
//! undone; every overlay interface the kernel may offer refuses rather than cuts.

mod common;

use common::{root_or_skip, snap, Node};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// 63 characters: the longest namespace and cache name.
fn long(prefix: &str) -> String {
    format!("{prefix}{}", "x".repeat(63 - prefix.len()))
}

/// The regular files under `dir` with their contents (the model's view of a tree).
fn files(dir: &Path) -> BTreeMap<String, String> {
    snap(dir)
        .into_iter()
        .filter(|(_, e)| e.kind == 'f')
        .map(|(p, _)| {
            let s = std::fs::read_to_string(dir.join(&p)).unwrap();
            (p.display().to_string(), s)
        })
        .collect()
}

/// What commit `i` does to the tree and to the model: overwrites, new files, deletions
/// (whiteouts), and now and then a directory removed and made again (an opaque dir).
fn job(dir: &Path, i: usize, model: &mut BTreeMap<String, String>) {
    let put = |model: &mut BTreeMap<String, String>, rel: String, body: String| {
        let p = dir.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &body).unwrap();
        model.insert(rel, body);
    };
    put(model, format!("f{}", i % 13), format!("v{i}"));
    put(model, format!("d{}/n{i}", i % 4), format!("n{i}"));
    if i.is_multiple_of(3) {
        if let Some(victim) = model.keys().find(|k| k.starts_with('f')).cloned() {
            std::fs::remove_file(dir.join(&victim)).unwrap();
            model.remove(&victim);
        }
    }
    if i % 10 == 9 {
        let d = format!("d{}", (i / 10) % 4);
        std::fs::remove_dir_all(dir.join(&d)).unwrap();
        model.retain(|k, _| !k.starts_with(&format!("{d}/")));
        put(model, format!("{d}/again{i}"), format!("a{i}"));
    }
}

struct Cache<'a> {
    node: &'a Node,
    ns: String,
    name: String,
}

impl Cache<'_> {
    fn create(&self, vol: &str, write_back: bool) -> PathBuf {
        let dir = self.node.vol(vol);
        let mut args = vec![
            "volume",
            "create",
            dir.to_str().unwrap(),
            "--cache",
            &self.name,
            "--namespace",
            &self.ns,
            "--size",
            "64Mi",
        ];
        if write_back {
            args.push("--write-back");
        }
        self.node.run(&args).ok();
        dir
    }

    fn show(&self) -> serde_json::Value {
        self.node
            .run(&[
                "cache",
                "show",
                &self.name,
                "--namespace",
                &self.ns,
                "-o",
                "json",
            ])
            .ok()
            .json()
    }

    /// A fresh volume shows exactly `model`, is writable, and its overlay has the cache's
    /// layers as lowers and an upper (read from the kernel's mount table).
    fn check(&self, model: &BTreeMap<String, String>, what: &str) {
        let v = self.create("check", false);
        assert_eq!(
            &files(&v),
            model,
            "{what}: the volume is not exactly the cache"
        );
        std::fs::write(v.join(".probe"), "w")
            .unwrap_or_else(|e| panic!("{what}: not writable: {e}"));
        let depth = self.show()["depth"].as_u64().unwrap() as usize;
        let table = jobcachefs::host::mounts::mount_table().unwrap();
        let m = table
            .iter()
            .rev()
            .find(|m| m.mount_point == v)
            .expect("mounted");
        let view = jobcachefs::host::mounts::parse_overlay(&m.super_options);
        assert_eq!(
            view.lowers.len(),
            depth.max(1),
            "{what}: {}",
            m.super_options
        );
        assert!(
            view.upper.is_some() && !view.read_only,
            "{what}: {}",
            m.super_options
        );
        self.node.delete(&v, &["--discard"]).ok();
    }
}

#[test]
fn real_deep_stacks_with_the_longest_names_mount_exactly_the_cache() {
    if !root_or_skip("real_deep_stacks_with_the_longest_names_mount_exactly_the_cache") {
        return;
    }
    // Squashes queued, as the hook and the CSI plugin configure them, and a bound high enough
    // that the stack passes the depth where one page of mount options used to be cut (21 with
    // these names, 56 with short ones).
    let node = Node::with_config("squash_inline = false\nmax_depth = 60\nmax_depth_hard = 64\n");
    let c = Cache {
        node: &node,
        ns: long("ns-"),
        name: long("cache-"),
    };
    let mut model = BTreeMap::new();
    let mut max_depth = 0;
    for i in 0..100 {
        let v = c.create("job", true);
        assert_eq!(
            files(&v),
            model,
            "commit {i}: the job's volume is not exactly the cache"
        );
        job(&v, i, &mut model);
        let r = node.delete(&v, &[]).ok();
        assert!(r.stdout.contains("committed"), "{}", r.stdout);
        let depth = c.show()["depth"].as_u64().unwrap();
        assert!(depth <= 64, "commit {i}: depth {depth} past the bound");
        max_depth = max_depth.max(depth);
        if i % 20 == 19 || (55..=64).contains(&depth) {
            c.check(&model, &format!("after commit {i} (depth {depth})"));
        }
    }
    assert_eq!(max_depth, 64, "the stack never reached the bound");

    // A burst of 8 concurrent commits on top.
    let dirs: Vec<PathBuf> = (0..8)
        .map(|k| c.create(&format!("burst{k}"), true))
        .collect();
    for (k, d) in dirs.iter().enumerate() {
        std::fs::write(d.join(format!("burst-{k}")), format!("b{k}")).unwrap();
        model.insert(format!("burst-{k}"), format!("b{k}"));
    }
    std::thread::scope(|s| {
        for d in &dirs {
            s.spawn(|| {
                let r = node.delete(d, &[]).ok();
                assert!(r.stdout.contains("committed"), "{}", r.stdout);
            });
        }
    });
    c.check(&model, "after the burst");

    // The queued squash, through its own verified read-only view: a base of exactly the cache.
    let v = c.create("before", false);
    let before = snap(&v);
    node.delete(&v, &["--discard"]).ok();
    node.run(&["gc", "--drain"]).ok();
    let shown = c.show();
    assert_eq!(shown["depth"], 1, "gc --drain did not squash: {shown}");
    c.check(&model, "after gc --drain");
    let v = c.create("after", false);
    let after = snap(&v);
    node.delete(&v, &["--discard"]).ok();
    let d = jobcachefs::files::tree::diff(&before, &after);
    assert!(d.is_empty(), "the squashed base differs:\n{}", d.join("\n"));
    node.assert_clean();
}

#[test]
fn real_the_hard_bound_merges_the_newest_layers_and_gc_repairs_a_deep_stack() {
    if !root_or_skip("real_the_hard_bound_merges_the_newest_layers_and_gc_repairs_a_deep_stack") {
        return;
    }
    // Defaults: max_depth 8, max_depth_hard 32; squashes queued and never drained.
    let node = Node::with_config("squash_inline = false\n");
    let c = Cache {
        node: &node,
        ns: "ci".into(),
        name: "maven".into(),
    };
    let mut model = BTreeMap::new();
    let mut depths = Vec::new();
    for i in 0..40 {
        let v = c.create("job", true);
        job(&v, i, &mut model);
        // Metadata a merge must keep: a hardlink, an xattr, an owner, a symlink.
        if i == 31 {
            std::fs::write(v.join("linked"), "l").unwrap();
            std::fs::hard_link(v.join("linked"), v.join("d3/linked2")).unwrap();
            xattr::set(v.join("linked"), "user.k", b"v").unwrap();
            std::os::unix::fs::symlink("linked", v.join("sym")).unwrap();
            nix::unistd::chown(&v.join("d0"), Some(1234.into()), Some(99.into())).unwrap();
            model.insert("linked".into(), "l".into());
            model.insert("d3/linked2".into(), "l".into());
        }
        // The view at delete time is what the cache must show afterwards, merged or not.
        let want = snap(&v);
        node.delete(&v, &[]).ok();
        let shown = c.show();
        let depth = shown["depth"].as_u64().unwrap();
        depths.push(depth);
        let v = c.create("view", false);
        let d = jobcachefs::files::tree::diff(&want, &snap(&v));
        node.delete(&v, &["--discard"]).ok();
        assert!(
            d.is_empty(),
            "commit {i} (depth {depth}):\n{}",
            d.join("\n")
        );
        if depth < depths.iter().copied().max().unwrap() {
            let top = shown["layers"].as_array().unwrap().last().unwrap().clone();
            let below = &shown["layers"].as_array().unwrap()[7];
            assert!(
                below["id"].as_str().unwrap().starts_with("merge-"),
                "commit {i}: the 8th layer is not the merge: {shown}"
            );
            assert_eq!(below["covers"].as_array().unwrap().len(), 26, "{below}");
            let _ = top;
        }
    }
    assert!(depths.iter().all(|&d| d <= 32), "{depths:?}");
    // 32 commits fill the stack; the 33rd is merged down to max_depth: 7 + the merge + nothing.
    assert_eq!(&depths[30..34], &[31, 32, 8, 9], "{depths:?}");
    c.check(&model, "after 40 commits");
    let hist = node
        .run(&[
            "cache",
            "history",
            "maven",
            "--namespace",
            "ci",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert!(
        hist.as_array()
            .unwrap()
            .iter()
            .any(|g| g["kind"] == "merge"),
        "{hist}"
    );

    // A stack made past the bound (a state dir from before it, or a lower bound now): the
    // next gc brings it back, and creates work before and after.
    let strict = node.tmp.path().join("strict.toml");
    std::fs::write(
        &strict,
        "squash_inline = false\nlayer_keep_seconds = 0\nmax_depth_hard = 12\n",
    )
    .unwrap();
    let deep = c.show()["depth"].as_u64().unwrap();
    assert!(deep > 12, "depth {deep}");
    let gc = node
        .run_env(
            &["gc", "-o", "json"],
            &[("JOBCACHEFS_CONFIG", strict.to_str().unwrap())],
        )
        .ok()
        .json();
    assert_eq!(gc["merged"], serde_json::json!(["ci/maven"]), "{gc}");
    assert_eq!(c.show()["depth"], 8);
    c.check(&model, "after gc repaired the depth");
    node.assert_clean();
}

#[test]
fn real_a_mount_that_is_not_what_was_asked_is_refused_and_undone() {
    if !root_or_skip("real_a_mount_that_is_not_what_was_asked_is_refused_and_undone") {
        return;
    }
    let node = Node::new();
    let c = Cache {
        node: &node,
        ns: "default".into(),
        name: "c".into(),
    };
    // A cold cache's only lower is the state dir's empty dir. Swapped behind the engine's
    // back for a link to other data, the kernel mounts the link's target: refused.
    let secret = node.tmp.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("other-namespace-data"), "x").unwrap();
    let empty = node.state().join("empty");
    node.run(&["gc"]).ok(); // makes the state dir, the empty dir with it
    std::fs::remove_dir(&empty).unwrap();
    std::os::unix::fs::symlink(&secret, &empty).unwrap();
    let dir = node.vol("v");
    let r = node.run(&["volume", "create", dir.to_str().unwrap(), "--cache", "c"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stderr.contains("is not the one asked for")
            && r.stderr.contains(&format!("is {}", secret.display())),
        "{}",
        r.stderr
    );
    assert!(!dir.join("other-namespace-data").exists());
    assert_eq!(
        node.mounts(),
        Vec::<PathBuf>::new(),
        "the refused mount stayed"
    );
    assert!(node
        .run(&["volume", "ls", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    std::fs::remove_file(&empty).unwrap();
    std::fs::create_dir(&empty).unwrap();

    // A layer's mount point holding something else (here a tmpfs with a fake `upper`) is
    // replaced by the layer before an overlay uses it.
    let keep = node.tmp.path().join("keep.toml");
    std::fs::write(&keep, "layer_keep_seconds = 600\n").unwrap();
    let kenv = [("JOBCACHEFS_CONFIG", keep.to_str().unwrap())];
    let v = c.create("w", true);
    std::fs::write(v.join("real"), "r").unwrap();
    node.run_env(&["volume", "delete", v.to_str().unwrap()], &kenv)
        .ok();
    let layer = c.show()["layers"][0]["id"].as_str().unwrap().to_string();
    let v = {
        let d = node.vol("r1");
        node.run_env(
            &["volume", "create", d.to_str().unwrap(), "--cache", "c"],
            &kenv,
        )
        .ok();
        d
    };
    node.run_env(&["volume", "delete", v.to_str().unwrap()], &kenv)
        .ok();
    let lm = node.state().join("mnt/layers/default/c").join(&layer);
    assert!(node.mounts().contains(&lm), "the layer mount was not kept");
    common::sh(&format!(
        "umount -l {m}; mount -t tmpfs -o size=1m none {m}; mkdir {m}/upper; echo fake > {m}/upper/fake",
        m = lm.display()
    ));
    let v = node.vol("r2");
    node.run_env(
        &["volume", "create", v.to_str().unwrap(), "--cache", "c"],
        &kenv,
    )
    .ok();
    assert_eq!(std::fs::read_to_string(v.join("real")).unwrap(), "r");
    assert!(!v.join("fake").exists(), "the volume used the stray mount");
    node.run_env(&["volume", "delete", v.to_str().unwrap()], &kenv)
        .ok();
    node.run(&["node", "release"]).ok();
    node.assert_clean();
}

#[test]
fn real_every_overlay_interface_mounts_or_refuses_never_cuts() {
    if !root_or_skip("real_every_overlay_interface_mounts_or_refuses_never_cuts") {
        return;
    }
    let node = Node::with_config("squash_inline = false\nmax_depth = 60\nmax_depth_hard = 64\n");
    let c = Cache {
        node: &node,
        ns: long("ns-"),
        name: long("cache-"),
    };
    let mut model = BTreeMap::new();
    for i in 0..30 {
        let v = c.create("job", true);
        job(&v, i, &mut model);
        node.delete(&v, &[]).ok();
    }
    // 30 layers of ~190-byte paths: 5.7 KiB of mount options. The fd and path interfaces
    // mount them; the mount(2) string is refused by name, before the kernel could cut it.
    for iface in ["fds", "paths", "mount-data"] {
        let dir = node.vol(&format!("via-{iface}"));
        let r = node.run_env(
            &[
                "volume",
                "create",
                dir.to_str().unwrap(),
                "--cache",
                &c.name,
                "--namespace",
                &c.ns,
            ],
            &[("JOBCACHEFS_OVERLAY_INTERFACE", iface)],
        );
        if iface == "mount-data" {
            assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
            assert!(r.stderr.contains("bytes of mount options"), "{}", r.stderr);
            assert!(!node.mounts().iter().any(|m| m.starts_with(node.vol(""))));
            assert!(
                !node
                    .state()
                    .join("volumes")
                    .read_dir()
                    .unwrap()
                    .any(|_| true),
                "a record stayed"
            );
        } else {
            r.ok();
            assert_eq!(files(&dir), model, "{iface}");
            std::fs::write(dir.join("w"), "w").unwrap();
            node.delete(&dir, &["--discard"]).ok();
        }
    }
    // A short stack: every interface mounts it, the same files.
    let short = Cache {
        node: &node,
        ns: "ci".into(),
        name: "npm".into(),
    };
    let v = short.create("seed", true);
    std::fs::write(v.join("a"), "1").unwrap();
    node.delete(&v, &[]).ok();
    for iface in ["fds", "paths", "mount-data"] {
        let dir = node.vol(&format!("short-{iface}"));
        node.run_env(
            &[
                "volume",
                "create",
                dir.to_str().unwrap(),
                "--cache",
                "npm",
                "--namespace",
                "ci",
                "--write-back",
            ],
            &[("JOBCACHEFS_OVERLAY_INTERFACE", iface)],
        )
        .ok();
        let want: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        assert_eq!(files(&dir), want, "{iface}");
        node.delete(&dir, &["--discard"]).ok();
    }
    node.assert_clean();
}

#[test]
fn real_three_nodes_forty_commits_each_through_a_restarting_registry_stay_within_the_bound() {
    if !root_or_skip(
        "real_three_nodes_forty_commits_each_through_a_restarting_registry_stay_within_the_bound",
    ) {
        return;
    }
    let mut reg = common::registry::Registry::start();
    // Squashes queued and never drained (no agent): only the hard bound keeps stacks shallow;
    // a low one, so that commits and imports both run into it.
    let nodes: Vec<Node> = (0..3)
        .map(|_| {
            Node::with_config(&format!(
                "squash_inline = false\nmax_depth = 4\nmax_depth_hard = 12\n{}",
                reg.config("")
            ))
        })
        .collect();
    // A fixed-seed generator (xorshift): which rounds restart the registry.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut coin = move |one_in: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed.is_multiple_of(one_in)
    };
    let depth = |n: &Node| -> u64 {
        let r = n.run(&["cache", "show", "gradle", "-o", "json"]);
        if r.code == 4 {
            0
        } else {
            r.ok().json()["depth"].as_u64().unwrap()
        }
    };
    let (mut failed_syncs, mut restarts, mut deepest) = (0, 0, 0);
    for round in 0..40 {
        for (k, n) in nodes.iter().enumerate() {
            let v = n.create("job", "gradle", &["--size", "64Mi", "--write-back"]);
            std::fs::write(v.join(format!("n{k}-{round}")), format!("{k}/{round}")).unwrap();
            std::fs::write(v.join(format!("last-of-{k}")), format!("{round}")).unwrap();
            n.delete(&v, &[]).ok();
            deepest = deepest.max(depth(n));
        }
        if round % 4 == 3 {
            let down = coin(3);
            if down {
                reg.stop();
                restarts += 1;
            }
            for n in &nodes {
                for verb in ["export", "import"] {
                    let r = n.run(&["cache", verb, "gradle", "-o", "json"]);
                    if r.code != 0 {
                        failed_syncs += 1;
                        assert!(down, "{verb} failed with the registry up: {}", r.stderr);
                    }
                    deepest = deepest.max(depth(n));
                }
            }
            if down {
                reg.start_again();
            }
        }
    }
    assert!(
        restarts > 0 && failed_syncs > 0,
        "the registry never went down"
    );
    // Converge: two rounds of export and import with the registry up.
    for _ in 0..2 {
        for n in &nodes {
            n.run(&["cache", "export", "gradle", "-o", "json"]).ok();
        }
        for n in &nodes {
            n.run(&["cache", "import", "gradle", "-o", "json"]).ok();
        }
    }
    for n in &nodes {
        deepest = deepest.max(depth(n));
    }
    assert!(
        deepest <= 12,
        "a node's stack reached {deepest} layers, past the bound of 12"
    );
    let merges: usize = nodes
        .iter()
        .map(|n| {
            let h = n
                .run(&["cache", "history", "gradle", "-n", "1000", "-o", "json"])
                .ok()
                .json();
            h.as_array()
                .unwrap()
                .iter()
                .filter(|g| g["kind"] == "merge")
                .count()
        })
        .sum();
    assert!(
        merges > 0,
        "the bound never merged: the test did not test it"
    );
    let trees: Vec<_> = nodes
        .iter()
        .map(|n| {
            let v = n.create("check", "gradle", &[]);
            std::fs::write(v.join("probe"), "w").unwrap();
            std::fs::remove_file(v.join("probe")).unwrap();
            let t = files(&v);
            n.delete(&v, &["--discard"]).ok();
            t
        })
        .collect();
    assert_eq!(
        trees[0].len(),
        120 + 3,
        "{:?}",
        trees[0].keys().collect::<Vec<_>>()
    );
    assert_eq!(trees[0], trees[1]);
    assert_eq!(trees[0], trees[2]);
    eprintln!("three nodes: deepest stack {deepest}, {merges} merges, {restarts} registry stops, {failed_syncs} failed syncs");
    for n in &nodes {
        n.assert_clean();
    }
}
