//! Live sessions by user: enforces `connections.max_per_user` (the newest connection wins,
//! the oldest are closed with 4009) and reaches every session of a user (logout, revocation).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::broker::hub::SessionId;
use crate::close::CloseCode;

/// An instruction from outside a session's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close with this code and reason.
    Close(CloseCode, String),
}

/// One registered session.
#[derive(Debug)]
struct Entry {
    id: SessionId,
    control: mpsc::Sender<Control>,
}

/// Sessions by user id.
#[derive(Debug, Default)]
pub struct Registry {
    users: Mutex<HashMap<String, Vec<Entry>>>,
}

impl Registry {
    /// Registers a new session of `user`; if the user then has more than `max_per_user`
    /// sessions, the oldest are told to close with 4009. Returns how many were replaced.
    pub fn register(&self, user: &str, id: SessionId, control: mpsc::Sender<Control>, max_per_user: u64) -> usize {
        let evicted: Vec<Entry> = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let sessions = users.entry(user.to_string()).or_default();
            sessions.push(Entry { id, control });
            let keep = usize::try_from(max_per_user.max(1)).unwrap_or(usize::MAX);
            let excess = sessions.len().saturating_sub(keep);
            sessions.drain(..excess).collect()
        };
        for entry in &evicted {
            let _ =
                entry.control.try_send(Control::Close(CloseCode::Replaced, "replaced by a newer connection".into()));
        }
        evicted.len()
    }

    /// Removes a session (when it ends).
    pub fn deregister(&self, user: &str, id: SessionId) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sessions) = users.get_mut(user) {
            sessions.retain(|e| e.id != id);
            if sessions.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Tells every session of `user` to close; returns how many there were.
    pub fn close_user(&self, user: &str, code: CloseCode, reason: &str) -> usize {
        let controls: Vec<mpsc::Sender<Control>> = {
            let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            users.get(user).map(|s| s.iter().map(|e| e.control.clone()).collect()).unwrap_or_default()
        };
        for c in &controls {
            let _ = c.try_send(Control::Close(code, reason.to_string()));
        }
        controls.len()
    }

    /// Live sessions of `user`.
    pub fn count(&self, user: &str) -> usize {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).get(user).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_newest_wins_and_the_oldest_gets_4009() {
        let r = Registry::default();
        let (a, mut ra) = mpsc::channel(4);
        let (b, mut rb) = mpsc::channel(4);
        let (c, mut rc) = mpsc::channel(4);
        assert_eq!(r.register("u", 1, a, 2), 0);
        assert_eq!(r.register("u", 2, b, 2), 0);
        assert_eq!(r.register("u", 3, c, 2), 1);
        assert_eq!(
            ra.try_recv().unwrap(),
            Control::Close(CloseCode::Replaced, "replaced by a newer connection".into())
        );
        assert!(rb.try_recv().is_err() && rc.try_recv().is_err());
        assert_eq!(r.count("u"), 2);
        r.deregister("u", 2);
        r.deregister("u", 3);
        assert_eq!(r.count("u"), 0);
    }
}
