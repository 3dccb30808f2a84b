use std::time::Duration;

use crate::runner::ctx::RunConfig;
use crate::runner::run::run;
use crate::scenario::format::parse;

/// A stand-in for wsgate: a shell script, so the supervisor and reports can be tested
/// without the server.
fn fake_server(dir: &std::path::Path, body: &str) -> RunConfig {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("fake-wsgate");
    std::fs::write(&bin, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    RunConfig {
        bin,
        policies: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"),
        ready_timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn a_server_that_exits_is_reported_with_its_output_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fake_server(dir.path(), "echo \"starting with $WSGATE_JWT_SECRET\" >&2; exit 3");
    let scenario = parse("steps:\n  - wait: 10ms\n").unwrap();
    let report = run(&scenario, &cfg).await.unwrap_err();
    assert!(report.contains("exited (exit status: 3)"), "{report}");
    assert!(report.contains("starting with <redacted: the JWT secret>"), "{report}");
}

#[tokio::test]
async fn a_secret_in_the_log_fails_an_otherwise_passing_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fake_server(
        dir.path(),
        "echo 'wsgate listening ws=127.0.0.1:9 admin=127.0.0.1:9'; echo \"admin=$WSGATE_ADMIN_TOKEN\" >&2; exec sleep 30",
    );
    let scenario = parse("steps:\n  - wait: 10ms\n").unwrap();
    let report = run(&scenario, &cfg).await.unwrap_err();
    assert!(report.starts_with("a log contains a secret (SPEC §2): wsgate `main` logged the admin token"), "{report}");
    assert!(report.contains("admin=<redacted: the admin token>"), "{report}");
}

/// A stand-in that drains on SIGTERM: prints `line` and exits with `code`.
fn draining_server(dir: &std::path::Path, line: &str, code: i32) -> RunConfig {
    fake_server(
        dir,
        &format!(
            "trap 'echo \"{line}\" >&2; exit {code}' TERM\n\
             echo 'wsgate listening ws=127.0.0.1:9 admin=127.0.0.1:9'\n\
             while :; do sleep 0.05; done"
        ),
    )
}

#[tokio::test]
async fn stop_then_expect_exit_passes_and_the_log_of_the_exited_server_is_still_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let scenario =
        parse("steps:\n  - stop: {}\n  - expect_exit: {code: 0, within: 5s}\n  - expect_log: {contains: draining}\n")
            .unwrap();
    run(&scenario, &draining_server(dir.path(), "draining", 0)).await.unwrap();

    let leaky = draining_server(dir.path(), "draining with $WSGATE_ADMIN_TOKEN", 0);
    let report = run(&scenario, &leaky).await.unwrap_err();
    assert!(report.starts_with("a log contains a secret (SPEC §2): wsgate `main` logged the admin token"), "{report}");
    assert!(report.contains("draining with <redacted: the admin token>"), "{report}");
}

#[tokio::test]
async fn expect_exit_reports_the_wrong_status_and_a_server_that_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = parse("steps:\n  - stop: {}\n  - expect_exit: {}\n").unwrap();
    let report = run(&scenario, &draining_server(dir.path(), "bye", 3)).await.unwrap_err();
    assert!(report.starts_with("step 2 (expect_exit): expected exit status 0, got exit status 3 ("), "{report}");
    assert!(report.contains("ms after SIGTERM)"), "{report}");

    let scenario = parse("steps:\n  - expect_exit: {within: 300ms}\n").unwrap();
    let report = run(&scenario, &draining_server(dir.path(), "bye", 0)).await.unwrap_err();
    assert!(
        report.starts_with(
            "step 1 (expect_exit): expected the server to exit with status 0 within 300ms; it is still running"
        ),
        "{report}"
    );
}

/// A scenario with `redis: true` against stand-in servers that print their arguments: the
/// Redis is started first and every server that uses it gets `--redis` with its URL (a late
/// server too, one with `redis: false` not); `stop_redis`, `start_redis` and `redis_publish`
/// run against the real redis-server.
#[tokio::test]
async fn redis_scenarios_start_redis_and_pass_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fake_server(
        dir.path(),
        "echo \"started with $*\" >&2; echo 'wsgate listening ws=127.0.0.1:9 admin=127.0.0.1:9'; exec sleep 30",
    );
    let scenario = parse(
        "redis: true\n\
         servers: {a: {}, solo: {redis: false}, late: {start: false}}\n\
         steps:\n\
         \x20 - expect_log: {server: a, contains: '--redis redis://127.0.0.1:'}\n\
         \x20 - redis_publish: {channel: 'wsgate:ch:alerts', payload: {id: b-1, data: {}}, expect_receivers: 0}\n\
         \x20 - stop_redis: {}\n\
         \x20 - start_redis: {}\n\
         \x20 - redis_publish: {channel: 'wsgate:ch:alerts', payload: 'raw text'}\n\
         \x20 - start: {server: late}\n\
         \x20 - expect_log: {server: late, contains: '--instance-id late --redis redis://127.0.0.1:'}\n\
         \x20 - expect_log: {server: solo, contains: '--instance-id solo', within: 1s}\n",
    )
    .unwrap();
    run(&scenario, &cfg).await.unwrap();

    // The Redis URL is the one of the Redis the harness started: PUBLISH a count that fails.
    let wrong =
        parse("redis: true\nsteps:\n  - redis_publish: {channel: c, payload: x, expect_receivers: 3}\n").unwrap();
    let report = run(&wrong, &cfg).await.unwrap_err();
    assert!(
        report.starts_with("step 1 (redis_publish): expected PUBLISH c to reach 3 Redis subscriber(s), it reached 0"),
        "{report}"
    );
    assert!(report.contains("lines of redis-server:") && report.contains("Ready to accept connections"), "{report}");

    // `redis: false` leaves `--redis` out.
    let solo = parse(
        "redis: true\nservers: {solo: {redis: false}}\nsteps:\n  - expect_log: {contains: '--redis', within: 300ms}\n",
    )
    .unwrap();
    let report = run(&solo, &cfg).await.unwrap_err();
    assert!(report.contains("no log line containing \"--redis\""), "{report}");
}
