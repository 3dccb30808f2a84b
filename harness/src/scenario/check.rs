//! The helpers every step's check shares: which servers and connections exist at a step, how a
//! missing `server`/`conn` is filled in, and the "exactly one of these keys" rule.

use std::collections::BTreeSet;

use serde_json::Value;

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

/// The scenario's server names, for checking steps.
pub(crate) struct Servers {
    pub(crate) all: BTreeSet<String>,
    /// Those with `tls: true`.
    pub(crate) tls: BTreeSet<String>,
    /// The scenario's signing keys.
    pub(crate) keys: BTreeSet<String>,
    /// Those with an HAProxy in front.
    pub(crate) haproxy: BTreeSet<String>,
}

/// What a step's check may consult and extend: the scenario's servers, the connections opened
/// by the steps before it, and the names they saved.
pub(crate) struct CheckCtx {
    pub(crate) servers: Servers,
    pub(crate) conns: BTreeSet<String>,
    /// Names saved so far (`save_id`, `$save:NAME`), for `$saved:NAME`.
    pub(crate) saved: BTreeSet<String>,
}

pub(crate) fn pick_server(name: &mut Option<String>, servers: &Servers) -> Result<(), String> {
    let servers = &servers.all;
    match name {
        Some(n) if servers.contains(n.as_str()) => Ok(()),
        Some(n) => Err(format!("no server named `{n}` (servers: {})", list(servers))),
        None if servers.len() == 1 => {
            *name = servers.iter().next().cloned();
            Ok(())
        }
        None => Err(format!("say which `server` (servers: {})", list(servers))),
    }
}

pub(crate) fn pick_conn(name: &mut Option<String>, conns: &BTreeSet<String>) -> Result<(), String> {
    match name {
        Some(n) if conns.contains(n.as_str()) => Ok(()),
        Some(n) if conns.is_empty() => {
            Err(format!("no connection named `{n}`: no connection was opened before this step"))
        }
        Some(n) => Err(format!("no connection named `{n}` before this step (connections: {})", list(conns))),
        None if conns.len() == 1 => {
            *name = conns.iter().next().cloned();
            Ok(())
        }
        None if conns.is_empty() => Err("no connection was opened before this step".into()),
        None => Err(format!("say which `conn` (connections: {})", list(conns))),
    }
}

fn list(names: &BTreeSet<String>) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// Checks the `from` and `proxied` keys of a step that connects to `server`: a source address
/// must be a loopback one (all of 127.0.0.0/8 reaches the server without any setup), and only a
/// server with an HAProxy in front can be reached through it.
pub(crate) fn check_origin(
    from: Option<std::net::Ipv4Addr>,
    proxied: bool,
    server: Option<&str>,
    servers: &Servers,
) -> Result<(), String> {
    if let Some(from) = from
        && !from.is_loopback()
    {
        return Err(format!("`from: {from}`: use a loopback address (127.0.0.2, 127.0.0.3, …)"));
    }
    if proxied && !server.is_some_and(|s| servers.haproxy.contains(s)) {
        return Err("`proxied: true` needs a server with `haproxy: http` or `haproxy: tcp`".into());
    }
    Ok(())
}

pub(crate) fn exactly_one(what: &[(&str, bool)]) -> Result<(), String> {
    let given: Vec<&str> = what.iter().filter(|(_, set)| *set).map(|(k, _)| *k).collect();
    if given.len() == 1 {
        return Ok(());
    }
    let keys = what.iter().map(|(k, _)| format!("`{k}`")).collect::<Vec<_>>().join(", ");
    if given.is_empty() { Err(format!("give one of {keys}")) } else { Err(format!("give only one of {keys}")) }
}

/// Checks a JSON pattern's wildcards, and that each `$saved:NAME` names a value an earlier step
/// saved; then adds the names it saves itself.
pub(crate) fn check_pattern(pattern: &Value, saved: &mut BTreeSet<String>) -> Result<(), String> {
    let new = crate::matching::check_pattern(pattern, saved)?;
    saved.extend(new);
    Ok(())
}
