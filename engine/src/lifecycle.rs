//! Where the server is in its life: running → draining → closed, never back. The accept loop and
//! the admin API move it on; every connection watches it, and leaving `Running` closes them.

use tokio::sync::watch;

/// A phase of the server's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Running,
    /// Shutting down: new handshakes get 503, every client is sent 1001, and the server waits
    /// (up to the drain timeout) for their close handshakes.
    Draining,
    /// The drain is over: what is left is dropped and the process exits.
    Closed,
}

/// The current phase, watched by every session.
#[derive(Debug)]
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
}

impl Default for Lifecycle {
    fn default() -> Lifecycle {
        Lifecycle { phase: watch::channel(Phase::Running).0 }
    }
}

impl Lifecycle {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves to `phase`; every session watching sees it.
    pub fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// A receiver sessions select on.
    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }
}
