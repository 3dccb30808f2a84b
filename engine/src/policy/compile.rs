//! Compiling a policy directory into one [`Policy`]: parse every document, merge sections,
//! compile every expression, schema and key, and refuse the whole policy on any error.
//!
//! Every problem is collected (not just the first) and reported as
//! `file:line:col: key.path: message`. A partially compiled policy never escapes this module.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::decision;
use super::error::{ErrorSink, PolicyError, PolicyErrors, strip_position};
use super::expr::{self, InputSizes, Var, VarSet};
use super::keys::{self, JwtSettings, KeyField};
use super::model::{
    AuthSection, ConnectionsSection, CountSpec, DurationSpec, Located, MessagesSection, OriginsSection, PolicyDocument,
    RuleAction, RuleMode, RuleSpec, SizeSpec, TypeAllow, WindowSpec,
};
use super::source::{PolicySource, read_bounded};
use super::units::{parse_duration, parse_size};
use super::{
    AuthPolicy, ConnectionPolicy, Limit, MessagePolicy, MessageType, OriginPattern, OriginPolicy, Policy, RatePolicy,
    Rule, RuleKind, TokenSource, WindowLimit,
};

/// Stack for the compiling thread: CEL parsing recurses with the expression's nesting, and an
/// expression within the length bound may nest a few thousand levels before it is refused.
const COMPILE_STACK_BYTES: usize = 256 * 1024 * 1024;

/// Variables available to connect rules.
pub const CONNECT_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Request, Var::Now]);
/// Variables available to message rules.
pub const MESSAGE_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Conn, Var::Message, Var::Now]);
/// Variables available to per-connection limits.
pub const LIMIT_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Request, Var::Now]);
/// Variables available to `auth.user_id`.
pub const USER_ID_VARS: VarSet = VarSet::of(&[Var::Claims, Var::Request]);
/// Variables available to global limits (`connections.spike`).
pub const GLOBAL_VARS: VarSet = VarSet::of(&[Var::Now]);

/// Claims come from a token, which the request header limit bounds.
pub const MAX_CLAIMS_BYTES: u64 = 8 * 1024;
/// The request's headers, bounded by the handshake's header limit.
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024;
/// Largest `messages.max_bytes` a policy may set.
pub const MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;

const SECS: fn(u64) -> Duration = Duration::from_secs;
/// The longest `connections.reconnects.per`.
pub const MAX_RECONNECT_WINDOW: Duration = Duration::from_secs(86_400);
const MILLIS: fn(u64) -> Duration = Duration::from_millis;

/// What compiling needs from outside the policy directory.
pub struct CompileOptions<'a> {
    /// The generation the new policy gets.
    pub generation: u64,
    /// Reads an environment variable holding a key (`auth.jwt.secret_env`).
    pub secret_lookup: &'a (dyn Fn(&str) -> Option<String> + Sync),
}

/// Reads the process environment: what `policy check`, `policy test` and `serve` use.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Reads and compiles a policy directory.
pub fn compile_dir(dir: &Path, options: &CompileOptions<'_>) -> Result<Policy, PolicyErrors> {
    compile(&PolicySource::read_dir(dir)?, options)
}

/// Compiles a policy read into memory. Runs on its own thread with a large stack so that no
/// expression can overflow it; a panic there (a bug) refuses the policy instead of crashing.
pub fn compile(source: &PolicySource, options: &CompileOptions<'_>) -> Result<Policy, PolicyErrors> {
    let outcome = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("policy-compile".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn_scoped(scope, || Compiler::new(source, options).run())
            .map(|handle| handle.join())
    });
    let internal = |message: String| {
        PolicyErrors(vec![PolicyError {
            file: source.dir.display().to_string(),
            line: 0,
            col: 0,
            path: String::new(),
            message,
        }])
    };
    match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(internal("internal error while compiling the policy (this is a wsgate bug)".into())),
        Err(e) => Err(internal(format!("cannot start the policy compiler: {e}"))),
    }
}

/// A section and the file it came from.
struct Section<'a, T> {
    file: &'a str,
    value: Option<&'a Located<T>>,
}

impl<'a, T> Section<'a, T> {
    fn absent(file: &'a str) -> Self {
        Section { file, value: None }
    }
}

struct Compiler<'a> {
    source: &'a PolicySource,
    options: &'a CompileOptions<'a>,
    errors: ErrorSink,
    /// Key files read, for the content hash.
    key_files: Vec<(String, Vec<u8>)>,
    sizes: InputSizes,
    /// The CEL environment of the policy being built (constant limits are evaluated in it).
    cel_env: Arc<cel::Env>,
}

impl<'a> Compiler<'a> {
    fn new(source: &'a PolicySource, options: &'a CompileOptions<'a>) -> Self {
        Compiler {
            source,
            options,
            errors: ErrorSink::default(),
            key_files: Vec::new(),
            cel_env: Arc::new(expr::env()),
            sizes: InputSizes {
                claims: MAX_CLAIMS_BYTES,
                request: MAX_REQUEST_BYTES,
                conn: 1024,
                message: MAX_MESSAGE_BYTES,
            },
        }
    }

    fn run(mut self) -> Result<Policy, PolicyErrors> {
        let documents = self.parse_documents();
        let first = self.source.documents.first().map_or("policy.yaml", |d| d.name.as_str());
        let mut auth = Section::absent(first);
        let mut origins = Section::absent(first);
        let mut connections = Section::absent(first);
        let mut messages = Section::absent(first);
        for (file, doc) in &documents {
            self.merge(&mut auth, file, doc.auth.as_ref(), "auth");
            self.merge(&mut origins, file, doc.origins.as_ref(), "origins");
            self.merge(&mut connections, file, doc.connections.as_ref(), "connections");
            self.merge(&mut messages, file, doc.messages.as_ref(), "messages");
        }
        let (default_auth, default_origins, default_connections, default_messages) = (
            AuthSection::default(),
            OriginsSection::default(),
            ConnectionsSection::default(),
            MessagesSection::default(),
        );
        let auth_v = auth.value.map_or(&default_auth, |l| &l.value);
        let origins_v = origins.value.map_or(&default_origins, |l| &l.value);
        let connections_v = connections.value.map_or(&default_connections, |l| &l.value);
        let messages_v = messages.value.map_or(&default_messages, |l| &l.value);

        let schemas = self.compile_schemas();
        // Message sizes bound the cost of message rules, so the limits come first.
        let message_policy = self.messages(messages.file, messages_v, &schemas);
        let auth_policy = self.auth(auth.file, auth_v);
        let origin_policy = self.origins(origins.file, origins_v);
        self.cookies_need_listed_origins(auth.file, auth_v, origins.file, origins_v);
        let connection_policy = self.connections(connections.file, connections_v);

        let content_hash = self.content_hash();
        let (Some(auth), Some(origins), Some(connections), Some(messages)) =
            (auth_policy, origin_policy, connection_policy, message_policy)
        else {
            // Every section that failed recorded why; the check guards against one that didn't.
            if self.errors.is_empty() {
                self.errors.push(first, "", 0, 0, "the policy did not compile (no error was recorded: a wsgate bug)");
            }
            return Err(self.errors.finish().expect_err("errors were recorded"));
        };
        self.errors.finish()?;
        Ok(Policy {
            generation: self.options.generation,
            content_hash,
            sources: self
                .source
                .documents
                .iter()
                .chain(&self.source.schemas)
                .map(|f| f.name.clone())
                .chain(self.key_files.iter().map(|(name, _)| name.clone()))
                .collect(),
            loaded_at: SystemTime::now(),
            auth,
            origins,
            connections,
            messages,
            cel_env: self.cel_env.clone(),
        })
    }

    fn parse_documents(&mut self) -> Vec<(&'a str, PolicyDocument)> {
        let mut documents = Vec::new();
        for file in &self.source.documents {
            match serde_saphyr::from_str::<PolicyDocument>(&file.text) {
                Ok(doc) => {
                    if doc.version.value != 1 {
                        self.errors.push(
                            &file.name,
                            "version",
                            doc.version.line,
                            doc.version.col,
                            "unsupported policy format version; this wsgate reads version 1",
                        );
                    }
                    documents.push((file.name.as_str(), doc));
                }
                Err(e) => {
                    let (line, col) = e.location().map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
                    self.errors.push(&file.name, "", line, col, yaml_message(&e));
                }
            }
        }
        documents
    }

    fn merge<'d, T>(&mut self, slot: &mut Section<'d, T>, file: &'d str, value: Option<&'d Located<T>>, name: &str) {
        let Some(value) = value else { return };
        if let Some(existing) = slot.value {
            self.errors.push(
                file,
                name,
                value.line,
                value.col,
                format!(
                    "section `{name}` is already defined in {}:{}; a section may be defined in one file only",
                    slot.file, existing.line
                ),
            );
            return;
        }
        *slot = Section { file, value: Some(value) };
    }

    fn error<T>(&mut self, file: &str, path: &str, at: &Located<T>, message: impl Into<String>) {
        self.errors.push(file, path, at.line, at.col, message);
    }

    fn expr(
        &mut self,
        file: &str,
        path: &str,
        at: &Located<impl Sized>,
        source: &str,
        vars: VarSet,
    ) -> Option<expr::Expr> {
        match expr::compile(source, vars, &self.sizes) {
            Ok(e) => Some(e),
            Err(e) => {
                self.error(file, path, at, e.message);
                None
            }
        }
    }

    fn count(
        &mut self,
        file: &str,
        path: &str,
        spec: &Located<CountSpec>,
        vars: VarSet,
        range: RangeInclusive<u64>,
    ) -> Option<Limit<u64>> {
        match &spec.value {
            CountSpec::Literal(n) => self.in_range(file, path, spec, *n, &range, |n| n.to_string()).map(Limit::Literal),
            CountSpec::Expr(src) => self.limit_expr(file, path, spec, src, vars, range, decision::count),
        }
    }

    fn duration(
        &mut self,
        file: &str,
        path: &str,
        spec: &Located<DurationSpec>,
        vars: VarSet,
        range: RangeInclusive<Duration>,
    ) -> Option<Limit<Duration>> {
        match parse_duration(&spec.value.0) {
            Some(d) => {
                self.in_range(file, path, spec, d, &range, |d| super::units::format_duration(*d)).map(Limit::Literal)
            }
            None if looks_like_a_duration(&spec.value.0) => {
                self.error(
                    file,
                    path,
                    spec,
                    "not a duration: write a number with a unit (ms, s, m, h, d), e.g. \"30s\" or \"1h30m\"",
                );
                None
            }
            None => self.limit_expr(file, path, spec, &spec.value.0, vars, range, decision::duration),
        }
    }

    fn size(
        &mut self,
        file: &str,
        path: &str,
        spec: &Located<SizeSpec>,
        vars: VarSet,
        range: RangeInclusive<u64>,
    ) -> Option<Limit<u64>> {
        let literal = match &spec.value {
            SizeSpec::Literal(n) => Some(*n),
            SizeSpec::Text(t) => parse_size(t),
        };
        match (literal, &spec.value) {
            (Some(n), _) => self.in_range(file, path, spec, n, &range, |n| format!("{n} bytes")).map(Limit::Literal),
            (None, SizeSpec::Text(t))
                if t.trim().bytes().next().is_some_and(|b| b.is_ascii_digit()) && !t.contains(['(', '?', '+', '*']) =>
            {
                self.error(file, path, spec, "not a size: write bytes (10240) or a number with B, KiB, MiB, KB or MB");
                None
            }
            (None, SizeSpec::Text(t)) => self.limit_expr(file, path, spec, t, vars, range, decision::count),
            (None, SizeSpec::Literal(_)) => None,
        }
    }

    /// A CEL limit. One that reads no variable is a constant: it is evaluated and range-checked
    /// now, so `max_per_user: "0"` is refused by `policy check`, not by every handshake.
    #[allow(clippy::too_many_arguments)]
    fn limit_expr<T: Copy, L>(
        &mut self,
        file: &str,
        path: &str,
        at: &Located<L>,
        source: &str,
        vars: VarSet,
        range: RangeInclusive<T>,
        eval: fn(&Limit<T>, &cel::Context<'_, '_>, &'static str) -> Result<T, decision::LimitError>,
    ) -> Option<Limit<T>> {
        let expr = self.expr(file, path, at, source, vars)?;
        let constant = expr.uses == VarSet::NONE;
        let limit = Limit::Expr { expr, min: *range.start(), max: *range.end() };
        if !constant {
            return Some(limit);
        }
        match eval(&limit, &cel::Context::with_env(self.cel_env.clone()), "constant") {
            Ok(v) => Some(Limit::Literal(v)),
            Err(e) => {
                self.error(file, path, at, e.error);
                None
            }
        }
    }

    fn in_range<T: PartialOrd + Copy, L>(
        &mut self,
        file: &str,
        path: &str,
        at: &Located<L>,
        v: T,
        range: &RangeInclusive<T>,
        show: impl Fn(&T) -> String,
    ) -> Option<T> {
        if range.contains(&v) {
            Some(v)
        } else {
            self.error(
                file,
                path,
                at,
                format!("out of range: allowed {} to {}", show(range.start()), show(range.end())),
            );
            None
        }
    }

    fn window(
        &mut self,
        file: &str,
        path: &str,
        w: &WindowSpec,
        vars: VarSet,
        per: RangeInclusive<Duration>,
    ) -> Option<WindowLimit> {
        let max = self.count(file, &format!("{path}.max"), &w.max, vars, 1..=10_000_000);
        let per = self.duration(file, &format!("{path}.per"), &w.per, vars, per);
        Some(WindowLimit { max: max?, per: per? })
    }

    fn rule(&mut self, file: &str, path: &str, spec: &RuleSpec, vars: VarSet, message_rule: bool) -> Option<Rule> {
        if !message_rule && spec.action.is_some() {
            self.error(
                file,
                &format!("{path}.action"),
                &spec.name,
                "connect rules have no `action`: a refused handshake always gets 403",
            );
        }
        if !message_rule && spec.types.is_some() {
            self.error(file, &format!("{path}.types"), &spec.name, "`types` belongs to message rules only");
        }
        let name = spec.name.value.trim();
        if name.is_empty() {
            self.error(file, &format!("{path}.name"), &spec.name, "a rule needs a name");
        }
        let (kind, text) = match (&spec.deny, &spec.allow) {
            (Some(deny), None) => (RuleKind::Deny, deny),
            (None, Some(allow)) => (RuleKind::Allow, allow),
            _ => {
                self.error(file, path, &spec.name, "a rule has exactly one of `deny` or `allow`");
                return None;
            }
        };
        let key = if kind == RuleKind::Deny { "deny" } else { "allow" };
        let expr = self.expr(file, &format!("{path}.{key}"), text, &text.value, vars)?;
        Some(Rule {
            name: name.into(),
            kind,
            expr,
            mode: spec.mode,
            action: spec.action.unwrap_or_default(),
            reason: spec.reason.clone().unwrap_or_else(|| name.to_string()).into(),
        })
    }

    fn unique_names<'r>(
        &mut self,
        file: &str,
        path: &str,
        rules: impl IntoIterator<Item = &'r RuleSpec>,
        seen: &mut HashMap<String, String>,
    ) {
        for (i, r) in rules.into_iter().enumerate() {
            let name = r.name.value.trim().to_string();
            if let Some(other) = seen.insert(name, format!("{path}[{i}]")) {
                self.error(
                    file,
                    &format!("{path}[{i}].name"),
                    &r.name,
                    format!("this name is already used by {other}"),
                );
            }
        }
    }

    fn auth(&mut self, file: &str, a: &AuthSection) -> Option<AuthPolicy> {
        let mut token_sources = Vec::new();
        for (i, s) in a.token_sources.iter().enumerate() {
            match parse_token_source(&s.value) {
                Ok(t) => token_sources.push(t),
                Err(m) => self.error(file, &format!("auth.token_sources[{i}]"), s, m),
            }
        }
        if a.token_sources.is_empty() {
            self.errors.push(file, "auth.token_sources", 0, 0, "at least one token source is required");
        }
        let jwt = &a.jwt.value;
        let leeway = match parse_duration(&jwt.leeway.value.0) {
            Some(d) if d <= SECS(300) => Some(d),
            _ => {
                self.error(
                    file,
                    "auth.jwt.leeway",
                    &jwt.leeway,
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
                let (path, at) = match field {
                    KeyField::Algorithms => ("auth.jwt.algorithms", (jwt.algorithms.line, jwt.algorithms.col)),
                    KeyField::SecretEnv => (
                        "auth.jwt.secret_env",
                        jwt.secret_env.as_ref().map_or((a.jwt.line, a.jwt.col), |l| (l.line, l.col)),
                    ),
                    KeyField::PublicKeyFile => {
                        ("auth.jwt.public_key_file", jwt.public_key_file.as_ref().map_or((0, 0), |l| (l.line, l.col)))
                    }
                    KeyField::JwksFile => {
                        ("auth.jwt.jwks_file", jwt.jwks_file.as_ref().map_or((0, 0), |l| (l.line, l.col)))
                    }
                };
                self.errors.push(file, path, at.0, at.1, message);
                None
            }
        };
        let user_id = self.expr(file, "auth.user_id", &a.user_id, &a.user_id.value, USER_ID_VARS);
        let reauth =
            self.duration(file, "auth.reauth_interval", &a.reauth_interval, LIMIT_VARS, SECS(10)..=SECS(86_400));
        self.unique_names(file, "auth.rules", &a.rules, &mut HashMap::new());
        let rules: Vec<Option<Rule>> = a
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| self.rule(file, &format!("auth.rules[{i}]"), r, CONNECT_VARS, false))
            .collect();
        Some(AuthPolicy {
            token_sources,
            jwt: verifier?,
            user_id: user_id?,
            reauth_interval: reauth?,
            rules: rules.into_iter().collect::<Option<Vec<_>>>()?,
        })
    }

    fn origins(&mut self, file: &str, o: &OriginsSection) -> Option<OriginPolicy> {
        let mut allowed = Vec::new();
        for (i, pattern) in o.allowed.iter().enumerate() {
            match parse_origin_pattern(&pattern.value) {
                Ok(p) => {
                    let insecure = match &p {
                        OriginPattern::Exact(s) => s.starts_with("http://"),
                        OriginPattern::Subdomains { scheme, .. } => scheme == "http",
                        OriginPattern::Any => false,
                    };
                    if insecure && o.require_https {
                        self.error(
                            file,
                            &format!("origins.allowed[{i}]"),
                            pattern,
                            "an http:// origin contradicts `require_https: true`",
                        );
                    }
                    allowed.push(p);
                }
                Err(m) => self.error(file, &format!("origins.allowed[{i}]"), pattern, m),
            }
        }
        Some(OriginPolicy { allowed, require_https: o.require_https, require_origin: o.require_origin })
    }

    /// SPEC §9: a `cookie:` token source next to an origin list that allows any origin is
    /// refused. Browsers attach cookies to cross-site WebSocket handshakes, so any web page a
    /// user visits could connect as that user (cross-site WebSocket hijacking). The error
    /// points at the written `"*"`, or at the cookie source when the origins are the default.
    /// It names no value from the file (the cookie's name may say something about the site).
    fn cookies_need_listed_origins(
        &mut self,
        auth_file: &str,
        a: &AuthSection,
        origins_file: &str,
        o: &OriginsSection,
    ) {
        let is_cookie = |s: &Located<String>| matches!(parse_token_source(&s.value), Ok(TokenSource::Cookie(_)));
        let is_any = |p: &Located<String>| matches!(parse_origin_pattern(&p.value), Ok(OriginPattern::Any));
        let (Some((i, cookie)), Some((j, any))) = (
            a.token_sources.iter().enumerate().find(|(_, s)| is_cookie(s)),
            o.allowed.iter().enumerate().find(|(_, p)| is_any(p)),
        ) else {
            return;
        };
        const WHY: &str = "browsers send cookies with cross-site WebSocket handshakes, so any web site could connect \
                           as your users (cross-site WebSocket hijacking); list the allowed origins instead";
        if any.line > 0 {
            let message = format!("any origin is allowed, but auth.token_sources has a cookie source: {WHY}");
            self.error(origins_file, &format!("origins.allowed[{j}]"), any, message);
        } else {
            let message = format!("a cookie source needs origins.allowed, which by default allows any origin: {WHY}");
            self.error(auth_file, &format!("auth.token_sources[{i}]"), cookie, message);
        }
    }

    fn connections(&mut self, file: &str, c: &ConnectionsSection) -> Option<ConnectionPolicy> {
        let max_per_user = self.count(file, "connections.max_per_user", &c.max_per_user, LIMIT_VARS, 1..=1000);
        let max_per_ip = self.count(file, "connections.max_per_ip", &c.max_per_ip, LIMIT_VARS, 1..=1_000_000);
        let reconnects = self.window(
            file,
            "connections.reconnects",
            &c.reconnects.value,
            LIMIT_VARS,
            SECS(1)..=MAX_RECONNECT_WINDOW,
        );
        let hb = &c.heartbeat.value;
        let interval =
            self.duration(file, "connections.heartbeat.interval", &hb.interval, LIMIT_VARS, SECS(1)..=SECS(3600));
        let timeout =
            self.duration(file, "connections.heartbeat.timeout", &hb.timeout, LIMIT_VARS, SECS(1)..=SECS(3600));
        let idle =
            self.duration(file, "connections.idle_timeout", &c.idle_timeout, LIMIT_VARS, SECS(1)..=SECS(7 * 86_400));
        let spike = self.window(file, "connections.spike", &c.spike.value, GLOBAL_VARS, SECS(1)..=SECS(3600));
        Some(ConnectionPolicy {
            max_per_user: max_per_user?,
            max_per_ip: max_per_ip?,
            reconnects: reconnects?,
            heartbeat_interval: interval?,
            heartbeat_timeout: timeout?,
            idle_timeout: idle?,
            spike: spike?,
        })
    }

    fn messages(
        &mut self,
        file: &str,
        m: &MessagesSection,
        schemas: &HashMap<String, Arc<jsonschema::Validator>>,
    ) -> Option<MessagePolicy> {
        let max_bytes = self.size(file, "messages.max_bytes", &m.max_bytes, LIMIT_VARS, 16..=MAX_MESSAGE_BYTES);
        if let Some(Limit::Literal(n)) = &max_bytes {
            self.sizes.message = *n;
        }
        let max_depth = self.count(file, "messages.max_depth", &m.max_depth, LIMIT_VARS, 1..=128);
        let r = &m.rate.value;
        let rate_max = self.count(file, "messages.rate.max", &r.max, LIMIT_VARS, 1..=1_000_000);
        let rate_per = self.duration(file, "messages.rate.per", &r.per, LIMIT_VARS, MILLIS(10)..=SECS(3600));
        let max_invalid = self.count(file, "messages.max_invalid", &m.max_invalid, LIMIT_VARS, 0..=1_000_000);

        let mut names = HashMap::new();
        self.unique_names(file, "messages.rules", &m.rules, &mut names);
        let mut global = Vec::new();
        for (i, spec) in m.rules.iter().enumerate() {
            if let Some(types) = &spec.types {
                for (j, t) in types.iter().enumerate() {
                    if !m.types.contains_key(t) {
                        self.error(
                            file,
                            &format!("messages.rules[{i}].types[{j}]"),
                            &spec.name,
                            "not a message type defined in messages.types",
                        );
                    }
                }
            }
            if let Some(rule) = self.rule(file, &format!("messages.rules[{i}]"), spec, MESSAGE_VARS, true) {
                global.push((spec.types.clone(), Arc::new(rule)));
            }
        }

        let mut types = HashMap::new();
        for (name, spec) in &m.types {
            let path = format!("messages.types.{name}");
            if !valid_type_name(name) {
                self.error(
                    file,
                    &path,
                    spec,
                    "a message type name is 1–64 characters of letters, digits, `_`, `-`, `.` or `:`",
                );
            }
            let t = &spec.value;
            let schema_file = format!("schemas/{}", t.schema.value.trim_start_matches("schemas/"));
            let schema = schemas.get(&schema_file).cloned();
            if schema.is_none() && !self.source.schemas.iter().any(|f| f.name == schema_file) {
                self.error(
                    file,
                    &format!("{path}.schema"),
                    &t.schema,
                    "no such file in the policy directory's schemas/",
                );
            }
            let mut rules = Vec::new();
            if let Some(allow) = &t.allow {
                let rule_name = format!("{name}.allow");
                if names.contains_key(&rule_name) {
                    self.error(
                        file,
                        &format!("{path}.allow"),
                        allow,
                        format!("rule name `{rule_name}` is also used in messages.rules"),
                    );
                }
                let (text, mode, action, reason) = match &allow.value {
                    TypeAllow::Expr(e) => (e.as_str(), RuleMode::Enforce, RuleAction::Reject, None),
                    TypeAllow::Rule(r) => (r.expr.as_str(), r.mode, r.action, r.reason.clone()),
                };
                if let Some(expr) = self.expr(file, &format!("{path}.allow"), allow, text, MESSAGE_VARS) {
                    rules.push(Arc::new(Rule {
                        reason: reason.unwrap_or_else(|| format!("{name} is not allowed")).into(),
                        name: rule_name.into(),
                        kind: RuleKind::Allow,
                        expr,
                        mode,
                        action,
                    }));
                }
            }
            for (applies, rule) in &global {
                if applies.as_ref().is_none_or(|ts| ts.iter().any(|x| x == name)) {
                    rules.push(rule.clone());
                }
            }
            let reads = |v: Var| rules.iter().any(|r| r.expr.uses.contains(v));
            let (reads_message, reads_now) = (reads(Var::Message), reads(Var::Now));
            if let Some(schema) = schema {
                types.insert(name.clone(), MessageType { schema_file, schema, rules, reads_message, reads_now });
            }
        }
        Some(MessagePolicy {
            max_bytes: max_bytes?,
            max_depth: max_depth?,
            rate: RatePolicy { max: rate_max?, per: rate_per?, action: r.action },
            binary: m.binary,
            max_invalid: max_invalid?,
            types,
        })
    }

    /// Compiles every file in `schemas/`, referenced or not: a broken schema is an error even
    /// before a type uses it. No `$ref` is ever fetched (no network, no file system), and
    /// `pattern` uses a linear-time regex engine.
    fn compile_schemas(&mut self) -> HashMap<String, Arc<jsonschema::Validator>> {
        let mut out = HashMap::new();
        for file in &self.source.schemas {
            let json: serde_json::Value = match serde_json::from_str(&file.text) {
                Ok(v) => v,
                Err(e) => {
                    self.errors.push(
                        &file.name,
                        "",
                        e.line(),
                        e.column(),
                        format!("not valid JSON: {}", strip_position(&e.to_string())),
                    );
                    continue;
                }
            };
            let built =
                jsonschema::options().offline().with_pattern_options(jsonschema::PatternOptions::regex()).build(&json);
            match built {
                Ok(v) => {
                    out.insert(file.name.clone(), Arc::new(v));
                }
                Err(e) => {
                    let at = e.schema_path().to_string();
                    let path = if at.is_empty() { String::new() } else { format!("schema {at}") };
                    self.errors.push(&file.name, &path, 1, 1, format!("invalid JSON Schema: {}", schema_message(&e)));
                }
            }
        }
        out
    }

    fn content_hash(&self) -> String {
        let mut hasher = Sha256::new();
        let files =
            self.source.documents.iter().chain(&self.source.schemas).map(|f| (f.name.as_str(), f.text.as_bytes()));
        let keys = self.key_files.iter().map(|(n, b)| (n.as_str(), b.as_slice()));
        let mut all: Vec<(&str, &[u8])> = files.chain(keys).collect();
        all.sort();
        for (name, bytes) in all {
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// serde-saphyr's message, without the snippet, the position (printed in front) or any value.
pub(crate) fn yaml_message(e: &serde_saphyr::Error) -> String {
    super::error::yaml_message(e)
}

/// What is wrong with a schema, by keyword and place: jsonschema's own message quotes the
/// offending value (and a `$ref`'s address).
fn schema_message(e: &jsonschema::ValidationError<'_>) -> String {
    match e.kind() {
        jsonschema::error::ValidationErrorKind::Referencing(_) => {
            "a `$ref` that does not resolve inside this schema (nothing is ever fetched)".to_string()
        }
        kind => {
            let at = e.instance_path().to_string();
            format!("`{}` does not hold at `{}`", kind.keyword(), if at.is_empty() { "/" } else { &at })
        }
    }
}

fn looks_like_a_duration(text: &str) -> bool {
    let t = text.trim();
    t.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b' ')
}

fn valid_type_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Parses `query:NAME`, `header:NAME`, `cookie:NAME` or `subprotocol`.
pub fn parse_token_source(text: &str) -> Result<TokenSource, String> {
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
pub fn parse_origin_pattern(text: &str) -> Result<OriginPattern, String> {
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
