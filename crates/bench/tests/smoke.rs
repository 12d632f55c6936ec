//! Smoke test: `seqnum-bench --quick` against the debug binaries works and
//! sees no client error. Not a timed test: the figures are not checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn quick_run_writes_reports_with_zero_errors() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_seqnum-bench"));
    let bin_dir = exe.parent().expect("bin dir").to_path_buf();
    for b in ["takeoverd", "seqnum-worker", "seqnum-client"] {
        assert!(
            bin_dir.join(b).is_file(),
            "{} is missing: run the tests with `cargo test --workspace` (or `cargo build --workspace` first)",
            bin_dir.join(b).display()
        );
    }
    let out = std::env::temp_dir().join(format!("seqnum-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);

    let mut child = Command::new(&exe)
        .args(["--quick", "--out-dir"])
        .arg(&out)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting seqnum-bench");
    // A safety net against a hang, not a performance bound.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting") {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("seqnum-bench --quick still runs after 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.success(), "seqnum-bench --quick failed ({status}):\n{stdout}\n{stderr}");

    let json = read(&out.join("benchmarks.json"));
    let v: serde_json::Value = serde_json::from_str(&json).expect("benchmarks.json is JSON");
    assert_eq!(v["mode"], "quick");
    assert_eq!(v["total_errors"], 0, "client errors: {stdout}");
    let handoff = v["handoff"].as_array().expect("handoff results");
    assert!(!handoff.is_empty(), "no handoff result: {stdout}\n{stderr}");
    for h in handoff {
        assert_eq!(h["errors"], 0, "{h}");
        assert_eq!(h["reloads_ok"], h["reloads"], "a reload failed: {h}");
    }
    assert!(v["echo"].as_array().is_some_and(|e| !e.is_empty()), "no echo result");
    let floor = v["floor_echo"].as_array().expect("floor-echo results");
    assert_eq!(floor.len(), v["echo"].as_array().map_or(0, Vec::len), "one floor-echo run per echo run");
    assert!(floor.iter().all(|f| f["server"] == "floor-echo" && f["errors"] == 0), "{floor:?}");
    let churn = v["churn"]["runs"].as_array().expect("churn runs");
    assert_eq!(churn.len(), 3, "floor-echo, takeoverd, takeoverd with events: {churn:?}");
    for c in churn {
        assert!(c.get("failure").is_none() && c["errors"] == 0, "{c}");
        assert!(c["connects"].as_u64().unwrap_or(0) > 50, "connections were not replaced: {c}");
    }
    assert_eq!(churn[2]["reloads_ok"], churn[2]["reloads"], "{}", churn[2]);
    assert_eq!(churn[2]["kills_ok"], churn[2]["kills"], "{}", churn[2]);
    // Section 8: one worker beside two, at --quick's size.
    let workers = &v["workers"];
    let rolls = workers["reloads"].as_array().expect("workers: reload runs");
    assert_eq!(rolls.iter().map(|r| r["workers"].as_u64()).collect::<Vec<_>>(), [Some(1), Some(2)], "{workers}");
    for r in rolls {
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["reloads_ok"], r["reloads"], "a reload failed: {r}");
        let slots = r["slots"].as_array().expect("slots");
        assert_eq!(slots.len() as u64, r["workers"].as_u64().unwrap_or(0), "one entry per slot: {r}");
        assert!(slots.iter().all(|s| s["handovers"] == r["reloads"]), "each slot hands over once a reload: {r}");
    }
    let echo_w = workers["echo"].as_array().expect("workers: echo runs");
    assert_eq!(echo_w.len(), 2, "{workers}");
    assert!(echo_w.iter().all(|e| e["errors"] == 0), "{workers}");
    assert_eq!(workers["balance"]["shares"].as_array().map_or(0, Vec::len), 2, "{workers}");
    assert!(workers["failures"].as_array().is_some_and(Vec::is_empty), "{workers}");
    let md = read(&out.join("BENCHMARKS.md"));
    assert!(md.contains("![latency](latency.svg)"));
    for section in
        ["### Against the floor", "## 6. Connection churn", "windows within their own bound", "## 8. Several workers"]
    {
        assert!(md.contains(section), "BENCHMARKS.md has no {section:?}");
    }
    assert!(read(&out.join("latency.svg")).contains("<svg"));
    let _ = std::fs::remove_dir_all(&out);
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
