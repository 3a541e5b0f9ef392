//! `jobcachefs run` and `jobcachefs node release` for real, as root: a command's exit code
//! decides the commit (seen by the next run), stop signals reach CMD and the volume is still
//! discarded, a SIGKILLed run is repaired by the next run of its DIR and by gc (its job's
//! leftovers killed), bad input makes nothing, and a release lets go of every layer mount, the
//! reflink pool and their loop devices — but only when no volume is live.

mod common;

use common::{root_or_skip, Node, Run};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const CONFLICT: i32 = 5;

fn run(node: &Node, cache: &str, dir: &Path, extra: &[&str], script: &str) -> Run {
    let mut args = vec!["run", "--cache", cache, "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    node.run(&args)
}

/// A run started in the background. Its stderr goes to a file: a job's leftover process
/// that inherited a pipe would keep it open long after the run ended.
struct Bg {
    child: Child,
    stderr: PathBuf,
}

impl Bg {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// CMD's process group: CMD is the run's child and leads its own group.
    fn cmd_groups(&self) -> Vec<i32> {
        let children = format!("/proc/{0}/task/{0}/children", self.child.id());
        std::fs::read_to_string(children)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

/// A run the test gave up on (a failed assertion, [`FINISH_BOUND`] passed): CMD's group and the
/// run are SIGKILLed, so that no job outlives the test. (The node's drop deletes the volume
/// with `volume delete`, which does not stop a dead run's job.)
impl Drop for Bg {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            for pgid in self.cmd_groups() {
                let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts a run in the background; returns once CMD has written `ready`.
fn spawn_run(node: &Node, cache: &str, dir: &Path, extra: &[&str], script: &str) -> Bg {
    spawn_run_ignoring(node, cache, dir, extra, script, &[])
}

/// [`spawn_run`] with `ignored` set to SIG_IGN in the run's process, as a runner started under
/// `nohup` (SIGHUP) or by a supervisor that ignores SIGINT hands them down.
fn spawn_run_ignoring(
    node: &Node,
    cache: &str,
    dir: &Path,
    extra: &[&str],
    script: &str,
    ignored: &[Signal],
) -> Bg {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let ready = node.tmp.path().join("ready");
    let _ = std::fs::remove_file(&ready);
    let stderr = node.tmp.path().join(format!(
        "run-{}.err",
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let mut c = node.command();
    c.args(["run", "--cache", cache, "--dir", dir.to_str().unwrap()])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let ignored: Vec<libc::c_int> = ignored.iter().map(|s| *s as libc::c_int).collect();
    // SAFETY: runs in the child between fork and exec; signal() is async-signal-safe and the
    // closure allocates nothing (the list was made before the fork).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            for s in &ignored {
                libc::signal(*s, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    wait_for(&ready);
    Bg { child, stderr }
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a run may take to end once it was told to (or its CMD ends on its own): a stopped
/// run discards its volume in well under a second.
const FINISH_BOUND: Duration = Duration::from_secs(30);

/// Waits for a background run to end, at most [`FINISH_BOUND`]: a run whose CMD ignores the
/// signal passed on would otherwise keep the test waiting for ever. Past the bound the test
/// fails, and the run and its job are killed (`Bg`'s drop).
fn finish(mut bg: Bg) -> Run {
    let t = Instant::now();
    let status = loop {
        if let Some(status) = bg.child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > FINISH_BOUND {
            panic!(
                "the run did not end within {FINISH_BOUND:?} (killed now); its stderr:\n{}",
                std::fs::read_to_string(&bg.stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    Run {
        code: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout: String::new(),
        stderr: std::fs::read_to_string(&bg.stderr).unwrap_or_default(),
    }
}

fn volumes(node: &Node) -> Vec<String> {
    node.run(&["volume", "ls", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["dir"].as_str().unwrap().to_string())
        .collect()
}

/// Loop devices of this node now (`Node::loops` waits for autoclear while any is attached).
fn loops_now(n: &Node) -> Vec<String> {
    jobcachefs::host::loopback::list()
        .into_iter()
        .filter(|b| b.file.starts_with(n.tmp.path()))
        .map(|b| format!("{} {}", b.device.display(), b.file.display()))
        .collect()
}

fn group_alive(pgid: i32) -> bool {
    kill(Pid::from_raw(-pgid), None).is_ok()
}

fn wait_gone(pgid: i32) {
    let t = Instant::now();
    while group_alive(pgid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "process group {pgid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn real_run_commits_on_exit_0_and_discards_a_failed_command() {
    if !root_or_skip("real_run_commits_on_exit_0_and_discards_a_failed_command") {
        return;
    }
    let n = Node::new();
    let dir = n.vol("job");
    // --write-back alone is on-success; CMD sees JOBCACHEFS_DIR; stdout is CMD's alone.
    let r = run(
        &n,
        "maven",
        &dir,
        &["--write-back"],
        "echo one > $JOBCACHEFS_DIR/dep; echo built",
    )
    .ok();
    assert_eq!(r.stdout, "built\n");
    assert!(
        r.stderr.contains("committed as generation 1"),
        "{}",
        r.stderr
    );
    assert_eq!(n.generation("maven"), 1);
    assert!(
        !dir.exists(),
        "the DIR the run made is gone with the volume"
    );
    // The next run sees the commit; a failing CMD's exit code is the run's, its changes go.
    let r = run(
        &n,
        "maven",
        &dir,
        &["--write-back"],
        "cat $JOBCACHEFS_DIR/dep; echo two > $JOBCACHEFS_DIR/dep; exit 3",
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stdout, "one\n");
    assert_eq!(n.generation("maven"), 1);
    let r = run(&n, "maven", &dir, &[], "cat $JOBCACHEFS_DIR/dep").ok();
    assert_eq!(r.stdout, "one\n", "the failed run's write was discarded");
    assert_eq!(volumes(&n), Vec::<String>::new());
    n.assert_clean();
}

#[test]
fn real_run_write_back_always_never_and_the_default() {
    if !root_or_skip("real_run_write_back_always_never_and_the_default") {
        return;
    }
    let n = Node::new();
    let dir = n.vol("job");
    // always: a failed build's downloads are kept; the exit code is still CMD's.
    let r = run(
        &n,
        "npm",
        &dir,
        &["--write-back", "always"],
        "echo a > $JOBCACHEFS_DIR/f; exit 1",
    );
    assert_eq!(r.code, 1);
    assert_eq!(n.generation("npm"), 1);
    // never, and no --write-back at all (the default): a successful run commits nothing.
    run(
        &n,
        "npm",
        &dir,
        &["--write-back", "never"],
        "echo b > $JOBCACHEFS_DIR/f",
    )
    .ok();
    run(&n, "npm", &dir, &[], "echo c > $JOBCACHEFS_DIR/f").ok();
    assert_eq!(n.generation("npm"), 1);
    let r = run(&n, "npm", &dir, &[], "cat $JOBCACHEFS_DIR/f").ok();
    assert_eq!(r.stdout, "a\n");
    // Several caches in one run, each at its DIR, named in the environment.
    let (a, b) = (n.vol("a"), n.vol("b"));
    let spec_a = format!("npm:{}", a.display());
    let spec_b = format!("gradle:{}", b.display());
    let r = n
        .run(&[
            "run",
            "--cache",
            &spec_a,
            "--cache",
            &spec_b,
            "--write-back",
            "--",
            "sh",
            "-c",
            "cat $JOBCACHEFS_DIR_NPM/f; echo g > $JOBCACHEFS_DIR_GRADLE/g; echo $JOBCACHEFS_DIR",
        ])
        .ok();
    assert_eq!(r.stdout, format!("a\n{}\n", a.display()));
    assert_eq!(n.generation("gradle"), 1);
    assert_eq!(
        n.generation("npm"),
        1,
        "npm's volume changed nothing: unchanged"
    );
    n.assert_clean();
}

#[test]
fn real_run_passes_stop_signals_to_cmd_and_discards_the_volume() {
    if !root_or_skip("real_run_passes_stop_signals_to_cmd_and_discards_the_volume") {
        return;
    }
    let n = Node::new();
    let dir = n.vol("job");
    let out = n.tmp.path().join("trapped");
    let ready = n.tmp.path().join("ready");
    // CMD handles SIGTERM (exit 7); the grandchild `sleep` gets it too (its own group's).
    let script = format!(
        "trap 'echo term > {out}; exit 7' TERM; echo half > $JOBCACHEFS_DIR/f; sleep 300 & echo $! > {pid}; touch {ready}; wait",
        out = out.display(),
        pid = n.tmp.path().join("sleep.pid").display(),
        ready = ready.display()
    );
    let child = spawn_run(&n, "maven", &dir, &["--write-back", "always"], &script);
    let sleep_pid: i32 = std::fs::read_to_string(n.tmp.path().join("sleep.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(child.pid(), Signal::SIGTERM).unwrap();
    let r = finish(child);
    assert_eq!(r.code, 7, "the run's exit code is CMD's: {}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "term\n",
        "CMD got the SIGTERM"
    );
    assert!(
        !Path::new(&format!("/proc/{sleep_pid}")).exists(),
        "the job's other processes got it too"
    );
    assert!(r.stderr.contains("changes discarded"), "{}", r.stderr);
    assert_eq!(
        n.generation("maven"),
        0,
        "a stopped run never commits, even under always"
    );
    assert_eq!(volumes(&n), Vec::<String>::new());
    // A CMD that dies of the signal: 128 + signal, as shells report it.
    let script = format!("touch {}; exec sleep 300", ready.display());
    let child = spawn_run(&n, "maven", &dir, &["--write-back"], &script);
    kill(child.pid(), Signal::SIGINT).unwrap();
    let r = finish(child);
    assert_eq!(r.code, 130, "{}", r.stderr);
    let child = spawn_run(&n, "maven", &dir, &["--write-back"], &script);
    kill(child.pid(), Signal::SIGHUP).unwrap();
    assert_eq!(finish(child).code, 129);
    assert_eq!(n.generation("maven"), 0);
    n.assert_clean();
}

/// A run that inherited ignored stop signals (a runner under `nohup`, a supervisor ignoring
/// SIGINT) still stops its job: CMD starts with them at their default action, and the signal
/// the run passes on ends it.
#[test]
fn real_run_stops_cmd_even_when_the_runner_ignores_stop_signals() {
    if !root_or_skip("real_run_stops_cmd_even_when_the_runner_ignores_stop_signals") {
        return;
    }
    let n = Node::new();
    let dir = n.vol("job");
    let ready = n.tmp.path().join("ready");
    let ign = n.tmp.path().join("sigign");
    // CMD writes the mask of the signals it ignores, then waits for the signal.
    let script = format!(
        "grep SigIgn /proc/$$/status > {ign}; touch {ready}; exec sleep 300",
        ign = ign.display(),
        ready = ready.display()
    );
    let stop = [Signal::SIGHUP, Signal::SIGINT, Signal::SIGTERM];
    for sig in stop {
        let child = spawn_run_ignoring(&n, "maven", &dir, &["--write-back"], &script, &stop);
        kill(child.pid(), sig).unwrap();
        let r = finish(child);
        assert_eq!(r.code, 128 + sig as i32, "{sig}: {}", r.stderr);
        assert!(r.stderr.contains("changes discarded"), "{}", r.stderr);
        let mask = std::fs::read_to_string(&ign).unwrap();
        let mask = u64::from_str_radix(mask.trim().trim_start_matches("SigIgn:").trim(), 16)
            .unwrap_or_else(|e| panic!("{mask:?}: {e}"));
        for s in stop {
            assert_eq!(
                mask & (1 << (s as i32 - 1)),
                0,
                "CMD was started with {s} ignored (SigIgn {mask:x})"
            );
        }
    }
    assert_eq!(n.generation("maven"), 0);
    assert_eq!(volumes(&n), Vec::<String>::new());
    n.assert_clean();
}

/// Starts a write-back run whose job leaves a background process, SIGKILLs the run, and
/// returns the job's process group once the run is dead.
fn killed_run(n: &Node, dir: &Path) -> i32 {
    let pgid_file = n.tmp.path().join("pgid");
    let script = format!(
        "echo lost > $JOBCACHEFS_DIR/f; echo $$ > {pg}; sleep 300 & touch {ready}; wait",
        pg = pgid_file.display(),
        ready = n.tmp.path().join("ready").display()
    );
    let child = spawn_run(n, "maven", dir, &["--write-back"], &script);
    let pgid: i32 = std::fs::read_to_string(&pgid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(child.pid(), Signal::SIGKILL).unwrap();
    assert_eq!(finish(child).code, 137);
    // CMD (the shell) dies with the run (PR_SET_PDEATHSIG); its background `sleep` stays until
    // the repair; the volume stays mounted.
    assert!(group_alive(pgid), "the job's leftover still runs");
    assert!(volumes(n).contains(&dir.display().to_string()));
    pgid
}

#[test]
fn real_a_sigkilled_run_is_repaired_by_the_next_run_of_its_dir() {
    if !root_or_skip("real_a_sigkilled_run_is_repaired_by_the_next_run_of_its_dir") {
        return;
    }
    let n = Node::new();
    let dir = n.vol("job");
    run(
        &n,
        "maven",
        &dir,
        &["--write-back"],
        "echo kept > $JOBCACHEFS_DIR/f",
    )
    .ok();
    let pgid = killed_run(&n, &dir);
    let r = run(&n, "maven", &dir, &[], "cat $JOBCACHEFS_DIR/f").ok();
    assert_eq!(
        r.stdout, "kept\n",
        "the killed run's write was discarded, the cache kept"
    );
    assert!(
        r.stderr.contains("was killed: discarding the volume"),
        "{}",
        r.stderr
    );
    wait_gone(pgid);
    assert_eq!(n.generation("maven"), 1);
    assert_eq!(volumes(&n), Vec::<String>::new());
    n.assert_clean();
}

#[test]
fn real_a_sigkilled_run_is_repaired_by_gc() {
    if !root_or_skip("real_a_sigkilled_run_is_repaired_by_gc") {
        return;
    }
    let n = Node::new();
    let dir = n.vol("job");
    // A live run is left alone by gc.
    let script = format!(
        "touch {}; exec sleep 300",
        n.tmp.path().join("ready").display()
    );
    let live = spawn_run(&n, "other", &n.vol("live"), &[], &script);
    let pgid = killed_run(&n, &dir);
    let gc = n.run(&["gc", "-o", "json"]).ok().json();
    assert_eq!(
        gc["runs_repaired"],
        serde_json::json!([dir.display().to_string()])
    );
    wait_gone(pgid);
    let left = volumes(&n);
    if left != vec![n.vol("live").display().to_string()] {
        let r = finish(live);
        panic!(
            "the live run's volume is gone: {left:?}; live run: {} {}",
            r.code, r.stderr
        );
    }
    assert_eq!(
        n.generation("maven"),
        0,
        "nothing of the killed run was committed"
    );
    kill(live.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(finish(live).code, 143);
    // No run lock, mount or loop device is left.
    let locks = n.state().join("locks/runs");
    assert_eq!(std::fs::read_dir(&locks).map(|d| d.count()).unwrap_or(0), 0);
    n.assert_clean();
}

#[test]
fn real_run_refuses_bad_input_before_making_anything() {
    if !root_or_skip("real_run_refuses_bad_input_before_making_anything") {
        return;
    }
    let n = Node::new();
    // Busy DIRs: not empty, a mount point, a volume of `volume create`, a live run's.
    let full = n.vol("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), "x").unwrap();
    let mounted = n.vol("mounted");
    std::fs::create_dir_all(&mounted).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &mounted,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let created = n.create("created", "maven", &[]);
    let script = format!(
        "touch {}; exec sleep 300",
        n.tmp.path().join("ready").display()
    );
    let live = spawn_run(&n, "maven", &n.vol("live"), &[], &script);
    let plain = n.tmp.path().join("plain-file");
    std::fs::write(&plain, "not a program").unwrap();
    let state_before: Vec<PathBuf> = std::fs::read_dir(n.state().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let (mounts_before, loops_before) = (n.mounts(), loops_now(&n));
    let fresh = n.vol("fresh");
    let f = fresh.to_str().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec![
                "--cache".into(),
                "Maven_Repo".into(),
                "--dir".into(),
                f.into(),
                "--".into(),
                "true".into(),
            ],
            2,
            "is invalid",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                f.into(),
                "--size".into(),
                "lots".into(),
                "--".into(),
                "true".into(),
            ],
            2,
            "--size",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                f.into(),
                "--size".into(),
                "1Ti".into(),
                "--".into(),
                "true".into(),
            ],
            3,
            "max_volume_size",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                "rel/dir".into(),
                "--".into(),
                "true".into(),
            ],
            2,
            "relative",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                s(&full),
                "--".into(),
                "true".into(),
            ],
            2,
            "not empty",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                s(&mounted),
                "--".into(),
                "true".into(),
            ],
            CONFLICT,
            "mount point",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                s(&created),
                "--".into(),
                "true".into(),
            ],
            CONFLICT,
            "not by a run",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                s(&n.vol("live")),
                "--".into(),
                "true".into(),
            ],
            CONFLICT,
            "in use by a running",
        ),
        (
            vec!["--cache".into(), "maven".into(), "--dir".into(), f.into()],
            2,
            "<CMD>",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                f.into(),
                "--".into(),
                "no-such-command-jcfs".into(),
            ],
            127,
            "not found",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                f.into(),
                "--".into(),
                s(&plain),
            ],
            126,
            "not an executable",
        ),
        (
            vec![
                "--cache".into(),
                format!("a:{f}"),
                "--cache".into(),
                format!("b:{}", s(&full)),
                "--".into(),
                "true".into(),
            ],
            2,
            "not empty",
        ),
        (
            vec![
                "--cache".into(),
                "maven".into(),
                "--dir".into(),
                f.into(),
                "--cache-mode".into(),
                "zfs".into(),
                "--".into(),
                "true".into(),
            ],
            2,
            "--cache-mode",
        ),
    ];
    for (args, code, msg) in cases {
        let mut all = vec!["run".to_string()];
        all.extend(args.iter().cloned());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let r = n.run(&all);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(msg), "{args:?}: {}", r.stderr);
        assert!(!fresh.exists(), "{args:?} made its DIR");
        let now: Vec<PathBuf> = std::fs::read_dir(n.state().join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(now, state_before, "{args:?} made a volume");
        assert_eq!(n.mounts(), mounts_before, "{args:?} mounted something");
        assert_eq!(
            loops_now(&n),
            loops_before,
            "{args:?} attached a loop device"
        );
    }
    assert_eq!(std::fs::read_to_string(full.join("x")).unwrap(), "x");
    kill(live.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(finish(live).code, 143);
    nix::mount::umount(&mounted).unwrap();
    n.delete(&created, &[]).ok();
    n.assert_clean();
}

#[test]
fn real_node_release_refuses_while_a_volume_is_live_then_releases_everything() {
    if !root_or_skip("real_node_release_refuses_while_a_volume_is_live_then_releases_everything") {
        return;
    }
    // Layer mounts are kept after their last volume: what a release is for.
    let n = Node::with_config("layer_keep_seconds = 600\n");
    for i in 0..2 {
        let d = n.create(&format!("w{i}"), "maven", &["--write-back"]);
        std::fs::write(d.join(format!("f{i}")), "x").unwrap();
        n.delete(&d, &[]).ok();
    }
    let live = n.create("live", "maven", &[]);
    let (mounts, loops) = (n.mounts(), loops_now(&n));
    let r = n.run(&["node", "release"]);
    assert_eq!(r.code, CONFLICT, "{}", r.stderr);
    assert!(
        r.stderr.contains(&live.display().to_string()),
        "names the live volume: {}",
        r.stderr
    );
    assert_eq!(
        (n.mounts(), n.loops()),
        (mounts, loops),
        "a refusal changes nothing"
    );
    assert_eq!(std::fs::read_to_string(live.join("f1")).unwrap(), "x");
    n.delete(&live, &[]).ok();
    assert!(
        !n.mounts().is_empty(),
        "the layer mounts are kept after the last volume"
    );
    let r = n.run(&["node", "release", "-o", "json"]).ok().json();
    assert_eq!(r["unmounted"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["loops_released"].as_array().unwrap().len(), 2, "{r}");
    n.assert_clean();
    // Idempotent, and nothing was lost: the next volume mounts the layers again.
    let r = n.run(&["node", "release", "-o", "json"]).ok().json();
    assert_eq!(
        r,
        serde_json::json!({"unmounted": [], "loops_released": []})
    );
    let d = n.create("again", "maven", &[]);
    assert_eq!(std::fs::read_to_string(d.join("f0")).unwrap(), "x");
    n.delete(&d, &[]).ok();
    n.run(&["node", "release"]).ok();
    n.assert_clean();
}

#[test]
fn real_node_release_lets_go_of_the_reflink_pool() {
    if !root_or_skip("real_node_release_lets_go_of_the_reflink_pool") {
        return;
    }
    let n = Node::with_config("clone_pool_size = \"4Gi\"\n");
    let clone = [
        "--cache-mode",
        "clone",
        "--cache-size",
        "512Mi",
        "--write-back",
    ];
    let d = n.create("c1", "podman", &clone);
    std::fs::write(d.join("image"), "layers").unwrap();
    let r = n.run(&["node", "release"]);
    assert_eq!(r.code, CONFLICT, "{}", r.stderr);
    assert!(r.stderr.contains(&d.display().to_string()), "{}", r.stderr);
    n.delete(&d, &[]).ok();
    assert!(
        loops_now(&n).iter().any(|l| l.ends_with("/state/pool.img")),
        "the pool stays attached between volumes"
    );
    let r = n.run(&["node", "release", "-o", "json"]).ok().json();
    let pool = n.state().join("mnt/pool").display().to_string();
    assert!(
        r["unmounted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == pool.as_str()),
        "{r}"
    );
    n.assert_clean();
    // The generation is in the pool image, which the next clone volume mounts again.
    let d = n.create("c2", "podman", &clone);
    assert_eq!(std::fs::read_to_string(d.join("image")).unwrap(), "layers");
    n.delete(&d, &["--discard"]).ok();
    n.run(&["node", "release"]).ok();
    n.assert_clean();
}
