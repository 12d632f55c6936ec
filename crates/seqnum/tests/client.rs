//! End-to-end tests of the `seqnum-client` binary against tiny in-test
//! echo servers.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use seqnum::client::Summary;

/// How a test server treats each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Echoes every message.
    Echo,
    /// Echoes a wrong value for message number 5 (seqnum 4).
    WrongOnFifth,
    /// Echoes three messages, then closes.
    CloseAfterThree,
    /// Reads but never echoes.
    Silent,
    /// Echoes every message one byte at a time (partial reads).
    Dribble,
}

/// A test server; `clean_eofs` counts connections that ended with an EOF
/// (not a reset) right after a whole message, `ended` those that ended in
/// any way, `accepted` those accepted.
struct Server {
    port: u16,
    clean_eofs: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

fn serve(behaviour: Behaviour) -> Server {
    serve_on(TcpListener::bind("127.0.0.1:0").unwrap(), behaviour)
}

fn serve_on(listener: TcpListener, behaviour: Behaviour) -> Server {
    let port = listener.local_addr().unwrap().port();
    let clean_eofs = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (eofs, done, seen) = (clean_eofs.clone(), ended.clone(), accepted.clone());
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            seen.fetch_add(1, Ordering::SeqCst);
            let (eofs, done) = (eofs.clone(), done.clone());
            thread::spawn(move || {
                handle(stream, behaviour, &eofs);
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Server { port, clean_eofs, ended, accepted }
}

fn handle(mut s: TcpStream, behaviour: Behaviour, clean_eofs: &AtomicUsize) {
    // A client that stops without closing ends this thread rather than
    // leaving it blocked for good.
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let mut n = 0u32;
    loop {
        let mut buf = [0u8; 4];
        let mut fill = 0;
        while fill < 4 {
            match s.read(&mut buf[fill..]) {
                Ok(0) if fill == 0 => {
                    clean_eofs.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(0) => return,
                Ok(k) => fill += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        n += 1;
        match behaviour {
            Behaviour::Echo => {}
            Behaviour::WrongOnFifth if n == 5 => buf[3] ^= 0x55,
            Behaviour::WrongOnFifth => {}
            Behaviour::CloseAfterThree if n > 3 => return,
            Behaviour::CloseAfterThree => {}
            Behaviour::Silent => continue,
            Behaviour::Dribble => {
                let _ = s.set_nodelay(true);
                for b in buf {
                    if s.write_all(&[b]).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
        }
        if s.write_all(&buf).is_err() {
            return;
        }
        if matches!(behaviour, Behaviour::CloseAfterThree) && n == 3 {
            return;
        }
    }
}

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_seqnum-client"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running seqnum-client")
}

/// Runs the client against `port` with `--json` and parses the summary.
fn run_json(port: u16, args: &[&str]) -> (i32, Summary, String) {
    let port = port.to_string();
    let mut all = vec!["-a", "127.0.0.1", "-p", &port, "--json"];
    all.extend_from_slice(args);
    let out = client(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no output; stderr: {stderr}"));
    let v: Summary = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout:?}; stderr: {stderr}"));
    (out.status.code().expect("exit status"), v, stderr)
}

fn wait_for(what: &AtomicUsize, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    while what.load(Ordering::SeqCst) < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    what.load(Ordering::SeqCst)
}

#[test]
fn correct_server_passes_and_closes_cleanly() {
    let server = serve(Behaviour::Echo);
    let (code, v, stderr) = run_json(server.port, &["--connections", "50", "--count", "20", "--interval-ms", "0"]);
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!(v.errors, 0, "{v:?}");
    assert_eq!(v.connections, 50);
    assert_eq!(v.sent, 50 * 20);
    assert_eq!(v.echoed, 50 * 20);
    let lat = &v.latency_us;
    assert!(lat.max >= lat.p50, "{v:?}");
    assert!(v.echoes_per_sec > 0.0);
    // Every connection ended with shutdown(write): the server saw EOF.
    assert_eq!(wait_for(&server.clean_eofs, 50), 50);
}

#[test]
fn partial_echoes_are_reassembled() {
    let server = serve(Behaviour::Dribble);
    let (code, v, stderr) = run_json(server.port, &["--connections", "4", "--count", "10", "--interval-ms", "0"]);
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!(v.echoed, 40);
    // Four bytes 1 ms apart: at least 3 ms each.
    assert!(v.latency_us.p50 >= 3000, "{v:?}");
}

#[test]
fn ipv6_loopback() {
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    };
    let server = serve_on(listener, Behaviour::Echo);
    let port = server.port.to_string();
    for addr in ["::1", "[::1]"] {
        let out = client(&["-a", addr, "-p", &port, "--count", "3", "--interval-ms", "0", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn interval_and_ramp() {
    let server = serve(Behaviour::Echo);
    let start = Instant::now();
    let (code, v, stderr) =
        run_json(server.port, &["--connections", "10", "--count", "3", "--interval-ms", "50", "--ramp-ms", "100"]);
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!(v.echoed, 30);
    // Two intervals of 50 ms between three messages.
    assert!(start.elapsed() >= Duration::from_millis(100));
}

#[test]
fn duration_run_drains_and_passes() {
    let server = serve(Behaviour::Echo);
    let (code, v, stderr) = run_json(server.port, &["--connections", "20", "--duration", "0.5", "--interval-ms", "5"]);
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!(v.errors, 0);
    assert!(v.echoed >= 20, "{v:?}");
    assert_eq!(v.sent, v.echoed);
    let d = v.duration_s;
    assert!((0.5..2.0).contains(&d), "{d}");
    assert_eq!(wait_for(&server.clean_eofs, 20), 20);
}

#[test]
fn churn_replaces_each_connection_after_k_echoes() {
    let server = serve(Behaviour::Echo);
    let (code, v, stderr) = run_json(
        server.port,
        &["--connections", "5", "--churn-messages", "3", "--interval-ms", "0", "--duration", "0.5"],
    );
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!(v.errors, 0, "{v:?}");
    assert_eq!(v.connections, 5, "--connections stays the number of concurrent connections");
    assert_eq!(v.churn_messages, Some(3));
    let connects = v.connects;
    let echoed = v.echoed;
    assert!(connects > 5, "connections were not replaced: {v:?}");
    // Every connection but the (at most 5) last ones echoed exactly 3.
    assert!(echoed <= 3 * connects && echoed >= 3 * (connects - 5), "{v:?}");
    assert_eq!(v.sent, v.echoed, "{v:?}");
    let rate = v.connects_per_sec;
    let d = v.duration_s;
    assert!((rate * d - connects as f64).abs() <= 1.0 + connects as f64 * 0.01, "{v:?}");
    // Each replaced connection was closed cleanly (the server read an EOF).
    assert!(wait_for(&server.clean_eofs, connects as usize - 5) >= connects as usize - 5);
    // The human summary names the churn.
    let port = server.port.to_string();
    let out = client(&["-p", &port, "--churn-messages", "2", "--interval-ms", "0", "--duration", "0.2"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("churn: ") && stdout.contains("connects/s") && stdout.contains("PASS"), "{stdout}");
}

#[test]
fn churn_replaces_a_failed_connection_but_not_a_failed_connect() {
    // The server closes after three echoes; the client wants five per
    // connection: every connection ends with an EOF, and is replaced.
    let server = serve(Behaviour::CloseAfterThree);
    let (code, v, _) = run_json(
        server.port,
        &["--connections", "4", "--churn-messages", "5", "--interval-ms", "0", "--duration", "0.3"],
    );
    assert_eq!(code, 1, "{v:?}");
    // An EOF, or a reset when the fourth message reached the closed socket.
    let failed = v.eofs + v.resets;
    let (connects, echoed) = (v.connects, v.echoed);
    assert!(failed > 4 && connects >= failed && connects <= failed + 4, "{v:?}");
    assert_eq!(v.errors, failed, "{v:?}");
    assert!(echoed >= 3 * failed && echoed <= 3 * (failed + 4), "three echoes per connection: {v:?}");
    // A refused connect is not replaced: the run ends at once.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, v, _) = run_json(port, &["--connections", "4", "--churn-messages", "3", "--duration", "5"]);
    assert_eq!(code, 1, "{v:?}");
    assert_eq!((v.connect_errors, v.connects), (4, 0), "{v:?}");
    assert!(v.duration_s < 4.0, "the run ends once every connect failed: {v:?}");
}

#[test]
fn churn_over_several_source_addresses() {
    let server = serve(Behaviour::Echo);
    let (code, v, stderr) = run_json(
        server.port,
        &[
            "--connections",
            "8",
            "--source-addresses",
            "4",
            "--churn-messages",
            "2",
            "--interval-ms",
            "0",
            "--duration",
            "0.3",
        ],
    );
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert!(v.connects > 8, "{v:?}");
}

#[test]
fn wrong_value_is_a_discontinuity() {
    let server = serve(Behaviour::WrongOnFifth);
    let (code, v, stderr) = run_json(server.port, &["--connections", "3", "--count", "10", "--interval-ms", "0"]);
    assert_eq!(code, 1, "{v:?}");
    assert!(v.discontinuities >= 1, "{v:?}");
    assert_eq!(v.errors, v.discontinuities);
    assert_eq!(v.echoed, 3 * 4);
    // The log names the connection, the peer and the seqnum.
    assert!(stderr.contains("discontinuity"), "{stderr}");
    assert!(stderr.contains("seq=4"), "{stderr}");
    assert!(stderr.contains(&format!("peer=127.0.0.1:{}", server.port)), "{stderr}");
}

#[test]
fn closing_server_is_an_eof() {
    let server = serve(Behaviour::CloseAfterThree);
    let (code, v, _) = run_json(server.port, &["--connections", "3", "--count", "10", "--interval-ms", "20"]);
    assert_eq!(code, 1, "{v:?}");
    assert!(v.eofs >= 1, "{v:?}");
    assert_eq!(v.echoed, 9);
}

#[test]
fn silent_server_times_out() {
    let server = serve(Behaviour::Silent);
    let start = Instant::now();
    let (code, v, _) = run_json(server.port, &["--connections", "2", "--count", "5", "--timeout-ms", "200"]);
    assert_eq!(code, 1, "{v:?}");
    assert_eq!(v.timeouts, 2, "{v:?}");
    assert_eq!(v.echoed, 0);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn refused_connect_is_a_connect_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, v, _) = run_json(port, &["--connections", "4", "--count", "1"]);
    assert_eq!(code, 1, "{v:?}");
    assert_eq!(v.connect_errors, 4, "{v:?}");
    assert_eq!(v.errors, 4);
}

#[test]
fn many_errors_are_logged_at_most_twenty_times() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, v, stderr) = run_json(port, &["--connections", "100", "--count", "1"]);
    assert_eq!(code, 1);
    assert_eq!(v.connect_errors, 100);
    let logged = stderr.lines().filter(|l| l.contains("connect_error")).count();
    assert_eq!(logged, 20, "{stderr}");
    assert!(stderr.contains("80 errors were not logged"), "{stderr}");
}

#[test]
fn timeline_csv() {
    let server = serve(Behaviour::Echo);
    let path = std::env::temp_dir().join(format!("seqnum-client-timeline-{}.csv", std::process::id()));
    let path_s = path.to_str().unwrap();
    let (code, v, stderr) = run_json(
        server.port,
        &["--connections", "5", "--duration", "0.35", "--interval-ms", "10", "--timeline", path_s],
    );
    assert_eq!(code, 0, "{v}\n{stderr}");
    let csv = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("t_ms,echoes,p50_us,p99_us,max_us,errors"));
    let rows: Vec<Vec<u64>> = lines.map(|l| l.split(',').map(|f| f.parse().unwrap()).collect()).collect();
    assert!(rows.len() >= 4, "{csv}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), 6);
        assert_eq!(r[0], 100 * i as u64);
        assert!(r[2] <= r[3] && r[3] <= r[4], "{csv}");
    }
    let echoes: u64 = rows.iter().map(|r| r[1]).sum();
    assert_eq!(echoes, v.echoed);
}

#[test]
fn human_summary_without_json() {
    let server = serve(Behaviour::Echo);
    let port = server.port.to_string();
    let out = client(&["-p", &port, "--count", "2", "--interval-ms", "0"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("echoed 2"), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
}

#[test]
fn bad_arguments_exit_2() {
    for (args, names) in [
        (&["--connections", "0"][..], "--connections"),
        (&["--count", "3", "--duration", "1"], "--duration"),
        (&["--connect-address", "not-an-ip"], "--connect-address"),
        (&["--interval-ms", "soon"], "--interval-ms"),
        (&["--frobnicate"], "--frobnicate"),
        (&["--processes", "0"], "--processes"),
        (&["--processes", "4", "--connections", "3"], "--processes 4"),
    ] {
        let out = client(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn help_exits_0() {
    let out = client(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    for opt in ["--connect-address", "--connect-port", "--connections", "--timeline", "--processes", "Exit status"] {
        assert!(stdout.contains(opt), "{opt}");
    }
}

/// Starts the client (not waiting for it) with `--json` and `args`.
fn start_client(port: u16, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_seqnum-client"))
        .args(["-p", &port.to_string(), "--json"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting seqnum-client")
}

/// A fresh directory for a test's files.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("seqnum-client-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn processes_merge_into_one_summary() {
    let server = serve(Behaviour::Echo);
    let (code, v, stderr) =
        run_json(server.port, &["--processes", "3", "--connections", "30", "--count", "10", "--interval-ms", "0"]);
    assert_eq!(code, 0, "{v}\n{stderr}");
    assert_eq!((v.connections, v.errors, v.processes, v.failed_processes), (30, 0, Some(3), 0), "{v:?}");
    assert_eq!((v.sent, v.echoed, v.connects), (300, 300, 30), "{v:?}");
    assert_eq!(v.latency_histogram.count(), v.echoed, "the histograms of the three merged");
    let lat = &v.latency_us;
    assert!(lat.p50 <= lat.p99 && lat.p99 <= lat.max && lat.max == v.latency_histogram.max(), "{v:?}");
    assert_eq!(lat.mean, (v.latency_histogram.mean() * 10.0).round() / 10.0);
    assert!(v.echoes_per_sec > 0.0);
    assert_eq!(wait_for(&server.clean_eofs, 30), 30);
    // Human output, as from one process.
    let port = server.port.to_string();
    let out = client(&["-p", &port, "--processes", "2", "--connections", "5", "--count", "2", "--interval-ms", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("connections 5 in 2 processes,") && stdout.contains("echoed 10"), "{stdout}");
    assert!(stdout.trim_end().ends_with("PASS") && !stdout.contains('{'), "{stdout}");
}

#[test]
fn errors_of_several_processes_add_up() {
    // Each connection gets three echoes, then the server closes it.
    let server = serve(Behaviour::CloseAfterThree);
    let (code, v, stderr) =
        run_json(server.port, &["--processes", "3", "--connections", "9", "--count", "10", "--interval-ms", "20"]);
    assert_eq!(code, 1, "{v:?}");
    assert_eq!((v.echoed, v.latency_histogram.count()), (27, 27), "{v:?}");
    assert_eq!((v.eofs + v.resets, v.errors, v.failed_processes), (9, 9, 0), "{v:?}");
    // Each process's log lines come through, saying which process.
    for n in 1..=3 {
        assert!(stderr.contains(&format!("[client {n}/3] ")), "{stderr}");
    }
}

#[test]
fn a_failed_process_is_named_and_fails_the_run() {
    let server = serve(Behaviour::Echo);
    // Process 2 of 3 cannot create its timeline.
    let dir = temp_dir("failed-process");
    std::fs::create_dir(dir.join("t.csv.2")).unwrap();
    let timeline = dir.join("t.csv");
    let args = ["--processes", "3", "--connections", "30", "--count", "5", "--interval-ms", "0", "--timeline"];
    let (code, v, stderr) = run_json(server.port, &[&args[..], &[timeline.to_str().unwrap()]].concat());
    assert_eq!(code, 1, "{v:?}\n{stderr}");
    assert_eq!((v.connections, v.processes, v.failed_processes, v.errors), (30, Some(3), 1, 1), "{v:?}");
    assert_eq!(v.echoed, 2 * 10 * 5, "the two others ran: {v:?}");
    let named = stderr.lines().find(|l| l.contains("client process 2 of 3 (10 connections) failed"));
    let named = named.unwrap_or_else(|| panic!("{stderr}"));
    assert!(named.contains("exited with status 1 without printing a summary"), "{named}");
    assert!(stderr.contains("t.csv.2: Is a directory"), "what it printed is repeated: {stderr}");
    // The others wrote theirs.
    for n in [1, 3] {
        let csv = std::fs::read_to_string(dir.join(format!("t.csv.{n}"))).unwrap();
        assert!(csv.starts_with("t_ms,echoes,p50_us,p99_us,max_us,errors\n"), "{csv}");
    }
    assert!(!timeline.exists(), "no merged timeline");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_an_end_a_failed_process_ends_the_others() {
    let server = serve(Behaviour::Echo);
    let dir = temp_dir("endless");
    std::fs::create_dir(dir.join("t.csv.2")).unwrap();
    let timeline = dir.join("t.csv");
    let start = Instant::now();
    let (code, v, stderr) = run_json(
        server.port,
        &["--processes", "3", "--connections", "6", "--interval-ms", "10", "--timeline", timeline.to_str().unwrap()],
    );
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert_eq!(code, 1, "{v:?}");
    assert_eq!((v.failed_processes, v.errors), (3, 3), "{v:?}");
    for n in [1, 3] {
        let why = format!(
            "client process {n} of 3 (2 connections) failed: killed by the coordinator (client process 2 ended"
        );
        assert!(stderr.contains(&why), "{stderr}");
    }
    // The processes are gone (the coordinator waited for them): every
    // connection they made is closed, with an EOF or a reset (an echo a
    // killed process never read). They may have been killed before
    // connecting at all.
    let deadline = Instant::now() + Duration::from_secs(2);
    let all_closed = || server.ended.load(Ordering::SeqCst) == server.accepted.load(Ordering::SeqCst);
    while !all_closed() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        all_closed(),
        "the killed processes' connections are closed: {} of {}",
        server.ended.load(Ordering::SeqCst),
        server.accepted.load(Ordering::SeqCst)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn processes_split_under_a_low_open_file_limit() {
    // 100 open files hold 68 connections a process: 150 need three.
    let server = serve(Behaviour::Echo);
    let out = Command::new("sh")
        .args(["-c", r#"ulimit -n 100 && exec "$0" "$@""#, env!("CARGO_BIN_EXE_seqnum-client")])
        .args(["-p", &server.port.to_string(), "--json", "--connections", "150", "--count", "3", "--interval-ms", "0"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let v: Summary = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!((v.connections, v.processes, v.errors, v.echoed), (150, Some(3), 0, 450), "{v:?}");
    assert!(stderr.contains("open-file hard limit 100") && stderr.contains("in 3 client processes"), "{stderr}");
}

#[test]
fn sigterm_to_the_coordinator_kills_every_process() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::os::unix::process::ExitStatusExt;
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        // Without --count or --duration the processes run until killed.
        let server = serve(Behaviour::Echo);
        let mut c = start_client(server.port, &["--processes", "2", "--connections", "4", "--interval-ms", "10"]);
        assert_eq!(wait_for(&server.accepted, 4), 4, "the processes connected");
        kill(Pid::from_raw(c.id() as i32), sig).unwrap();
        let status = c.wait().unwrap();
        assert_eq!(status.signal(), Some(sig as i32), "the coordinator dies of it: {status:?}");
        // SIGTERM: the coordinator kills them; SIGKILL: the kernel sends
        // them SIGTERM (PR_SET_PDEATHSIG). Either way their connections close.
        assert_eq!(wait_for(&server.ended, 4), 4, "{sig}: client processes left running");
    }
}
