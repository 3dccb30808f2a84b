//! `wsgate serve`: everything between the command line and [`server::serve`] — flags and
//! their environment twins, logging, the `--dev` conveniences, and the start-up checks. The
//! whole policy (CEL, schemas, keys) is compiled before anything binds; a refused policy, a
//! missing key or plaintext on a non-loopback address exits with status 64 and says why.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::builder::BoolishValueParser;
use clap::{Args, ValueEnum};
use tokio::net::TcpListener;

use super::shared::{EXIT_CONFIG, parse_ttl, print_errors};
use crate::broker::redis::link::Topology;
use crate::gateway::{Failpoint, Gateway, GatewayOptions};
use crate::policy::compile::driver::process_env;
use crate::policy::{CompileOptions, PolicySource, compile};
use crate::proxy::Proxies;
use crate::proxy::trusted::{ForwardedHeader, TrustedProxies};
use crate::reload::{LivePolicy, PolicyDir, SecretLookup, Trigger};
use crate::server::{self, Listeners, ServeOptions};
use crate::tls::Tls;
use crate::watcher;

/// The environment variable the default policy reads its HS256 secret from.
const DEV_SECRET_ENV: &str = "WSGATE_JWT_SECRET";

/// `wsgate serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The policy directory.
    #[arg(long, env = "WSGATE_POLICIES", default_value = "./policies")]
    pub policies: PathBuf,
    /// The public WebSocket address (port 0: any free port).
    #[arg(long, env = "WSGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The admin address: metrics, health, admin API.
    #[arg(long, env = "WSGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// Redis URL for running several instances as one (with --redis-cluster: the cluster's
    /// seed nodes, comma-separated).
    #[arg(long, env = "WSGATE_REDIS_URL")]
    pub redis: Option<String>,
    /// --redis names a Redis Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7).
    #[arg(long, env = "WSGATE_REDIS_CLUSTER", requires = "redis", value_parser = BoolishValueParser::new())]
    pub redis_cluster: bool,
    /// This instance's id (default: host name and process id).
    #[arg(long, env = "WSGATE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "WSGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "WSGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Development mode: an ephemeral HS256 secret when none is set, and a ready token.
    #[arg(long)]
    pub dev: bool,
    /// Serve plaintext on a non-loopback address (tokens then cross the network in clear).
    #[arg(long, env = "WSGATE_ALLOW_PLAINTEXT", value_parser = BoolishValueParser::new())]
    pub allow_plaintext: bool,
    /// Log format.
    #[arg(long, env = "WSGATE_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// How long shutdown waits for clients' close handshakes.
    #[arg(long, env = "WSGATE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_ttl)]
    pub drain_timeout: Duration,
    /// On SIGTERM, how long `/readyz` answers 503 while everything else goes on (clients
    /// served, new handshakes accepted), so a load balancer stops sending new clients before
    /// the drain starts. Set it to the balancer's probe period times its failure threshold.
    #[arg(long, env = "WSGATE_DRAIN_DELAY", default_value = "0s", value_parser = parse_ttl)]
    pub drain_delay: Duration,
    /// Keep `/readyz` at 200 while Redis is away (this instance still serves its own clients;
    /// deliveries from other instances and shared limits wait for Redis). Default: 503.
    #[arg(long, env = "WSGATE_READY_WITHOUT_REDIS", value_parser = BoolishValueParser::new())]
    pub ready_without_redis: bool,
    /// How long a token revocation (`/v1/disconnect` with `revoke_tokens`) lasts: set it to the
    /// longest lifetime of the tokens you issue.
    #[arg(long, env = "WSGATE_REVOCATION_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub revocation_ttl: Duration,
    /// Do not watch the policy directory; reload only on SIGHUP or `POST /v1/policy/reload`
    /// (for file systems without change notifications, or deployments that push reloads).
    #[arg(long, env = "WSGATE_NO_WATCH", value_parser = BoolishValueParser::new())]
    pub no_watch: bool,
    /// Most connections held at once.
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Most connections still in their handshake (TLS and the upgrade request) at once, over
    /// every address; more are closed unanswered.
    #[arg(long, env = "WSGATE_MAX_HANDSHAKES", default_value_t = crate::limits::handshaking::DEFAULT_MAX_TOTAL)]
    pub max_handshakes: usize,
    /// Peers in these address ranges (CIDR, comma-separated) are proxies: the client is the
    /// rightmost forwarded address that is not itself trusted.
    #[arg(long, env = "WSGATE_TRUSTED_PROXIES", value_name = "CIDR[,CIDR…]")]
    pub trusted_proxies: Option<String>,
    /// The header the trusted proxies name the client in.
    #[arg(long, env = "WSGATE_FORWARDED_HEADER", value_enum, default_value = "x-forwarded-for")]
    pub forwarded_header: ForwardedHeader,
    /// Every connection to the public listener starts with a PROXY protocol header (v1 or v2)
    /// from a trusted proxy; anything else is closed at once.
    #[arg(long, env = "WSGATE_PROXY_PROTOCOL", requires = "trusted_proxies", value_parser = BoolishValueParser::new())]
    pub proxy_protocol: bool,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line.
    Json,
}

fn refuse_start(message: &str) -> ExitCode {
    eprintln!("wsgate: {message}");
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs `wsgate serve` to the end.
pub fn run(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match Tls::load(cert, key) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => return refuse_start(&format!("TLS: {e}")),
        },
        _ => None,
    };
    // An empty value (an empty variable in a compose file) is no value, as for --redis.
    let listed = args.trusted_proxies.as_deref().filter(|list| !list.trim().is_empty());
    let trusted = match listed.map(TrustedProxies::parse).transpose() {
        Ok(trusted) => trusted.unwrap_or_default(),
        Err(e) => return refuse_start(&format!("--trusted-proxies: {e}")),
    };
    if args.proxy_protocol && trusted.is_empty() {
        return refuse_start(
            "--proxy-protocol needs --trusted-proxies: PROXY headers are taken from trusted proxies only",
        );
    }
    // Plaintext on a non-loopback address behind trusted proxies: the proxies' network is the
    // only one served, every other peer is closed at once (unless --allow-plaintext says to
    // serve anyone).
    let proxied_plaintext =
        !trusted.is_empty() && tls.is_none() && !args.listen.ip().is_loopback() && !args.allow_plaintext;
    let proxies = Proxies {
        closes_untrusted: proxied_plaintext,
        protocol: args.proxy_protocol,
        header: args.forwarded_header,
        trusted,
    };
    if !proxies.trusted.is_empty() {
        let ranges: Vec<String> = proxies.trusted.ranges().iter().map(ToString::to_string).collect();
        tracing::info!(
            trusted_proxies = %ranges.join(","),
            header = ?proxies.header,
            proxy_protocol = proxies.protocol,
            closes_untrusted = proxies.serves_only_proxies(),
            "clients behind trusted proxies are taken from their forwarding headers"
        );
    }
    // TLS covers the public listener; the admin listener is plaintext and belongs on loopback.
    let in_clear =
        [("--listen", args.listen, tls.is_none() && !proxied_plaintext), ("--admin-listen", args.admin_listen, true)];
    for (what, addr, plaintext) in in_clear {
        if plaintext && !addr.ip().is_loopback() {
            if !args.allow_plaintext {
                return refuse_start(&format!(
                    "{what} {addr} is not a loopback address and is not served over TLS; tokens would cross the network in clear (--allow-plaintext overrides)"
                ));
            }
            tracing::warn!(address = %addr, "PLAINTEXT on a non-loopback address (--allow-plaintext): tokens cross the network in clear");
        }
    }

    // --dev: an ephemeral secret, used only when none is set.
    let dev_secret = (args.dev && process_env(DEV_SECRET_ENV).is_none_or(|s| s.is_empty())).then(random_secret);
    let secrets: SecretLookup = {
        let dev_secret = dev_secret.clone();
        Arc::new(move |name: &str| match (&dev_secret, name) {
            (Some(secret), DEV_SECRET_ENV) => Some(secret.clone()),
            _ => process_env(name),
        })
    };
    let options = CompileOptions { generation: 1, secret_lookup: &*secrets };
    let policy = match PolicySource::read_dir(&args.policies).and_then(|source| compile(&source, &options)) {
        Ok(p) => Arc::new(p),
        Err(errors) => {
            print_errors(&errors);
            return refuse_start(&format!("the policy in {} is refused; nothing was started", args.policies.display()));
        }
    };
    tracing::info!(
        policy = %args.policies.display(),
        generation = policy.generation,
        sha256 = %policy.content_hash,
        "policy loaded"
    );

    let failpoint =
        if cfg!(debug_assertions) { process_env("WSGATE_FAILPOINT").and_then(|f| Failpoint::parse(&f)) } else { None };
    let gateway_options = GatewayOptions {
        instance_id: args.instance_id.clone().unwrap_or_else(default_instance_id),
        admin_token: process_env("WSGATE_ADMIN_TOKEN").filter(|t| !t.is_empty()),
        failpoint,
        revocation_ttl: args.revocation_ttl,
        policy_dir: Some(PolicyDir { dir: args.policies.clone(), secrets }),
        proxies,
        ready_without_redis: args.ready_without_redis,
    };
    if gateway_options.admin_token.is_none() {
        tracing::info!("WSGATE_ADMIN_TOKEN is not set: state-changing admin calls answer 403");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let (ws, admin) = match (TcpListener::bind(args.listen).await, TcpListener::bind(args.admin_listen).await) {
            (Ok(ws), Ok(admin)) => (ws, admin),
            (Err(e), _) => return refuse_start(&format!("cannot listen on {}: {e}", args.listen)),
            (_, Err(e)) => return refuse_start(&format!("cannot listen on {}: {e}", args.admin_listen)),
        };
        let (ws_addr, admin_addr) = match (ws.local_addr(), admin.local_addr()) {
            (Ok(w), Ok(a)) => (w, a),
            _ => return refuse_start("cannot read the listening addresses"),
        };
        // Handlers go in before anyone can know the address: a SIGTERM right after the listening
        // line must drain, not kill.
        let topology = if args.redis_cluster { Topology::Cluster } else { Topology::Server };
        let gw = match args.redis.as_deref().filter(|url| !url.is_empty()) {
            None => Gateway::new(policy, gateway_options),
            Some(url) => match Gateway::with_redis(policy, gateway_options, url, topology) {
                Ok(gw) => gw,
                Err(e) => return refuse_start(&e),
            },
        };
        let shutdown = match shutdown_signal(tls.clone(), gw.policy.clone()) {
            Ok(s) => s,
            Err(e) => return refuse_start(&format!("cannot install signal handlers: {e}")),
        };
        println!("wsgate listening ws={ws_addr} admin={admin_addr}");
        if tls.is_some() {
            tracing::info!(address = %ws_addr, "serving wss:// (TLS 1.2 and 1.3); SIGHUP re-reads the certificate");
        }
        // The secret the policy was compiled with: the ephemeral one, or the environment's.
        if args.dev
            && let Some(secret) = dev_secret.or_else(|| process_env(DEV_SECRET_ENV))
        {
            print_dev_token(&secret, ws_addr);
        }
        // Watching is a convenience on top of SIGHUP and the admin call: without it (no
        // inotify watches left, say) the server still runs, and says so.
        let watching = if args.no_watch { None } else { Some(watcher::watch(gw.policy.clone())) };
        let _watcher = match watching {
            None => {
                tracing::info!("--no-watch: the policy is reloaded on SIGHUP and POST /v1/policy/reload only");
                None
            }
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::error!(error = %e, policy = %args.policies.display(), "cannot watch the policy directory; reload with SIGHUP or POST /v1/policy/reload");
                None
            }
        };
        let serve_options =
            ServeOptions {
                max_connections: args.max_connections,
                drain_timeout: args.drain_timeout,
                drain_delay: args.drain_delay,
                tls,
                max_handshakes: args.max_handshakes,
            };
        match server::serve(Listeners { ws, admin }, gw, serve_options, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::from(1)
            }
        }
    })
}

/// A development token for `dev-user` with the publisher role, printed with a ready URL.
fn print_dev_token(secret: &str, ws_addr: SocketAddr) {
    let claims = [("roles".to_string(), r#"["publisher"]"#.to_string())];
    match crate::token::mint(secret.as_bytes(), "dev-user", Duration::from_secs(3600), &claims, SystemTime::now()) {
        Ok(token) => {
            println!("dev token (sub=dev-user, roles=[publisher], valid 1h): {token}");
            println!("connect: ws://{ws_addr}/ws?token={token}");
        }
        Err(e) => eprintln!("wsgate: cannot mint a dev token: {e}"),
    }
}

/// 32 random bytes, hex: an HS256 secret for this process only.
fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS has no randomness for a development secret");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wsgate".into());
    format!("{host}-{}", std::process::id())
}

/// Exit status when a second signal cuts the drain short (128 + SIGINT, as shells report).
pub const EXIT_INTERRUPTED: i32 = 130;

/// Installs the SIGTERM, SIGINT and SIGHUP handlers now. The returned future completes on the
/// first SIGTERM or SIGINT (the drain starts); a second one exits at once. SIGHUP reloads the
/// policy and re-reads the TLS certificate, and never takes its default action (terminating
/// without a drain).
fn shutdown_signal(
    tls: Option<Arc<Tls>>,
    policy: Arc<LivePolicy>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut first = Some(first_tx);
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    match &tls {
                        Some(tls) => match tls.reload() {
                            Ok(()) => tracing::info!("SIGHUP: TLS certificate and key re-read; new connections use them"),
                            Err(e) => tracing::error!(error = %e, "SIGHUP: the TLS certificate could not be re-read; the current one stays"),
                        },
                        None => tracing::debug!("SIGHUP: no TLS certificate to re-read"),
                    }
                    // Its own task: a reload waiting for its turn must not hold up a SIGTERM.
                    let policy = policy.clone();
                    tokio::spawn(async move { policy.reload(Trigger::Signal).await });
                    continue;
                }
            };
            match first.take() {
                Some(tx) => {
                    tracing::info!(signal = name, "shutting down gracefully; a second signal exits at once");
                    let _ = tx.send(());
                }
                None => {
                    tracing::warn!(signal = name, "second signal: exiting now, without waiting for the drain");
                    std::process::exit(EXIT_INTERRUPTED);
                }
            }
        }
    });
    Ok(async move {
        let _ = first_rx.await;
    })
}
