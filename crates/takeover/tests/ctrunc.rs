//! Truncated control data (`MSG_CTRUNC`). Lowers this test process's fd
//! limit, so it lives alone in its own test binary.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use takeover::wire;

#[test]
fn truncated_control_data_is_an_error_and_leaks_nothing() {
    let (giver, taker) = wire::seqpacket_pair().unwrap();
    let files: Vec<std::fs::File> = (0..20).map(|_| std::fs::File::open("/proc/self/status").unwrap()).collect();
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    wire::send(giver.as_fd(), br#"{"type":"end","fds":0}"#, &fds, None).unwrap();
    drop(fds);
    drop(files);

    let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = open();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Room for 5 of the 20 fds (read_dir itself needs one).
    setrlimit(Resource::RLIMIT_NOFILE, (before + 5) as u64, hard).unwrap();
    let r = wire::recv(taker.as_fd(), Some(Instant::now() + Duration::from_secs(2)));
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let err = r.unwrap_err();
    assert!(matches!(err, takeover::Error::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("MSG_CTRUNC"), "{err}");
    assert_eq!(open(), before, "fds received with truncated control data were not closed");
}
