//! The messages of the takeover protocol, the parts every protocol shares
//! (entries, names, sending and receiving), and their JSON encoding. `docs/PROTOCOL.md` is the prose version
//! of this file.

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ProtocolError, Result};
use crate::fd::Kind;
use crate::wire::{self, MAX_FDS, MAX_MESSAGE};

/// The protocol version this build speaks. A peer announcing another
/// version is refused with a message that names both.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest fd name we send or accept. systemd's fd store allows 255.
pub const MAX_NAME: usize = 255;

/// One fd as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Unique within one handoff; printable ASCII, no `:` (so it can also be
    /// an fd-store name).
    pub name: String,
    /// What the fd is; the receiver checks it.
    pub kind: Kind,
    /// Whatever the application carries along with this fd.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub state: Value,
}

/// State of one connection without its fd (the reply to `quiesce`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateEntry {
    /// The connection's name.
    pub name: String,
    /// The application's state for it.
    #[serde(default)]
    pub state: Value,
}

/// Every message of the takeover protocol ([`crate::offer`], [`crate::receive`]). The
/// supervisor's channel has its own: version 1 in [`crate::control`],
/// version 2 in [`crate::channel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// Taker → giver, first message: who is asking, in which version.
    Hello {
        /// The taker's protocol version.
        version: u32,
        /// The taker's pid (for the giver's log).
        #[serde(default)]
        pid: u32,
    },
    /// Giver → taker: the handoff will not happen.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Giver → taker: what follows.
    Offer {
        /// The giver's protocol version.
        version: u32,
        /// How many fds the batches carry in all.
        fds: usize,
        /// How many batch messages follow.
        batches: usize,
        /// True when the giver is not the last process that served these
        /// sockets and that process died: states may be stale.
        #[serde(default)]
        recovered: bool,
        /// Application state that is not tied to one fd.
        #[serde(default)]
        app: Value,
    },
    /// Giver → taker: entries, with exactly one fd each attached.
    Batch {
        /// 0, 1, 2, ...
        seq: usize,
        /// One per attached fd, in the same order.
        entries: Vec<Entry>,
    },
    /// Giver → taker: the last message of an offer.
    End {
        /// The fd count again.
        fds: usize,
    },
    /// Taker → giver: every fd is validated and in the taker's event loop;
    /// the giver may close its copies and go.
    Ack,
    /// Taker → giver: the taker will not serve these fds; the giver resumes.
    Nack {
        /// Why.
        reason: String,
    },
    /// Giver → taker, after an ack: the giver has stopped for good; the
    /// taker may start serving. A taker that sees the channel end without a
    /// commit serves only if the giver process is gone (it died after the
    /// ack); if the giver is alive, it timed out and resumed, so the taker
    /// must not serve.
    Commit,
}

/// Gives a message enum `encode` and `decode`: JSON, the `type` field
/// naming the variant.
macro_rules! codec {
    ($t:ty) => {
        impl $t {
            /// Encodes the message as JSON.
            pub fn encode(&self) -> Vec<u8> {
                serde_json::to_vec(self).expect("a message always serialises")
            }

            /// Decodes one message; the error says what is wrong with it.
            pub fn decode(bytes: &[u8]) -> $crate::Result<Self> {
                $crate::manifest::decode(bytes)
            }
        }
    };
}
pub(crate) use codec;

codec!(Message);

/// Decodes one message of any of the protocols; the error says what is
/// wrong with it.
pub(crate) fn decode<M: DeserializeOwned>(bytes: &[u8]) -> Result<M> {
    serde_json::from_slice(bytes).map_err(|e| {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
        ProtocolError::Malformed { error: e, shown }.into()
    })
}

impl Message {
    /// The message's `type`, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Refuse { .. } => "refuse",
            Message::Offer { .. } => "offer",
            Message::Batch { .. } => "batch",
            Message::End { .. } => "end",
            Message::Ack => "ack",
            Message::Nack { .. } => "nack",
            Message::Commit => "commit",
        }
    }
}

/// A per-fd state kept as raw JSON text: moved and forwarded as bytes, and
/// parsed only by the application that owns it.
pub type RawState = Box<serde_json::value::RawValue>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry<'a> {
    name: String,
    #[serde(default)]
    kind: Option<Kind>,
    #[serde(borrow, default)]
    state: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntries<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default)]
    seq: Option<usize>,
    #[serde(borrow)]
    entries: Vec<RawEntry<'a>>,
}

/// One decoded entry of a `batch` or `state` message, its state left raw.
pub(crate) type DecodedEntry = (String, Option<Kind>, Option<RawState>);

/// Decodes a `batch` (`ty` = "batch") or `state` message without building
/// a JSON tree per state: the fast path of a handoff. `None` when the
/// message is not of that type or shape; the caller then decodes it with
/// [`Message::decode`] for a precise error.
pub(crate) fn decode_entries(bytes: &[u8], ty: &str) -> Option<(Option<usize>, Vec<DecodedEntry>)> {
    let raw: RawEntries<'_> = serde_json::from_slice(bytes).ok()?;
    if raw.ty != ty {
        return None;
    }
    let entries = raw
        .entries
        .into_iter()
        .map(|e| {
            let state = e.state.filter(|s| s.get() != "null").map(|s| s.to_owned());
            (e.name, e.kind, state)
        })
        .collect();
    Some((raw.seq, entries))
}

/// An entry as [`encode_entry`] writes it: borrowed, the state raw JSON,
/// so no JSON tree is built (the hot path of a handoff and of accepting).
#[derive(Serialize)]
struct EntryOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<Kind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a serde_json::value::RawValue>,
}

/// Encodes one entry from its parts, the state as raw JSON.
pub(crate) fn encode_entry(name: &str, kind: Option<Kind>, state: Option<&serde_json::value::RawValue>) -> String {
    serde_json::to_string(&EntryOut { name, kind, state }).expect("an entry serialises")
}

/// Why a name cannot be an fd name.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// Empty, or longer than [`MAX_NAME`].
    Length {
        /// The name.
        name: String,
    },
    /// A byte that is not printable ASCII, or a space, or a `:`.
    Characters {
        /// The name.
        name: String,
    },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Length { name } => write!(f, "fd name {name:?} must be 1 to {MAX_NAME} characters"),
            NameError::Characters { name } => {
                write!(f, "fd name {name:?} must be printable ASCII without spaces or ':'")
            }
        }
    }
}

impl std::error::Error for NameError {}

/// Checks that `name` can be an fd name (here and in systemd's fd store).
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(NameError::Length { name: name.to_owned() });
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(NameError::Characters { name: name.to_owned() });
    }
    Ok(())
}

/// Sends `msg` (a message of any of the protocols) with `fds` attached.
pub fn send<M: Serialize>(
    chan: BorrowedFd<'_>,
    msg: &M,
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> Result<()> {
    wire::send(chan, &serde_json::to_vec(msg).expect("a message always serialises"), fds, deadline)
}

/// Receives one message (of the protocol `M`) and its fds; `Ok(None)` at
/// the end of the channel.
pub fn recv<M: DeserializeOwned>(chan: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<Option<(M, Vec<OwnedFd>)>> {
    match wire::recv(chan, deadline)? {
        None => Ok(None),
        Some(r) => Ok(Some((decode(&r.bytes)?, r.fds))),
    }
}

/// Like [`recv`] but returns `Ok(None)` at once when no message is queued,
/// and `Ok(Some(None))` at the end of the channel.
#[allow(clippy::type_complexity)]
pub fn try_recv<M: DeserializeOwned>(chan: BorrowedFd<'_>) -> Result<Option<Option<(M, Vec<OwnedFd>)>>> {
    match wire::try_recv(chan)? {
        None => Ok(None),
        Some(None) => Ok(Some(None)),
        Some(Some(r)) => Ok(Some(Some((decode(&r.bytes)?, r.fds)))),
    }
}

/// Splits pre-encoded JSON array elements into chunks that each fit one
/// message: at most `MAX_MESSAGE - overhead` bytes and [`MAX_FDS`] elements
/// (every element carries at most one fd). Returns the element ranges.
pub(crate) fn chunk(encoded: &[String], overhead: usize) -> Result<Vec<std::ops::Range<usize>>> {
    let budget = MAX_MESSAGE - overhead;
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, e) in encoded.iter().enumerate() {
        let add = e.len() + 1; // the comma
        if add > budget {
            return Err(ProtocolError::EntryTooLarge { len: e.len() }.into());
        }
        if i - start == MAX_FDS || size + add > budget {
            out.push(start..i);
            start = i;
            size = 0;
        }
        size += add;
    }
    if start < encoded.len() {
        out.push(start..encoded.len());
    }
    Ok(out)
}

/// Builds `{"type":"<ty>","seq":N,"entries":[...]}` (or without `seq`) from
/// pre-encoded elements.
///
/// By hand, not with serde, on purpose: the elements are JSON already,
/// encoded once so that [`chunk`] could measure them against the message
/// size, and serde cannot splice pre-encoded JSON into its output without
/// parsing it again (`RawValue::from_string` validates). The tests pin the
/// bytes.
pub(crate) fn wrap(ty: &str, seq: Option<usize>, elems: &[String]) -> Vec<u8> {
    wrap_with(ty, seq, "entries", elems)
}

/// Builds `{"type":"<ty>","<field>":[...]}` from pre-encoded elements.
pub(crate) fn wrap_field(ty: &str, field: &str, elems: &[String]) -> Vec<u8> {
    wrap_with(ty, None, field, elems)
}

fn wrap_with(ty: &str, seq: Option<usize>, field: &str, elems: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + elems.iter().map(|e| e.len() + 1).sum::<usize>());
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(ty.as_bytes());
    out.extend_from_slice(b"\",");
    if let Some(seq) = seq {
        out.extend_from_slice(format!("\"seq\":{seq},").as_bytes());
    }
    out.push(b'"');
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":[");
    for (i, e) in elems.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e.as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

/// Room kept for the wrapper around a chunk's elements.
pub(crate) const WRAP_OVERHEAD: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_every_message() {
        let entry = Entry { name: "c1".into(), kind: Kind::TcpStream, state: json!({"next": 7}) };
        let msgs = vec![
            Message::Hello { version: 1, pid: 42 },
            Message::Refuse { reason: "no".into() },
            Message::Offer { version: 1, fds: 3, batches: 1, recovered: true, app: json!({"g": 2}) },
            Message::Batch { seq: 0, entries: vec![entry.clone()] },
            Message::End { fds: 3 },
            Message::Ack,
            Message::Nack { reason: "bad fd".into() },
            Message::Commit,
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn wire_format_is_stable() {
        let m = Message::Batch {
            seq: 2,
            entries: vec![Entry { name: "l0".into(), kind: Kind::TcpListener, state: Value::Null }],
        };
        assert_eq!(
            String::from_utf8(m.encode()).unwrap(),
            r#"{"type":"batch","seq":2,"entries":[{"name":"l0","kind":"tcp-listener"}]}"#
        );
        let wrapped = wrap("batch", Some(2), &[r#"{"name":"l0","kind":"tcp-listener"}"#.to_string()]);
        assert_eq!(Message::decode(&wrapped).unwrap(), m);
    }

    /// The exact bytes of every message: the wire format old peers speak.
    #[test]
    fn message_bytes_are_pinned() {
        let entry = Entry { name: "c1".into(), kind: Kind::TcpStream, state: json!({"next": 7}) };
        let cases = [
            (Message::Hello { version: 1, pid: 42 }, r#"{"type":"hello","version":1,"pid":42}"#),
            (Message::Refuse { reason: "no".into() }, r#"{"type":"refuse","reason":"no"}"#),
            (
                Message::Offer { version: 1, fds: 3, batches: 1, recovered: true, app: json!({"g": 2}) },
                r#"{"type":"offer","version":1,"fds":3,"batches":1,"recovered":true,"app":{"g":2}}"#,
            ),
            (
                Message::Batch { seq: 0, entries: vec![entry.clone()] },
                r#"{"type":"batch","seq":0,"entries":[{"name":"c1","kind":"tcp-stream","state":{"next":7}}]}"#,
            ),
            (Message::End { fds: 3 }, r#"{"type":"end","fds":3}"#),
            (Message::Ack, r#"{"type":"ack"}"#),
            (Message::Nack { reason: "bad fd".into() }, r#"{"type":"nack","reason":"bad fd"}"#),
            (Message::Commit, r#"{"type":"commit"}"#),
        ];
        for (m, want) in cases {
            assert_eq!(String::from_utf8(m.encode()).unwrap(), want);
        }
    }

    /// The exact bytes of the hand-built messages: old peers parse them, so
    /// any change of encoder must write the same bytes.
    #[test]
    fn hand_built_bytes_are_pinned() {
        let state = serde_json::value::to_raw_value(&json!({"next": 7, "peer": "127.0.0.1:5"})).unwrap();
        let cases = [
            (
                encode_entry("c1", Some(Kind::TcpStream), Some(&state)),
                r#"{"name":"c1","kind":"tcp-stream","state":{"next":7,"peer":"127.0.0.1:5"}}"#,
            ),
            (encode_entry("l0", Some(Kind::TcpListener), None), r#"{"name":"l0","kind":"tcp-listener"}"#),
            (encode_entry("c2", None, Some(&state)), r#"{"name":"c2","state":{"next":7,"peer":"127.0.0.1:5"}}"#),
            (encode_entry("q\"\\é\n", None, None), r#"{"name":"q\"\\é\n"}"#),
        ];
        for (got, want) in &cases {
            assert_eq!(got, want);
        }
        let elems: Vec<String> = cases.iter().map(|(e, _)| e.clone()).collect();
        assert_eq!(
            String::from_utf8(wrap("batch", Some(3), &elems[..2])).unwrap(),
            format!(r#"{{"type":"batch","seq":3,"entries":[{},{}]}}"#, cases[0].1, cases[1].1)
        );
        assert_eq!(
            String::from_utf8(wrap("state", None, &elems[2..3])).unwrap(),
            format!(r#"{{"type":"state","entries":[{}]}}"#, cases[2].1)
        );
        assert_eq!(String::from_utf8(wrap_field("wake", "names", &[])).unwrap(), r#"{"type":"wake","names":[]}"#);
        assert_eq!(
            String::from_utf8(wrap_field("release", "names", &[r#""c1""#.into(), r#""c2""#.into()])).unwrap(),
            r#"{"type":"release","names":["c1","c2"]}"#
        );
    }

    #[test]
    fn malformed_and_unknown_are_named() {
        for (input, want) in [
            (&b"{not json"[..], "malformed message"),
            (br#"{"type":"launch-missiles"}"#, "unknown variant"),
            (br#"{"type":"batch","seq":0,"entries":[{"name":"x","kind":"pipe"}]}"#, "unknown variant `pipe`"),
            (br#"{"type":"offer"}"#, "missing field"),
        ] {
            let e = Message::decode(input).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name("c1z"), Ok(()));
        assert!(matches!(check_name(""), Err(NameError::Length { .. })));
        assert!(matches!(check_name("a:b"), Err(NameError::Characters { .. })));
        assert!(matches!(check_name("a b"), Err(NameError::Characters { .. })));
        assert!(matches!(check_name(&"x".repeat(256)), Err(NameError::Length { .. })));
        assert_eq!(
            check_name("a b").unwrap_err().to_string(),
            "fd name \"a b\" must be printable ASCII without spaces or ':'"
        );
    }

    #[test]
    fn chunks_respect_fd_and_byte_limits() {
        let small: Vec<String> = (0..600).map(|i| format!("{{\"n\":{i}}}")).collect();
        let c = chunk(&small, WRAP_OVERHEAD).unwrap();
        assert_eq!(c, vec![0..253, 253..506, 506..600]);
        let big: Vec<String> = (0..10).map(|_| format!("\"{}\"", "x".repeat(20_000))).collect();
        let c = chunk(&big, WRAP_OVERHEAD).unwrap();
        assert!(c.iter().all(|r| r.len() <= 3), "{c:?}");
        assert_eq!(c.iter().map(|r| r.len()).sum::<usize>(), 10);
        let huge = vec![format!("\"{}\"", "x".repeat(MAX_MESSAGE))];
        assert!(matches!(
            chunk(&huge, WRAP_OVERHEAD),
            Err(crate::Error::Protocol(ProtocolError::EntryTooLarge { len })) if len == MAX_MESSAGE + 2
        ));
    }
}
