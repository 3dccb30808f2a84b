//! Names that make this process unique among instances: message ids and the origin tag.

use std::sync::atomic::{AtomicU64, Ordering};

/// Message ids unique across instances: a random prefix per process and a counter.
#[derive(Debug)]
pub(crate) struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl MessageIds {
    pub(crate) fn new() -> MessageIds {
        MessageIds { prefix: random_tag(), next: AtomicU64::new(1) }
    }

    pub(crate) fn next_id(&self) -> String {
        format!("{}-{:x}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// Twelve random hex digits naming this process among instances (message ids, the origin of
/// what it sends through Redis). Uniqueness, not secrecy: falls back to the clock if the OS has
/// no randomness.
pub(crate) fn random_tag() -> String {
    let mut bytes = [0u8; 6];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Default for MessageIds {
    fn default() -> Self {
        Self::new()
    }
}
