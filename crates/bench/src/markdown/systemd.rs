//! Section 2 of BENCHMARKS.md: restarts through the systemd fd store.

use std::fmt::Write as _;

use super::prelude::*;

/// ## 2. Restart through the fd store (systemd).
pub(super) fn write(w: &mut String, r: &Results) {
    let _ = writeln!(w, "\n## 2. Restart through the fd store (systemd)\n");
    let _ = writeln!(w, "Status: **{}**\n", r.systemd.status);
    if let Some(u) = &r.systemd.unit {
        let _ = writeln!(
            w,
            "The unit copies the fd-store settings of {}: takeoverd `{}`, `FileDescriptorStoreMax={}`{}{}.\n",
            u.source.as_deref().map_or("(no units/seqnum.service found: defaults)".to_owned(), |p| format!("`{p}`")),
            u.fdstore_max.map_or("(default --fdstore-max)".to_owned(), |m| format!("--fdstore-max {m}")),
            u.store_max,
            u.watchdog.as_deref().map(|w| format!(", `WatchdogSec={w}`")).unwrap_or_default(),
            u.start_limit
                .as_ref()
                .map(|(i, b)| format!(", `StartLimitIntervalSec={i}`, `StartLimitBurst={b}`"))
                .unwrap_or_default()
        );
    }
    if !r.systemd.runs.is_empty() {
        let _ = writeln!(
            w,
            "Pause = the highest client latency in the event's window, ms, median (min–max) over the events.\n\n\
             | connections | fds in the store (`NFileDescriptorStore`) | `systemctl reload` pause | `takeoverd ctl \
             upgrade` pause | `systemctl restart` pause | `kill -s KILL --kill-who=main` pause | errors \
             |\n|---:|---:|---|---|---|---|---:|"
        );
        for sd in &r.systemd.runs {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} |",
                sd.connections,
                sd.fdstore_fds,
                show(&sd.reload_pause_ms, 1),
                show(&sd.upgrade_pause_ms, 1),
                show(&sd.restart_pause_ms, 1),
                show(&sd.kill_pause_ms, 1),
                bold_if(sd.errors)
            );
        }
        let _ = writeln!(
            w,
            "\nWhere a restart's time goes (ms), from the service log and the manager's /proc/PID/stat:\n\n\
             | connections | restart: old takeoverd \"stopping\" → new one \"restored from the fd store\" | restored → \
             control socket ready | ready → first worker serving | manager CPU per restart/kill |\n|---:|---|---|---|---|"
        );
        for sd in &r.systemd.runs {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} |",
                sd.connections,
                show(&sd.stop_to_restored_ms, 1),
                show(&sd.restore_to_ready_ms, 1),
                show(&sd.ready_to_serving_ms, 1),
                show(&sd.manager_cpu_ms, 0)
            );
        }
        let _ = writeln!(
            w,
            "\nEvery event:\n\n| connections | event | took (ms) | pause (ms) | errors in window | ok \
             |\n|---:|---|---:|---:|---:|---|"
        );
        for sd in &r.systemd.runs {
            for e in &sd.events {
                let _ = writeln!(
                    w,
                    "| {} | {} | {:.0} | {:.1} | {} | {} |",
                    sd.connections,
                    e.kind,
                    e.done_ms - e.at_ms,
                    e.window.max_us as f64 / 1e3,
                    bold_if(e.window.errors),
                    if e.ok { "yes" } else { "**no**" }
                );
            }
        }
    }
}
