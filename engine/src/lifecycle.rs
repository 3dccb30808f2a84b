//! Where the server is in its life: running → leaving → draining → closed, never back. The accept
//! loop moves it on; the handshake, the admin API and every connection watch it. Leaving only
//! turns `/readyz` to 503 (`--drain-delay`); the drain closes the clients, paced
//! ([`crate::drain`]); once closed, what is left ends.

use tokio::sync::watch;

/// A phase of the server's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Running,
    /// A shutdown was asked for and `--drain-delay` has not passed: `/readyz` answers 503 so a
    /// load balancer stops sending new clients, while everything else goes on as in `Running`.
    Leaving,
    /// Shutting down: new handshakes get 503, every client is sent 1001 (paced), and the server
    /// waits (up to the drain timeout) for their close handshakes.
    Draining,
    /// The drain is over: what is left is dropped and the process exits.
    Closed,
}

impl Phase {
    /// Whether new clients are admitted and live ones served as ever.
    pub fn serves(self) -> bool {
        matches!(self, Phase::Running | Phase::Leaving)
    }
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
