//! Who serves: takeoverd runs `--workers N` [`Slot`]s, each a share of the
//! connections and the state machine of who serves it ([`Who`]), and
//! [`Worker`], one worker as takeoverd sees it (its process, the version of
//! its channel, and what is queued to be sent to it).
//!
//! Every connection belongs to exactly one slot (`HeldConn::slot`), chosen
//! when it is accepted (the live slot with the fewest connections); a
//! slot's handoff, crash or restart touches only its own share. The state
//! machine of one slot:
//!
//! ```text
//!              start, crash, reload                     serving       commit
//!   Down ──────────────────────────▶ Handoff ─ hello ─ staging ─ stopping ─ committing ─▶ Serving
//!     ▲                                 │  (the old worker serves until `stop`)          │
//!     └──── failure without an old ─────┘  failure with an old: rollback ──▶ Serving(old) │
//!     └──────────────────────────── worker died / hung ──────────────────────────────────┘
//! ```
//!
//! takeoverd never waits on a worker: everything it sends goes through the
//! worker's [`Outbox`], flushed when the channel has room, so a worker that
//! hangs costs only its own deadline, never the other worker's clients.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use takeover::channel::ToWorker;
use takeover::wire::{MAX_FDS, MAX_MESSAGE};
use takeover::RawState;

use crate::worker::WorkerProc;

/// Sends one message if the channel has room now: `Ok(false)` when it has not.
fn try_send(chan: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> takeover::Result<bool> {
    match takeover::wire::send(chan, bytes, fds, Some(Instant::now())) {
        Ok(()) => Ok(true),
        Err(takeover::Error::Timeout(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The version of the channel a worker speaks, from its `hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Not known yet (no hello).
    Unknown,
    /// Version 1: the worker accepts and reports `opened` (docs/PROTOCOL.md).
    V1,
    /// Version 2: takeoverd accepts and `assign`s; staged handoffs.
    V2,
    /// Version 3: version 2, and it gives connections back (`give`) for
    /// `ctl workers N` to move them to another worker.
    V3,
}

impl Proto {
    /// From a `hello`'s version (or a carried worker's).
    pub fn of(version: u32) -> Option<Proto> {
        match version {
            1 => Some(Proto::V1),
            2 => Some(Proto::V2),
            3 => Some(Proto::V3),
            _ => None,
        }
    }

    /// The version number (0: not known yet).
    pub fn number(self) -> u32 {
        match self {
            Proto::Unknown => 0,
            Proto::V1 => 1,
            Proto::V2 => 2,
            Proto::V3 => 3,
        }
    }

    /// Whether takeoverd assigns it connections (versions 2 and 3).
    pub fn assigns(self) -> bool {
        matches!(self, Proto::V2 | Proto::V3)
    }
}

/// A connection takeoverd holds.
#[derive(Debug)]
pub struct HeldConn {
    /// takeoverd's copy, open; `None` while it is parked in its slot's
    /// [`Park`](crate::park::Park).
    pub fd: Option<std::os::fd::OwnedFd>,
    /// The last state a worker reported, as raw JSON: moved, never parsed.
    pub state: Option<RawState>,
    /// The slot whose worker serves it.
    pub slot: usize,
}

impl HeldConn {
    /// A connection not given to any slot yet (see `Supervisor::hold`).
    pub fn new(fd: std::os::fd::OwnedFd, state: Option<RawState>) -> HeldConn {
        HeldConn { fd: Some(fd), state, slot: usize::MAX }
    }

    /// takeoverd's copy, if it is open (not parked).
    pub fn open_fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
}

/// Every connection held, by name.
pub type Conns = HashMap<String, HeldConn>;

/// Something queued for a worker.
#[derive(Debug)]
enum Out {
    /// A connection to assign (looked up when sent: one that ended meanwhile
    /// is skipped).
    Assign(String),
    /// An encoded message without fds.
    Bytes(Vec<u8>),
    /// Every connection of the slot's parked copies (see `park.rs`): taken
    /// out a batch at a time, parked again, and assigned.
    Unpark,
    /// A batch taken out of the park (open here until it is sent).
    Unparked(Vec<(String, OwnedFd)>),
}

/// Where a staged worker's parked connections come from and go back to.
#[derive(Debug)]
pub struct Unpark<'a> {
    /// The park being emptied.
    pub from: &'a mut crate::park::Park,
    /// Where each batch is parked again once taken out.
    pub into: &'a mut crate::park::Park,
    /// The slot (a connection that moved or ended is dropped).
    pub slot: usize,
}

/// What is queued for one worker, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Out>,
}

/// A worker process and its channel.
#[derive(Debug)]
pub struct Worker {
    /// The process.
    pub proc: WorkerProc,
    /// Its channel version.
    pub proto: Proto,
    /// Its token in takeoverd's poll.
    pub token: mio::Token,
    /// When it started serving.
    pub serving_since: Option<Instant>,
    /// Whether the poll watches the channel for room (the outbox is stuck).
    pub wants_room: bool,
    outbox: Outbox,
}

impl Worker {
    /// Wraps a started process.
    pub fn new(proc: WorkerProc, token: mio::Token) -> Worker {
        Worker { proc, proto: Proto::Unknown, token, serving_since: None, wants_room: false, outbox: Outbox::default() }
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The channel.
    pub fn chan(&self) -> BorrowedFd<'_> {
        self.proc.chan()
    }

    /// Queues `msg`.
    pub fn send(&mut self, msg: &ToWorker) {
        self.outbox.queue.push_back(Out::Bytes(msg.encode()));
    }

    /// Queues the message that stops the worker at a message boundary:
    /// `stop`, or version 1's `quiesce`. (`resume`, `exit` and `ping` are the
    /// same bytes in both versions: [`send`](Self::send) them.)
    pub fn send_stop(&mut self) {
        match self.proto {
            Proto::V1 => self.send_raw(vec![takeover::control::ToWorker::Quiesce.encode()]),
            _ => self.send(&ToWorker::Stop),
        }
    }

    /// Queues pre-encoded messages.
    pub fn send_raw(&mut self, msgs: Vec<Vec<u8>>) {
        self.outbox.queue.extend(msgs.into_iter().map(Out::Bytes));
    }

    /// Queues an `assign` of each named connection.
    pub fn assign(&mut self, names: impl IntoIterator<Item = String>) {
        self.outbox.queue.extend(names.into_iter().map(Out::Assign));
    }

    /// Queues the `assign`s of the slot's parked connections (taken out of
    /// the park when the channel has room for them).
    pub fn assign_parked(&mut self) {
        self.outbox.queue.push_back(Out::Unpark);
    }

    /// Whether everything queued has been sent.
    pub fn drained(&self) -> bool {
        self.outbox.queue.is_empty()
    }

    /// Sends what the channel takes now, assigns in batches of up to
    /// [`MAX_FDS`]. `Ok(true)` when something went out; an error means the
    /// channel is broken (the worker is gone or misbehaving).
    pub fn flush(&mut self, conns: &Conns, mut unpark: Option<Unpark<'_>>) -> takeover::Result<bool> {
        let mut progress = false;
        loop {
            let (sent, count) = match self.outbox.queue.front() {
                None => return Ok(progress),
                Some(Out::Bytes(b)) => (try_send(self.chan(), b, &[])?, 1),
                Some(Out::Assign(_)) => {
                    let (bytes, fds, count) = self.next_assign(conns);
                    // Only ended connections: nothing to send.
                    (bytes.is_empty() || try_send(self.chan(), &bytes, &fds)?, count)
                }
                Some(Out::Unparked(batch)) => {
                    let items = batch.iter().map(|(n, _)| (n.as_str(), conns.get(n).and_then(|c| c.state.as_deref())));
                    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
                    (try_send(self.chan(), &takeover::channel::encode_assign(items), &fds)?, 1)
                }
                Some(Out::Unpark) => {
                    let Some(u) = unpark.as_mut() else {
                        self.outbox.queue.pop_front();
                        continue;
                    };
                    let Some(batch) = u.from.take() else {
                        self.outbox.queue.pop_front();
                        continue;
                    };
                    // Still parked and still this slot's: the others ended
                    // (or moved) meanwhile, and their copies close here.
                    let keep: Vec<(String, OwnedFd)> = batch
                        .into_iter()
                        .filter(|(n, _)| conns.get(n).is_some_and(|c| c.slot == u.slot && c.fd.is_none()))
                        .collect();
                    if keep.is_empty() {
                        continue;
                    }
                    let refs: Vec<(&str, BorrowedFd<'_>)> = keep.iter().map(|(n, f)| (n.as_str(), f.as_fd())).collect();
                    if let Err(e) = u.into.put(&refs) {
                        tracing::error!(
                            connections = keep.len(),
                            "parking connections again failed ({e}): they are served, but would not survive a crash of their worker"
                        );
                    }
                    self.outbox.queue.push_front(Out::Unparked(keep));
                    continue;
                }
            };
            if !sent {
                return Ok(progress);
            }
            self.outbox.queue.drain(..count);
            progress = true;
        }
    }

    /// The next `assign` batch: its bytes, its fds, and how many queue items
    /// it takes (ended connections are skipped).
    fn next_assign<'a>(&self, conns: &'a Conns) -> (Vec<u8>, Vec<BorrowedFd<'a>>, usize) {
        let mut items = Vec::new();
        let mut fds = Vec::new();
        let mut bytes = 64;
        let mut taken = 0;
        for out in &self.outbox.queue {
            let Out::Assign(name) = out else { break };
            let Some(c) = conns.get(name) else {
                taken += 1;
                continue;
            };
            // A name may need escaping in JSON: count it twice.
            let size = 2 * name.len() + 48 + c.state.as_ref().map_or(0, |s| s.get().len());
            if fds.len() == MAX_FDS || bytes + size > MAX_MESSAGE {
                break;
            }
            bytes += size;
            taken += 1;
            let Some(fd) = c.open_fd() else {
                // Parked: never queued as a name (only by `Unpark`).
                tracing::error!(%name, "a parked connection was queued by name; skipped");
                taken += 1;
                continue;
            };
            items.push((name.as_str(), c.state.as_deref()));
            fds.push(fd);
        }
        if items.is_empty() {
            return (Vec::new(), fds, taken);
        }
        (takeover::channel::encode_assign(items.into_iter()), fds, taken)
    }
}

/// Why a handoff runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// takeoverd's first worker.
    Start,
    /// The serving worker died or hung.
    Restart,
    /// SIGHUP or `ctl reload`.
    Reload,
}

/// Where a handoff is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The new worker was started; waiting for its hello.
    Hello,
    /// The new worker is receiving every connection; the old one serves.
    Staging,
    /// The new worker is ready; the old one was told to stop.
    Stopping,
    /// The new worker was told to serve.
    Committing,
}

impl Step {
    /// For logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Step::Hello => "waiting for the new worker's hello",
            Step::Staging => "staging the new worker",
            Step::Stopping => "stopping the old worker",
            Step::Committing => "waiting for the new worker to serve",
        }
    }
}

/// A new worker taking over from an old one (or from nobody).
#[derive(Debug)]
pub struct Handoff {
    /// Why.
    pub why: Why,
    /// The worker that serves until it is stopped (None at start, after a crash).
    pub old: Option<Worker>,
    /// The incoming worker.
    pub new: Worker,
    /// Where we are.
    pub step: Step,
    /// When the current step gives up (pushed out while a big staging progresses).
    pub deadline: Instant,
    /// Connection states may be stale: the last server of them died.
    pub recovered: bool,
    /// When it was asked for.
    pub t0: Instant,
    /// When the new worker said hello.
    pub hello_at: Option<Instant>,
    /// When the new worker said ready.
    pub ready_at: Option<Instant>,
    /// When `stop` was queued for the old worker.
    pub stop_at: Option<Instant>,
    /// Connections accepted after the old worker was stopped: it never got
    /// them, and gets them if the handoff rolls back.
    pub since_stop: Vec<String>,
}

/// Who serves one slot's share.
#[derive(Debug)]
pub enum Who {
    /// Nobody; the next worker starts at `at`.
    Down {
        /// When.
        at: Instant,
    },
    /// One worker serves.
    Serving(Worker),
    /// A handoff is under way.
    Handoff(Box<Handoff>),
}

/// One share of the connections and who serves it.
#[derive(Debug)]
pub struct Slot {
    /// Who serves it.
    pub who: Who,
    /// Crash-restart backoff of this slot's workers.
    pub backoff: std::time::Duration,
    /// When its last ping went out, and whether the pong is still due.
    pub ping: (Instant, bool),
    /// Connections that belong to it.
    pub share: usize,
    /// The generation of the worker that serves it (0: none yet).
    pub generation: u64,
    /// `ctl workers N` removes this slot: its worker was told to stop, and
    /// its connections go to the others when it has (the deadline).
    pub leaving: Option<Instant>,
    /// `ctl workers N` moves these connections to other slots (name →
    /// slot): its worker was told to give them (version 3).
    pub giving: HashMap<String, usize>,
    /// When the worker must have given them.
    pub give_deadline: Option<Instant>,
    /// takeoverd's copies of this slot's connections that are parked.
    pub park: crate::park::Park,
    /// The park a staged worker is being given (emptied into `park`).
    pub unparking: crate::park::Park,
    /// Parked connections that ended (their copies linger in the park).
    pub parked_dead: usize,
}

impl Slot {
    /// A slot whose first worker starts at once.
    pub fn new() -> Slot {
        let now = Instant::now();
        Slot {
            who: Who::Down { at: now },
            backoff: std::time::Duration::ZERO,
            ping: (now, false),
            share: 0,
            generation: 0,
            leaving: None,
            giving: HashMap::new(),
            give_deadline: None,
            park: crate::park::Park::default(),
            unparking: crate::park::Park::default(),
            parked_dead: 0,
        }
    }

    /// Whether `token` is one of this slot's workers.
    pub fn has(&self, token: mio::Token) -> bool {
        match &self.who {
            Who::Serving(w) => w.token == token,
            Who::Handoff(h) => h.new.token == token || h.old.as_ref().is_some_and(|o| o.token == token),
            Who::Down { .. } => false,
        }
    }

    /// Its workers (the old and the new one during a handoff).
    pub fn workers_mut(&mut self) -> Vec<&mut Worker> {
        match &mut self.who {
            Who::Serving(w) => vec![w],
            Who::Handoff(h) => h.old.iter_mut().chain([&mut h.new]).collect(),
            Who::Down { .. } => Vec::new(),
        }
    }

    /// `serving`, `restarting`, or `handoff: <step>`.
    pub fn state_name(&self) -> String {
        if self.leaving.is_some() {
            return "leaving: handing its connections to the others".into();
        }
        if !self.giving.is_empty() {
            return format!("giving {} connections to other workers", self.giving.len());
        }
        match &self.who {
            Who::Down { .. } => "restarting".into(),
            Who::Serving(_) => "serving".into(),
            Who::Handoff(h) => format!("handoff: {}", h.step.name()),
        }
    }
}

impl Default for Slot {
    fn default() -> Slot {
        Slot::new()
    }
}

impl Who {
    /// The worker that serves now (the old one during a handoff until it
    /// is stopped).
    pub fn serving(&self) -> Option<&Worker> {
        match self {
            Who::Serving(w) => Some(w),
            Who::Handoff(h) if h.step <= Step::Staging => h.old.as_ref(),
            _ => None,
        }
    }

    /// Whether takeoverd accepts on the listeners itself: always, unless a
    /// version-1 worker serves (it accepts), or takes over, or may be
    /// resumed (it could not be given what takeoverd accepted meanwhile).
    pub fn takeoverd_accepts(&self) -> bool {
        match self {
            Who::Serving(w) => w.proto != Proto::V1,
            Who::Handoff(h) => h.new.proto != Proto::V1 && h.old.as_ref().is_none_or(|o| o.proto != Proto::V1),
            Who::Down { .. } => true,
        }
    }

    /// The deadline of whatever waits.
    pub fn deadline(&self, ping: Option<Instant>) -> Option<Instant> {
        match self {
            Who::Down { at } => Some(*at),
            Who::Serving(_) => ping,
            Who::Handoff(h) => Some(h.deadline),
        }
    }
}
