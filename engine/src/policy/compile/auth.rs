//! `auth` and `origins`: token sources, JWT keys, the user id, connect rules, allowed origins,
//! and the rule that ties the two sections together (a cookie needs listed origins).

use std::collections::HashMap;

use super::bounds::{CONNECT_VARS, LIMIT_VARS, SECS, USER_ID_VARS};
use super::driver::Compiler;
use crate::policy::compiled::{AuthPolicy, OriginPattern, OriginPolicy, Rule, TokenSource};
use crate::policy::error::At;
use crate::policy::keys::{self, JwtSettings, KeyField};
use crate::policy::model::{AuthSection, Located, OriginsSection};
use crate::policy::source::read_bounded;
use crate::policy::units::parse_duration;

impl Compiler<'_> {
    pub(super) fn auth(&mut self, file: &str, a: &AuthSection) -> Option<AuthPolicy> {
        let mut token_sources = Vec::new();
        for (i, s) in a.token_sources.value.iter().enumerate() {
            match parse_token_source(&s.value) {
                Ok(t) => token_sources.push(t),
                Err(m) => self.errors.push(&At::of(file, format!("auth.token_sources[{i}]"), s), m),
            }
        }
        if a.token_sources.value.is_empty() {
            let at = At::of(file, "auth.token_sources", &a.token_sources);
            self.errors.push(&at, "at least one token source is required");
        }
        let jwt = &a.jwt.value;
        let leeway = match parse_duration(&jwt.leeway.value.0) {
            Some(d) if d <= SECS(300) => Some(d),
            _ => {
                self.errors.push(
                    &At::of(file, "auth.jwt.leeway", &jwt.leeway),
                    "leeway is a literal duration of at most 5m (e.g. \"5s\")",
                );
                None
            }
        };
        let settings = JwtSettings {
            algorithms: &jwt.algorithms.value,
            secret_env: jwt.secret_env.as_ref().map(|l| l.value.as_str()),
            secret_env_written: jwt.secret_env.as_ref().is_some_and(|l| l.line > 0),
            public_key_file: jwt.public_key_file.as_ref().map(|l| l.value.as_str()),
            jwks_file: jwt.jwks_file.as_ref().map(|l| l.value.as_str()),
            issuer: jwt.issuer.as_deref(),
            audience: jwt.audience.as_deref(),
            leeway_secs: leeway.unwrap_or_default().as_secs(),
            required_claims: &jwt.required_claims,
        };
        let dir = self.source.dir.clone();
        let key_files = &mut self.key_files;
        let mut read = |path: &str| -> Result<Vec<u8>, String> {
            let text = read_bounded(&keys::key_path(&dir, path))?;
            key_files.push((path.to_string(), text.clone().into_bytes()));
            Ok(text.into_bytes())
        };
        let verifier = match keys::load(&settings, self.options.secret_lookup, &mut read) {
            Ok(v) => Some(v),
            Err((field, message)) => {
                // A key file or variable that was not written is a problem of `auth.jwt` as a whole.
                let place = |l: Option<&Located<String>>| l.map_or((a.jwt.line, a.jwt.col), |l| (l.line, l.col));
                let (path, (line, col)) = match field {
                    KeyField::Algorithms => ("auth.jwt.algorithms", (jwt.algorithms.line, jwt.algorithms.col)),
                    KeyField::SecretEnv => ("auth.jwt.secret_env", place(jwt.secret_env.as_ref())),
                    KeyField::PublicKeyFile => ("auth.jwt.public_key_file", place(jwt.public_key_file.as_ref())),
                    KeyField::JwksFile => ("auth.jwt.jwks_file", place(jwt.jwks_file.as_ref())),
                };
                self.errors.push(&At { file, path: path.to_string(), line, col }, message);
                None
            }
        };
        let user_id = self.expr(&At::of(file, "auth.user_id", &a.user_id), &a.user_id.value, USER_ID_VARS);
        let reauth = self.limit(file, "auth.reauth_interval", &a.reauth_interval, LIMIT_VARS, SECS(10)..=SECS(86_400));
        self.unique_names(file, "auth.rules", &a.rules, &mut HashMap::new());
        let rules: Vec<Option<Rule>> = a
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| self.rule(&At::of(file, format!("auth.rules[{i}]"), &r.name), r, CONNECT_VARS, false))
            .collect();
        Some(AuthPolicy {
            token_sources,
            jwt: verifier?,
            user_id: user_id?,
            reauth_interval: reauth?,
            rules: rules.into_iter().collect::<Option<Vec<_>>>()?,
        })
    }

    pub(super) fn origins(&mut self, file: &str, o: &OriginsSection) -> Option<OriginPolicy> {
        let mut allowed = Vec::new();
        for (i, pattern) in o.allowed.iter().enumerate() {
            let at = At::of(file, format!("origins.allowed[{i}]"), pattern);
            match parse_origin_pattern(&pattern.value) {
                Ok(p) => {
                    let insecure = match &p {
                        OriginPattern::Exact(s) => s.starts_with("http://"),
                        OriginPattern::Subdomains { scheme, .. } => scheme == "http",
                        OriginPattern::Any => false,
                    };
                    if insecure && o.require_https {
                        self.errors.push(&at, "an http:// origin contradicts `require_https: true`");
                    }
                    allowed.push(p);
                }
                Err(m) => self.errors.push(&at, m),
            }
        }
        Some(OriginPolicy { allowed, require_https: o.require_https, require_origin: o.require_origin })
    }

    /// SPEC §9: a `cookie:` token source next to an origin list that allows any origin is
    /// refused. Browsers attach cookies to cross-site WebSocket handshakes, so any web page a
    /// user visits could connect as that user (cross-site WebSocket hijacking). The error
    /// points at the written `"*"`, or at the cookie source when the origins are the default.
    /// It names no value from the file (the cookie's name may say something about the site).
    pub(super) fn cookies_need_listed_origins(
        &mut self,
        auth_file: &str,
        a: &AuthSection,
        origins_file: &str,
        o: &OriginsSection,
    ) {
        let is_cookie = |s: &Located<String>| matches!(parse_token_source(&s.value), Ok(TokenSource::Cookie(_)));
        let is_any = |p: &Located<String>| matches!(parse_origin_pattern(&p.value), Ok(OriginPattern::Any));
        let (Some((i, cookie)), Some((j, any))) = (
            a.token_sources.value.iter().enumerate().find(|(_, s)| is_cookie(s)),
            o.allowed.iter().enumerate().find(|(_, p)| is_any(p)),
        ) else {
            return;
        };
        const WHY: &str = "browsers send cookies with cross-site WebSocket handshakes, so any web site could connect \
                           as your users (cross-site WebSocket hijacking); list the allowed origins instead";
        if any.line > 0 {
            let message = format!("any origin is allowed, but auth.token_sources has a cookie source: {WHY}");
            self.errors.push(&At::of(origins_file, format!("origins.allowed[{j}]"), any), message);
        } else {
            let message = format!("a cookie source needs origins.allowed, which by default allows any origin: {WHY}");
            self.errors.push(&At::of(auth_file, format!("auth.token_sources[{i}]"), cookie), message);
        }
    }
}

/// Parses `query:NAME`, `header:NAME`, `cookie:NAME` or `subprotocol`.
fn parse_token_source(text: &str) -> Result<TokenSource, String> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.len() <= 64
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    let (kind, name) = text.split_once(':').unwrap_or((text, ""));
    let source = match kind {
        "subprotocol" if name.is_empty() => TokenSource::Subprotocol,
        "query" if valid_name(name) => TokenSource::Query(name.to_string()),
        "header" if valid_name(name) => TokenSource::Header(name.to_ascii_lowercase()),
        "cookie" if valid_name(name) => TokenSource::Cookie(name.to_string()),
        _ => {
            return Err("not a token source: use query:NAME, header:NAME, cookie:NAME or subprotocol".to_string());
        }
    };
    Ok(source)
}

/// Parses an origin pattern: `*`, `scheme://host[:port]`, or `scheme://*.domain[:port]`.
fn parse_origin_pattern(text: &str) -> Result<OriginPattern, String> {
    if text == "*" {
        return Ok(OriginPattern::Any);
    }
    let bad = || "not an origin: use \"*\", \"https://app.example.com\" or \"https://*.example.com\"".to_string();
    let lower = text.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://").ok_or_else(bad)?;
    if scheme != "http" && scheme != "https" {
        return Err(bad());
    }
    let host_ok = |h: &str| {
        let (host, port) = h.rsplit_once(':').map_or((h, None), |(a, b)| (a, Some(b)));
        !host.is_empty()
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            && port.is_none_or(|p| p.parse::<u16>().is_ok())
    };
    if let Some(suffix) = rest.strip_prefix("*.") {
        if !host_ok(suffix) || !suffix.contains('.') {
            return Err(bad());
        }
        return Ok(OriginPattern::Subdomains { scheme: scheme.to_string(), suffix: format!(".{suffix}") });
    }
    if !host_ok(rest) {
        return Err(bad());
    }
    Ok(OriginPattern::Exact(lower))
}
