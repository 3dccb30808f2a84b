//! Counting this instance's handshakes and connections in Redis: per-IP concurrent connections
//! and the per-user reconnect window at the handshake, then the user's live connections
//! (`max_per_user`, newest wins), each over a lease that lapses when an instance stops renewing
//! it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::broker::hub::SessionId;
use crate::broker::redis::instance::Redis;
use crate::broker::redis::keys;
use crate::broker::redis::lease::{LEASE, LeaseKeys, millis, now_ms};
use crate::broker::redis::link;
use crate::broker::redis::scripts::{self, AdmitReply};
use crate::broker::redis::wire::Control;
use crate::close::Ending;
use crate::policy::decision::ConnLimits;

/// Commands per pipeline when renewing leases.
const PIPELINE_CHUNK: usize = 500;

/// A connection counted in Redis; dropping it takes the connection out of the counts.
pub struct Lease {
    redis: Arc<Redis>,
    member: Box<str>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lease").field(&self.member).finish()
    }
}

impl Lease {
    /// The connection's name in Redis.
    pub(crate) fn member(&self) -> &str {
        &self.member
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.redis.release(&self.member);
    }
}

/// The answer of the counts kept in Redis, across every instance, to a handshake.
#[derive(Debug)]
pub(crate) enum FleetAdmission {
    /// Counted: the connection holds this lease.
    Counted(Lease),
    /// The address has `max_per_ip` live connections across the instances.
    PerIp,
    /// The user reconnected too often; a slot frees after this long.
    Reconnects(Duration),
}

impl Redis {
    /// Counts the handshake of `session` against the address's and the user's limits across
    /// every instance; `Err` when Redis failed (it is then marked away and the caller counts
    /// locally).
    pub(crate) async fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        user: &str,
        limits: &ConnLimits,
        session: SessionId,
    ) -> Result<FleetAdmission, ()> {
        let ip_key = keys::ip(ip);
        let member = self.member(session);
        let reply = if self.link.is_sharded() {
            self.admit_in_two_slots(&ip_key, user, limits, &member).await
        } else {
            scripts::ADMIT
                .key(&ip_key)
                .key(keys::reconnects(user))
                .arg(now_ms())
                .arg(millis(LEASE))
                .arg(&member)
                .arg(limits.max_per_ip)
                .arg(limits.reconnects_max)
                .arg(millis(limits.reconnects_per))
                .invoke_async(&mut self.connection())
                .await
        };
        match reply {
            Ok(AdmitReply::Admitted) => Ok(FleetAdmission::Counted(self.lease(ip_key, member))),
            Ok(AdmitReply::PerIp) => Ok(FleetAdmission::PerIp),
            Ok(AdmitReply::Reconnects(wait)) => Ok(FleetAdmission::Reconnects(wait)),
            Err(e) => {
                self.mark_down(&e.to_string());
                Err(())
            }
        }
    }

    /// The connection's name in Redis: when, where and which session.
    fn member(&self, session: SessionId) -> String {
        keys::member(now_ms(), &self.origin, session)
    }

    /// [`scripts::ADMIT`] on a Redis Cluster, where the address's key and the user's lie in
    /// different slots: the address is counted first, then the user's reconnects; a refusal of
    /// the second takes the first back. Each step is atomic; between them another handshake
    /// from the same address may see this one counted (and be refused by a slot that is then
    /// freed).
    async fn admit_in_two_slots(
        &self,
        ip_key: &str,
        user: &str,
        limits: &ConnLimits,
        member: &str,
    ) -> redis::RedisResult<AdmitReply> {
        let mut con = self.connection();
        let now = now_ms();
        let address: AdmitReply = scripts::ADMIT_IP
            .key(ip_key)
            .arg(now)
            .arg(millis(LEASE))
            .arg(member)
            .arg(limits.max_per_ip)
            .invoke_async(&mut con)
            .await?;
        if address != AdmitReply::Admitted {
            return Ok(address);
        }
        let user_reply: redis::RedisResult<AdmitReply> = scripts::ADMIT_RECONNECT
            .key(keys::reconnects(user))
            .arg(now)
            .arg(member)
            .arg(limits.reconnects_max)
            .arg(millis(limits.reconnects_per))
            .invoke_async(&mut con)
            .await;
        if !matches!(user_reply, Ok(AdmitReply::Admitted)) {
            // Refused, or Redis failed (the caller then counts locally): take the address's
            // count back. Should that fail, the lease lapses by itself within [`LEASE`]; the
            // outcome stands either way.
            let _: redis::RedisResult<i64> = redis::cmd("ZREM").arg(ip_key).arg(member).query_async(&mut con).await;
        }
        user_reply
    }

    /// A lease for the connection of `session`, admitted while Redis was away: it is known
    /// here and is added to the counts in Redis when Redis returns.
    pub(crate) fn lease_locally(self: &Arc<Self>, ip: IpAddr, session: SessionId) -> Lease {
        self.lease(keys::ip(ip), self.member(session))
    }

    fn lease(self: &Arc<Self>, ip_key: String, member: String) -> Lease {
        let member: Box<str> = member.into();
        self.leases.lock().insert(member.clone(), LeaseKeys { ip: ip_key, user: None });
        Lease { redis: self.clone(), member }
    }

    /// Records the connection of `lease` as one of `user`'s live connections; those beyond the
    /// user's `max` (the oldest, wherever they are) are closed with 4009.
    pub(crate) async fn register(&self, lease: &str, user: &str, max: u64) {
        let user_key = keys::user(user);
        match self.leases.lock().get_mut(lease) {
            Some(keys) => keys.user = Some(user_key.clone()),
            None => return, // the connection has already ended
        }
        if !self.is_up() {
            return;
        }
        let displaced: redis::RedisResult<Vec<String>> = scripts::REGISTER
            .key(&user_key)
            .arg(now_ms())
            .arg(millis(LEASE))
            .arg(lease)
            .arg(max)
            .invoke_async(&mut self.connection())
            .await;
        let displaced = match displaced {
            Ok(d) => d,
            Err(e) => return self.mark_down(&e.to_string()),
        };
        if !self.leases.lock().contains_key(lease) {
            // Ended while being registered: take it out again.
            let _: redis::RedisResult<i64> =
                redis::cmd("ZREM").arg(&user_key).arg(lease).query_async(&mut self.connection()).await;
        }
        let mut elsewhere: BTreeMap<&str, Vec<SessionId>> = BTreeMap::new();
        for member in &displaced {
            match keys::parse_member(member) {
                Some((origin, session)) if origin == self.origin => {
                    let (code, reason) = Ending::Replaced.close();
                    self.sessions.close_session(user, session, code, &reason);
                }
                Some((origin, session)) => elsewhere.entry(origin).or_default().push(session),
                None => {}
            }
        }
        for (origin, sessions) in elsewhere {
            let control = Control::Replace { to: origin.to_string(), user: user.to_string(), sessions };
            self.control(&control).await;
        }
    }

    /// Takes a connection out of the counts (it ended).
    fn release(&self, member: &str) {
        let Some(keys) = self.leases.lock().remove(member) else { return };
        if !self.is_up() {
            return; // the lease lapses by itself
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut con = self.connection();
        let member = member.to_string();
        runtime.spawn(async move {
            // One command per key: on a Redis Cluster the two keys lie in different slots.
            for key in std::iter::once(&keys.ip).chain(&keys.user) {
                let _: redis::RedisResult<i64> = redis::cmd("ZREM").arg(key).arg(&member).query_async(&mut con).await;
            }
        });
    }

    /// Renews (or, after Redis lost them, restores) the leases of every live connection here.
    pub(crate) async fn renew_leases(&self) -> redis::RedisResult<()> {
        // (pipeline group, key) → the key's members. A pipeline holds one group (on a Redis
        // Cluster, one hash slot), so it is sent whenever the group changes or it is full.
        let mut members: BTreeMap<(u16, String), Vec<Box<str>>> = BTreeMap::new();
        for (member, keys) in self.leases.lock().iter() {
            for key in std::iter::once(&keys.ip).chain(&keys.user) {
                members.entry((self.link.group(key), key.clone())).or_default().push(member.clone());
            }
        }
        let lease = millis(LEASE);
        let mut pipes = Vec::new();
        let mut pipe = redis::pipe();
        let mut pipe_group = None;
        for ((group, key), members) in members {
            if pipe_group != Some(group) || pipe.len() >= PIPELINE_CHUNK {
                if !pipe.is_empty() {
                    pipes.push(std::mem::take(&mut pipe));
                }
                pipe_group = Some(group);
            }
            for chunk in members.chunks(PIPELINE_CHUNK) {
                let until = now_ms() + lease;
                let zadd = pipe.cmd("ZADD").arg(&key);
                for member in chunk {
                    zadd.arg(until).arg(&**member);
                }
                zadd.ignore();
            }
            pipe.cmd("PEXPIRE").arg(&key).arg(lease).ignore();
        }
        if !pipe.is_empty() {
            pipes.push(pipe);
        }
        // On a Redis Cluster, one pipeline per slot: many, sent a few at a time.
        let results: Vec<redis::RedisResult<()>> = futures_util::stream::iter(pipes)
            .map(|pipe| {
                let mut con = self.connection();
                async move { pipe.query_async::<()>(&mut con).await }
            })
            .buffer_unordered(link::IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect()
    }
}
