//! `tiergate check-config FILE` as a user runs it: exit code and every
//! error with its path and line.

use std::process::Command;

/// Runs `tiergate check-config` on `yaml`; returns (exit code, stdout+stderr).
fn check(yaml: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!(
        "tiergate-check-{}-{}",
        std::process::id(),
        fastrand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiergate.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = run(&[file.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .arg("check-config")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

const VALID: &str = "
upstreams:
  users:
    backends:
      - address: 127.0.0.1:8021
routes:
  - name: users
    match:
      path: { prefix: /api/users }
    upstream: users
";

#[test]
fn test_shipped_default_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tiergate.yaml");
    let (code, out) = run(&[path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (22 routes, 5 upstreams)"), "{out}");
}

#[test]
fn test_valid_config_exits_zero() {
    let (code, out) = check(VALID);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn test_dangling_upstream_is_reported_with_line() {
    let (code, out) = check(&VALID.replace("    upstream: users", "    upstream: userz"));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("routes[0].upstream (line 10): unknown upstream `userz` (defined: users)"),
        "{out}"
    );
}

#[test]
fn test_duplicate_route_names_backends_and_matches() {
    let yaml = "
upstreams:
  users:
    backends:
      - address: 127.0.0.1:8021
      - address: 127.0.0.1:8021
routes:
  - name: users
    match: { path: { prefix: /api/users } }
    upstream: users
  - name: users
    match: { path: { prefix: /api/users/ } }
    upstream: users
";
    let (code, out) = check(yaml);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("upstreams.users.backends[1].address (line 6): duplicate backend"),
        "{out}"
    );
    assert!(
        out.contains("routes[1].name (line 11): duplicate route name `users`"),
        "{out}"
    );
    assert!(
        out.contains("routes[1].match (line 12): same match as routes[0]"),
        "{out}"
    );
    assert!(out.contains("3 errors"), "{out}");
}

#[test]
fn test_bad_regex_is_reported() {
    let (code, out) =
        check(&VALID.replace("{ prefix: /api/users }", "{ regex: \"^/api/(users\" }"));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("routes[0].match.path.regex (line 9): invalid regex"),
        "{out}"
    );
}

#[test]
fn test_zero_weight_and_bad_addresses_are_all_reported() {
    let yaml = "
upstreams:
  users:
    backends:
      - address: 127.0.0.1:8021
        weight: 0
      - address: not an address
      - address: 10.0.0.1
      - address: 10.0.0.2:0
routes:
  - name: users
    match: { path: { prefix: /api/users } }
    upstream: users
";
    let (code, out) = check(yaml);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains(
            "upstreams.users.backends[0].weight (line 6): weight must be between 1 and 1000, got 0"
        ),
        "{out}"
    );
    assert!(out.contains("upstreams.users.backends[1].address (line 7): `not an address` is not `ip:port` or `host:port`"), "{out}");
    assert!(
        out.contains("upstreams.users.backends[2].address (line 8)"),
        "{out}"
    );
    assert!(
        out.contains(
            "upstreams.users.backends[3].address (line 9): `10.0.0.2:0`: port 0 is not allowed"
        ),
        "{out}"
    );
    assert!(out.contains("4 errors"), "{out}");
}

#[test]
fn test_every_unknown_key_is_reported() {
    let yaml = "
sever:
  listen: [\"0.0.0.0:8000\"]
upstreams:
  users:
    balance: round_robin
    backends:
      - address: 127.0.0.1:8021
        wieght: 2
routes:
  - name: users
    match: { path: { prefix: /api/users }, method: [GET] }
    upstream: users
";
    let (code, out) = check(yaml);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("sever (line 2): unknown key `sever` in the top level"),
        "{out}"
    );
    assert!(
        out.contains("upstreams.users.balance (line 6): unknown key `balance` in upstreams.users"),
        "{out}"
    );
    assert!(
        out.contains("upstreams.users.backends[0].wieght (line 9)"),
        "{out}"
    );
    assert!(out.contains("routes[0].match.method (line 12)"), "{out}");
    assert!(out.contains("4 errors"), "{out}");
}

#[test]
fn test_type_errors_and_bad_values_name_their_path() {
    let (code, out) = check(&VALID.replace(
        "      - address: 127.0.0.1:8021",
        "      - address: 127.0.0.1:8021\n        weight: heavy",
    ));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("upstreams.users.backends[0].weight (line 6): invalid type"),
        "{out}"
    );

    let (code, out) = check(&VALID.replace(
        "upstream: users",
        "upstream: users\n    timeouts: { connect: soon }",
    ));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("routes[0].timeouts.connect"), "{out}");

    let (code, out) = check(&format!("{VALID}  - name: x\n    match: {{ path: {{ prefix: /x }}, methods: [\"GE T\"] }}\n    upstream: users\n    strip_prefix: true\n    rewrite: {{ prefix: /y }}\n"));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("routes[1].match.methods[0] (line 12): `GE T` is not an HTTP method"),
        "{out}"
    );
    assert!(
        out.contains("routes[1].strip_prefix (line 14): use either strip_prefix or rewrite"),
        "{out}"
    );
}

#[test]
fn test_malformed_yaml_and_empty_and_missing_files() {
    let (code, out) = check("routes:\n  - name: [unclosed\n");
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("(line "), "{out}");

    let (code, out) = check("");
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("the config file is empty"), "{out}");

    let (code, out) = run(&["/nonexistent/tiergate.yaml"]);
    assert_eq!(code, 66, "{out}");
    assert!(
        out.contains("cannot read /nonexistent/tiergate.yaml"),
        "{out}"
    );
}

#[test]
fn test_host_and_listener_errors() {
    let yaml = "
server:
  listen: [\"0.0.0.0:8000\", \"localhost:80\", \"0.0.0.0:8000\"]
  threads: 0
upstreams:
  users:
    algorithm: round_robin
    hash_on: header
    backends: [{ address: 127.0.0.1:8021 }]
routes:
  - name: users
    match: { hosts: [\"api.*.com\"], path: { prefix: api } }
    upstream: users
";
    let (code, out) = check(yaml);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("server.listen[1] (line 3): `localhost:80` is not an `ip:port` address"),
        "{out}"
    );
    assert!(
        out.contains("server.listen[2] (line 3): duplicate listener"),
        "{out}"
    );
    assert!(
        out.contains("server.threads (line 4): must be at least 1"),
        "{out}"
    );
    assert!(
        out.contains(
            "upstreams.users.hash_on (line 8): hash_on only applies to algorithm consistent_hash"
        ),
        "{out}"
    );
    assert!(out.contains("routes[0].match.hosts[0] (line 12)"), "{out}");
    assert!(
        out.contains("routes[0].match.path.prefix (line 12): `api` must start with `/`"),
        "{out}"
    );
}

#[test]
fn test_auth_and_rate_limit_errors_are_all_reported() {
    let extra = [
        "    auth: none",
        "    min_tier: GOLD",
        "    roles: [\"bad role\"]",
        "auth:",
        "  algorithms: [none, HS999]",
        "  jwks: { url: \"ftp://keys\", timeout: 0s }",
        "  max_token_bytes: 10",
        "rate_limit:",
        "  tiers:",
        "    - { name: FREE, per_minute: 0 }",
        "    - { name: free, per_hour: lots }",
        "  redis: { url: \"http://cache:6379\", expected_instances: 0, colour: blue }",
    ];
    let yaml = format!("{VALID}{}\n", extra.join("\n"));
    let (code, out) = check(&yaml);
    assert_eq!(code, 64, "{out}");
    // A type error stops parsing, so it is reported alone; fix it first.
    assert!(out.contains("rate_limit.tiers[1].per_hour"), "{out}");
    assert!(out.contains("expected a number or `unlimited`"), "{out}");

    let (code, out) = check(&yaml.replace("per_hour: lots", "per_hour: unlimited"));
    assert_eq!(code, 64, "{out}");
    for expected in [
        "rate_limit.redis.colour (line 22): unknown key `colour`",
        "routes[0].min_tier (line 12): unknown tier `GOLD`",
        "routes[0].auth (line 11): `min_tier` and `roles` need `auth: required` or `auth: optional`",
        "routes[0].roles[0]",
        "auth.algorithms[0] (line 15): `none` (unsigned tokens) is never accepted",
        "auth.algorithms[1] (line 15): unknown algorithm `HS999`",
        "auth.jwks.url (line 16): `ftp://keys` is not an http(s) URL",
        "auth.jwks.timeout (line 16): must be greater than 0",
        "auth.max_token_bytes (line 17): must be at least 64",
        "rate_limit.tiers[0].per_minute (line 20): must be at least 1 (or `unlimited`)",
        "rate_limit.tiers[1].name (line 21): duplicate tier `free`",
        "rate_limit.redis.url (line 22): a Redis URL starts with `redis://`",
        "rate_limit.redis.expected_instances (line 22): must be at least 1",
        // A key set alone would accept any of its issuer's tokens.
        "auth.issuer (line 14): is required with `auth.jwks` (the `iss` claim tokens must carry)",
        "auth.audience (line 14): is required with `auth.jwks` (the `aud` claim tokens must carry)",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[test]
fn test_limit_by_takes_user_or_tenant() {
    let yaml = format!(
        "{VALID}rate_limit:\n  tiers:\n    - {{ name: TEAM, per_minute: 5, limit_by: team }}\n"
    );
    let (code, out) = check(&yaml);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("rate_limit.tiers[0].limit_by")
            && out.contains("user")
            && out.contains("tenant"),
        "{out}"
    );
    let (code, out) = check(&yaml.replace("team", "tenant"));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn test_edge_limits_and_environment_errors_are_all_reported() {
    let extra = [
        "environment: production",
        "auth:",
        "  algorithms: [EdDSA, HS256]",
        "server:",
        "  limits: { request_line_bytes: 10, headers: 1000, head_bytes: 100, connections: 0 }",
        "  client_timeouts: { request_head: 0s, keepalive: 2h }",
        "rate_limit:",
        "  anonymous_keys: { ipv6_prefix: 200, overflow_ipv4_prefix: 40 }",
    ];
    let yaml = format!("{VALID}{}\n", extra.join("\n"));
    let (code, out) = check(&yaml);
    assert_eq!(code, 64, "{out}");
    for expected in [
        "auth.algorithms[1] (line 13): HS256 (the development secret) needs `environment: development`",
        "server.limits.request_line_bytes (line 15): must be between 256 and `head_bytes` (100), got 10",
        "server.limits.head_bytes (line 15): must be between 1024 and 1048576, got 100",
        "server.limits.headers (line 15): must be between 1 and 256, got 1000",
        "server.limits.connections (line 15): must be at least 1",
        "server.client_timeouts.request_head (line 16): must be greater than 0 and at most 1h",
        "server.client_timeouts.keepalive (line 16): must be at most 1h",
        "rate_limit.anonymous_keys.ipv6_prefix (line 18): must be between 16 and 128",
        "rate_limit.anonymous_keys.overflow_ipv4_prefix (line 18): must be between 8 and 32",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
    let (code, out) = check(&format!(
        "{VALID}server:\n  path: {{ escaped_slashes: maybe }}\n"
    ));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("server.path.escaped_slashes"), "{out}");
    assert!(out.contains("reject") && out.contains("decode"), "{out}");
}

#[test]
fn test_redis_password_never_appears_in_errors() {
    let yaml = format!(
        "{VALID}rate_limit:\n  redis: {{ url: \"redis://:hunter2@cache:6379\", cluster: [\"redis://:hunter2@a:1\"] }}\n"
    );
    let (code, out) = check(&yaml);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("give either `url` or `cluster`"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
}

#[test]
fn test_circuit_breaker_errors_are_reported() {
    let yaml = VALID.replace(
        "      - address: 127.0.0.1:8021",
        "      - address: 127.0.0.1:8021\n    circuit_breaker: { failure_ratio: 1.5, open_for: 10s, max_open_for: 1s, failure_statuses: [999], colour: red }",
    );
    let (code, out) = check(&yaml);
    assert_eq!(code, 64, "{out}");
    for expected in [
        "upstreams.users.circuit_breaker.colour",
        "upstreams.users.circuit_breaker.failure_ratio (line 6): must be greater than 0 and at most 1",
        "upstreams.users.circuit_breaker.max_open_for (line 6): must be at least `open_for`",
        "upstreams.users.circuit_breaker.failure_statuses[0] (line 6): 999 is not an HTTP status",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[test]
fn test_health_check_dns_and_admin_errors_are_reported() {
    let yaml = VALID.replace(
        "      - address: 127.0.0.1:8021",
        "      - address: 127.0.0.1:8021\n    health_check: { type: http, method: POST, path: health, expected_statuses: [99], interval: 50ms, timeout: 1s, unhealthy_threshold: 0, port: 9 }",
    );
    let yaml = format!(
        "{yaml}admin:\n  listen: [\"127.0.0.1:8090\", \"127.0.0.1:8090\", \"nowhere\"]\ndns:\n  nameservers: [\"8.8.8.8\", \"dns.example\"]\n  timeout: 0s\n"
    );
    let (code, out) = check(&yaml);
    assert_eq!(code, 64, "{out}");
    for expected in [
        "upstreams.users.health_check.port (line 6): unknown key",
        "upstreams.users.health_check.method (line 6): `POST` is not GET, HEAD or OPTIONS",
        "upstreams.users.health_check.path (line 6): `health` must start with `/`",
        "upstreams.users.health_check.expected_statuses[0] (line 6): 99 is not an HTTP status",
        "upstreams.users.health_check.interval (line 6): must be between 100ms and 1h",
        "upstreams.users.health_check.timeout (line 6): must be greater than 0 and at most `interval`",
        "upstreams.users.health_check.unhealthy_threshold (line 6): must be between 1 and 100",
        "admin.listen[1]",
        "duplicate listener `127.0.0.1:8090`",
        "admin.listen[2]",
        "`nowhere` is not an `ip:port` address",
        "dns.nameservers[1]",
        "`dns.example` is not an IP address or `ip:port`",
        "dns.timeout",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
    assert!(!out.contains("nameservers[0]"), "8.8.8.8 is fine:\n{out}");
}

/// `conf/tiergate.schema.json` is what the config types generate, the
/// shipped YAML points editors at it, and the shipped config and the
/// complete example of docs/CONFIG.md validate against it (Python's
/// `jsonschema`, installed with schemathesis) while a typo does not.
#[test]
fn test_json_schema_is_in_sync_and_accepts_the_shipped_configs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let file = std::fs::read_to_string(format!("{root}/conf/tiergate.schema.json")).unwrap();
    assert!(
        file == gateway::config::json_schema(),
        "conf/tiergate.schema.json is stale: run `cargo run -- config-schema > conf/tiergate.schema.json`"
    );
    let shipped = std::fs::read_to_string(format!("{root}/conf/tiergate.yaml")).unwrap();
    assert!(shipped.starts_with("# yaml-language-server: $schema=./tiergate.schema.json\n"));
    let doc = std::fs::read_to_string(format!("{root}/docs/CONFIG.md")).unwrap();
    let example = doc
        .split("## Complete example\n\n```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("docs/CONFIG.md has a complete example");
    let dir = std::env::temp_dir().join(format!("tg-schema-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("example.yaml"), example).unwrap();
    std::fs::write(dir.join("typo.yaml"), "server:\n  lisen: [\"x\"]\n").unwrap();
    let script = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
for path in sys.argv[2:4]:
    jsonschema.validate(yaml.safe_load(open(path)), schema)
try:
    jsonschema.validate(yaml.safe_load(open(sys.argv[4])), schema)
    sys.exit("the typo was accepted")
except jsonschema.ValidationError as e:
    print("typo refused:", e.message)
"#;
    let run = || {
        std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(format!("{root}/conf/tiergate.schema.json"))
            .arg(format!("{root}/conf/tiergate.yaml"))
            .arg(dir.join("example.yaml"))
            .arg(dir.join("typo.yaml"))
            .output()
            .unwrap()
    };
    let mut out = run();
    if String::from_utf8_lossy(&out.stderr).contains("ModuleNotFoundError") {
        let pip = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "-q", "jsonschema", "pyyaml"])
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "python3 -m pip install jsonschema pyyaml"
        );
        out = run();
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("'lisen' was unexpected"));
}
