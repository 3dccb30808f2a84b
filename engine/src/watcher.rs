//! Watching the policy directory, so that a saved policy is enforced without anyone asking.
//!
//! The directory is watched (recursively: `schemas/`, key files in subdirectories), not the
//! files: an editor's atomic save renames a temporary file over the original, and a watch on
//! the original would be gone with it. Directories holding key files outside the policy
//! directory are watched too. Changes are debounced: a reload runs once nothing has changed
//! for [`QUIET`], and at least every [`MAX_DELAY`] while changes keep coming, so a storm of
//! saves becomes a few reloads. A file that is being written (modified and not yet closed)
//! holds the reload back until it is closed, or for at most [`WRITE_HOLD`]: a half-written
//! file is not read when the writer is still at it. Whatever is read is compiled whole and
//! refused whole when invalid ([`crate::reload`]), so even a reload that does catch a file
//! half-written never activates a broken policy.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::policy::Policy;
use crate::reload::{LivePolicy, Trigger};

/// Quiet time after the last change before reloading.
pub const QUIET: Duration = Duration::from_millis(30);
/// Longest a reload waits while changes keep coming.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(250);
/// Longest a reload waits for a file being written to be closed.
pub(crate) const WRITE_HOLD: Duration = Duration::from_secs(2);
/// File events queued between the watcher's thread and the reload task. When it is full a
/// reload is already due, so dropping more events loses nothing but a close event, which
/// [`WRITE_HOLD`] covers.
const EVENT_QUEUE: usize = 4096;

/// A change the debouncer cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Created, removed, renamed or changed in its attributes.
    Changed(PathBuf),
    /// Data written into it; more may follow until it is closed.
    Writing(PathBuf),
    /// Closed after writing.
    Written(PathBuf),
    /// Removed or renamed away: whatever was being written there is over.
    Gone(PathBuf),
}

/// Turns a file-system event into changes. Reads (opening, closing without writing) are not
/// changes: the reload reads every file, and must not trigger itself.
pub(crate) fn classify(event: &notify::Event) -> Vec<Change> {
    let each = |make: fn(PathBuf) -> Change| event.paths.iter().cloned().map(make).collect();
    match &event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => each(Change::Written),
        EventKind::Access(_) => Vec::new(),
        EventKind::Modify(ModifyKind::Data(_)) => each(Change::Writing),
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
            event.paths.iter().flat_map(|p| [Change::Gone(p.clone()), Change::Changed(p.clone())]).collect()
        }
        _ => each(Change::Changed),
    }
}

/// When the next reload is due.
#[derive(Debug, Default)]
pub(crate) struct Debounce {
    /// First change not yet reloaded.
    first: Option<Instant>,
    /// Latest change.
    last: Option<Instant>,
    /// Files written to and not closed yet.
    writing: HashSet<PathBuf>,
}

impl Debounce {
    /// Records a change seen at `now`.
    pub fn record(&mut self, change: Change, now: Instant) {
        match change {
            Change::Writing(path) => {
                self.writing.insert(path);
            }
            Change::Written(path) | Change::Gone(path) => {
                self.writing.remove(&path);
            }
            Change::Changed(_) => {}
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When to reload, if anything changed.
    pub(crate) fn due(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        if self.writing.is_empty() { Some((last + QUIET).min(first + MAX_DELAY)) } else { Some(first + WRITE_HOLD) }
    }

    /// A reload is starting: it reads everything changed so far.
    pub fn reset(&mut self) {
        self.first = None;
        self.last = None;
        self.writing.clear();
    }
}

/// A running watch; dropping it stops watching.
#[derive(Debug)]
pub struct Watch {
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching the live policy's directory and reloading on changes.
pub fn watch(policy: Arc<LivePolicy>) -> notify::Result<Watch> {
    let Some(source) = policy.source().cloned() else {
        return Err(notify::Error::generic("the policy was not read from a directory"));
    };
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            for change in classify(&event) {
                // Full: a reload is already due (see EVENT_QUEUE).
                let _ = tx.try_send(change);
            }
        }
        Err(e) => tracing::warn!(error = %e, "policy directory watch error"),
    })?;
    watcher.watch(&source.dir, RecursiveMode::Recursive)?;
    let mut extra = HashSet::new();
    watch_key_dirs(&mut watcher, &policy.current(), &source.dir, &mut extra);
    tracing::info!(policy = %source.dir.display(), "watching the policy directory; saved changes are reloaded");
    let task = tokio::spawn(run(policy, source.dir, watcher, extra, rx));
    Ok(Watch { task })
}

async fn run(
    policy: Arc<LivePolicy>,
    dir: PathBuf,
    mut watcher: notify::RecommendedWatcher,
    mut extra: HashSet<PathBuf>,
    mut rx: mpsc::Receiver<Change>,
) {
    let mut debounce = Debounce::default();
    // Whatever applied a policy (this watch, SIGHUP, the admin call), its key files' directories
    // are watched from then on.
    let mut active = policy.watch();
    loop {
        let due = debounce.due();
        tokio::select! {
            change = rx.recv() => match change {
                Some(change) => debounce.record(change, Instant::now()),
                None => return,
            },
            Ok(()) = active.changed() => {
                active.borrow_and_update();
                watch_key_dirs(&mut watcher, &policy.current(), &dir, &mut extra);
            }
            () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                debounce.reset();
                policy.reload(Trigger::Watch).await;
            }
        }
    }
}

/// Watches the directories of key files that live outside the policy directory.
fn watch_key_dirs(
    watcher: &mut notify::RecommendedWatcher,
    policy: &Policy,
    dir: &Path,
    watched: &mut HashSet<PathBuf>,
) {
    // Compared resolved (`../keys` is outside the directory, whatever its spelling).
    let resolve = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let dir = resolve(dir);
    for name in &policy.sources {
        let Some(parent) = dir.join(name).parent().map(resolve) else { continue };
        if parent.starts_with(&dir) || watched.contains(&parent) {
            continue;
        }
        match watcher.watch(&parent, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watched.insert(parent);
            }
            Err(e) => tracing::warn!(error = %e, dir = %parent.display(), "cannot watch a key file's directory"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        e.paths = paths.iter().map(PathBuf::from).collect();
        e
    }

    #[test]
    fn reads_are_not_changes_and_writes_are_tracked() {
        assert!(classify(&event(EventKind::Access(AccessKind::Open(AccessMode::Any)), &["p.yaml"])).is_empty());
        assert!(classify(&event(EventKind::Access(AccessKind::Close(AccessMode::Read)), &["p.yaml"])).is_empty());
        assert_eq!(
            classify(&event(EventKind::Modify(ModifyKind::Data(DataChange::Any)), &["p.yaml"])),
            [Change::Writing("p.yaml".into())]
        );
        assert_eq!(
            classify(&event(EventKind::Access(AccessKind::Close(AccessMode::Write)), &["p.yaml"])),
            [Change::Written("p.yaml".into())]
        );
        assert_eq!(
            classify(&event(EventKind::Create(CreateKind::File), &["p.yaml"])),
            [Change::Changed("p.yaml".into())]
        );
        let renamed = classify(&event(EventKind::Modify(ModifyKind::Name(RenameMode::Both)), &[".p.tmp", "p.yaml"]));
        assert!(
            renamed.contains(&Change::Gone(".p.tmp".into())) && renamed.contains(&Change::Changed("p.yaml".into()))
        );
        assert!(
            classify(&event(EventKind::Remove(RemoveKind::File), &["p.yaml"])).contains(&Change::Gone("p.yaml".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_waits_for_quiet_but_not_forever() {
        let mut d = Debounce::default();
        assert_eq!(d.due(), None, "nothing changed, nothing due");
        let t0 = Instant::now();
        d.record(Change::Changed("p.yaml".into()), t0);
        assert_eq!(d.due(), Some(t0 + QUIET));
        // A storm: a change every 10 ms pushes the quiet point on, up to MAX_DELAY.
        for i in 1..100 {
            d.record(Change::Changed("p.yaml".into()), t0 + Duration::from_millis(10 * i));
        }
        assert_eq!(d.due(), Some(t0 + MAX_DELAY));
        d.reset();
        assert_eq!(d.due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_being_written_holds_the_reload_until_it_is_closed() {
        let mut d = Debounce::default();
        let t0 = Instant::now();
        d.record(Change::Writing("p.yaml".into()), t0);
        assert_eq!(d.due(), Some(t0 + WRITE_HOLD), "half-written: wait for the close");
        let t1 = t0 + Duration::from_millis(700);
        d.record(Change::Written("p.yaml".into()), t1);
        assert_eq!(d.due(), Some(t0 + MAX_DELAY), "closed: due at once (the storm bound has passed)");
        d.reset();
        d.record(Change::Writing(".p.tmp".into()), t1);
        d.record(Change::Gone(".p.tmp".into()), t1);
        d.record(Change::Changed("p.yaml".into()), t1);
        assert_eq!(d.due(), Some(t1 + QUIET), "a temporary file renamed over the policy is not being written");
    }
}
