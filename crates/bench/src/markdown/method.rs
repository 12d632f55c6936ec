//! The *Method* section of BENCHMARKS.md: how every figure is measured
//! (prose, with the few numbers it quotes filled in).

use std::fmt::Write as _;

use super::prelude::*;

/// ## Method.
pub(super) fn write(w: &mut String, r: &Results) {
    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "- Everything runs on 127.0.0.1: a fresh `takeoverd --listen 127.0.0.1:PORT --control-socket TMP` (its own \
         `seqnum-worker`) per run, on a free port, and `seqnum-client --json --timeline` against it.\n\
         - **Placement:** {}\n\
         - **Load:** the client is lock-step (the next message on a connection goes out once the echo of the \
         previous one is in) with a per-connection interval of *connections / 10* ms (at least 10 ms): 100 \
         connections every 10 ms, 1 000 every 100 ms, 10 000 every 1 000 ms, 19 900 every 1 990 ms — about \
         10 000 messages/s in all, well below what the two cores can echo (see *Echo cost*), so the latency \
         measured is the server's pause, not queueing. Connects are spread over *connections / 10* ms \
         (`--ramp-ms`). `--timeout-ms 2000` (5 000 for the scale ladder, 300 000 under systemd so that a long \
         pause is measured instead of being cut short by timeouts).\n\
         - **Reloads:** `takeoverd ctl reload`, one at a time, after every connection is up and 1 s of warm-up; \
         `handoff_ms` (request → new worker's ack, including starting the new process) and `old_exit_ms` \
         (request → old worker exited) come from `takeoverd ctl status --json`.\n\
         - **Latency around an event:** the client's timeline has one row per 100 ms (echoes received in it, \
         their p50/p99/max latency, errors). An event's window is every row overlapping [request, command \
         returned + 50 ms]; a message caught by the pause has its echo arrive at the end of the pause, so its \
         whole wait lands in the window. Per window we take the highest row p50, the highest row p99, and the \
         max, then report median (min–max) over the events. The same windows (same offsets from the moment \
         every connection was up) are cut from a second, identical run without reloads.\n\
         - **Echo cost:** `--interval-ms 0` (each connection sends again as soon as its echo is in); CPU = \
         utime+stime of takeoverd and the worker from `/proc/PID/stat` (clock ticks → µs) over a 3 s window after \
         1 s of warm-up, divided by the echoes the client's timeline counts in that window. Run twice: \
         *pinned* (server and client on different cores with `taskset`) and *shared* (no pinning).\n\
         - **Memory:** VmRSS from `/proc/PID/status` of takeoverd and the worker with no connection, then with \
         N idle connections (each sent one message, then nothing for an hour), then after one reload.\n\
         - **Scale:** the ladder below, 3 reloads each; a step passes when every reload succeeds and the clients \
         count zero errors. More than {} connections are spread over several client processes, and more than 10 000 \
         over several loopback source addresses (127.0.0.x, one per 10 000; the handoff at 19 900 too).\n\
         - **systemd:** a private `systemd --user` manager (`unshare -m --propagation private`, a tmpfs on \
         /run/systemd, `/lib/systemd/systemd --user`, `systemctl --user` through \
         `$XDG_RUNTIME_DIR/systemd/private`), a `Type=notify` unit running takeoverd with \
         `Restart=on-failure`, `RestartSec=100ms`, `KillMode=mixed`, \
         `LimitNOFILE=` the hard limit, and the fd-store settings of `units/seqnum.service` (below). Connects are \
         spread over max(n/10, m²/500) ms, m being the connections stored by name (systemd spends about 1 µs per \
         stored fd on each new one; connecting faster than it can store stalls the service). Events: `systemctl --user reload`, `systemctl --user restart` (returns once the new \
         takeoverd said READY=1), `systemctl --user kill -s KILL --kill-who=main` (systemd restarts it). An event \
         is over when a new main process runs and `ctl status` shows every connection again. The pause is the \
         highest client latency in the event's window. The client is killed after the last event; its errors \
         are counted from its timeline.\n\
         - Clients, servers, timelines and logs live in a temporary directory that is removed at the end.",
        r.placement,
        crate::client::MAX_PER_CLIENT,
    );
    crate::report_floor::method(w);
}
