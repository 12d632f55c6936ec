//! The application: a line protocol whose every connection carries state
//! (a nickname, the rooms it joined, how many commands it sent), all of it
//! in a JSON value that takeoverd carries from one worker to the next.
//!
//! A request is one line, `<id> <command> [argument]`, with `<id>` a number
//! that grows with every request of the connection. The reply is one line,
//! `<id> OK <nick> <served> <rooms>` (rooms comma-separated, `-` for none)
//! or `<id> ERR <why>`:
//!
//! | command        | does                                |
//! |----------------|-------------------------------------|
//! | `NICK <name>`  | sets the nickname (1–32 non-space bytes) |
//! | `JOIN <room>`  | joins a room                        |
//! | `PART <room>`  | leaves it                           |
//! | `WHO`          | changes nothing                     |
//!
//! `<served>` counts the connection's commands, so a client sees at once if
//! one was lost or run twice. The last reply is part of the state: a request
//! that comes again with the id of the last one (its worker died after
//! answering it and before consuming it) is answered again, not run again.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// One connection's state, as it travels between workers.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    /// The nickname, once set.
    pub nick: Option<String>,
    /// The rooms joined.
    pub rooms: BTreeSet<String>,
    /// Commands served.
    pub served: u64,
    /// The id of the last request answered.
    pub last_id: Option<u64>,
    /// Its reply, for a request that comes again.
    pub last_reply: String,
}

/// What a request line did.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// It ran: the state changed; tell takeoverd before replying.
    Ran(String),
    /// It was the last request again, or malformed: reply, state unchanged.
    Answered(String),
}

impl Session {
    /// Runs one request line (without its newline).
    pub fn handle(&mut self, line: &str) -> Outcome {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let mut words = line.splitn(3, ' ');
        let Some(id) = words.next().and_then(|w| w.parse::<u64>().ok()) else {
            return Outcome::Answered("? ERR a request is: <id> <command> [argument]\n".into());
        };
        match self.last_id {
            Some(last) if id == last => return Outcome::Answered(self.last_reply.clone()),
            Some(last) if id < last => return Outcome::Answered(format!("{id} ERR ids must grow (last: {last})\n")),
            _ => {}
        }
        let command = words.next().unwrap_or("");
        let arg = words.next().unwrap_or("");
        let valid = |a: &str| !a.is_empty() && a.len() <= 32 && !a.contains(char::is_whitespace);
        let error = match command {
            "NICK" if valid(arg) => {
                self.nick = Some(arg.to_string());
                None
            }
            "JOIN" if valid(arg) => {
                self.rooms.insert(arg.to_string());
                None
            }
            "PART" if valid(arg) => {
                self.rooms.remove(arg);
                None
            }
            "WHO" => None,
            "NICK" | "JOIN" | "PART" => Some(format!("{command} needs a name of 1 to 32 bytes without spaces")),
            _ => Some(format!("unknown command {command:?}: NICK, JOIN, PART or WHO")),
        };
        self.served += 1;
        self.last_id = Some(id);
        self.last_reply = match error {
            Some(why) => format!("{id} ERR {why}\n"),
            None => {
                let rooms = if self.rooms.is_empty() {
                    "-".to_string()
                } else {
                    self.rooms.iter().cloned().collect::<Vec<_>>().join(",")
                };
                format!("{id} OK {} {} {rooms}\n", self.nick.as_deref().unwrap_or("-"), self.served)
            }
        };
        Outcome::Ran(self.last_reply.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_change_the_session() {
        let mut s = Session::default();
        assert_eq!(s.handle("1 NICK ada"), Outcome::Ran("1 OK ada 1 -\n".into()));
        assert_eq!(s.handle("2 JOIN rust"), Outcome::Ran("2 OK ada 2 rust\n".into()));
        assert_eq!(s.handle("3 JOIN c\r"), Outcome::Ran("3 OK ada 3 c,rust\n".into()));
        assert_eq!(s.handle("4 PART c"), Outcome::Ran("4 OK ada 4 rust\n".into()));
        assert_eq!(s.handle("5 WHO"), Outcome::Ran("5 OK ada 5 rust\n".into()));
    }

    #[test]
    fn the_last_request_again_is_answered_not_run() {
        let mut s = Session::default();
        s.handle("7 JOIN a");
        assert_eq!(s.handle("7 JOIN a"), Outcome::Answered("7 OK - 1 a\n".into()));
        assert_eq!(s.served, 1);
        assert!(matches!(s.handle("6 WHO"), Outcome::Answered(r) if r.starts_with("6 ERR")));
    }

    #[test]
    fn bad_requests_get_errors() {
        let mut s = Session::default();
        assert!(matches!(s.handle("hello"), Outcome::Answered(r) if r.starts_with("? ERR")));
        assert!(matches!(s.handle("1 NICK"), Outcome::Ran(r) if r.starts_with("1 ERR NICK needs")));
        assert!(matches!(s.handle("2 FLY"), Outcome::Ran(r) if r.starts_with("2 ERR unknown")));
    }

    #[test]
    fn the_state_round_trips_through_json() {
        let mut s = Session::default();
        s.handle("1 NICK ada");
        s.handle("2 JOIN rust");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Session>(&json).unwrap(), s);
        assert_eq!(serde_json::from_str::<Session>("{}").unwrap(), Session::default());
    }
}
