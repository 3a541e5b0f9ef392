//! The CI recipes of runners/ executed the way their CI systems execute them, against real
//! volumes (root: loop devices, ext4, overlayfs). A harness plays each runner's part — its
//! documented environment, the order of its hooks and stages, the working directory, the files
//! it hands a step (GITHUB_ENV, GITHUB_STATE, GITHUB_OUTPUT: parsed as actions/runner parses
//! them) — for a job that succeeds, one that fails, one that is cancelled, one whose end hook
//! never runs and two that run at once in different concurrency slots, then checks what the
//! cache and its scopes hold: default-branch success → the cache; a pull/merge request's success
//! → its scope; any failure → nothing; the next job of the request sees its scope and the cache.
//!
//! Without root, the unprivileged tests still run: the mapping (shell and JavaScript against
//! runners/mapping-cases.json), the action's manifest and bundle, the offline validation of the
//! Kubernetes recipes and the systemd units.
//!
//! Tests named `..._scope...` need `volume create --scope` from the engine (DESIGN.md, "Scopes").

mod common;

use common::{root_or_skip, Node, Run};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The namespace every recipe uses by default.
const NS: &str = "ci";
/// The jobs' repository (GitHub) and project (GitLab): their cache is its path made a label.
const PROJECT: &str = "Octo-Org/App";
const CACHE: &str = "octo-org-app";
/// The runner host's PATH (the tests' own may hold anything).
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn runners() -> PathBuf {
    Path::new(REPO).join("runners")
}

fn output(c: &mut Command) -> Run {
    let out = c.output().expect("run a recipe");
    use std::os::unix::process::ExitStatusExt;
    Run {
        code: out
            .status
            .code()
            .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0)),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
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

/// Kills a step the way a runner cancels a job: its whole process group, without a chance to
/// finish; returns once it is gone.
fn cancel(mut child: Child) {
    let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
    let _ = child.wait();
}

// ------------------------------------------------------------------------------------------
// The mapping: one table, two implementations.

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(runners().join("mapping-cases.json")).unwrap())
        .unwrap()
}

/// Runs `. runners/common.sh; SNIPPET` in a clean environment plus `env`.
fn common_sh(snippet: &str, args: &[&str], env: &[(String, String)]) -> Run {
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(format!(". {}/common.sh; {snippet}", runners().display()))
        .arg("common.sh")
        .args(args)
        .env_clear()
        .env("PATH", HOST_PATH)
        .envs(env.iter().map(|(k, v)| (k, v)));
    output(&mut c)
}

#[test]
fn mapping_shell_agrees_with_the_shared_table() {
    let t = cases();
    for c in t["label"].as_array().unwrap() {
        let input = c["in"].as_str().unwrap();
        let r = common_sh("jcfs_dns_label \"$1\"", &[input], &[]);
        assert_eq!(
            r.stdout,
            c["out"].as_str().unwrap(),
            "jcfs_dns_label {input:?}: {}",
            r.stderr
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for (system, function) in [
        ("github", "jcfs_github_target"),
        ("gitlab", "jcfs_gitlab_target"),
        ("buildkite", "jcfs_buildkite_target"),
    ] {
        for c in t[system].as_array().unwrap() {
            let mut env: Vec<(String, String)> = c["env"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            if let Some(p) = c.get("payload") {
                let f = tmp.path().join("event.json");
                std::fs::write(&f, p.to_string()).unwrap();
                env.push(("GITHUB_EVENT_PATH".into(), f.display().to_string()));
            }
            let r = common_sh(
                &format!("{function}; printf '%s|%s' \"$JCFS_SCOPE\" \"$JCFS_WRITE_BACK\""),
                &[],
                &env,
            );
            let want = format!(
                "{}|{}",
                c["expect"]["scope"].as_str().unwrap(),
                c["expect"]["writeBack"].as_bool().unwrap()
            );
            assert_eq!(r.stdout, want, "{system}: {}: {}", c["name"], r.stderr);
            n += 1;
        }
    }
    assert!(n >= 25, "the table lost its cases ({n})");
    // A runner host without jq reads the payload with python3.
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["tr", "sha256sum", "python3"] {
        let found = HOST_PATH
            .split(':')
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} is missing"));
        std::os::unix::fs::symlink(found, bin.join(tool)).unwrap();
    }
    let event = tmp.path().join("event.json");
    std::fs::write(
        &event,
        r#"{"pull_request": {"number": 77}, "repository": {"default_branch": "trunk"}}"#,
    )
    .unwrap();
    for (name, reff, want) in [
        ("pull_request_target", "refs/heads/trunk", "pr-77"),
        ("push", "refs/heads/trunk", ""),
    ] {
        let mut c = Command::new("/bin/bash");
        c.arg("-c")
            .arg(format!(
                ". {}/common.sh; command -v jq && exit 9; jcfs_github_target; printf '%s' \"$JCFS_SCOPE\"",
                runners().display()
            ))
            .env_clear()
            .env("PATH", &bin)
            .env("GITHUB_EVENT_NAME", name)
            .env("GITHUB_REF", reff)
            .env("GITHUB_EVENT_PATH", &event);
        let r = output(&mut c);
        assert_eq!(
            (r.code, r.stdout.as_str()),
            (0, want),
            "without jq, {name}: {}",
            r.stderr
        );
    }
}

fn node_or_panic() -> &'static str {
    let ok = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "node is missing: run scripts/setup (the GitHub action's tests run it)"
    );
    "node"
}

#[test]
fn mapping_javascript_agrees_with_the_shared_table() {
    let r = output(
        Command::new(node_or_panic())
            .args(["--test", "test/"])
            .current_dir(runners().join("github-action")),
    );
    assert_eq!(r.code, 0, "node --test:\n{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("# fail 0"), "{}", r.stdout);
}

// ------------------------------------------------------------------------------------------
// The GitHub action's manifest and bundle.

fn action_manifest() -> serde_yaml::Value {
    serde_yaml::from_str(
        &std::fs::read_to_string(runners().join("github-action/action.yml")).unwrap(),
    )
    .unwrap()
}

#[test]
fn github_action_manifest_runs_node20_and_deletes_in_an_always_post_step() {
    let m = action_manifest();
    let runs = &m["runs"];
    assert_eq!(runs["using"].as_str(), Some("node20"));
    assert_eq!(runs["main"].as_str(), Some("dist/main.js"));
    assert_eq!(runs["post"].as_str(), Some("dist/post.js"));
    assert_eq!(runs["post-if"].as_str(), Some("always()"));
    // The post step learns the job's status from this input's default, evaluated again when the
    // post step runs (actions/runner: ActionRunner.RunAsync evaluates inputs and their defaults
    // for each stage; `job` is among an input default's contexts in action_yaml.json).
    assert_eq!(
        m["inputs"]["job-status"]["default"].as_str(),
        Some("${{ job.status }}")
    );
    assert_eq!(m["inputs"]["path"]["required"].as_bool(), Some(true));
    // Every input the sources read is declared (an undeclared one is always empty).
    let inputs = m["inputs"].as_mapping().unwrap();
    for f in ["main.js", "post.js"] {
        let src = std::fs::read_to_string(runners().join("github-action/src").join(f)).unwrap();
        for (i, _) in src.match_indices("getInput('") {
            let name = &src[i + 10..];
            let name = &name[..name.find('\'').unwrap()];
            assert!(
                inputs.contains_key(serde_yaml::Value::from(name)),
                "src/{f} reads input {name:?}, which action.yml does not declare"
            );
        }
    }
    // dist/ is CommonJS whatever package.json says of the sources.
    let dist: Value = serde_json::from_str(
        &std::fs::read_to_string(runners().join("github-action/dist/package.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dist["type"], "commonjs");
}

#[test]
fn github_action_dist_is_the_bundle_of_its_sources() {
    let dir = runners().join("github-action");
    let esbuild = dir.join("node_modules/.bin/esbuild");
    if !esbuild.exists() {
        // Without the pinned bundler (scripts/setup runs `npm ci` there) the check cannot be made:
        // say so loudly rather than pass.
        eprintln!(
            "\n!!!!! SKIPPED github_action_dist_is_the_bundle_of_its_sources: {} is missing: run scripts/setup (npm ci in runners/github-action) !!!!!\n",
            esbuild.display()
        );
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let pkg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("package.json")).unwrap()).unwrap();
    // The build script of package.json, with another output directory.
    let build = pkg["scripts"]["build"].as_str().unwrap().replace(
        "--outdir=dist",
        &format!("--outdir={}", out.path().display()),
    );
    let r = output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("PATH=node_modules/.bin:$PATH {build}"))
            .current_dir(&dir),
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for f in ["main.js", "post.js"] {
        let built = std::fs::read(out.path().join(f)).unwrap();
        let committed = std::fs::read(dir.join("dist").join(f)).unwrap();
        assert!(
            built == committed,
            "dist/{f} is not the bundle of src/: run `npm run build` in runners/github-action and commit dist/"
        );
    }
}

// ------------------------------------------------------------------------------------------
// A runner host with real volumes.

/// A runner host: a node (its own state dir and config) and the directory the recipes make job
/// volumes in.
struct Host {
    node: Node,
    root: PathBuf,
}

impl Host {
    fn new() -> Host {
        let node = Node::with_config("");
        let root = node.tmp.path().join("vols/runners");
        std::fs::create_dir_all(&root).unwrap();
        Host { node, root }
    }

    /// What the admin gives every recipe (the runner's .env, config.toml's `environment`).
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), HOST_PATH.into()),
            ("HOME".into(), "/root".into()),
            ("JOBCACHEFS".into(), env!("CARGO_BIN_EXE_jobcachefs").into()),
            (
                "JOBCACHEFS_STATE_DIR".into(),
                self.node.state().display().to_string(),
            ),
            (
                "JOBCACHEFS_CONFIG".into(),
                self.node.config.as_ref().unwrap().display().to_string(),
            ),
            ("JOBCACHEFS_ROOT".into(), self.root.display().to_string()),
            ("JOBCACHEFS_LOG".into(), "info".into()),
        ]
    }

    fn jcfs(&self, args: &[&str]) -> Run {
        self.node.run(args)
    }

    /// The cache's generation (0: not made yet).
    fn generation(&self) -> u64 {
        let r = self.jcfs(&["cache", "show", CACHE, "--namespace", NS, "-o", "json"]);
        if r.code == 4 {
            return 0;
        }
        r.ok().json()["generation"].as_u64().unwrap()
    }

    /// How many commits a scope holds: its layers (0: none).
    fn scope_layers(&self, scope: &str) -> u64 {
        let r = self.jcfs(&["cache", "show", CACHE, "--namespace", NS, "-o", "json"]);
        if r.code == 4 {
            return 0;
        }
        let v = r.ok().json();
        v["scopes"]
            .as_array()
            .unwrap_or(&Vec::new())
            .iter()
            .find(|s| s["scope"] == scope)
            .map(|s| s["layers"].as_u64().unwrap())
            .unwrap_or(0)
    }

    /// The file `name` as a new job would read it: from the cache, or the cache and `scope`.
    fn read(&self, scope: Option<&str>, name: &str) -> Option<String> {
        let probe = self.node.vol("probe");
        let mut args = vec![
            "volume",
            "create",
            probe.to_str().unwrap(),
            "--cache",
            CACHE,
            "--namespace",
            NS,
        ];
        if let Some(s) = scope {
            args.extend(["--scope", s]);
        }
        self.jcfs(&args).ok();
        let text = std::fs::read_to_string(probe.join(name)).ok();
        self.jcfs(&["volume", "delete", probe.to_str().unwrap(), "--discard"])
            .ok();
        text
    }

    /// Live volumes' DIRs.
    fn volumes(&self) -> Vec<String> {
        self.jcfs(&["volume", "ls", "-o", "json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["dir"].as_str().unwrap().to_string())
            .collect()
    }

    fn assert_no_volumes(&self) {
        assert_eq!(self.volumes(), Vec::<String>::new(), "volumes left");
        self.node.assert_clean_volumes();
    }
}

// ------------------------------------------------------------------------------------------
// GitHub Actions: the runner's side (actions/runner, src/Runner.Worker).

/// Reads a GITHUB_ENV / GITHUB_STATE / GITHUB_OUTPUT file as the runner does
/// (FileCommandManager.cs, EnvFileKeyValuePairs): `NAME=VALUE` lines and `NAME<<DELIMITER`
/// blocks ending at a line that is exactly the delimiter.
fn file_command(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut pairs = Vec::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let eq = line.find('=');
        let heredoc = line.find("<<");
        match (eq, heredoc) {
            (Some(e), h) if h.is_none_or(|h| e < h) => {
                pairs.push((line[..e].to_string(), line[e + 1..].to_string()))
            }
            (_, Some(h)) => {
                let (key, delim) = (&line[..h], &line[h + 2..]);
                assert!(
                    !key.is_empty() && !delim.is_empty(),
                    "bad heredoc line {line:?}"
                );
                let mut value = Vec::new();
                loop {
                    let l = lines
                        .next()
                        .unwrap_or_else(|| panic!("{}: no delimiter {delim}", path.display()));
                    if l == delim {
                        break;
                    }
                    value.push(l);
                }
                pairs.push((key.to_string(), value.join("\n")));
            }
            _ => panic!("{}: invalid line {line:?}", path.display()),
        }
    }
    pairs
}

/// One GitHub Actions job on a self-hosted runner, in the runner's layout: `_work/<repo>/<repo>`
/// the workspace, `_work/_temp` RUNNER_TEMP, the event payload at
/// `_temp/_github_workflow/event.json`.
struct GithubJob {
    env: BTreeMap<String, String>,
    workspace: PathBuf,
    temp: PathBuf,
    step: u32,
    outputs: BTreeMap<String, String>,
    state: BTreeMap<String, String>,
}

/// A push of `branch`, in a repository whose default branch is `main`.
fn push(branch: &str) -> (Vec<(String, String)>, Value) {
    (
        vec![
            ("GITHUB_EVENT_NAME".into(), "push".into()),
            ("GITHUB_REF".into(), format!("refs/heads/{branch}")),
            ("GITHUB_REF_NAME".into(), branch.into()),
            ("GITHUB_REF_TYPE".into(), "branch".into()),
        ],
        serde_json::json!({"ref": format!("refs/heads/{branch}"), "repository": {"default_branch": "main", "full_name": PROJECT}}),
    )
}

/// A pull request's `pull_request` event.
fn pull_request(number: u32, head: &str) -> (Vec<(String, String)>, Value) {
    (
        vec![
            ("GITHUB_EVENT_NAME".into(), "pull_request".into()),
            ("GITHUB_REF".into(), format!("refs/pull/{number}/merge")),
            ("GITHUB_REF_NAME".into(), format!("{number}/merge")),
            ("GITHUB_HEAD_REF".into(), head.into()),
            ("GITHUB_BASE_REF".into(), "main".into()),
        ],
        serde_json::json!({"number": number, "pull_request": {"number": number}, "repository": {"default_branch": "main", "full_name": PROJECT}}),
    )
}

impl GithubJob {
    fn new(host: &Host, runner: &str, event: (Vec<(String, String)>, Value)) -> Self {
        let work = host.node.tmp.path().join(format!("{runner}/_work"));
        let workspace = work.join("App/App");
        let temp = work.join("_temp");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::create_dir_all(temp.join("_github_workflow")).unwrap();
        let payload = temp.join("_github_workflow/event.json");
        std::fs::write(&payload, event.1.to_string()).unwrap();
        let mut env: BTreeMap<String, String> = host.env().into_iter().collect();
        for (k, v) in [
            ("CI", "true".to_string()),
            ("GITHUB_ACTIONS", "true".into()),
            ("GITHUB_REPOSITORY", PROJECT.into()),
            ("GITHUB_WORKSPACE", workspace.display().to_string()),
            ("GITHUB_EVENT_PATH", payload.display().to_string()),
            ("RUNNER_TEMP", temp.display().to_string()),
            ("RUNNER_NAME", runner.into()),
            ("RUNNER_OS", "Linux".into()),
        ] {
            env.insert(k.into(), v);
        }
        env.extend(event.0);
        GithubJob {
            env,
            workspace,
            temp,
            step: 0,
            outputs: BTreeMap::new(),
            state: BTreeMap::new(),
        }
    }

    /// The file commands of one step: fresh empty files, as FileCommandManager.InitializeFiles
    /// makes them under `_temp/_runner_file_commands`.
    fn file_commands(&mut self) -> BTreeMap<&'static str, PathBuf> {
        self.step += 1;
        let dir = self.temp.join("_runner_file_commands");
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = BTreeMap::new();
        for (var, prefix) in [
            ("GITHUB_ENV", "set_env_"),
            ("GITHUB_PATH", "add_path_"),
            ("GITHUB_STATE", "save_state_"),
            ("GITHUB_OUTPUT", "set_output_"),
            ("GITHUB_STEP_SUMMARY", "step_summary_"),
        ] {
            let f = dir.join(format!("{prefix}{:08}-step", self.step));
            std::fs::write(&f, "").unwrap();
            files.insert(var, f);
        }
        files
    }

    /// Runs one step's process with the job's environment and file commands, then processes the
    /// files as the runner does after the step.
    fn run(&mut self, mut c: Command, extra: &[(String, String)]) -> Run {
        let files = self.file_commands();
        c.current_dir(&self.workspace)
            .env_clear()
            .envs(&self.env)
            .envs(files.iter().map(|(k, v)| (*k, v)))
            .envs(extra.iter().map(|(k, v)| (k, v)));
        let r = output(&mut c);
        self.process(&files);
        r
    }

    fn process(&mut self, files: &BTreeMap<&'static str, PathBuf>) {
        self.env.extend(file_command(&files["GITHUB_ENV"]));
        self.state.extend(file_command(&files["GITHUB_STATE"]));
        self.outputs.extend(file_command(&files["GITHUB_OUTPUT"]));
    }

    /// A job hook: `bash -e HOOK` (JobHookProvider: a `.sh` path runs with the `sh` argument
    /// format, `-e {0}`, preferring bash), in the workspace.
    fn hook(&mut self, script: &str) -> Run {
        let mut c = Command::new("bash");
        c.arg("-e")
            .arg(runners().join("github-actions").join(script));
        self.run(c, &[])
    }

    /// A `run:` step, in the runner's default shell on Linux: `bash --noprofile --norc -eo
    /// pipefail {0}`.
    fn step(&mut self, script: &str) -> Run {
        let f = self.temp.join(format!("step-{}.sh", self.step + 1));
        std::fs::write(&f, script).unwrap();
        let mut c = Command::new("bash");
        c.args(["--noprofile", "--norc", "-eo", "pipefail"]).arg(&f);
        self.run(c, &[])
    }

    /// A step started in its own process group, for a cancellation; returns once it wrote
    /// `ready`.
    fn spawn_step(&mut self, script: &str, ready: &Path) -> Child {
        let files = self.file_commands();
        let child = Command::new("bash")
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
            .current_dir(&self.workspace)
            .env_clear()
            .envs(&self.env)
            .envs(files.iter().map(|(k, v)| (*k, v)))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(ready);
        child
    }

    /// A node20 action's step (`main` or `post`): `node dist/<file>` in the workspace, with its
    /// inputs as INPUT_<NAME> — every input of action.yml, the defaults evaluated (`${{
    /// job.status }}` to `status`), `with` overriding — and, for the post step, the state the
    /// main step saved as STATE_<name>.
    fn action(&mut self, file: &str, with: &[(&str, &str)], status: &str) -> Run {
        let m = action_manifest();
        let mut extra = Vec::new();
        for (name, spec) in m["inputs"].as_mapping().unwrap() {
            let name = name.as_str().unwrap();
            let mut value = spec["default"]
                .as_str()
                .unwrap_or("")
                .replace("${{ job.status }}", status);
            if let Some((_, v)) = with.iter().find(|(k, _)| *k == name) {
                value = v.to_string();
            }
            extra.push((
                format!("INPUT_{}", name.replace(' ', "_").to_uppercase()),
                value,
            ));
        }
        for (k, v) in &self.state {
            extra.push((format!("STATE_{k}"), v.clone()));
        }
        let mut c = Command::new(node_or_panic());
        c.arg(runners().join("github-action/dist").join(file));
        self.run(c, &extra)
    }
}

/// The steps of a job that uses the hooks: the build, then the documented last step.
const MARK_SUCCESS: &str = "touch \"$JOBCACHEFS_SUCCESS_FILE\"";

#[test]
fn real_github_hooks_commit_a_default_branch_success_and_nothing_of_a_failed_or_cancelled_job() {
    if !root_or_skip(
        "real_github_hooks_commit_a_default_branch_success_and_nothing_of_a_failed_or_cancelled_job",
    ) {
        return;
    }
    let host = Host::new();
    // A job that succeeds: the volume is there for every step, in the environment.
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    let r = job.hook("job-started.sh").ok();
    assert!(r.stdout.contains("write-back: true"), "{}", r.stdout);
    let dir = job.env["JOBCACHEFS_DIR"].clone();
    assert!(dir.starts_with(host.root.to_str().unwrap()), "{dir}");
    assert_eq!(
        job.env["JOBCACHEFS_SUCCESS_FILE"],
        format!("{dir}/.jobcachefs-success")
    );
    job.step("echo 1 > \"$JOBCACHEFS_DIR/dep\"; test \"$PWD\" = \"$GITHUB_WORKSPACE\"")
        .ok();
    job.step(MARK_SUCCESS).ok();
    let r = job.hook("job-completed.sh").ok();
    assert!(r.stdout.contains("committed"), "{}", r.stdout);
    assert_eq!(host.generation(), 1);
    assert_eq!(host.read(None, "dep").as_deref(), Some("1\n"));
    assert_eq!(
        host.read(None, ".jobcachefs-success"),
        None,
        "the marker never reaches the cache"
    );

    // A job that fails: the runner skips the `if: success()` step; the completed hook runs.
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    job.hook("job-started.sh").ok();
    let r = job.step("cat \"$JOBCACHEFS_DIR/dep\"; echo 2 > \"$JOBCACHEFS_DIR/dep\"; exit 1");
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "1\n", "the job read the cache");
    let r = job.hook("job-completed.sh").ok();
    assert!(
        r.stdout.contains("\"outcome\": \"discarded\""),
        "{}",
        r.stdout
    );
    assert_eq!(host.generation(), 1);

    // A job cancelled in the middle of a step: its process tree is killed, later steps skipped.
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    job.hook("job-started.sh").ok();
    let ready = host.node.tmp.path().join("ready");
    let child = job.spawn_step(
        &format!(
            "echo 3 > \"$JOBCACHEFS_DIR/dep\"; touch {}; sleep 300",
            ready.display()
        ),
        &ready,
    );
    cancel(child);
    let r = job.hook("job-completed.sh").ok();
    assert!(
        r.stdout.contains("\"outcome\": \"discarded\""),
        "{}",
        r.stdout
    );
    assert_eq!(host.generation(), 1);
    assert_eq!(host.read(None, "dep").as_deref(), Some("1\n"));
    host.assert_no_volumes();
}

#[test]
fn real_github_hooks_repair_a_job_whose_completed_hook_never_ran() {
    if !root_or_skip("real_github_hooks_repair_a_job_whose_completed_hook_never_ran") {
        return;
    }
    let host = Host::new();
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    job.hook("job-started.sh").ok();
    job.step("echo lost > \"$JOBCACHEFS_DIR/f\"").ok();
    job.step(MARK_SUCCESS).ok();
    // The runner dies here: no completed hook. Its volume stays mounted until the next job.
    let dir = job.env["JOBCACHEFS_DIR"].clone();
    assert_eq!(host.volumes(), vec![dir.clone()]);
    // Another runner on the same host is not affected by it.
    let mut other = GithubJob::new(&host, "runner-2", push("main"));
    other.hook("job-started.sh").ok();
    assert_ne!(other.env["JOBCACHEFS_DIR"], dir);
    other.step("echo other > \"$JOBCACHEFS_DIR/g\"").ok();
    other.step(MARK_SUCCESS).ok();
    other.hook("job-completed.sh").ok();
    assert_eq!(host.volumes(), vec![dir.clone()]);
    // The next job of runner-1 discards it (even marked: nothing says that job's end was clean).
    let mut next = GithubJob::new(&host, "runner-1", push("main"));
    let r = next.hook("job-started.sh").ok();
    assert!(
        r.stderr.contains("discarded the volume a job left"),
        "{}",
        r.stderr
    );
    next.step("test ! -e \"$JOBCACHEFS_DIR/f\"; cat \"$JOBCACHEFS_DIR/g\"")
        .ok();
    next.step(MARK_SUCCESS).ok();
    next.hook("job-completed.sh").ok();
    assert_eq!(host.read(None, "f"), None);
    assert_eq!(host.read(None, "g").as_deref(), Some("other\n"));
    host.assert_no_volumes();
}

#[test]
fn real_github_hooks_pull_requests_write_their_scope_and_read_the_cache() {
    if !root_or_skip("real_github_hooks_pull_requests_write_their_scope_and_read_the_cache") {
        return;
    }
    let host = Host::new();
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    job.hook("job-started.sh").ok();
    job.step("echo main > \"$JOBCACHEFS_DIR/base\"").ok();
    job.step(MARK_SUCCESS).ok();
    job.hook("job-completed.sh").ok();
    assert_eq!(host.generation(), 1);
    // PR 42 succeeds: it read the cache, its writes go into its scope, never the cache.
    let mut job = GithubJob::new(&host, "runner-1", pull_request(42, "feature/x"));
    let r = job.hook("job-started.sh").ok();
    assert!(r.stdout.contains("scope pr-42"), "{}", r.stdout);
    job.step("cat \"$JOBCACHEFS_DIR/base\"; echo 42 > \"$JOBCACHEFS_DIR/pr\"")
        .ok();
    job.step(MARK_SUCCESS).ok();
    let r = job.hook("job-completed.sh").ok();
    assert!(r.stdout.contains("committed"), "{}", r.stdout);
    assert_eq!(host.generation(), 1, "the cache did not move");
    assert_eq!(host.scope_layers("pr-42"), 1);
    assert_eq!(host.read(None, "pr"), None);
    // Its next job sees its scope and the cache; a failure of it changes nothing.
    let mut job = GithubJob::new(&host, "runner-1", pull_request(42, "feature/x"));
    job.hook("job-started.sh").ok();
    let r = job
        .step("cat \"$JOBCACHEFS_DIR/base\" \"$JOBCACHEFS_DIR/pr\"; echo bad > \"$JOBCACHEFS_DIR/pr\"; exit 2");
    assert_eq!((r.code, r.stdout.as_str()), (2, "main\n42\n"));
    job.hook("job-completed.sh").ok();
    assert_eq!(host.scope_layers("pr-42"), 1);
    assert_eq!(host.read(Some("pr-42"), "pr").as_deref(), Some("42\n"));
    // A branch other than the default writes its own scope; another PR does not see PR 42's.
    let mut job = GithubJob::new(&host, "runner-1", push("Feature/Y"));
    job.hook("job-started.sh").ok();
    job.step("test ! -e \"$JOBCACHEFS_DIR/pr\"; echo y > \"$JOBCACHEFS_DIR/y\"")
        .ok();
    job.step(MARK_SUCCESS).ok();
    job.hook("job-completed.sh").ok();
    assert_eq!(host.scope_layers("feature-y"), 1);
    assert_eq!(host.generation(), 1);
    host.assert_no_volumes();
}

// ------------------------------------------------------------------------------------------
// The GitHub action, run with node the way the runner runs a node20 action.

#[test]
fn real_github_action_commits_on_success_and_discards_failed_and_cancelled_jobs() {
    if !root_or_skip("real_github_action_commits_on_success_and_discards_failed_and_cancelled_jobs")
    {
        return;
    }
    let host = Host::new();
    let with = [("path", ".m2/repository")];
    // Success: main mounts the volume inside the workspace; post commits it.
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    let r = job.action("main.js", &with, "success");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let dir = job.workspace.join(".m2/repository");
    assert_eq!(job.env["JOBCACHEFS_DIR"], dir.display().to_string());
    assert_eq!(job.outputs["dir"], dir.display().to_string());
    assert_eq!(job.outputs["writes-to"], "cache");
    assert_eq!(job.outputs["scope"], "");
    assert_eq!(job.state["dir"], dir.display().to_string());
    job.step("echo jar > .m2/repository/lib.jar").ok();
    let r = job.action("post.js", &with, "success");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("committed"), "{}", r.stdout);
    assert_eq!(host.generation(), 1);
    assert_eq!(host.read(None, "lib.jar").as_deref(), Some("jar\n"));
    assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none());

    // Failure and cancellation: the post step still runs (post-if: always()), and discards.
    for status in ["failure", "cancelled"] {
        let mut job = GithubJob::new(&host, "runner-1", push("main"));
        job.action("main.js", &with, status).ok();
        job.step("echo broken > .m2/repository/lib.jar").ok();
        let r = job.action("post.js", &with, status);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("discarded"), "{status}: {}", r.stdout);
        assert_eq!(host.generation(), 1, "{status}");
    }
    // A job whose post step never ran: the next main step discards what it left.
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    job.action("main.js", &with, "success").ok();
    job.step("echo lost > .m2/repository/lost").ok();
    let mut next = GithubJob::new(&host, "runner-1", push("main"));
    let r = next.action("main.js", &with, "success").ok();
    assert!(
        r.stdout.contains("discarded the volume a job left"),
        "{}",
        r.stdout
    );
    next.step("test ! -e .m2/repository/lost").ok();
    next.action("post.js", &with, "success").ok();
    assert_eq!(host.read(None, "lib.jar").as_deref(), Some("jar\n"));
    // A main step that failed before making a volume: the post step has nothing to do.
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    let r = job.action(
        "main.js",
        &[("path", ".m2/repository"), ("cache", "Not_A_Label")],
        "success",
    );
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("::error::"), "{}", r.stdout);
    let r = job.action("post.js", &with, "failure").ok();
    assert!(r.stdout.contains("nothing to delete"), "{}", r.stdout);
    host.assert_no_volumes();
}

#[test]
fn real_github_action_pull_requests_write_their_scope() {
    if !root_or_skip("real_github_action_pull_requests_write_their_scope") {
        return;
    }
    let host = Host::new();
    let with = [("path", "cache")];
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    job.action("main.js", &with, "success").ok();
    job.step("echo main > cache/base").ok();
    job.action("post.js", &with, "success").ok();
    let mut job = GithubJob::new(&host, "runner-1", pull_request(7, "fix"));
    job.action("main.js", &with, "success").ok();
    assert_eq!(job.outputs["scope"], "pr-7");
    assert_eq!(job.outputs["writes-to"], "scope");
    job.step("cat cache/base; echo 7 > cache/pr").ok();
    let r = job.action("post.js", &with, "success").ok();
    assert!(r.stdout.contains("committed"), "{}", r.stdout);
    assert_eq!(host.generation(), 1);
    assert_eq!(host.scope_layers("pr-7"), 1);
    let mut job = GithubJob::new(&host, "runner-1", pull_request(7, "fix"));
    job.action("main.js", &with, "success").ok();
    let r = job.step("cat cache/base cache/pr").ok();
    assert_eq!(r.stdout, "main\n7\n");
    job.action("post.js", &with, "failure").ok();
    assert_eq!(host.scope_layers("pr-7"), 1);
    host.assert_no_volumes();
}

// ------------------------------------------------------------------------------------------
// GitLab Runner (gitlab-org/gitlab-runner: shells/abstract.go, executors/custom/custom.go,
// common/build.go).

/// A GitLab job's predefined variables.
fn gitlab_vars(slot: u32, ref_name: &str, mr: Option<u32>) -> Vec<(String, String)> {
    let mut v = vec![
        ("CI".to_string(), "true".to_string()),
        ("GITLAB_CI".into(), "true".into()),
        ("CI_RUNNER_ID".into(), "7".into()),
        ("CI_CONCURRENT_ID".into(), slot.to_string()),
        ("CI_PROJECT_PATH".into(), PROJECT.into()),
        ("CI_DEFAULT_BRANCH".into(), "main".into()),
        ("CI_COMMIT_REF_NAME".into(), ref_name.into()),
        (
            "CI_COMMIT_REF_PROTECTED".into(),
            (ref_name == "main").to_string(),
        ),
    ];
    match mr {
        Some(iid) => v.push(("CI_MERGE_REQUEST_IID".into(), iid.to_string())),
        None => v.push(("CI_COMMIT_BRANCH".into(), ref_name.into())),
    }
    v
}

/// A `[[runners]]` entry of a recipe's config.toml, its paths pointing into this checkout.
fn gitlab_config(executor: &str) -> toml::Value {
    let text = std::fs::read_to_string(runners().join("gitlab").join(executor).join("config.toml"))
        .unwrap()
        .replace("/opt/jobcachefs", REPO);
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["runners"][0].clone()
}

/// The shell executor's step_script stage as the runner writes it (shells/abstract.go
/// writeUserScript; bash.go: errexit and pipefail, every command checked): the job's variables
/// exported, `cd` into the build directory, pre_build_script, the job's script,
/// post_build_script — one script, so the post script runs only if the job's script succeeded.
fn gitlab_shell_stage(host: &Host, vars: &[(String, String)], script: &[&str]) -> Command {
    let runner = gitlab_config("shell");
    let build_dir = host.node.tmp.path().join("builds/octo-org/app");
    std::fs::create_dir_all(&build_dir).unwrap();
    let mut s = String::from("set -o pipefail\nset -o errexit\n");
    for (k, v) in vars {
        s += &format!("export {k}='{v}'\n");
    }
    s += &format!("cd '{}'\n", build_dir.display());
    s += runner["pre_build_script"].as_str().unwrap();
    s += "\n";
    for line in script {
        s += line;
        s += "\n";
    }
    s += runner["post_build_script"].as_str().unwrap();
    s += "\n";
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(s)
        .env_clear()
        .envs(host.env())
        .process_group(0);
    c
}

#[test]
fn real_gitlab_shell_commits_a_success_and_the_next_job_in_a_slot_discards_a_failed_one() {
    if !root_or_skip(
        "real_gitlab_shell_commits_a_success_and_the_next_job_in_a_slot_discards_a_failed_one",
    ) {
        return;
    }
    let host = Host::new();
    let main0 = gitlab_vars(0, "main", None);
    let r = output(&mut gitlab_shell_stage(
        &host,
        &main0,
        &["echo 1 > \"$JOBCACHEFS_DIR/dep\""],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("committed"), "{}", r.stderr);
    assert_eq!(host.generation(), 1);
    // A failing script: post_build_script never runs, the volume stays in slot 0.
    let r = output(&mut gitlab_shell_stage(
        &host,
        &main0,
        &[
            "echo 2 > \"$JOBCACHEFS_DIR/dep\"",
            "false",
            "echo unreachable",
        ],
    ));
    assert_eq!(r.code, 1);
    assert_eq!(host.volumes().len(), 1);
    // A cancelled job in slot 1: killed in the middle of its script.
    let ready = host.node.tmp.path().join("ready");
    let line = format!(
        "echo 3 > \"$JOBCACHEFS_DIR/dep\"; touch {}; sleep 300",
        ready.display()
    );
    let child = gitlab_shell_stage(&host, &gitlab_vars(1, "main", None), &[&line])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&ready);
    cancel(child);
    assert_eq!(host.volumes().len(), 2);
    assert_eq!(host.generation(), 1);
    // The next jobs in slots 0 and 1 discard what their predecessors left and read the cache.
    for slot in [0, 1] {
        let r = output(&mut gitlab_shell_stage(
            &host,
            &gitlab_vars(slot, "main", None),
            &["test \"$(cat \"$JOBCACHEFS_DIR/dep\")\" = 1"],
        ));
        assert_eq!(r.code, 0, "slot {slot}: {}", r.stderr);
        assert!(
            r.stderr.contains("discarded the volume a job left"),
            "slot {slot}: {}",
            r.stderr
        );
    }
    assert_eq!(host.generation(), 1, "unchanged volumes publish nothing");
    host.assert_no_volumes();
}

#[test]
fn real_gitlab_shell_two_concurrent_jobs_use_their_own_slots_and_both_commit() {
    if !root_or_skip("real_gitlab_shell_two_concurrent_jobs_use_their_own_slots_and_both_commit") {
        return;
    }
    let host = Host::new();
    let go = host.node.tmp.path().join("go");
    let mut children = Vec::new();
    for slot in [0u32, 1] {
        let ready = host.node.tmp.path().join(format!("ready-{slot}"));
        let line = format!(
            "echo $JOBCACHEFS_DIR > {ready}; echo {slot} > \"$JOBCACHEFS_DIR/from-{slot}\"; while [ ! -e {go} ]; do sleep 0.05; done",
            ready = ready.display(),
            go = go.display()
        );
        let child = gitlab_shell_stage(&host, &gitlab_vars(slot, "main", None), &[&line])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for(&ready);
        children.push((child, ready));
    }
    // Both are mounted at once, in different slots.
    let dirs: Vec<String> = children
        .iter()
        .map(|(_, r)| std::fs::read_to_string(r).unwrap().trim().to_string())
        .collect();
    assert_ne!(dirs[0], dirs[1]);
    let mut live = host.volumes();
    live.sort();
    let mut want = dirs.clone();
    want.sort();
    assert_eq!(live, want);
    std::fs::write(&go, "").unwrap();
    for (child, _) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Two commits; per file, the last writer wins; different files both stay.
    assert_eq!(host.generation(), 2);
    assert_eq!(host.read(None, "from-0").as_deref(), Some("0\n"));
    assert_eq!(host.read(None, "from-1").as_deref(), Some("1\n"));
    host.assert_no_volumes();
}

#[test]
fn real_gitlab_shell_merge_requests_and_branches_write_their_scope() {
    if !root_or_skip("real_gitlab_shell_merge_requests_and_branches_write_their_scope") {
        return;
    }
    let host = Host::new();
    let r = output(&mut gitlab_shell_stage(
        &host,
        &gitlab_vars(0, "main", None),
        &["echo main > \"$JOBCACHEFS_DIR/base\""],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mr = gitlab_vars(0, "feature/x", Some(12));
    let r = output(&mut gitlab_shell_stage(
        &host,
        &mr,
        &[
            "cat \"$JOBCACHEFS_DIR/base\"",
            "echo 12 > \"$JOBCACHEFS_DIR/mr\"",
        ],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("scope pr-12"), "{}", r.stderr);
    assert_eq!(host.generation(), 1);
    assert_eq!(host.scope_layers("pr-12"), 1);
    let r = output(&mut gitlab_shell_stage(
        &host,
        &mr,
        &["cat \"$JOBCACHEFS_DIR/base\" \"$JOBCACHEFS_DIR/mr\""],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    // An unprotected branch: its own scope.
    let r = output(&mut gitlab_shell_stage(
        &host,
        &gitlab_vars(1, "feature/x", None),
        &[
            "test ! -e \"$JOBCACHEFS_DIR/mr\"",
            "echo b > \"$JOBCACHEFS_DIR/b\"",
        ],
    ));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(host.scope_layers("feature-x"), 1);
    assert_eq!(host.read(None, "b"), None);
    host.assert_no_volumes();
}

/// One job of the custom executor: the runner's calls, in its order, with its environment —
/// the job's variables as CUSTOM_ENV_*, BUILD_FAILURE_EXIT_CODE and SYSTEM_FAILURE_EXIT_CODE,
/// config_exec's `job_env` in every later call — from a temporary directory.
struct CustomJob<'h> {
    host: &'h Host,
    vars: Vec<(String, String)>,
    job_env: Vec<(String, String)>,
    cwd: tempfile::TempDir,
    status: Option<&'static str>,
}

impl<'h> CustomJob<'h> {
    fn new(host: &'h Host, vars: Vec<(String, String)>) -> Self {
        CustomJob {
            host,
            vars,
            job_env: Vec::new(),
            cwd: tempfile::tempdir_in(host.node.tmp.path()).unwrap(),
            status: None,
        }
    }

    fn command(&self, exec: &str, args: &[&str]) -> Command {
        let runner = gitlab_config("custom");
        let mut c = Command::new(runner["custom"][exec].as_str().unwrap());
        c.args(args)
            .current_dir(self.cwd.path())
            .env_clear()
            .envs(self.host.env())
            .envs(self.job_env.iter().map(|(k, v)| (k, v)))
            .envs(
                self.vars
                    .iter()
                    .map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v)),
            )
            .env("BUILD_FAILURE_EXIT_CODE", "1")
            .env("SYSTEM_FAILURE_EXIT_CODE", "2")
            .process_group(0);
        if let Some(s) = self.status {
            // common/build.go executeAfterScript: CI_JOB_STATUS joins the job's variables.
            c.env("CUSTOM_ENV_CI_JOB_STATUS", s);
        }
        c
    }

    fn config(&mut self) {
        let r = output(&mut self.command("config_exec", &[])).ok();
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        self.job_env = v["job_env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
    }

    fn prepare(&mut self) -> Run {
        self.config();
        output(&mut self.command("prepare_exec", &[]))
    }

    fn script(&self, stage: &str, body: &str) -> PathBuf {
        let f = self.cwd.path().join(format!("{stage}.sh"));
        std::fs::write(&f, format!("set -eo pipefail\n{body}\n")).unwrap();
        f
    }

    fn stage(&self, stage: &str, body: &str) -> Run {
        let f = self.script(stage, body);
        output(&mut self.command("run_exec", &[f.to_str().unwrap(), stage]))
    }

    /// The stages after the job's script, for its result (common/build.go executeScript).
    fn finish(&mut self, status: &'static str) -> Run {
        self.status = Some(status);
        self.stage("after_script", "echo after").ok();
        let ok = status == "success";
        self.stage(
            if ok {
                "archive_cache"
            } else {
                "archive_cache_on_failure"
            },
            "true",
        )
        .ok();
        self.stage(
            if ok {
                "upload_artifacts_on_success"
            } else {
                "upload_artifacts_on_failure"
            },
            "true",
        )
        .ok();
        self.stage("cleanup_file_variables", "true").ok();
        output(&mut self.command("cleanup_exec", &[])).ok()
    }
}

#[test]
fn real_gitlab_custom_executor_commits_only_jobs_whose_steps_succeeded() {
    if !root_or_skip("real_gitlab_custom_executor_commits_only_jobs_whose_steps_succeeded") {
        return;
    }
    let host = Host::new();
    // Success.
    let mut job = CustomJob::new(&host, gitlab_vars(0, "main", None));
    let r = job.prepare().ok();
    assert!(r.stdout.contains("write-back: true"), "{}", r.stdout);
    for stage in ["prepare_script", "get_sources", "restore_cache"] {
        job.stage(stage, "true").ok();
    }
    job.stage("build_script", "echo 1 > \"$JOBCACHEFS_DIR/dep\"")
        .ok();
    let r = job.finish("success");
    assert!(r.stdout.contains("commit"), "{}", r.stdout);
    assert_eq!(host.generation(), 1);
    assert_eq!(host.read(None, ".jobcachefs-success"), None);
    // Failure: the script fails with the build failure code; cleanup discards.
    let mut job = CustomJob::new(&host, gitlab_vars(0, "main", None));
    job.prepare().ok();
    let r = job.stage("build_script", "echo 2 > \"$JOBCACHEFS_DIR/dep\"\nexit 3");
    assert_eq!(r.code, 1, "BUILD_FAILURE_EXIT_CODE");
    let r = job.finish("failed");
    assert!(
        r.stdout.contains("\"outcome\": \"discarded\""),
        "{}",
        r.stdout
    );
    // A job that marks its own success and then fails is not believed.
    let mut job = CustomJob::new(&host, gitlab_vars(0, "main", None));
    job.prepare().ok();
    let r = job.stage(
        "build_script",
        "echo 2 > \"$JOBCACHEFS_DIR/dep\"\ntouch \"$JOBCACHEFS_DIR/.jobcachefs-success\"\nfalse",
    );
    assert_eq!(r.code, 1);
    job.finish("failed");
    // A second step (release) that fails after the script succeeded: the job failed.
    let mut job = CustomJob::new(&host, gitlab_vars(0, "main", None));
    job.prepare().ok();
    job.stage("build_script", "echo 2 > \"$JOBCACHEFS_DIR/dep\"")
        .ok();
    assert_eq!(job.stage("step_release", "exit 1").code, 1);
    job.finish("failed");
    // Cancelled in the middle of a step that came after a successful one: the runner kills
    // run_exec, then runs after_script with "canceled" and the cleanup.
    let mut job = CustomJob::new(&host, gitlab_vars(0, "main", None));
    job.prepare().ok();
    job.stage("build_script", "echo 2 > \"$JOBCACHEFS_DIR/dep\"")
        .ok();
    let ready = host.node.tmp.path().join("ready");
    let f = job.script(
        "step_release",
        &format!("touch {}; sleep 300", ready.display()),
    );
    let child = job
        .command("run_exec", &[f.to_str().unwrap(), "step_release"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&ready);
    cancel(child);
    job.finish("canceled");
    assert_eq!(host.generation(), 1);
    assert_eq!(host.read(None, "dep").as_deref(), Some("1\n"));
    // A job whose cleanup never ran (the runner died): the next prepare in its slot discards.
    let mut job = CustomJob::new(&host, gitlab_vars(1, "main", None));
    job.prepare().ok();
    job.stage("build_script", "echo lost > \"$JOBCACHEFS_DIR/dep\"")
        .ok();
    let mut next = CustomJob::new(&host, gitlab_vars(1, "main", None));
    let r = next.prepare().ok();
    assert!(
        r.stderr.contains("discarded the volume a job left"),
        "{}",
        r.stderr
    );
    next.stage(
        "build_script",
        "test \"$(cat \"$JOBCACHEFS_DIR/dep\")\" = 1",
    )
    .ok();
    next.finish("success");
    assert_eq!(host.read(None, "dep").as_deref(), Some("1\n"));
    // A prepare that fails is the runner's failure, not the job's.
    let mut bad = CustomJob::new(&host, gitlab_vars(0, "main", None));
    bad.config();
    let r = output(
        bad.command("prepare_exec", &[])
            .env("JOBCACHEFS_NAMESPACE", "Not_A_Namespace"),
    );
    assert_eq!(r.code, 2, "SYSTEM_FAILURE_EXIT_CODE: {}", r.stderr);
    host.assert_no_volumes();
}

#[test]
fn real_gitlab_custom_executor_merge_requests_write_their_scope() {
    if !root_or_skip("real_gitlab_custom_executor_merge_requests_write_their_scope") {
        return;
    }
    let host = Host::new();
    let mut job = CustomJob::new(&host, gitlab_vars(0, "main", None));
    job.prepare().ok();
    job.stage("build_script", "echo main > \"$JOBCACHEFS_DIR/base\"")
        .ok();
    job.finish("success");
    let mut job = CustomJob::new(&host, gitlab_vars(0, "feature/x", Some(3)));
    let r = job.prepare().ok();
    assert!(r.stdout.contains("scope pr-3"), "{}", r.stdout);
    job.stage(
        "build_script",
        "cat \"$JOBCACHEFS_DIR/base\"; echo 3 > \"$JOBCACHEFS_DIR/mr\"",
    )
    .ok();
    job.finish("success");
    assert_eq!(host.generation(), 1);
    assert_eq!(host.scope_layers("pr-3"), 1);
    let mut job = CustomJob::new(&host, gitlab_vars(0, "feature/x", Some(3)));
    job.prepare().ok();
    job.stage(
        "build_script",
        "cat \"$JOBCACHEFS_DIR/base\" \"$JOBCACHEFS_DIR/mr\"",
    )
    .ok();
    job.finish("failed");
    assert_eq!(host.scope_layers("pr-3"), 1);
    host.assert_no_volumes();
}

// ------------------------------------------------------------------------------------------
// systemd units (runners/systemd/).

/// A unit file's `Key=value` lines of its sections, in order.
fn unit_lines(name: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(runners().join("systemd").join(name))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let units = [
        "jobcachefs-agent.service",
        "jobcachefs-gc.service",
        "jobcachefs-gc.timer",
    ];
    for u in units {
        // The binary where the units expect it is this build's (verify checks that ExecStart's
        // command exists and is executable).
        let text = std::fs::read_to_string(runners().join("systemd").join(u))
            .unwrap()
            .replace(
                "/usr/local/bin/jobcachefs",
                env!("CARGO_BIN_EXE_jobcachefs"),
            );
        std::fs::write(tmp.path().join(u), text).unwrap();
    }
    let r = output(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(units.iter().map(|u| tmp.path().join(u)))
            .env("SYSTEMD_LOG_LEVEL", "warning"),
    );
    // verify exits 0 on an unknown key or section, with a warning naming the file: those fail too.
    assert_eq!(
        r.code, 0,
        "systemd-analyze verify:\n{}{}",
        r.stdout, r.stderr
    );
    let complaints: Vec<&str> = r
        .stderr
        .lines()
        .chain(r.stdout.lines())
        .filter(|l| l.contains("jobcachefs"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify:\n{}",
        complaints.join("\n")
    );
    // What they promise.
    let agent = unit_lines("jobcachefs-agent.service");
    let has =
        |lines: &[(String, String)], k: &str, v: &str| lines.iter().any(|(a, b)| a == k && b == v);
    assert!(has(
        &agent,
        "ExecStopPost",
        "-/usr/local/bin/jobcachefs node release"
    ));
    assert!(has(&agent, "Restart", "on-failure"));
    assert!(
        !agent
            .iter()
            .any(|(k, _)| k.starts_with("Private") || k.starts_with("Protect")),
        "the agent must mount in the host's namespace"
    );
    let timer = unit_lines("jobcachefs-gc.timer");
    assert!(has(&timer, "OnCalendar", "hourly") && has(&timer, "Persistent", "true"));
}

#[test]
fn real_systemd_units_commands_run_against_a_node() {
    if !root_or_skip("real_systemd_units_commands_run_against_a_node") {
        return;
    }
    // Each unit's commands, as systemd would run them (its Environment= with this node's state
    // dir and config), against a node with a committed cache.
    let host = Host::new();
    let mut job = GithubJob::new(&host, "runner-1", push("main"));
    job.hook("job-started.sh").ok();
    job.step("echo 1 > \"$JOBCACHEFS_DIR/dep\"").ok();
    job.step(MARK_SUCCESS).ok();
    job.hook("job-completed.sh").ok();
    let run = |unit: &str, key: &str, extra: &[&str]| -> Run {
        let lines = unit_lines(unit);
        let (_, cmd) = lines.iter().find(|(k, _)| k == key).unwrap();
        let cmd = cmd.trim_start_matches('-');
        let mut argv = cmd.split_whitespace();
        assert_eq!(argv.next(), Some("/usr/local/bin/jobcachefs"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_jobcachefs"));
        c.args(argv).args(extra).env_clear().env("PATH", HOST_PATH);
        for (k, v) in lines.iter().filter(|(k, _)| k == "Environment") {
            let (name, _) = v.split_once('=').unwrap();
            let value = match name {
                "JOBCACHEFS_STATE_DIR" => host.node.state().display().to_string(),
                "JOBCACHEFS_CONFIG" => host.node.config.as_ref().unwrap().display().to_string(),
                other => panic!("{unit}: unexpected {k}={other}"),
            };
            c.env(name, value);
        }
        output(&mut c)
    };
    let r = run("jobcachefs-gc.service", "ExecStart", &[]);
    assert_eq!(r.code, 0, "gc: {}", r.stderr);
    let r = run(
        "jobcachefs-agent.service",
        "ExecStart",
        &["--rounds", "1", "--metrics-addr", "off"],
    );
    assert_eq!(r.code, 0, "agent: {}", r.stderr);
    let r = run("jobcachefs-agent.service", "ExecStopPost", &[]);
    assert_eq!(r.code, 0, "node release: {}", r.stderr);
    assert_eq!(host.generation(), 1);
    host.node.assert_clean();
}

// ------------------------------------------------------------------------------------------
// Kubernetes-native recipes: validated offline, then their volumes published by the kubelet
// stand-in with the attributes and pod identity each recipe gives, the marker written by the
// recipe's own last step, and unpublished.

#[path = "common/kubelet.rs"]
mod kubelet;

/// Runs scripts/validate-runners; returns the volumes it found (--volumes).
fn validate_runners() -> Vec<Value> {
    let python = Path::new(REPO).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup (it makes the virtualenv with the pinned kubernetes-validate)",
        python.display()
    );
    let out = tempfile::NamedTempFile::new().unwrap();
    let r = output(
        Command::new(&python)
            .arg(Path::new(REPO).join("scripts/validate-runners"))
            .arg("--volumes")
            .arg(out.path()),
    );
    assert_eq!(r.code, 0, "validate-runners:\n{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("jobcachefs checks passed"),
        "{}",
        r.stdout
    );
    serde_json::from_str::<Value>(&std::fs::read_to_string(out.path()).unwrap())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn kubernetes_recipes_validate_offline() {
    let vols = validate_runners();
    let recipes: Vec<&str> = vols.iter().map(|v| v["recipe"].as_str().unwrap()).collect();
    for system in [
        "gitlab-kubernetes/",
        "arc/",
        "tekton/",
        "argo/",
        "jenkins/",
        "buildkite/",
    ] {
        assert!(
            recipes.iter().any(|r| r.starts_with(system)),
            "no volume of {system} in {recipes:?}"
        );
    }
    // Both kinds everywhere a recipe has both: a trusted one writing the cache, scoped ones.
    let scoped = vols
        .iter()
        .filter(|v| v["attributes"].get("scope").is_some())
        .count();
    assert!(scoped >= 7 && vols.len() - scoped >= 5, "{vols:?}");
}

/// `cache show` of a recipe's cache in its namespace: (generation, the scope's layers).
fn cache_state(node: &Node, ns: &str, cache: &str, scope: Option<&str>) -> (u64, u64) {
    let r = node.run(&["cache", "show", cache, "--namespace", ns, "-o", "json"]);
    if r.code == 4 {
        return (0, 0);
    }
    let v = r.ok().json();
    let layers = scope
        .and_then(|s| {
            v["scopes"]
                .as_array()?
                .iter()
                .find(|x| x["scope"] == s)
                .map(|x| x["layers"].as_u64().unwrap())
        })
        .unwrap_or(0);
    (v["generation"].as_u64().unwrap(), layers)
}

#[test]
fn real_csi_recipe_volumes_commit_on_success_into_their_cache_or_scope() {
    if !root_or_skip("real_csi_recipe_volumes_commit_on_success_into_their_cache_or_scope") {
        return;
    }
    let vols = validate_runners();
    let node =
        Node::with_config(&std::fs::read_to_string(runners().join("node-config.toml")).unwrap());
    let plugin = kubelet::Plugin::start(&node);
    let k = kubelet::Kubelet::connect(&plugin, &node);
    for (i, v) in vols.iter().enumerate() {
        let recipe = v["recipe"].as_str().unwrap();
        let ns = v["namespace"].as_str().unwrap();
        let sa = v["serviceAccount"].as_str().unwrap();
        let attrs: std::collections::HashMap<String, String> = v["attributes"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let cache = attrs["cache"].clone();
        let scope = attrs.get("scope").map(String::as_str);
        let mount = v["mountPath"].as_str().unwrap();
        // The recipe's last step, run where the volume is: its mount path is the target.
        let mark = |target: &Path, env: &serde_json::Map<String, Value>| {
            let cmd = v["markerCommand"]
                .as_str()
                .unwrap()
                .replace(mount, target.to_str().unwrap());
            let mut c = Command::new("sh");
            c.arg("-c").arg(&cmd).env_clear().env("PATH", HOST_PATH);
            for (k, x) in env {
                c.env(k, x.as_str().unwrap());
            }
            let r = output(&mut c);
            assert_eq!(r.code, 0, "{recipe}: {cmd}: {}", r.stderr);
        };
        let before = cache_state(&node, ns, &cache, scope);
        // A job that succeeds: the marker is there when kubelet unpublishes.
        let id = format!("recipe-{i}-ok");
        let t = k.target(&id, "jobcachefs");
        k.publish_inline(&id, &t, ns, sa, &attrs)
            .unwrap_or_else(|e| panic!("{recipe}: publish: {e:?}\n{}", plugin.log()));
        std::fs::write(t.join(format!("from-{i}")), recipe).unwrap();
        mark(&t, v["markerEnv"].as_object().unwrap());
        assert!(
            t.join(".jobcachefs-success").exists(),
            "{recipe}: no marker"
        );
        k.unpublish(&id, &t).unwrap();
        let after = cache_state(&node, ns, &cache, scope);
        match scope {
            Some(_) => assert_eq!(
                after,
                (before.0, before.1 + 1),
                "{recipe}: into its scope, not the cache\n{}",
                plugin.log()
            ),
            None => assert_eq!(
                after,
                (before.0 + 1, 0),
                "{recipe}: into the cache\n{}",
                plugin.log()
            ),
        }
        // A job that fails: the last step does not run (GitLab's after_script runs, and writes
        // nothing for a failed job).
        let id = format!("recipe-{i}-failed");
        let t = k.target(&id, "jobcachefs");
        k.publish_inline(&id, &t, ns, sa, &attrs).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.join(format!("from-{i}"))).unwrap(),
            recipe,
            "{recipe}: the next job sees what the last one committed"
        );
        assert!(
            !t.join(".jobcachefs-success").exists(),
            "the marker never reaches a cache"
        );
        std::fs::write(t.join(format!("from-{i}")), "failed").unwrap();
        if v["markerEnv"].get("CI_JOB_STATUS").is_some() {
            let mut env = serde_json::Map::new();
            env.insert("CI_JOB_STATUS".into(), "failed".into());
            mark(&t, &env);
            assert!(
                !t.join(".jobcachefs-success").exists(),
                "{recipe}: marked a failed job"
            );
        }
        k.unpublish(&id, &t).unwrap();
        assert_eq!(
            cache_state(&node, ns, &cache, scope),
            after,
            "{recipe}: a failed job committed"
        );
    }
    drop(k);
    drop(plugin);
    node.assert_clean_volumes();
}
