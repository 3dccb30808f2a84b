//! The session registry: live sessions by user, each reachable through its [`Mailbox`]. It
//! numbers sessions, enforces `connections.max_per_user` (the newest connection wins, the oldest
//! are closed with 4009) and reaches every session of a user (logout, revocation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::broker::hub::SessionId;
use crate::close::{CloseCode, Ending};

/// An instruction from outside a session's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// Close with this code and reason.
    Close(CloseCode, String),
}

/// How the outside reaches one session: a slot for one instruction and a wake-up. Cheaper
/// than a channel per connection (which allocates its buffers up front), and enough: the only
/// instruction so far is terminal, and the first one posted wins.
#[derive(Debug, Default)]
pub struct Mailbox {
    slot: Mutex<Option<Instruction>>,
    ready: Notify,
}

impl Mailbox {
    /// Posts an instruction unless one is already waiting.
    pub fn post(&self, control: Instruction) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(control);
        }
        drop(slot);
        self.ready.notify_one();
    }

    /// The instruction waiting, if any, left in place.
    #[cfg(test)]
    pub(crate) fn peek(&self) -> Option<Instruction> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The next instruction. Cancel-safe: it is taken only in the poll that returns it.
    pub async fn recv(&self) -> Instruction {
        loop {
            if let Some(control) = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return control;
            }
            self.ready.notified().await;
        }
    }
}

/// One registered session.
#[derive(Debug)]
struct Entry {
    id: SessionId,
    mailbox: Arc<Mailbox>,
}

/// Sessions by user id.
#[derive(Debug)]
pub struct Registry {
    users: Mutex<HashMap<String, Vec<Entry>>>,
    next_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry { users: Mutex::default(), next_id: AtomicU64::new(1) }
    }
}

impl Registry {
    /// A fresh session id, unique within the process: given at the handshake, so that the
    /// counts in Redis can name the connection before it is registered.
    pub fn next_id(&self) -> SessionId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a new session of `user`; if the user then has more than `max_per_user`
    /// sessions, the oldest are told to close with 4009. Returns how many were replaced.
    pub fn register(&self, user: &str, id: SessionId, mailbox: Arc<Mailbox>, max_per_user: u64) -> usize {
        let evicted: Vec<Entry> = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let sessions = users.entry(user.to_string()).or_default();
            sessions.push(Entry { id, mailbox });
            let keep = usize::try_from(max_per_user.max(1)).unwrap_or(usize::MAX);
            let excess = sessions.len().saturating_sub(keep);
            sessions.drain(..excess).collect()
        };
        for entry in &evicted {
            let (code, reason) = Ending::Replaced.close();
            entry.mailbox.post(Instruction::Close(code, reason));
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
        let mailboxes: Vec<Arc<Mailbox>> = {
            let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            users.get(user).map(|s| s.iter().map(|e| e.mailbox.clone()).collect()).unwrap_or_default()
        };
        for m in &mailboxes {
            m.post(Instruction::Close(code, reason.to_string()));
        }
        mailboxes.len()
    }

    /// Tells one session of `user` to close; returns whether it is live here.
    pub fn close_session(&self, user: &str, id: SessionId, code: CloseCode, reason: &str) -> bool {
        let mailbox = {
            let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            users.get(user).and_then(|s| s.iter().find(|e| e.id == id)).map(|e| e.mailbox.clone())
        };
        match mailbox {
            Some(m) => {
                m.post(Instruction::Close(code, reason.to_string()));
                true
            }
            None => false,
        }
    }

    /// The mailbox of every live session, as of now.
    pub fn mailboxes(&self) -> Vec<Arc<Mailbox>> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.values().flatten().map(|e| e.mailbox.clone()).collect()
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
        let (a, b, c) = (Arc::new(Mailbox::default()), Arc::new(Mailbox::default()), Arc::new(Mailbox::default()));
        assert_eq!(r.register("u", 1, a.clone(), 2), 0);
        assert_eq!(r.register("u", 2, b.clone(), 2), 0);
        assert_eq!(r.register("u", 3, c.clone(), 2), 1);
        assert_eq!(a.recv().await, Instruction::Close(CloseCode::Replaced, "replaced by a newer connection".into()));
        assert!(b.slot.lock().unwrap().is_none() && c.slot.lock().unwrap().is_none());
        assert_eq!(r.count("u"), 2);
        assert!(!r.close_session("u", 1, CloseCode::Replaced, "gone already"));
        assert!(!r.close_session("v", 2, CloseCode::Replaced, "another user's"));
        assert!(r.close_session("u", 2, CloseCode::Replaced, "elsewhere"));
        assert_eq!(b.recv().await, Instruction::Close(CloseCode::Replaced, "elsewhere".into()));
        assert_eq!(r.close_user("u", CloseCode::LoggedOut, "bye"), 2);
        assert_eq!(c.recv().await, Instruction::Close(CloseCode::LoggedOut, "bye".into()));
        r.deregister("u", 2);
        r.deregister("u", 3);
        assert_eq!(r.count("u"), 0);
    }
}
