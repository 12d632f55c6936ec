//! The units of `units/` installed into a test manager (`seqnum.socket`,
//! `seqnum.service`, with what cannot work here adapted and said), and
//! `takeoverd ctl` against the service's control socket.

use std::path::{Path, PathBuf};
use std::process::Output;

use super::UserManager;
use crate::daemon::Status;

impl UserManager {
    /// Installs `units/seqnum.socket` and `units/seqnum.service` for this
    /// manager: the binaries of `target/debug`, `port` instead of 1234,
    /// `takeoverd_args` appended to `ExecStart=`, output appended to
    /// `service.log`, and what cannot work here dropped or adapted, each
    /// with a note on stderr. Then `daemon-reload`.
    pub fn install_seqnum(&mut self, port: u16, takeoverd_args: &[&str]) {
        // This crate is crates/testkit; the units are at the top of the workspace.
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../units");
        let bins = format!("{}/", self.service_bins().display());
        let read = |n: &str| std::fs::read_to_string(units.join(n)).unwrap_or_else(|e| panic!("units/{n}: {e}"));

        let socket = read("seqnum.socket");
        assert!(socket.contains("127.0.0.1:1234"), "units/seqnum.socket no longer listens on 127.0.0.1:1234");
        let socket = socket.replace("127.0.0.1:1234", &format!("127.0.0.1:{port}"));
        self.install_unit("seqnum.socket", &socket);

        let log = self.dir.path("service.log");
        let adapt = self.adaptations();
        if adapt.is_empty() {
            eprintln!("note: every directive of units/seqnum.service is kept as written");
        }
        let mut out = String::new();
        for line in read("seqnum.service").lines() {
            let key = line.split('=').next().unwrap_or_default().trim();
            let mut line = line.replace("/usr/local/bin/", &bins);
            if key == "ExecStart" && !takeoverd_args.is_empty() {
                line = format!("{line} {}", takeoverd_args.join(" "));
            }
            if key == "StandardOutput" || key == "StandardError" {
                line = format!("{key}=append:{}", log.display());
            }
            if let Some((new, why)) = adapt.iter().find(|(k, _, _)| k == key).map(|(_, n, w)| (n, w)) {
                eprintln!("note: {line:?} -> {new:?} in the test manager: {why}");
                line = new.clone();
            }
            out.push_str(&line);
            out.push('\n');
        }
        self.install_unit("seqnum.service", &out);
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// The directives of units/seqnum.service that this manager cannot run
    /// as written: (key, replacement line, why). Tested on systemd 252 as
    /// root in a private mount namespace: every directive of the unit works
    /// there, given the inaccessible nodes and the opened notify socket that
    /// `start` provides; what remains depends on where the checkout is.
    fn adaptations(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let under = |p: &Path, roots: &[&str]| roots.iter().any(|r| p.starts_with(r));
        let ours = [self.service_bins(), self.dir.0.clone()];
        if ours.iter().any(|p| under(p, &["/home", "/root", "/run/user"])) {
            out.push((
                "ProtectHome".to_owned(),
                "ProtectHome=read-only".to_owned(),
                "the binaries or the runtime directory of this test live under a home directory".to_owned(),
            ));
        }
        if ours.iter().any(|p| under(p, &["/tmp", "/var/tmp"])) {
            out.push((
                "PrivateTmp".to_owned(),
                "#PrivateTmp= (dropped)".to_owned(),
                "the binaries or the runtime directory of this test live under /tmp or /var/tmp".to_owned(),
            ));
        }
        // Escape hatch for hosts where more fails: TAKEOVER_SYSTEMD_DROP=Key,Key
        if let Ok(keys) = std::env::var("TAKEOVER_SYSTEMD_DROP") {
            for k in keys.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                out.push((k.to_owned(), format!("#{k}= (dropped)"), "listed in TAKEOVER_SYSTEMD_DROP".to_owned()));
            }
        }
        out
    }

    /// The control socket of takeoverd in `seqnum.service`:
    /// `RuntimeDirectory=seqnum` lives in `$XDG_RUNTIME_DIR` under a user
    /// manager.
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join("seqnum/control.sock")
    }

    /// `takeoverd ctl --control-socket <ours> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        crate::daemon::ctl(&self.control_socket(), args)
    }

    /// `takeoverd ctl status --json` of the service, or `None` when
    /// takeoverd does not answer.
    pub fn try_ctl_status(&self) -> Option<Status> {
        crate::daemon::try_ctl_status(&self.control_socket())
    }

    /// `takeoverd ctl status --json` of the service, which must succeed.
    pub fn ctl_status(&self) -> Status {
        crate::daemon::ctl_status(&self.control_socket())
    }
}
