//! The alert rules in deploy/alerts/ and the metrics they read: `promtool check rules` and
//! `promtool test rules` (the rules' unit tests, deploy/alerts/jobcachefs.tests.yaml), and a real
//! Prometheus (Debian's `prometheus`) on 127.0.0.1 that scrapes a real agent and loads the rules,
//! queried through its HTTP API for what this test did. Every process is killed and waited for
//! on every path (the guards' Drop).

mod common;

use common::{root_or_skip, Node};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn alerts_dir() -> PathBuf {
    Path::new(REPO).join("deploy/alerts")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(alerts_dir())
        .output()
        .expect("promtool is missing: run scripts/setup (package prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = promtool(&["check", "rules", "jobcachefs.rules.yaml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "jobcachefs.tests.yaml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every alert of the rules file has a unit test that expects it to fire: an alert nobody has
/// seen fire is an alert that may never fire.
#[test]
fn every_alert_has_a_firing_unit_test() {
    let rules = std::fs::read_to_string(alerts_dir().join("jobcachefs.rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(alerts_dir().join("jobcachefs.tests.yaml")).unwrap();
    let firing: Vec<&str> = tests
        .split("alertname: ")
        .skip(1)
        .filter(|t| {
            let block = t.split("alertname: ").next().unwrap();
            block.contains("exp_labels")
        })
        .map(|t| t.lines().next().unwrap().trim())
        .collect();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                firing.contains(&name),
                "alert {name} has no unit test that expects it to fire"
            );
        }
    }
}

/// A child process killed and waited for when the guard goes.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Prometheus' answer to `query`: the first sample's value, if any.
fn query(port: u16, query: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", "-G"])
        .arg(format!("http://127.0.0.1:{port}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={query}"))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn real_prometheus_scrapes_the_agent_and_loads_the_rules() {
    if !root_or_skip("real_prometheus_scrapes_the_agent_and_loads_the_rules") {
        return;
    }
    let n = Node::new();
    // Two commits and one discard, made by this test: what Prometheus must report.
    for (i, extra) in [(0, &[][..]), (1, &[][..]), (2, &["--discard"][..])] {
        let dir = n.create(&format!("v{i}"), "prom", &["--write-back"]);
        std::fs::write(dir.join(format!("f{i}")), "x").unwrap();
        n.delete(&dir, extra).ok();
    }
    let agent_port = free_port();
    let mut agent = n.command();
    agent
        .args(["agent", "--interval", "1s", "--metrics-addr"])
        .arg(format!("127.0.0.1:{agent_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _agent = Proc(agent.spawn().unwrap());

    let prom_dir = n.tmp.path().join("prometheus");
    std::fs::create_dir(&prom_dir).unwrap();
    let config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: jobcachefs\n    static_configs: [{{targets: ['127.0.0.1:{agent_port}']}}]\n",
            alerts_dir().join("jobcachefs.rules.yaml").display()
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let log = std::fs::File::create(prom_dir.join("log")).unwrap();
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus is missing: run scripts/setup (package prometheus)");
    let _prom = Proc(prom);
    let started = Instant::now();
    let log_of = || std::fs::read_to_string(prom_dir.join("log")).unwrap_or_default();
    wait_for(
        "Prometheus to scrape the agent",
        Duration::from_secs(60),
        || query(prom_port, "up{job=\"jobcachefs\"}") == Some(1.0),
    );
    let scraped = started.elapsed();
    wait_for("the commits in Prometheus", Duration::from_secs(30), || {
        query(prom_port, "jobcachefs_commits_total{job=\"jobcachefs\"}") == Some(2.0)
    });
    assert_eq!(
        query(prom_port, "jobcachefs_volume_commit_seconds_count"),
        Some(2.0)
    );
    assert_eq!(
        query(prom_port, "jobcachefs_volume_discard_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        query(
            prom_port,
            "jobcachefs_volume_create_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        query(
            prom_port,
            "jobcachefs_cache_generation{namespace=\"default\",name=\"prom\"}"
        ),
        Some(2.0)
    );
    // The rules loaded, and none of them fires on this healthy node.
    let rules = Command::new("curl")
        .args(["-sf", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{prom_port}/api/v1/rules"))
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("JobcachefsCommitsRejected"),
        "rules not loaded: {rules}\n{}",
        log_of()
    );
    assert_eq!(
        query(prom_port, "count(ALERTS{alertstate=\"firing\"})"),
        None
    );
    eprintln!("prometheus scraped the agent after {scraped:?}");
    drop(_prom);
    drop(_agent);
    n.assert_clean();
}
