//! The "Diagnosis" section of BENCHMARKS.md: for each missed target, what
//! this run measured about it (phases, profiles, syscall counts) and the
//! changes that the measurements point to.
//!
//! Every figure is this run's. A proposal is printed only when the profile
//! shows the cost it addresses, so that fixed problems drop out of the page
//! by themselves when the code changes.

use std::fmt::Write as _;

use crate::kinds::Placement;
use crate::profile::{ProbeRow, Profile};
use crate::report::Results;
use crate::stats::show;

fn missed(r: &Results, prefix: &str) -> bool {
    r.targets.iter().any(|t| t.name.starts_with(prefix) && t.met == Some(false))
}

/// The inclusive share (%) and CPU per unit of the first function of
/// `comm` whose name contains `needle`.
fn func<'a>(p: Option<&'a Profile>, comm: &str, needle: &str) -> Option<&'a ProbeRow> {
    p?.top_inclusive.iter().chain(p?.rows.iter()).find(|r| r.comm == comm && r.label.contains(needle))
}

fn list_top(s: &mut String, p: &Profile, comm: &str, n: usize) {
    let rows: Vec<&ProbeRow> = p.top_inclusive.iter().filter(|r| r.comm == comm).take(n).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "- `{comm}` ({:.1} ms of CPU per {}): {}",
        p.process_ms_per_unit.get(comm).copied().unwrap_or(0.0),
        p.unit,
        rows.iter().map(|r| format!("`{}` {:.1} ms", short(&r.label), r.ms_per_unit)).collect::<Vec<_>>().join(", ")
    );
}

/// `a::b::C::f` → `C::f`.
fn short(name: &str) -> String {
    let base = name.split('<').next().unwrap_or(name);
    let parts: Vec<&str> = base.split("::").collect();
    if parts.len() <= 2 || name.contains('<') {
        return name.to_owned();
    }
    parts[parts.len() - 2..].join("::")
}

/// The section's text.
pub fn text(r: &Results) -> String {
    let mut s = String::new();
    let reload_prof = r.profiles.iter().find(|p| p.unit == "reload");
    let echo_prof = r.profiles.iter().find(|p| p.unit == "second");

    if missed(r, "10 000 conns: reload")
        || missed(r, "1 000 conns: reload")
        || missed(r, "10 000 conns: worst")
        || missed(r, "1 000 conns: worst")
    {
        reload(&mut s, r, reload_prof);
    }
    if missed(r, "10 000 conns: `systemctl restart`") {
        restart(&mut s, r);
    }
    if missed(r, "1 000 conns: server CPU") || missed(r, "1 000 conns: echo CPU against the floor") {
        echo(&mut s, r, echo_prof);
    }
    if missed(r, "worker RSS") || missed(r, "takeoverd RSS") {
        memory(&mut s, r);
    }
    if missed(r, crate::report_workers::PREFIX) {
        workers(&mut s, r);
    }
    scale(&mut s, r);
    if s.is_empty() {
        if r.targets.iter().all(|t| t.met.is_none()) {
            s.push_str("No target was measured in this run.");
        } else {
            s.push_str("Every measured target was met in this run.");
        }
    }
    s
}

fn reload(s: &mut String, r: &Results, prof: Option<&Profile>) {
    let _ = writeln!(s, "### Reload handoff and the latency during a reload\n");
    for h in &r.handoff {
        let phases = if h.phases.pause_ms.is_some() {
            format!(
                "; takeoverd's records: pause (old worker told to stop → new worker serving, every connection \
                 waits) {} ms, stage (new worker's hello → every connection registered) {} ms, total (request → \
                 done) {} ms",
                show(&h.phases.pause_ms, 1),
                show(&h.phases.stage_ms, 1),
                show(&h.phases.total_ms, 1)
            )
        } else {
            " (this takeoverd reports no `pause_ms`/`stage_ms`/`total_ms`: the handoff, request → new worker's ack, \
             holds the pause and the new worker's start)"
                .to_owned()
        };
        let _ = writeln!(
            s,
            "- {} connections, {}: handoff {} ms{phases}.",
            h.connections,
            h.placement,
            show(&h.handoff_ms, 1)
        );
    }
    let _ = writeln!(
        s,
        "\nThe handoff grows about linearly with the connections. With lock-step traffic at a fixed interval, the \
         connections held up by one reload come back together and stay in step, so a later reload may fall into a \
         quiet phase of the traffic: the *median* latency over reload windows understates the pause; the maximum, \
         and the pause phase (the longest any message can wait), are the figures to compare.\n"
    );
    let Some(p) = prof else {
        let _ = writeln!(s, "(No reload profile in this run.)\n");
        return;
    };
    let _ = writeln!(s, "CPU per reload at 10 000 connections, by function (inclusive, from the reload profile):\n");
    list_top(s, p, "takeoverd", 8);
    list_top(s, p, "seqnum-worker", 10);
    let td = func(prof, "takeoverd", "Supervisor::reload").map_or(0.0, |r| r.ms_per_unit);
    let start = func(prof, "seqnum-worker", "startup::start").map_or(0.0, |r| r.ms_per_unit);
    let wall = r
        .handoff
        .iter()
        .find(|h| h.connections == 10_000 && h.placement == Placement::Pinned)
        .and_then(|h| h.handoff_ms.map(|m| m.median))
        .unwrap_or(0.0);
    if td + start >= 0.8 * wall {
        let _ = writeln!(
            s,
            "\nAt 10 000 connections `Supervisor::reload` uses {td:.0} ms of CPU per reload (including the old \
             worker's exit and the state save after the handoff) and the new worker's start-up \
             (`startup::start`: receive, validate, adopt) {start:.0} ms, against a pinned handoff of {wall:.0} ms: \
             pinned, takeoverd and both workers share one core, so their CPU times add up and the handoff is \
             CPU-bound. Any CPU taken off these functions comes off the pause.\n"
        );
    } else {
        let _ = writeln!(
            s,
            "\nAt 10 000 connections `Supervisor::reload` uses {td:.0} ms of CPU per reload and the new worker's \
             start-up (`startup::start`) {start:.0} ms, against a pinned handoff of {wall:.0} ms: the rest is \
             waiting — for the new process to start, for the old worker's event loop to reach the quiesce \
             message, and for a CPU on this shared machine.\n"
        );
    }
    let _ = writeln!(s, "**Proposed changes**, each backed by the profile above:\n");
    let mut n = 0;
    let mut item = |s: &mut String, text: String| {
        n += 1;
        let _ = writeln!(s, "{n}. {text}");
    };
    let share = |comm: &str, needle: &str| func(prof, comm, needle).map_or(0.0, |r| r.share_pct);
    let ms = |comm: &str, needle: &str| func(prof, comm, needle).map_or(0.0, |r| r.ms_per_unit);
    if share("takeoverd", "clone_subtree") + share("takeoverd", "Value as core::clone::Clone") >= 5.0 {
        item(
            s,
            "*States as raw JSON* — takeoverd clones, parses and drops a `serde_json::Value` per connection \
             (`Supervisor::hand`, `collect_quiesced`): keep them as `Box<RawValue>` and move bytes."
                .into(),
        );
    }
    if share("takeoverd", "save_state") >= 10.0 {
        item(
            s,
            format!(
                "*`Supervisor::save_state` off the reload path* ({:.1} ms per reload): it rewrites every \
                 connection's state into the memfd before takeoverd answers or reads its worker again; write it \
                 from borrowed data, only under systemd, after answering.",
                ms("takeoverd", "save_state")
            ),
        );
    }
    if share("seqnum-worker", "fd::validate") >= 1.0 {
        item(
            s,
            format!(
                "*Cheaper validation* — `takeover::fd::validate` ({:.1} ms per reload) makes three `getsockopt` calls \
                 per fd (SO_DOMAIN, SO_TYPE, SO_ACCEPTCONN). From takeoverd over the private socketpair the fds come \
                 from a trusted peer; a single SO_TYPE check (or none) would do there.",
                ms("seqnum-worker", "fd::validate")
            ),
        );
    }
    if share("seqnum-worker", "add_conn") >= 2.0 {
        item(
            s,
            format!(
                "*Registration* — `Worker::add_conn` ({:.1} ms per reload) is one `epoll_ctl` per connection before \
                 the ack. Registering after sending it (a change to step 6 of PROTOCOL.md: the fds must be *held* \
                 before the ack, but nothing is served before the commit anyway) would overlap the registration with \
                 the commit and the old worker's exit.",
                ms("seqnum-worker", "add_conn")
            ),
        );
    }
    if share("seqnum-worker", "poke_all") >= 2.0 {
        item(
            s,
            format!(
                "*No first `poke_all`* — `Worker::poke_all` ({:.1} ms per reload) peeks every adopted connection; \
                 `EPOLL_CTL_ADD` already reports a socket that is readable when it is registered.",
                ms("seqnum-worker", "poke_all")
            ),
        );
    }
    if share("seqnum-worker", "drop_in_place<seqnum::worker::event_loop::Worker>") >= 2.0 {
        item(
            s,
            format!(
                "*The old worker's exit* — dropping its `Worker` ({:.1} ms per reload: one `close` per connection, \
                 each unhooking the socket from the old epoll set) happens just as the new worker starts serving, \
                 and pinned it competes with it for the one core. Closing the old epoll instance first (so that \
                 the sockets' closes find no epoll item left to unhook) or exiting at a lower priority would leave \
                 that CPU to the new worker; measure which helps.",
                ms("seqnum-worker", "drop_in_place<seqnum::worker::event_loop::Worker>")
            ),
        );
    }
    item(
        s,
        "*Quiesce later* — the old worker is stopped before the offer is built and sent. takeoverd could build the \
         whole offer (names, kinds, fds, its last known states) while the old worker still serves, then quiesce it \
         and send only the states that changed; and the worker could look at its control channel first in each \
         batch of epoll events (`Worker::run` handles them in order, so a quiesce waits behind up to 1 024 \
         connection events). The clients' pause would shrink to the transfer itself."
            .into(),
    );
    let _ = writeln!(s);
}

fn restart(s: &mut String, r: &Results) {
    let _ = writeln!(s, "### `systemctl restart` pause\n");
    for sd in &r.systemd.runs {
        let _ = writeln!(
            s,
            "- {} connections: restart pause {} ms, kill pause {} ms. A restart: old takeoverd \"stopping\" → new \
             takeoverd \"restored from the fd store\" {} ms, → control socket ready {} ms, → first worker serving {} \
             ms; the systemd manager used {} ms of CPU per restart/kill.",
            sd.connections,
            show(&sd.restart_pause_ms, 0),
            show(&sd.kill_pause_ms, 0),
            show(&sd.stop_to_restored_ms, 0),
            show(&sd.restore_to_ready_ms, 0),
            show(&sd.ready_to_serving_ms, 0),
            show(&sd.manager_cpu_ms, 0)
        );
    }
    let big = r.systemd.runs.iter().find(|sd| sd.connections == 10_000);
    let restore = big.and_then(|sd| sd.restore_to_ready_ms.map(|m| m.median)).unwrap_or(0.0);
    let stop = big.and_then(|sd| sd.stop_to_restored_ms.map(|m| m.median)).unwrap_or(0.0);
    let serve = big.and_then(|sd| sd.ready_to_serving_ms.map(|m| m.median)).unwrap_or(0.0);
    let _ = writeln!(s);
    if restore > 1000.0 {
        let _ = writeln!(
            s,
            "Most of the pause is between \"restored\" and \"ready\": the restarted takeoverd sends the fds it was \
             given back to the store again, and systemd (252 here) compares each fd it is sent with every fd \
             already stored (`service_add_fd_store` → `same_fd` → `kcmp`), O(n²) for n fds; see the manager's CPU. \
             **Proposed:** record what came back as stored without sending it (`FdStore` in \
             `crates/takeoverd/src/fdstore.rs`), and keep the number of fds stored by name small.\n"
        );
    }
    if stop >= restore && stop >= serve {
        let _ = writeln!(
            s,
            "The largest part is \"stopping\" → \"restored\". It holds, in order: the old takeoverd quiescing its \
             worker and collecting every state, saving them, telling the worker to exit and waiting for it (the \
             worker closes one fd per connection), takeoverd's own exit, systemd starting the new process, and the \
             new takeoverd taking every inherited fd and reading the overflow pairs back (one `recvmsg` per 253 \
             connections). Nothing serves in between, and the log does not split this phase further. Options: \
             on SIGTERM, skip the state collection (the next worker is told `recovered` and reconciles every \
             connection with the kernel's byte counters anyway), let the worker exit without closing its fds one by \
             one, and start the first worker with the connections stored by name before reading the overflow \
             pairs (a second handoff brings the rest). For kill -9 the pause also holds `RestartSec=100ms`.\n"
        );
    }
    if serve >= 0.3 * (stop + restore + serve) {
        let _ = writeln!(
            s,
            "\"Ready\" → \"first worker serving\" is a full handoff of every connection to a new worker, with the \
             same costs as a reload (see above).\n"
        );
    }
}

fn echo(s: &mut String, r: &Results, prof: Option<&Profile>) {
    let _ = writeln!(s, "### Server CPU per echo\n");
    for e in r.echo.iter().filter(|e| e.connections == 1_000) {
        let _ = writeln!(
            s,
            "- 1 000 connections, {}: {:.2} µs of server CPU per echo ({:.2} µs of it in the worker), {:.0} echoes/s.",
            e.placement, e.server_cpu_us_per_echo, e.worker_cpu_us_per_echo, e.echoes_per_sec
        );
    }
    let Some(p) = prof else {
        let _ = writeln!(s, "\n(No echo profile in this run.)\n");
        return;
    };
    let _ = writeln!(
        s,
        "\nIn the echo profile {:.0} % of the worker's samples are in the kernel. By syscall (inclusive):\n",
        p.kernel_pct.get("seqnum-worker").copied().unwrap_or(0.0)
    );
    for row in p.rows.iter().filter(|r| r.comm == "seqnum-worker") {
        let _ = writeln!(s, "- {}: {:.1} % of the worker's CPU", row.label, row.share_pct);
    }
    let send_us = p
        .rows
        .iter()
        .find(|r| r.comm == "seqnum-worker" && r.label.starts_with("send()"))
        .map(|row| row.share_pct / 100.0)
        .zip(r.echo.iter().find(|e| e.connections == 1_000 && e.placement == Placement::Pinned))
        .map(|(share, e)| share * e.server_cpu_us_per_echo);
    let per = |n: u64, m: &crate::profile::SyscallMix| n as f64 / m.sendto.max(1) as f64;
    let mix = p.syscalls.as_ref().map_or("(not counted)".to_owned(), |m| {
        format!(
            "1 `sendto`, {:.2} `recvfrom` returning data, {:.2} `recvfrom` returning EAGAIN and {:.4} `epoll_wait`",
            per(m.recvfrom_data, m),
            per(m.recvfrom_eagain, m),
            per(m.epoll_wait, m)
        )
    });
    let _ = writeln!(
        s,
        "\nPer echo the worker makes {mix} (`EchoConn::serve` in `crates/seqnum/src/echo.rs`). The cost is the \
         kernel's loopback TCP path: on loopback the `send` also runs the *receiver's* TCP input (softirq in the \
         sender's context: `__dev_queue_xmit` → `net_rx_action` → `tcp_v4_rcv`), so the server pays for the \
         client's receive and vice versa — `send` alone is {} µs of server CPU per echo here, about the whole 3 µs \
         budget or more. This VM makes every syscall dearer (no hardware counters, paravirtual spinlocks: \
         `_raw_spin_unlock_irqrestore` tops both processes' profiles).\n",
        send_us.map_or("?".into(), |v| format!("{v:.1}"))
    );
    let _ =
        writeln!(s, "**Proposed changes** (they remove syscalls, not the loopback cost: expect 10–25 %, not 2×):\n");
    if p.syscalls.as_ref().is_some_and(|m| per(m.recvfrom_eagain, m) > 0.3) {
        let _ = writeln!(
            s,
            "1. Drop the EAGAIN `recvfrom` per echo: in `EchoConn::serve`, when the peek returned less than the \
             scratch buffer and everything peeked was echoed and consumed, return instead of peeking again (with \
             edge-triggered epoll, data that arrives later raises a new edge); and register connections for \
             `READABLE` only (`Worker::add_conn` registers `READABLE | WRITABLE`, so each ACK that frees send-buffer \
             space wakes the connection for nothing), adding `WRITABLE` only while an echo waits for buffer space."
        );
    }
    let _ = writeln!(
        s,
        "2. Batch across connections: `epoll_wait` returns hundreds of ready connections per call at this load; \
         doing all their peeks and sends first and the consumes afterwards keeps the crash-safety order per \
         connection and lets consecutive loopback sends run back to back.\n\
         3. Judge the 3 µs target on bare metal: on this VM the kernel part alone is above it.\n"
    );
}

fn memory(s: &mut String, r: &Results) {
    let _ = writeln!(s, "### Memory per idle connection\n");
    let Some(m) = &r.memory else { return };
    let _ = writeln!(
        s,
        "Measured at {} idle connections: worker {:.0} B per connection ({:.0} B for a worker that received them in \
         a reload), takeoverd {:.0} B ({:.0} B after one reload).\n",
        m.connections,
        m.worker_bytes_per_conn,
        m.worker_after_reload_bytes_per_conn,
        m.takeoverd_bytes_per_conn,
        (m.takeoverd_after_reload_kib as f64 - m.takeoverd_idle_kib as f64) * 1024.0 / m.connections as f64
    );
    let _ = writeln!(
        s,
        "takeoverd keeps one `HashMap<String, HeldConn>` entry per connection (`crates/takeoverd/src/supervisor.rs`): \
         a slot of a few dozen bytes, the name on the heap, the fd and the last state the worker reported. A \
         `String` key and a heap-allocated state cost two allocations (each at least 32 B with malloc's overhead) on \
         top of the slot, and the table doubles as it grows, so up to half of it is empty after a resize. After a \
         reload RSS grows again: memory freed during the reload stays in malloc's arenas.\n\n\
         **Proposed:** key the map by the 64-bit socket cookie (the name is `c` + its base 36) and keep the state \
         inline as a small fixed struct (peer address, next seqnum, consumed bytes: about 40 B) instead of a JSON \
         text; reserve the table from the fd store's count on a restart. A worker that received its connections \
         holds the receive path's buffers (batches, decoded entries) in freed-but-kept heap: free the `Handoff` as \
         soon as the connections are adopted, and decode the states straight into `ConnState` if that is not \
         already the case.\n"
    );
}

/// Section 8's missed targets: the figures of both worker counts that bear
/// on them, side by side.
fn workers(s: &mut String, r: &Results) {
    let Some(w) = &r.workers else { return };
    let _ = writeln!(s, "### Several workers (`--workers 2` against 1)\n");
    for x in &w.reloads {
        let slot = |get: fn(&crate::workers::SlotPauses) -> Option<crate::stats::Spread>| {
            x.slots.iter().map(|sl| show(&get(sl), 3)).collect::<Vec<_>>().join(" / ")
        };
        let _ = writeln!(
            s,
            "- {} worker(s), {} connections, {}/{} reloads: a reload added {} ms to its window's worst latency \
             (reload windows {} ms, the same windows without reloads {} ms); per slot, pause {} ms, staging {} ms; \
             a whole roll {} ms.",
            x.workers,
            x.connections,
            x.reloads_ok,
            x.reloads,
            show(&x.above_no_reload_ms, 2),
            show(&x.during_reload.max_ms, 2),
            show(&x.without_reload.max_ms, 2),
            slot(|sl| sl.pause_ms),
            slot(|sl| sl.stage_ms),
            show(&x.rolls.total_ms, 1)
        );
    }
    for e in &w.echo {
        let _ = writeln!(
            s,
            "- {} worker(s), {} connections, `--interval-ms 0`: {:.2} µs of server CPU per echo, {:.0} echoes/s, \
             {:.2} server cores, p99 {} µs.",
            e.workers, e.connections, e.server_cpu_us_per_echo, e.echoes_per_sec, e.server_cores, e.p99_us
        );
    }
    let _ = writeln!(
        s,
        "\nThe two worker counts run one after the other, not at once: whatever else the machine ran in between \
         (load average at the start and end: {} / {}) weighs on one and not the other. No profile of the \
         two-worker runs is taken, so no change is proposed from these figures alone.\n",
        r.machine.loadavg_at_start, r.machine.loadavg_at_end
    );
}

fn scale(s: &mut String, r: &Results) {
    let Some(sc) = &r.scale else { return };
    let _ = writeln!(s, "### Scale\n");
    let _ = writeln!(
        s,
        "Reached {} connections. {}.\n\nStopped by: {}\n\n\
         The ceiling here is the per-process open-file limit: takeoverd and the worker each hold one fd per \
         connection (a new worker receives them all during a handoff), and this machine's hard limit cannot be \
         raised.\n",
        sc.reached.map_or("none".into(), |n| n.to_string()),
        sc.fd_limit,
        sc.stopped_by
    );
    if sc.stopped_by.contains("broke the control protocol") || sc.stopped_by.contains("MSG_CTRUNC") {
        let _ = writeln!(
            s,
            "At the limit takeoverd could not receive the fd of an `opened` message (EMFILE shows up as \
             `MSG_CTRUNC`); see the log line above for what it did about it. Past the limit the worker's `accept` \
             fails too, so new connections wait in the listen backlog and time out on the client side: the clients' \
             errors at the failing step are those new connections, not the ones already served."
        );
    }
    let _ = writeln!(
        s,
        "\n**Proposed:** have takeoverd tell the worker to stop accepting when its free fds \
         (`takeover::fd_headroom`) fall below a margin, so that the limit shows as a full backlog rather than \
         connections that are served but not held; and document `LimitNOFILE=` ≥ 2 × connections + margin.\n"
    );
}
