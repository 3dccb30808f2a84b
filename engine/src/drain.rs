//! The drain's 1001 closes, paced. Sent in one tick, every client of a stopping instance would
//! reconnect in the same second — onto the instances still running, behind a load balancer —
//! which is what a rolling restart must not do. So the drain takes the list of live sessions
//! once, closes a first burst at once, then the rest at a steady rate sized to finish within
//! the first half of the drain timeout, leaving the second half for the last close handshakes.
//! The rate never falls below [`MIN_CLOSES_PER_SECOND`], so a few hundred clients do not hold a
//! shutdown for seconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use crate::close::Ending;
use crate::limits::RELOAD_CLOSE_BURST;
use crate::limits::rate::Pacer;
use crate::registry::{Instruction, Registry};

/// Clients sent their 1001 at once when the drain starts (as many as a reload closes at once).
pub const CLOSE_BURST: u32 = RELOAD_CLOSE_BURST;
/// The slowest the drain closes clients after its burst.
pub const MIN_CLOSES_PER_SECOND: u32 = 100;

/// How fast `sessions` closes go so that they are all sent within `window`: after the burst, the
/// rest spread evenly, at least [`MIN_CLOSES_PER_SECOND`].
pub fn closes_per_second(sessions: usize, window: Duration) -> u32 {
    let rest = sessions.saturating_sub(CLOSE_BURST as usize) as f64;
    let rate = (rest / window.as_secs_f64().max(0.001)).ceil();
    if rate >= f64::from(u32::MAX) { u32::MAX } else { (rate as u32).max(MIN_CLOSES_PER_SECOND) }
}

/// Sends 1001 to every session live now, paced to finish within half of `drain_timeout`.
/// Returns how many it told to close. A session that ended meanwhile just ignores its post.
pub async fn close_all(registry: Arc<Registry>, drain_timeout: Duration) -> usize {
    let mailboxes = registry.mailboxes();
    let pacer = Pacer::new(closes_per_second(mailboxes.len(), drain_timeout / 2), CLOSE_BURST);
    let (code, reason) = Ending::ShuttingDown.close();
    let started = Instant::now();
    for mailbox in &mailboxes {
        let at = pacer.slot(Instant::now());
        if at > Instant::now() {
            sleep_until(at).await;
        }
        mailbox.post(Instruction::Close(code, reason.clone()));
    }
    tracing::info!(clients = mailboxes.len(), seconds = started.elapsed().as_secs_f64(), "every client was sent 1001");
    mailboxes.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Mailbox;

    #[test]
    fn the_rate_spreads_what_is_past_the_burst_over_the_window_but_never_crawls() {
        let five = Duration::from_secs(5);
        assert_eq!(closes_per_second(2100, five), 400);
        assert_eq!(closes_per_second(50_100, five), 10_000);
        assert_eq!(closes_per_second(150, five), MIN_CLOSES_PER_SECOND);
        assert_eq!(closes_per_second(0, five), MIN_CLOSES_PER_SECOND);
        assert_eq!(closes_per_second(usize::MAX, Duration::ZERO), u32::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn every_session_is_told_within_half_the_drain_timeout_a_burst_at_once() {
        let registry = Arc::new(Registry::default());
        let mailboxes: Vec<Arc<Mailbox>> = (0..1100).map(|_| Arc::new(Mailbox::default())).collect();
        for (i, mailbox) in mailboxes.iter().enumerate() {
            registry.register(&format!("u{i}"), registry.next_id(), mailbox.clone(), 1);
        }
        let started = Instant::now();
        let closing = tokio::spawn(close_all(registry, Duration::from_secs(4)));
        // The burst is posted before any time passes.
        tokio::task::yield_now().await;
        let told = |m: &Arc<Mailbox>| m.peek().is_some();
        assert_eq!(mailboxes.iter().filter(|m| told(m)).count(), CLOSE_BURST as usize);
        // Half-way through the spread, about half of the rest.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let halfway = mailboxes.iter().filter(|m| told(m)).count();
        assert!((590..=610).contains(&halfway), "{halfway}");
        assert_eq!(closing.await.unwrap(), 1100);
        assert!(started.elapsed() <= Duration::from_secs(2), "{:?}", started.elapsed());
        let (code, reason) = Ending::ShuttingDown.close();
        assert!(mailboxes.iter().all(|m| m.peek() == Some(Instruction::Close(code, reason.clone()))));
    }
}
