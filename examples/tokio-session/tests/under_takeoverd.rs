//! session-worker (the tokio example) under takeoverd, end to end: clients
//! that each set a nickname and join rooms keep sending requests while
//! takeoverd reloads the worker and a worker is SIGKILLed. Every reply must
//! carry the connection's own nickname and rooms, and its command count
//! must grow by exactly one per request: a state lost, a request lost or a
//! request run twice shows at once.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use testkit::*;

/// One client: its session, then `WHO` after `WHO` until `stop`. Returns
/// the requests it made, or what went wrong.
fn session(port: u16, i: usize, stop: Arc<AtomicBool>) -> Result<u64, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let nick = format!("user{i}");
    let rooms = format!("r{},r{}", i % 3, 3 + i % 2);
    let mut id = 0u64;
    let mut request = |cmd: String, expect_rooms: &str| -> Result<(), String> {
        id += 1;
        writer.write_all(format!("{id} {cmd}\n").as_bytes()).map_err(|e| format!("request {id}: {e}"))?;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => return Err(format!("request {id}: connection closed")),
                Ok(_) => {}
                Err(e) => return Err(format!("request {id}: {e}")),
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let got: u64 = words.first().and_then(|w| w.parse().ok()).ok_or(format!("bad reply {line:?}"))?;
            if got + 1 == id {
                // The reply to our previous request again: its worker died
                // after answering and before consuming it. Allowed once.
                continue;
            }
            let expect = format!("{id} OK {nick} {id} {expect_rooms}");
            return if line.trim_end() == expect { Ok(()) } else { Err(format!("expected {expect:?}, got {line:?}")) };
        }
    };
    request(format!("NICK {nick}"), "-")?;
    request(format!("JOIN r{}", i % 3), &format!("r{}", i % 3))?;
    request(format!("JOIN r{}", 3 + i % 2), &rooms)?;
    while !stop.load(Ordering::Relaxed) {
        request("WHO".into(), &rooms)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(id)
}

fn serving_pid(d: &Takeoverd) -> u32 {
    ctl_status(&d.sock).worker_pid.expect("a worker serves")
}

/// 20 sessions; 3 reloads, a SIGKILL of the serving worker, a reload more:
/// every session's state and count come through exact.
#[test]
fn sessions_keep_their_state_through_reloads_and_a_kill() {
    let dir = TempDir::new("tokio-session");
    let d = Takeoverd::start(&dir, &["--worker", bin("session-worker").to_str().unwrap()], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let stop = stop.clone();
            let port = d.port;
            std::thread::spawn(move || session(port, i, stop))
        })
        .collect();
    wait_until("the 20 sessions are connected", Duration::from_secs(5), || ctl_status(&d.sock).connections == 20);
    let mut pid = serving_pid(&d);
    let step = |what: &str, pid: &mut u32, act: &dyn Fn(u32)| {
        // Let requests flow under the worker that serves now.
        std::thread::sleep(Duration::from_millis(300));
        act(*pid);
        wait_until(&format!("a new worker serves after {what}"), Duration::from_secs(5), || {
            try_ctl_status(&d.sock).and_then(|s| s.worker_pid).is_some_and(|p| p != *pid)
        });
        *pid = serving_pid(&d);
    };
    let reload = |_: u32| {
        let out = ctl(&d.sock, &["reload"]);
        assert!(out.status.success(), "reload failed: {out:?}");
    };
    let kill = |pid: u32| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    };
    for i in 1..=3 {
        step(&format!("reload {i}"), &mut pid, &reload);
    }
    step("the SIGKILL", &mut pid, &kill);
    step("the reload after the kill", &mut pid, &reload);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    for (i, c) in clients.into_iter().enumerate() {
        match c.join().expect("client thread") {
            Ok(n) => requests += n,
            Err(e) => panic!("session {i}: {e}\n---- takeoverd's log:\n{}", std::fs::read_to_string(&d.log).unwrap()),
        }
    }
    eprintln!("20 sessions, {requests} requests, every reply exact");
    let st = ctl_status(&d.sock);
    assert_eq!(st.worker_restarts, 1, "only the kill should have cost a worker: {st:?}");
    assert!(requests > 20 * 10, "the sessions barely ran: {requests} requests");
    wait_until("every session the clients closed is reported closed", Duration::from_secs(5), || {
        ctl_status(&d.sock).connections == 0
    });
}
