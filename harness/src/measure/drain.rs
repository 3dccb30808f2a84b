//! `drain-time`: how long a graceful shutdown takes with N connected clients. Starts one
//! wsgate, opens N authenticated connections that keep reading (so each answers the server's
//! close frame at once), sends SIGTERM, and measures from the signal until every client has
//! received its 1001 close frame, and until the process has exited (with its status).

use std::collections::BTreeMap;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::duration::Dur;
use crate::measure::fleet::{self, FleetOptions};
use crate::process::supervisor::{Credentials, Redactor, describe_exit};
use crate::wire::client::{Connection, Event};

#[derive(Debug, Clone)]
pub(crate) struct DrainOptions {
    pub(crate) fleet: FleetOptions,
    /// The server's `--drain-timeout`.
    pub(crate) drain_timeout: Dur,
}

/// How one client's connection ended after the signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientEnd {
    /// A close frame with this code (`None`: a close frame without a status), this long after
    /// the signal.
    Close(Option<u16>, Duration),
    /// The connection ended without a close frame.
    Dropped,
    /// Nothing arrived before the harness gave up.
    Nothing,
}

#[derive(Debug, Clone)]
pub(crate) struct DrainMeasurement {
    /// How each client's connection ended.
    pub(crate) clients: Vec<ClientEnd>,
    /// The exit status and how long after the signal the process exited; `None` if it was
    /// still running when the harness gave up (it is killed then).
    pub(crate) exit: Option<(ExitStatus, Duration)>,
    /// How long the harness waited for the exit.
    pub(crate) waited: Duration,
}

impl DrainMeasurement {
    /// After the signal, when each client that got 1001 got it, sorted.
    pub(crate) fn close_times(&self) -> Vec<Duration> {
        let mut times: Vec<Duration> = self
            .clients
            .iter()
            .filter_map(|c| match c {
                ClientEnd::Close(Some(1001), at) => Some(*at),
                _ => None,
            })
            .collect();
        times.sort();
        times
    }

    /// The clients that did not get 1001, counted by what they got instead.
    pub(crate) fn misses(&self) -> BTreeMap<String, usize> {
        let mut misses = BTreeMap::new();
        for c in &self.clients {
            let what = match c {
                ClientEnd::Close(Some(1001), _) => continue,
                ClientEnd::Close(Some(code), _) => format!("close {code}"),
                ClientEnd::Close(None, _) => "a close frame without a code".into(),
                ClientEnd::Dropped => "dropped without a close frame".into(),
                ClientEnd::Nothing => "nothing".into(),
            };
            *misses.entry(what).or_insert(0) += 1;
        }
        misses
    }

    /// Whether every client got 1001 and the process exited 0.
    pub(crate) fn passed(&self) -> bool {
        self.misses().is_empty() && self.exit.is_some_and(|(status, _)| status.code() == Some(0))
    }

    /// The result line: `drain: 1000 clients, all got 1001 in X ms, process exited 0 after Y ms`.
    pub(crate) fn summary(&self) -> String {
        let n = self.clients.len();
        let times = self.close_times();
        let last = times.last().map_or(0, Duration::as_millis);
        let clients = if times.len() == n {
            format!("all got 1001 in {last} ms")
        } else {
            let misses: Vec<String> = self.misses().iter().map(|(what, k)| format!("{k} got {what}")).collect();
            format!("{} got 1001 (the last after {last} ms), {}", times.len(), misses.join(", "))
        };
        let process = match self.exit {
            Some((status, after)) if status.code() == Some(0) => {
                format!("process exited 0 after {} ms", after.as_millis())
            }
            Some((status, after)) => {
                format!("process ended with {} after {} ms", describe_exit(status), after.as_millis())
            }
            None => format!("process still running {} ms after SIGTERM (killed)", self.waited.as_millis()),
        };
        format!("drain: {n} clients, {clients}, {process}")
    }

    /// Percentiles of the close times: `p50 X ms, p90 Y ms, p99 Z ms`.
    pub(crate) fn percentiles(&self) -> Option<String> {
        let times = self.close_times();
        if times.is_empty() {
            return None;
        }
        let at = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)].as_millis();
        Some(format!("1001 after SIGTERM: p50 {} ms, p90 {} ms, p99 {} ms", at(50), at(90), at(99)))
    }
}

/// Waits for the close frame (skipping data frames) or the end of `conn`; returns the
/// connection too, so it stays open — and answers the close — until the measurement is over.
/// `None`: nothing but data frames before `give_up`.
async fn wait_for_close(mut conn: Connection, give_up: Instant) -> (Connection, Option<Event>, Instant) {
    loop {
        match conn.next_event(give_up).await {
            Some(Event::Text(_) | Event::Binary(_)) => continue,
            Some(event) => return (conn, Some(event), Instant::now()),
            None => return (conn, None, give_up),
        }
    }
}

/// Runs the measurement; `Err` when it could not be made (the server did not start, a
/// connection was refused, …).
pub(crate) async fn measure(opts: &DrainOptions) -> Result<DrainMeasurement, String> {
    let fleet = &opts.fleet;
    let redactor = Arc::new(Redactor::default());
    let credentials = Credentials::generate(&redactor);
    let args = vec!["--drain-timeout".to_string(), opts.drain_timeout.to_string()];
    let (mut server, _dir) =
        fleet::start_server(&fleet.bin, &fleet.policies, "drain", fleet.connections, &args, &credentials, &redactor)
            .await?;
    let held = fleet::open_all(server.ws_addr, &credentials, "drain", fleet.connections, fleet.parallel)
        .await
        .map_err(|e| redactor.redact(&e))?;

    // Every client's waiter is in place before the signal. The server gives up on the last
    // clients at the drain timeout; the harness waits some more so a late exit is measured, not
    // guessed.
    let patience = opts.drain_timeout.0 + Duration::from_secs(15);
    let give_up = Instant::now() + patience + Duration::from_secs(5);
    let mut waiters = JoinSet::new();
    for conn in held {
        waiters.spawn(wait_for_close(conn, give_up));
    }
    tokio::task::yield_now().await;

    // Measured from just before `kill` runs, so the figures include its start-up (about a
    // millisecond): an upper bound, never flattering.
    let signalled = Instant::now();
    server.process.signal("TERM").await?;
    let process = &mut server.process;
    let exited = async move {
        let status = process.wait_exit(signalled + patience).await;
        (status, signalled.elapsed())
    };
    let clients = async {
        let mut ends = Vec::with_capacity(fleet.connections);
        let mut conns = Vec::with_capacity(fleet.connections);
        while let Some(joined) = waiters.join_next().await {
            let (conn, event, at) = joined.map_err(|e| e.to_string())?;
            conns.push(conn);
            ends.push(match event {
                Some(Event::Close { code, .. }) => ClientEnd::Close(code, at.duration_since(signalled)),
                Some(_) => ClientEnd::Dropped,
                None => ClientEnd::Nothing,
            });
        }
        Ok::<_, String>((ends, conns))
    };
    let ((status, after), clients) = tokio::join!(exited, clients);
    let (clients, conns) = clients?;
    drop(conns);
    let exit = status?.map(|s| (s, after));
    // A server still running is killed when `server` is dropped.
    Ok(DrainMeasurement { clients, exit, waited: after })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn all_1001_and_exit_0_passes() {
        let m = DrainMeasurement {
            clients: vec![ClientEnd::Close(Some(1001), ms(12)), ClientEnd::Close(Some(1001), ms(30))],
            exit: Some((ExitStatus::from_raw(0), ms(41))),
            waited: ms(41),
        };
        assert!(m.passed());
        assert_eq!(m.summary(), "drain: 2 clients, all got 1001 in 30 ms, process exited 0 after 41 ms");
        assert_eq!(m.percentiles().unwrap(), "1001 after SIGTERM: p50 30 ms, p90 30 ms, p99 30 ms");
    }

    #[test]
    fn a_miss_or_a_bad_exit_fails() {
        let m = DrainMeasurement {
            clients: vec![
                ClientEnd::Close(Some(1001), ms(5)),
                ClientEnd::Dropped,
                ClientEnd::Close(Some(1000), ms(6)),
                ClientEnd::Dropped,
            ],
            exit: Some((ExitStatus::from_raw(0), ms(9))),
            waited: ms(9),
        };
        assert!(!m.passed());
        assert_eq!(
            m.summary(),
            "drain: 4 clients, 1 got 1001 (the last after 5 ms), 1 got close 1000, 2 got dropped without a close frame, \
             process exited 0 after 9 ms"
        );
        // Exit status 130 is 130 << 8 in a raw wait status.
        let m = DrainMeasurement {
            clients: vec![ClientEnd::Close(Some(1001), ms(5))],
            exit: Some((ExitStatus::from_raw(130 << 8), ms(7))),
            waited: ms(7),
        };
        assert!(!m.passed());
        assert!(m.summary().ends_with("process ended with exit status 130 after 7 ms"), "{}", m.summary());
        let m = DrainMeasurement { clients: vec![ClientEnd::Nothing], exit: None, waited: ms(25_000) };
        assert!(!m.passed());
        assert!(m.summary().ends_with(
            "0 got 1001 (the last after 0 ms), 1 got nothing, process still running 25000 ms after SIGTERM (killed)"
        ));
    }
}
