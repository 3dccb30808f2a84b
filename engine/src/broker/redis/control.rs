//! The control channel between instances (`wsgate:control`): replacements (4009) and
//! disconnects (4010) of connections on other instances, and the revocations kept in one Redis
//! sorted set (`wsgate:revocations`), read by an instance when it starts and whenever Redis
//! returns.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::redis::instance::Redis;
use crate::broker::redis::keys;
use crate::broker::redis::lease::{millis, now_ms};
use crate::broker::redis::scripts;
use crate::broker::redis::wire::Control;
use crate::close::Ending;
use crate::decisions;

impl Redis {
    pub(crate) async fn control(&self, control: &Control) -> bool {
        self.send(keys::CONTROL, &control.encode()).await
    }

    /// `POST /v1/disconnect` taken here (and done locally already): records the revocation in
    /// Redis and tells every other instance. Returns whether Redis carried it.
    pub(crate) async fn disconnect(&self, user: &str, reason: &str, revoked_at: Option<SystemTime>) -> bool {
        let revoked_at_ms = revoked_at.map(|t| t.duration_since(UNIX_EPOCH).map_or(0, millis));
        if let Some(at) = revoked_at_ms {
            let forget_at = at.saturating_add(millis(self.revocation_ttl));
            let now = now_ms();
            let stored: redis::RedisResult<i64> = scripts::REVOKE
                .key(keys::REVOCATIONS)
                .arg(now)
                .arg(forget_at)
                .arg(keys::revocation(at, user))
                .arg(forget_at.saturating_sub(now).max(1))
                .invoke_async(&mut self.connection())
                .await;
            if let Err(e) = stored {
                self.mark_down(&e.to_string());
                return false;
            }
        }
        let control = Control::Disconnect {
            from: self.origin.clone(),
            user: user.to_string(),
            reason: reason.to_string(),
            revoked_at_ms,
        };
        self.control(&control).await
    }

    /// A message on the control channel, from any instance (this one included).
    pub(crate) fn on_control(&self, payload: &[u8]) {
        match Control::decode(payload) {
            Ok(Control::Replace { to, user, sessions }) if to == self.origin => {
                for session in sessions {
                    let (code, reason) = Ending::Replaced.close();
                    self.sessions.close_session(&user, session, code, &reason);
                }
            }
            Ok(Control::Disconnect { from, user, reason, revoked_at_ms }) if from != self.origin => {
                if let Some(at) = revoked_at_ms {
                    let at = UNIX_EPOCH + Duration::from_millis(at);
                    self.revocations.insert(&user, at, at + self.revocation_ttl);
                }
                let (code, reason) = Ending::LoggedOut(reason).close();
                let closed = self.sessions.close_user(&user, code, &reason);
                decisions::relayed_disconnect(&user, closed, revoked_at_ms.is_some());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "dropped a malformed control message from Redis"),
        }
    }

    /// Reads every revocation in Redis into this instance's (an instance started later, or
    /// back from an outage, honours the ones it did not hear of).
    pub(crate) async fn load_revocations(&self) -> redis::RedisResult<usize> {
        let now = now_ms();
        let live: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::REVOCATIONS)
            .arg(now)
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut self.connection())
            .await?;
        let mut loaded = 0;
        for (member, forget_at) in &live {
            let Some((at, user)) = keys::parse_revocation(member) else { continue };
            // Scores are whole milliseconds, exact in a double.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let forget_at = UNIX_EPOCH + Duration::from_millis(*forget_at as u64);
            self.revocations.insert(user, UNIX_EPOCH + Duration::from_millis(at), forget_at);
            loaded += 1;
        }
        Ok(loaded)
    }
}
