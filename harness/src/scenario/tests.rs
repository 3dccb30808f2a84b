use crate::duration::Dur;
use crate::fixtures::token::TokenKind;
use crate::scenario::format::parse;
use crate::scenario::step::Step;
use crate::scenario::steps::connect::Via;
use crate::scenario::steps::process::StopSignal;
use crate::scenario::steps::redis::RedisSignal;

#[test]
fn minimal_scenario_gets_the_default_server_and_names() {
    let s = parse("steps:\n  - connect: {user: alice}\n  - send: {json: {type: ping}}\n").unwrap();
    assert_eq!(s.servers.keys().collect::<Vec<_>>(), vec!["main"]);
    let Step::Connect(c) = &s.steps[0] else { panic!() };
    assert_eq!(c.name.as_deref(), Some("alice"));
    assert_eq!(c.server.as_deref(), Some("main"));
    assert_eq!(c.token, TokenKind::Valid);
    assert_eq!(c.via, Via::Query);
    let Step::Send(send) = &s.steps[1] else { panic!() };
    assert_eq!(send.conn.as_deref(), Some("alice"));
}

#[test]
fn shorthand_policy_goes_to_main() {
    let s = parse(
        "policy:\n  connections: {max_per_ip: 1}\nfiles:\n  schemas/boom.json: '{}'\nenv: {A: b}\n\
         steps:\n  - connect: {user: a, expect_status: 429, retry_after: true}\n",
    )
    .unwrap();
    let main = &s.servers["main"];
    assert_eq!(main.policy.as_ref().unwrap()["connections"]["max_per_ip"], 1);
    assert_eq!(main.files["schemas/boom.json"], "{}");
    assert_eq!(main.env["A"], "b");
}

#[test]
fn every_step_kind_parses() {
    let text = r#"
description: all the steps
timeout: 30s
servers:
  a: {policy: {messages: {binary: close}}, args: [--dev], env: {X: "1"}}
  b: {}
steps:
  - connect: {name: c1, server: a, user: alice, claims: {roles: [publisher]}, ttl: 2s, via: subprotocol,
          origin: "https://app.example.com", silent: true, expect_welcome: {heartbeat_ms: 1000}}
  - connect: {server: b, token: wrong_algorithm, algorithm: HS512, expect_status: 401, expect_error: unauthorized}
  - connect: {name: c2, server: b, user: bob, via: cookie, token_name: sid, path: /ws, query: {x: "1"}, headers: {X-A: b}}
  - send: {conn: c1, json: {type: publish, channel: alerts, data: 1}, pad_to: 100, repeat: 2}
  - send: {conn: c1, binary: 16}
  - send: {conn: c1, text_size: 20480}
  - send: {conn: c2, text: "not json"}
  - expect: {conn: c1, json: {type: ok}, within: 2s, repeat: 2}
  - expect: {conn: c1, text: "hi"}
  - expect: {conn: c2, unordered: [{type: ok}, {type: message}]}
  - expect_close: {conn: c1, code: 1009, reason: big, within: 3s, no_frames_before: true}
  - expect_dropped: {conn: c2, close_frame: false}
  - expect_no_frame: {conn: c2, for: 500ms}
  - close: {conn: c2, code: 1000, reason: bye, expect_code: 1000}
  - wait: 1s
  - publish: {server: a, channel: alerts, data: {level: high}, repeat: 3, auth: wrong, expect_status: 403}
  - publish: {server: b, channel: "user:bob", data_size: 8192}
  - http: {server: a, listener: admin, method: POST, path: /v1/policy/reload, auth: valid, json: {},
       expect_status: 200, expect_body: {ok: true}, expect_text: ok, expect_headers: {content-type: json},
       retry_within: 2s}
  - edit_policy: {server: a, policy: {connections: {max_per_ip: 2}}, files: {x.json: "{}"}, replace: true}
  - pause_reading: c1
  - resume_reading: c1
  - expect_log: {server: a, contains: listening, within: 1s}
  - stop: {server: a, signal: INT}
  - stop: {server: b}
  - expect_exit: {server: a, code: 0, within: 12s}
  - expect_log: {server: a, contains: stopped}
"#;
    let s = parse(text).unwrap();
    assert_eq!(s.steps.len(), 26);
    assert_eq!(s.timeout(), Dur::secs(30));
    let kinds: Vec<&str> = s.steps.iter().map(Step::kind).collect();
    assert!(kinds.contains(&"edit_policy") && kinds.contains(&"resume_reading"));
    let Step::ExpectNoFrame(n) = &s.steps[12] else { panic!() };
    assert_eq!(n.duration, Some(Dur::millis(500)));
}

#[test]
fn tls_servers_and_plaintext_http() {
    let s = parse("tls: true\nsteps:\n  - http: {path: /ws, plaintext: true, expect_no_response: true}\n").unwrap();
    assert!(s.servers["main"].tls);
    let Step::Http(h) = &s.steps[0] else { panic!() };
    assert!(h.plaintext && h.expect_no_response && h.expect_status.is_none());
    let two = "servers: {a: {tls: true}, b: {}}\nsteps:\n";
    parse(&format!("{two}  - http: {{server: a, path: /, plaintext: true, expect_status: 400}}\n")).unwrap();
    for step in [
        "{server: b, path: /, plaintext: true, expect_status: 404}",
        "{server: a, listener: admin, path: /, plaintext: true, expect_status: 404}",
    ] {
        let e = err(&format!("{two}  - http: {step}\n"));
        assert!(e.contains("`plaintext` is for the `ws` listener of a `tls: true` server"), "{e}");
    }
    let e = err("tls: true\nservers: {a: {}}\nsteps:\n  - wait: 1s\n");
    assert!(e.contains("inside `servers`"), "{e}");
    let e = err("tls: true\nargs: [--tls-cert, x.pem]\nsteps:\n  - wait: 1s\n");
    assert!(e.contains("drop `--tls-cert`"), "{e}");
    assert!(err("steps:\n  - http: {path: /}\n").contains("give one of `expect_status`, `expect_no_response`"));
    let both = "steps:\n  - http: {path: /, expect_status: 200, expect_no_response: true}\n";
    assert!(err(both).contains("give only one"));
    let e = err("steps:\n  - http: {path: /, expect_no_response: true, expect_text: x}\n");
    assert!(e.contains("need a response"), "{e}");
}

#[test]
fn stop_and_expect_exit_defaults() {
    let s = parse("steps:\n  - stop: {}\n  - expect_exit: {}\n").unwrap();
    let Step::Stop(stop) = &s.steps[0] else { panic!() };
    assert_eq!((stop.server.as_deref(), stop.signal), (Some("main"), StopSignal::Term));
    let Step::ExpectExit(exit) = &s.steps[1] else { panic!() };
    assert_eq!((exit.server.as_deref(), exit.code, exit.within), (Some("main"), 0, None));
    let s = parse("steps:\n  - stop: {signal: SIGINT}\n").unwrap();
    let Step::Stop(stop) = &s.steps[0] else { panic!() };
    assert_eq!(stop.signal.name(), "INT");
}

#[test]
fn nothing_but_expect_log_follows_an_exit() {
    let e = err("steps:\n  - stop: {}\n  - expect_exit: {}\n  - http: {path: /, expect_status: 404}\n");
    assert!(e.starts_with("step 3 (http)") && e.contains("has exited (step 2)"), "{e}");
    let e = err("steps:\n  - expect_exit: {}\n  - stop: {}\n");
    assert!(e.contains("has exited"), "{e}");
    assert!(err("steps:\n  - stop: {signal: KILL}\n").contains("KILL"));
    let two = "servers: {a: {}, b: {}}\nsteps:\n  - stop: {server: a}\n  - expect_exit: {server: a}\n";
    let ok = format!("{two}  - expect_log: {{server: a, contains: stopped}}\n  - connect: {{server: b, user: x}}\n");
    parse(&ok).unwrap();
}

fn err(text: &str) -> String {
    parse(text).unwrap_err()
}

#[test]
fn a_redis_cluster_needs_redis() {
    let s = parse("redis: true\nredis_cluster: true\nsteps:\n  - connect: {user: alice}\n").unwrap();
    assert!(s.redis && s.redis_cluster);
    let e = parse("redis_cluster: true\nsteps:\n  - connect: {user: alice}\n").unwrap_err();
    assert!(e.contains("`redis_cluster: true` needs `redis: true`"), "{e}");
}

#[test]
fn redis_and_late_servers_parse() {
    let text = r#"
redis: true
servers:
  a: {}
  b: {redis: false}
  c: {start: false}
steps:
  - connect: {server: a, user: alice}
  - publish: {server: a, channel: alerts, data: {n: 1}, save_id: first}
  - expect: {conn: alice, json: {type: message, id: $saved:first}}
  - stop_redis: {}
  - publish: {server: a, channel: alerts, until: {json: {type: message, id: $save:again}}, within: 10s, every: 100ms}
  - start_redis: {within: 3s}
  - stop_redis: {signal: SIGTERM}
  - start_redis: {}
  - redis_publish: {channel: "wsgate:ch:alerts", payload: {id: b-1, data: {x: 1}}, expect_receivers: 2}
  - redis_publish: {channel: "wsgate:ch:alerts", payload: 'not json'}
  - start: {server: c}
  - http: {server: c, listener: admin, path: /readyz, expect_status: 200, expect_body: {id: $saved:again}}
"#;
    let s = parse(text).unwrap();
    assert!(s.redis);
    assert!(s.servers["a"].uses_redis(s.redis) && !s.servers["b"].uses_redis(s.redis));
    assert!(!s.servers["c"].starts_with_the_scenario() && s.servers["a"].starts_with_the_scenario());
    let kinds: Vec<&str> = s.steps.iter().map(Step::kind).collect();
    assert_eq!(
        kinds,
        [
            "connect",
            "publish",
            "expect",
            "stop_redis",
            "publish",
            "start_redis",
            "stop_redis",
            "start_redis",
            "redis_publish",
            "redis_publish",
            "start",
            "http"
        ]
    );
    let Step::Publish(p) = &s.steps[4] else { panic!() };
    let until = p.until.as_ref().unwrap();
    assert_eq!(
        (until.conn.as_deref(), p.within, p.every),
        (Some("alice"), Some(Dur::secs(10)), Some(Dur::millis(100)))
    );
    let Step::StopRedis(stop) = &s.steps[3] else { panic!() };
    assert_eq!(stop.signal.name(), "KILL");
    let Step::StopRedis(stop) = &s.steps[6] else { panic!() };
    assert_eq!(stop.signal, RedisSignal::Term);
    let Step::RedisPublish(r) = &s.steps[8] else { panic!() };
    assert_eq!((r.payload["id"].as_str(), r.expect_receivers), (Some("b-1"), Some(2)));
    let Step::Start(start) = &s.steps[10] else { panic!() };
    assert_eq!(start.server.as_deref(), Some("c"));
    // With one server, the shorthand form gets the Redis too.
    let s = parse("redis: true\nsteps:\n  - stop_redis: {}\n").unwrap();
    assert!(s.servers["main"].uses_redis(s.redis));
}

#[test]
fn redis_steps_need_a_redis_in_the_right_state() {
    let e = err("steps:\n  - stop_redis: {}\n");
    assert!(e.starts_with("step 1 (stop_redis)") && e.contains("declare `redis: true`"), "{e}");
    assert!(err("steps:\n  - redis_publish: {channel: x, payload: y}\n").contains("declare `redis: true`"));
    let r = "redis: true\nsteps:\n";
    assert!(err(&format!("{r}  - start_redis: {{}}\n")).contains("Redis is running"));
    let e = err(&format!("{r}  - stop_redis: {{}}\n  - stop_redis: {{signal: TERM}}\n"));
    assert!(e.starts_with("step 2") && e.contains("already stopped (step 1)"), "{e}");
    let e = err(&format!("{r}  - stop_redis: {{}}\n  - redis_publish: {{channel: c, payload: {{}}}}\n"));
    assert!(e.contains("Redis is stopped (step 1)"), "{e}");
    assert!(err(&format!("{r}  - stop_redis: {{signal: INT}}\n")).contains("INT"));
    assert!(err(&format!("{r}  - redis_publish: {{channel: c}}\n")).contains("payload"));
    let e = err("servers: {a: {redis: true}}\nsteps:\n  - wait: 1s\n");
    assert!(e.contains("needs `redis: true` at the top level"), "{e}");
    let e = err("redis: true\nargs: [--redis, redis://x/]\nsteps:\n  - wait: 1s\n");
    assert!(e.contains("drop it from `args`"), "{e}");
    // A server that does not use the Redis may name its own.
    parse("redis: true\nservers: {a: {redis: false, args: [--redis, redis://x/]}}\nsteps:\n  - wait: 1s\n").unwrap();
}

#[test]
fn late_servers_are_started_once_before_use() {
    let two = "servers: {a: {}, b: {start: false}}\nsteps:\n";
    let e = err(&format!("{two}  - connect: {{server: b, user: x}}\n  - start: {{server: b}}\n"));
    assert!(e.starts_with("step 1 (connect)") && e.contains("not running yet") && e.contains("start: {server: b}"));
    let e = err(&format!("{two}  - start: {{server: b}}\n  - start: {{server: b}}\n"));
    assert!(e.starts_with("step 2 (start)") && e.contains("already running"), "{e}");
    assert!(err(&format!("{two}  - start: {{server: a}}\n")).contains("already running"));
    assert!(err(&format!("{two}  - wait: 1s\n")).contains("no `start` step starts it"));
    assert!(err(&format!("{two}  - start: {{}}\n")).contains("say which `server`"));
    let e = err(&format!(
        "{two}  - start: {{server: b}}\n  - stop: {{server: b}}\n  - expect_exit: {{server: b}}\n  - start: {{server: b}}\n"
    ));
    assert!(e.contains("has exited"), "{e}");
}

#[test]
fn saved_values_and_publish_until_are_checked() {
    let c = "steps:\n  - connect: {user: a}\n";
    let e = err(&format!("{c}  - expect: {{json: {{id: $saved:m}}}}\n"));
    assert!(e.starts_with("step 2 (expect)") && e.contains("no earlier step saved a value as `m`"), "{e}");
    let e = err(&format!("{c}  - expect: {{json: {{id: $bogus}}}}\n"));
    assert!(e.contains("unknown wildcard `$bogus`"), "{e}");
    parse(&format!("{c}  - expect: {{json: {{id: $save:m}}}}\n  - expect: {{json: {{id: $saved:m}}}}\n")).unwrap();
    let e = err(&format!("{c}  - publish: {{channel: x, save_id: 'a b'}}\n"));
    assert!(e.contains("save_id"), "{e}");
    assert!(err(&format!("{c}  - publish: {{channel: x, save_id: m, expect_status: 403}}\n")).contains("status 200"));
    let until = "until: {json: {type: message}}";
    assert!(err(&format!("{c}  - publish: {{channel: x, {until}, repeat: 2}}\n")).contains("does not go with"));
    assert!(err(&format!("{c}  - publish: {{channel: x, {until}, save_id: m}}\n")).contains("does not go with"));
    assert!(err(&format!("{c}  - publish: {{channel: x, {until}, every: 0ms}}\n")).contains("more than 0ms"));
    assert!(err(&format!("{c}  - publish: {{channel: x, within: 1s}}\n")).contains("go with `until`"));
    assert!(err(&format!("{c}  - publish: {{channel: x, until: {{conn: z, json: {{}}}}}}\n")).contains("`z`"));
    assert!(err("steps:\n  - publish: {channel: x, until: {json: {}}}\n").contains("no connection was opened"));
}

#[test]
fn unknown_keys_are_errors() {
    assert!(err("steps:\n  - connect: {user: a, tokn: none}\n").contains("tokn"));
    assert!(err("stepz: []\n").contains("stepz"));
    assert!(err("steps:\n  - conect: {user: a}\n").contains("conect"));
    assert!(err("steps:\n  - connect: {user: a, token: expird}\n").contains("expird"));
}

#[test]
fn references_must_exist_in_order() {
    let e = err("steps:\n  - send: {conn: a, text: x}\n  - connect: {user: a}\n");
    assert!(e.starts_with("step 1") && e.contains("no connection"), "{e}");
    let e = err("steps:\n  - connect: {user: a}\n  - connect: {user: b}\n  - send: {text: x}\n");
    assert!(e.starts_with("step 3") && e.contains("say which `conn`"), "{e}");
    let e = err("steps:\n  - connect: {user: a, server: other}\n");
    assert!(e.contains("no server named `other`"), "{e}");
    let e = err("servers: {a: {}, b: {}}\nsteps:\n  - connect: {user: a}\n");
    assert!(e.contains("say which `server`"), "{e}");
    // A refused handshake opens no connection.
    let e = err("steps:\n  - connect: {user: a, expect_status: 401}\n  - send: {conn: a, text: x}\n");
    assert!(e.contains("no connection"), "{e}");
}

#[test]
fn combinations_are_checked() {
    assert!(err("steps:\n  - connect: {user: a}\n  - send: {text: x, json: {}}\n").contains("only one"));
    assert!(err("steps:\n  - connect: {user: a}\n  - send: {}\n").contains("give one of"));
    assert!(err("steps:\n  - connect: {user: a}\n  - send: {text: x, pad_to: 5}\n").contains("pad_to"));
    assert!(err("steps:\n  - connect: {user: a, retry_after: true}\n").contains("expect_status"));
    assert!(err("steps:\n  - connect: {user: a, silent: true, expect_status: 401}\n").contains("silent"));
    assert!(err("steps:\n  - connect: {user: a, algorithm: HS384}\n").contains("wrong_algorithm"));
    assert!(err("steps:\n  - connect: {user: a, token: wrong_algorithm, algorithm: XX1}\n").contains("XX1"));
    assert!(err("steps:\n  - connect: {token: none}\n").contains("name"));
    assert!(err("steps:\n  - wait: 5\n").contains("duration"));
    assert!(err("steps: []\n").contains("at least one step"));
    assert!(err("policy: {a: 1}\nservers: {x: {}}\nsteps:\n  - wait: 1s\n").contains("inside `servers`"));
    assert!(err("policy: [1]\nsteps:\n  - wait: 1s\n").contains("mapping"));
}
