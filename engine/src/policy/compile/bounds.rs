//! What each place in a policy may read, and the bounds its values are checked against: the
//! variables of each kind of expression, and the worst-case sizes of their inputs.

use std::time::Duration;

use crate::policy::expr::vars::{Var, VarSet};

pub(crate) const CONNECT_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Request, Var::Now]);
pub(crate) const MESSAGE_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Conn, Var::Message, Var::Now]);
pub(crate) const LIMIT_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Request, Var::Now]);
pub(crate) const USER_ID_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Request]);
/// `connections.spike` is global: there is no connection, claim or request to read.
pub(crate) const GLOBAL_VARS: VarSet = VarSet::of(&[Var::Now]);

/// Claims come from a token, which the request header limit bounds.
pub const MAX_CLAIMS_BYTES: u64 = 8 * 1024;
/// The request's headers, bounded by the handshake's header limit.
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024;
/// Largest `messages.max_bytes` a policy may set.
pub(crate) const MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;
/// The longest `connections.reconnects.per`; a window written as an expression may be this
/// long, so the server sweeps with it.
pub(crate) const MAX_RECONNECT_WINDOW: Duration = Duration::from_secs(86_400);

pub(crate) const SECS: fn(u64) -> Duration = Duration::from_secs;
pub(crate) const MILLIS: fn(u64) -> Duration = Duration::from_millis;
