//! The HTTP API over a real socket: status codes, JSON bodies, errors, authentication.

use phasm::store::prelude::*;
use std::sync::Arc;

use phasm::clock::SystemClock;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Limits;
use phasm::server::{serve, ServerState};
use phasm::store::{SqliteOptions, SqliteStore};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const YAML: &str = "schedules:\n- name: hourly\n  machine: Job\n  cron: '0 * * * *'\nstate_machines:\n- name: Job\n  context_types:\n    count: int\n  states:\n  - name: a\n    initial: true\n    action: A\n    transitions:\n    - event: go\n      to: b\n  - name: b\n    final: true\n";

struct Api {
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

async fn api(token: Option<&str>) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    api_with(dir, store, token, None, &[]).await
}

/// Serve `store` with the test machine on a free port (contexts up to 1000 bytes).
async fn api_with(
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    token: Option<&str>,
    hosts: Option<&[&str]>,
    trusted_proxies: &[&str],
) -> Api {
    let config = Arc::new(
        load_str(YAML, dir.path().join("fsm.yaml"), &LoadOptions::default())
            .unwrap()
            .config,
    );
    let state = Arc::new(ServerState {
        store,
        config,
        clock: Arc::new(SystemClock),
        limits: Limits {
            max_context_bytes: 1000,
            ..Limits::default()
        },
        token: token.map(str::to_string),
        metrics: Some(phasm::server::install_metrics().unwrap()),
        throttle: Default::default(),
        allowed_hosts: hosts.map(|h| h.iter().map(|n| (*n).to_string()).collect()),
        trusted_proxies: trusted_proxies.iter().map(|p| p.parse().unwrap()).collect(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));
    Api { addr, _dir: dir }
}

/// One HTTP/1.1 request; returns the status and the body.
async fn call(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn start_inspect_list_and_cancel_an_instance() {
    let api = api(None).await;
    let (status, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"context": {"n": 1}, "name": "job-1"}"#),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(json(&body)["instance"], "job-1");
    let (status, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"name": "job-1"}"#),
        None,
    )
    .await;
    assert_eq!(
        status, 200,
        "starting the same name again is idempotent: {body}"
    );
    assert_eq!(json(&body)["created"], false);

    let (status, body) = call(&api, "GET", "/api/instances/job-1", None, None).await;
    assert_eq!(status, 200);
    let view = json(&body);
    assert_eq!(
        (view["instance"].as_str(), view["status"].as_str()),
        (Some("job-1"), Some("running"))
    );
    assert_eq!(view["initial_context"]["n"], 1);

    let (status, body) = call(
        &api,
        "GET",
        "/api/instances?machine=Job&status=running",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["instances"][0]["instance"], "job-1");

    let (status, _) = call(&api, "POST", "/api/instances/job-1/cancel", None, None).await;
    assert_eq!(status, 200);
    let (status, body) = call(&api, "POST", "/api/instances/job-1/cancel", None, None).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = call(&api, "POST", "/api/instances/job-1/retry", None, None).await;
    assert_eq!(status, 409, "only failed instances can be retried: {body}");
}

#[tokio::test]
async fn bad_requests_get_json_errors_not_500s() {
    let api = api(None).await;
    let cases: [(&str, &str, Option<&str>, u16, &str); 11] = [
        (
            "POST",
            "/api/machines/Job/instances",
            Some("{oops"),
            400,
            "not JSON",
        ),
        (
            "POST",
            "/api/machines/Job/instances",
            Some("[1]"),
            400,
            "must be a JSON object",
        ),
        (
            "POST",
            "/api/machines/Job/instances",
            Some(r#"{"context": 5}"#),
            400,
            "`context`: invalid type: integer `5`, expected a map",
        ),
        (
            "POST",
            "/api/machines/Job/instances",
            Some(r#"{"contxt": {}}"#),
            400,
            "unknown field `contxt`",
        ),
        (
            "POST",
            "/api/machines/Job/instances",
            Some(r#"{"name": "bad name"}"#),
            400,
            "invalid instance name",
        ),
        (
            "POST",
            "/api/machines/Job/instances",
            Some(r#"{"name": ".."}"#),
            400,
            "invalid instance name `..`",
        ),
        (
            "POST",
            "/api/machines/Job/instances",
            Some(r#"{"name": "."}"#),
            400,
            "invalid instance name `.`",
        ),
        (
            "POST",
            "/api/machines/Nope/instances",
            Some("{}"),
            404,
            "no machine named `Nope`",
        ),
        (
            "GET",
            "/api/instances/nobody",
            None,
            404,
            "no instance named `nobody`",
        ),
        (
            "GET",
            "/api/instances?status=sleeping",
            None,
            400,
            "unknown status `sleeping`",
        ),
        ("GET", "/api/nothing-here", None, 404, "no such endpoint"),
    ];
    for (method, path, body, want, message) in cases {
        let (status, text) = call(&api, method, path, body, None).await;
        assert_eq!(status, want, "{method} {path}: {text}");
        let error = json(&text)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.contains(message), "{method} {path}: {error}");
    }
    let big = format!(r#"{{"context": {{"blob": "{}"}}}}"#, "x".repeat(2000));
    let (status, text) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(&big),
        None,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(json(&text)["error"]
        .as_str()
        .unwrap()
        .contains("over the limit of 1000 bytes"));
}

#[tokio::test]
async fn machines_graphs_and_health() {
    let api = api(None).await;
    let (status, body) = call(&api, "GET", "/api/machines", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["machines"][0]["name"], "Job");
    let (status, body) = call(&api, "GET", "/api/machines/Job/graph.svg", None, None).await;
    assert_eq!(status, 200);
    assert!(body.contains("<svg"), "{body}");
    let (status, body) = call(&api, "GET", "/healthz", None, None).await;
    assert_eq!((status, json(&body)["status"].as_str()), (200, Some("ok")));
    // No worker ran: the schedule has never fired; its next tick is on the hour.
    let (status, body) = call(&api, "GET", "/api/schedules", None, None).await;
    assert_eq!(status, 200, "{body}");
    let hourly = &json(&body)["schedules"][0];
    assert_eq!(hourly["name"], "hourly");
    assert_eq!(hourly["machine"], "Job");
    assert_eq!(hourly["last_tick"], Value::Null);
    assert!(
        hourly["next_tick"]
            .as_str()
            .is_some_and(|t| t.ends_with(":00:00.000Z")),
        "{hourly}"
    );
    let (status, page) = call(&api, "GET", "/", None, None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<caption>Schedules</caption>"), "{page}");
    assert!(page.contains("cron 0 * * * * (UTC)"), "{page}");
}

#[tokio::test]
async fn a_token_protects_every_api_call() {
    let api = api(Some("s3cret-s3cret-s3cret")).await;
    let (status, body) = call(&api, "GET", "/api/machines", None, None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = call(&api, "GET", "/api/machines", None, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = call(
        &api,
        "GET",
        "/api/machines",
        None,
        Some("s3cret-s3cret-s3cret"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn metrics_show_pending_work_and_step_counters() {
    let api = api(None).await;
    for _ in 0..3 {
        let (status, _) = call(
            &api,
            "POST",
            "/api/machines/Job/instances",
            Some("{}"),
            None,
        )
        .await;
        assert_eq!(status, 201);
    }
    metrics::counter!("phasm_steps_total", "machine" => "Job", "state" => "a", "outcome" => "committed").increment(1);
    let (status, body) = call(&api, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("phasm_queue_due{queue=\"default\"} 3"),
        "{body}"
    );
    assert!(body.contains("phasm_parked_branches 0"), "{body}");
    assert!(
        body.contains("phasm_steps_total{machine=\"Job\",state=\"a\",outcome=\"committed\"}"),
        "{body}"
    );
}

#[tokio::test]
async fn the_instance_list_pages_with_a_cursor_and_the_console_renders() {
    let api = api(None).await;
    for i in 0..3 {
        let body = format!(r#"{{"name": "p{i}"}}"#);
        let (status, _) = call(
            &api,
            "POST",
            "/api/machines/Job/instances",
            Some(&body),
            None,
        )
        .await;
        assert_eq!(status, 201);
    }
    let (_, body) = call(&api, "GET", "/api/instances?limit=2", None, None).await;
    let first = json(&body);
    assert_eq!(first["instances"][0]["instance"], "p2");
    assert_eq!(first["next_cursor"], "p1");
    let (_, body) = call(&api, "GET", "/api/instances?limit=2&cursor=p1", None, None).await;
    let second = json(&body);
    assert_eq!(second["instances"][0]["instance"], "p0");
    assert_eq!(second["next_cursor"], Value::Null);

    let (status, page) = call(&api, "GET", "/instances/p0", None, None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<h1>p0</h1>") && page.contains("id=\"cancel\""),
        "{page}"
    );
    let answer = form_post(&api, "/instances/p0/cancel", SAME_ORIGIN, "").await;
    let status: u16 = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert_eq!(status, 303, "the button redirects back to the page");
    let (_, page) = call(&api, "GET", "/instances/p0", None, None).await;
    assert!(page.contains("s-cancelled"), "{page}");
}

#[tokio::test]
async fn string_values_of_typed_keys_are_converted_at_start() {
    let api = api(None).await;
    // A string value of a typed key is converted, as `--set` converts it.
    let (status, body2) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"context": {"count": "2", "free": "2"}, "name": "typed"}"#),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body2}");
    let (_, typed) = call(&api, "GET", "/api/instances/typed", None, None).await;
    assert_eq!(json(&typed)["initial_context"]["count"], 2, "{typed}");
    assert_eq!(json(&typed)["initial_context"]["free"], "2", "{typed}");
    let (status, bad) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"context": {"count": "two"}}"#),
        None,
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad.contains("is not a whole number"), "{bad}");
}

/// One raw HTTP/1.1 request; the whole response (status line, headers, body).
async fn raw(api: &Api, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// A browser form `POST` (`extra` holds whole header lines, e.g. an `Origin`); the whole
/// response.
async fn form_post(api: &Api, path: &str, extra: &str, body: &str) -> String {
    raw(
        api,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

const SAME_ORIGIN: &str = "Origin: http://test\r\n";

const BASE64_TOKEN: &str = "q+7/Zk3=Lm9/Pw==+Xy";

#[tokio::test]
async fn login_works_for_tokens_with_plus_slash_and_equals() {
    let api = api(Some(BASE64_TOKEN)).await;
    let form = format!(
        "token={}",
        BASE64_TOKEN
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    );
    let response = form_post(&api, "/login", SAME_ORIGIN, &form).await;
    assert!(response.starts_with("HTTP/1.1 303"), "{response}");
    let cookie = response
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no cookie: {response}"))
        .to_string();
    // With the cookie the console's pages are served, not the login form again.
    let page = raw(
        &api,
        &format!("GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\nCookie: {cookie}\r\n\r\n"),
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<h1>Machines</h1>"), "{page}");
}

/// A GET carrying `headers` (whole header lines); the whole response.
async fn get_with(api: &Api, path: &str, headers: &str) -> String {
    raw(
        api,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n"),
    )
    .await
}

#[tokio::test]
async fn a_burst_of_wrong_tokens_is_refused_for_a_while_but_never_the_right_token() {
    let api = api(Some(BASE64_TOKEN)).await;
    // One throttle: wrong bearer tokens, wrong cookies on pages and wrong logins all count.
    let (status, _) = call(&api, "GET", "/api/machines", None, Some("guess-1")).await;
    assert_eq!(status, 401);
    let page = get_with(
        &api,
        "/",
        &format!(
            "Cookie: {}=guess-2\r\n",
            phasm::server::console::TOKEN_COOKIE
        ),
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 303"), "{page}");
    let response = form_post(&api, "/login", SAME_ORIGIN, "token=guess-3").await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    for _ in 3..phasm::server::auth::MAX_FAILURES {
        let (status, _) = call(&api, "GET", "/api/machines", None, Some("guess")).await;
        assert_eq!(status, 401);
    }
    // Now wrong tokens are refused at once, on the API, the pages and the login form.
    let (status, body) = call(&api, "GET", "/api/machines", None, Some("guess")).await;
    assert_eq!(status, 429, "{body}");
    assert!(json(&body)["error"]
        .as_str()
        .unwrap()
        .contains("too many wrong tokens"));
    let page = get_with(
        &api,
        "/",
        &format!("Cookie: {}=guess\r\n", phasm::server::console::TOKEN_COOKIE),
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 429"), "{page}");
    let response = form_post(&api, "/login", SAME_ORIGIN, "token=guess").await;
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("retry-after: "),
        "{response}"
    );
    // The right token still passes from the same address: behind a proxy, every client
    // shares it, and one guesser must not lock them out.
    let (status, body) = call(&api, "GET", "/api/machines", None, Some(BASE64_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let cookie = format!(
        "Cookie: {}={}\r\n",
        phasm::server::console::TOKEN_COOKIE,
        phasm::server::auth::cookie_value(BASE64_TOKEN)
    );
    let page = get_with(&api, "/", &cookie).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let form = format!("token={}", phasm::server::auth::cookie_value(BASE64_TOKEN));
    let response = form_post(&api, "/login", SAME_ORIGIN, &form).await;
    assert!(response.starts_with("HTTP/1.1 303"), "{response}");
}

/// Behind a trusted proxy the throttle is kept per forwarded address: one client's wrong
/// tokens do not refuse another's; from an untrusted peer the header is ignored.
#[tokio::test]
async fn behind_a_trusted_proxy_wrong_tokens_are_counted_per_forwarded_client() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let api = api_with(dir, store, Some(BASE64_TOKEN), None, &["127.0.0.1"]).await;
    let from = |client: &str, token: &str| {
        format!("X-Forwarded-For: {client}\r\nAuthorization: Bearer {token}\r\n")
    };
    for _ in 0..phasm::server::auth::MAX_FAILURES {
        let r = get_with(&api, "/api/machines", &from("203.0.113.7", "guess")).await;
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }
    let r = get_with(&api, "/api/machines", &from("203.0.113.7", "guess")).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    // Another client behind the same proxy is judged on its own.
    let r = get_with(&api, "/api/machines", &from("198.51.100.2", "guess")).await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    // A forged first hop is ignored: the proxy appended the real client last.
    let forged = "X-Forwarded-For: 198.51.100.9, 203.0.113.7\r\nAuthorization: Bearer guess\r\n";
    let r = get_with(&api, "/api/machines", forged).await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
}

#[test]
fn the_client_address_is_the_peers_unless_a_trusted_proxy_forwarded_it() {
    use axum::http::HeaderMap;
    use phasm::server::client_address;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", "1.2.3.4, 10.0.0.2".parse().unwrap());
    let proxies = [ip("10.0.0.1"), ip("10.0.0.2")];
    assert_eq!(
        client_address(ip("10.0.0.1"), &headers, &proxies),
        ip("1.2.3.4")
    );
    assert_eq!(
        client_address(ip("9.9.9.9"), &headers, &proxies),
        ip("9.9.9.9")
    );
    assert_eq!(
        client_address(ip("10.0.0.1"), &HeaderMap::new(), &proxies),
        ip("10.0.0.1")
    );
}

#[tokio::test]
async fn every_api_error_is_a_json_object() {
    let api = api(None).await;
    let cases: [(&str, &str, Option<&str>, u16, &str); 5] = [
        (
            "DELETE",
            "/api/machines",
            None,
            405,
            "method not allowed here; this path takes GET, HEAD",
        ),
        ("GET", "/api/instances?limit=-1", None, 400, "limit"),
        ("GET", "/api/instances/%FF%FE", None, 400, "UTF-8"),
        (
            "GET",
            "/api/instances?cursor=nobody-here",
            None,
            400,
            "unknown cursor `nobody-here`",
        ),
        (
            "GET",
            "/api/instances?cursor=bad%20name",
            None,
            400,
            "unknown cursor",
        ),
    ];
    for (method, path, body, want, says) in cases {
        let (status, text) = call(&api, method, path, body, None).await;
        assert_eq!(status, want, "{method} {path}: {text}");
        let message = json(&text)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(says), "{method} {path}: {text}");
    }
    // A body over the limit.
    let big = format!(
        r#"{{"context": {{"x": "{}"}}}}"#,
        "a".repeat(3 * 1024 * 1024)
    );
    let (status, text) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(&big),
        None,
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert!(json(&text)["error"].as_str().is_some(), "{text}");
    // A cursor that names an instance still pages.
    call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"name": "only"}"#),
        None,
    )
    .await;
    let (status, text) = call(&api, "GET", "/api/instances?cursor=only", None, None).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["instances"], serde_json::json!([]));
}

#[tokio::test]
async fn api_writes_must_be_json_and_console_forms_same_origin() {
    let api = api(None).await;
    // A cross-site `no-cors` POST can only send text/plain or form bodies.
    let body = r#"{"name": "from-elsewhere"}"#;
    let answer = raw(
        &api,
        &format!(
            "POST /api/machines/Job/instances HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    let (status, _) = call(&api, "GET", "/api/instances/from-elsewhere", None, None).await;
    assert_eq!(status, 404, "nothing was started");

    call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"name": "victim"}"#),
        None,
    )
    .await;
    for other in [
        "Origin: http://evil.example\r\n",
        "Origin: http://sub.test\r\n",
        "Origin: null\r\n",
        "Referer: http://evil.example/page\r\n",
        "",
    ] {
        let answer = form_post(&api, "/instances/victim/cancel", other, "").await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{other:?}: {answer}");
    }
    let (_, body) = call(&api, "GET", "/api/instances/victim", None, None).await;
    assert_eq!(json(&body)["status"], "running", "{body}");
    let answer = form_post(&api, "/instances/victim/cancel", SAME_ORIGIN, "").await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let (_, body) = call(&api, "GET", "/api/instances/victim", None, None).await;
    assert_eq!(json(&body)["status"], "cancelled", "{body}");
}

#[tokio::test]
async fn a_loopback_server_answers_only_to_loopback_names() {
    let api = api_with_hosts(&["localhost", "127.0.0.1", "[::1]"]).await;
    for (host, want) in [
        ("localhost:8080", "200"),
        ("127.0.0.1", "200"),
        ("[::1]:80", "200"),
        ("attacker.example", "421"),
        ("127.0.0.1.nip.example:8080", "421"),
    ] {
        let answer = raw(
            &api,
            &format!("GET /api/machines HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {want}")),
            "{host}: {answer}"
        );
    }
}

async fn api_with_hosts(hosts: &[&str]) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    api_with(dir, store, None, Some(hosts), &[]).await
}

#[tokio::test]
async fn history_and_logs_come_in_pages_and_the_instance_page_stays_small() {
    use phasm::engine::{Commit, Context, HistoryEntry, LogLine, NewTask, TaskKind};
    use phasm::store::{ClaimRequest, NewInstance, Targets};
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let now = 1_800_000_000_000_000;
    let start = NewTask {
        name: "big--start".into(),
        from_state: None,
        event: "pseudo-init".into(),
        kind: TaskKind::Dispatch,
        context: Context::new(),
        step: 0,
        branch: String::new(),
        queue: "default".into(),
        target: None,
        due_at: now,
        token: None,
    };
    store
        .start(
            now,
            NewInstance {
                name: "big".into(),
                machine: "Job".into(),
                context: Context::new(),
                start,
                version: None,
            },
        )
        .await
        .unwrap();
    let claim = ClaimRequest {
        owner: "w".into(),
        lease: std::time::Duration::from_secs(30),
        limit: 1,
        queue_limits: Vec::new(),
        queues: None,
        targets: Targets::Any,
        shared_limits: Vec::new(),
    };
    let task = store.claim(now, &claim).await.unwrap().remove(0);
    let mut commit = Commit::finishing(&task);
    commit.history = (0..250)
        .map(|i| HistoryEntry {
            from: Some("a".into()),
            event: "go".into(),
            to: format!("s{i}"),
            attempt: 0,
            started_at: now,
            finished_at: now,
            task: task.name.clone(),
            branch: String::new(),
            ends_branch: false,
        })
        .collect();
    commit.logs = (0..250)
        .map(|i| LogLine {
            at: now,
            level: "info".into(),
            message: if i == 0 {
                "y".repeat(1_000_000)
            } else {
                format!("line {i}")
            },
            task: task.name.clone(),
        })
        .collect();
    store.apply(now, commit.into(), None).await.unwrap();
    let api = api_with(dir, store, None, None, &[]).await;

    let mut seen = 0;
    let mut cursor = String::new();
    loop {
        let (status, body) = call(
            &api,
            "GET",
            &format!("/api/instances/big/history?limit=100&cursor={cursor}"),
            None,
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let page = json(&body);
        seen += page["history"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, 250);
    let (status, body) = call(&api, "GET", "/api/instances/big/logs", None, None).await;
    assert_eq!(status, 200);
    let page = json(&body);
    assert_eq!(page["logs"].as_array().unwrap().len(), 100);
    assert!(page["next_cursor"].is_string());
    assert!(
        body.len() < 100_000,
        "the 1 MB message is cut: {} bytes",
        body.len()
    );
    let (status, body) = call(&api, "GET", "/api/instances/big/logs?cursor=x", None, None).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = call(&api, "GET", "/api/instances/nobody/history", None, None).await;
    assert_eq!(status, 404);

    let (status, page) = call(&api, "GET", "/instances/big", None, None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("150 earlier transitions are not shown"),
        "{page:.2000}"
    );
    assert!(page.contains("id=\"log-next\""), "{page:.2000}");
    assert!(page.len() < 150_000, "the page is {} bytes", page.len());
}

#[tokio::test]
async fn a_batch_starts_every_context_or_none() {
    let api = api(None).await;
    let (status, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(r#"{"contexts": [{"count": "1"}, {"count": 2}, {}]}"#),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let reply = json(&body);
    assert_eq!(reply["created"], 3);
    let names: Vec<String> = reply["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3);
    let (_, body) = call(
        &api,
        "GET",
        &format!("/api/instances/{}", names[0]),
        None,
        None,
    )
    .await;
    assert_eq!(
        json(&body)["initial_context"]["count"],
        1,
        "typed as a start is"
    );

    // One bad context: nothing of the request is started.
    let (status, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(r#"{"contexts": [{"count": 5}, {"count": "five"}]}"#),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("contexts[1]") && body.contains("nothing was started"),
        "{body}"
    );
    let (status, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(r#"{"contexts": [{"count": 5}, 7]}"#),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (_, body) = call(&api, "GET", "/api/instances?limit=100", None, None).await;
    assert_eq!(json(&body)["instances"].as_array().unwrap().len(), 3);

    // The limits: an unknown machine, too many contexts, a body that is not a batch.
    let (status, _) = call(
        &api,
        "POST",
        "/api/machines/Nope/instances/batch",
        Some(r#"{"contexts": [{}]}"#),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let many = format!(r#"{{"contexts": [{}{{}}]}}"#, "{},".repeat(10_000));
    let (status, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(&many),
        None,
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let (status, _) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(r#"{"context": {}}"#),
        None,
    )
    .await;
    assert_eq!(status, 400);

    // 10,000 at once, in one request larger than a single start may be.
    let lines: Vec<String> = (0..10_000)
        .map(|i| format!(r#"{{"count": {i}, "pad": "{}"}}"#, "x".repeat(200)))
        .collect();
    let big = format!(r#"{{"contexts": [{}]}}"#, lines.join(","));
    assert!(big.len() > phasm::server::MAX_BODY_BYTES);
    let (status, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(&big),
        None,
    )
    .await;
    assert_eq!(status, 201, "{}", &body[..body.len().min(300)]);
    assert_eq!(json(&body)["created"], 10_000);
}

/// A batch sent again — its answer lost, say — starts nothing twice: with an idempotency key
/// its unnamed items are named from the key, and items may carry names of their own.
#[tokio::test]
async fn a_batch_sent_again_with_its_key_or_names_starts_nothing_twice() {
    let api = api(None).await;
    let body = r#"{"key": "import-7", "contexts": [{"count": 1}, {"name": "mine", "context": {"count": 2}}]}"#;
    let (status, first) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(body),
        None,
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(json(&first)["created"], 2);
    assert_eq!(
        json(&first)["instances"],
        serde_json::json!(["Job-import-7-0", "mine"])
    );
    let (status, again) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(body),
        None,
    )
    .await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(json(&again)["created"], 0, "{again}");
    assert_eq!(json(&again)["instances"], json(&first)["instances"]);
    let (_, list) = call(&api, "GET", "/api/instances?limit=100", None, None).await;
    assert_eq!(json(&list)["instances"].as_array().unwrap().len(), 2);
    for bad in [
        r#"{"key": "bad key", "contexts": [{}]}"#,
        r#"{"contexts": [{"name": "par.s1.2", "context": {}}]}"#,
        r#"{"contexts": [{"name": 5, "context": {}}]}"#,
    ] {
        let (status, body) = call(
            &api,
            "POST",
            "/api/machines/Job/instances/batch",
            Some(bad),
            None,
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

const WAITING_YAML: &str = "state_machines:\n- name: Approve\n  states:\n  - name: approval\n    initial: true\n    wait: true\n    transitions:\n    - event: approved\n      to: done\n  - name: done\n    final: true\n";

/// Serve the waiting machine (`WAITING_YAML`) on a free port, with the store and
/// configuration behind it (to run steps as a worker would).
async fn waiting_api(token: Option<&str>) -> (Api, Arc<SqliteStore>, Arc<phasm::machine::Config>) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let config = Arc::new(
        load_str(
            WAITING_YAML,
            dir.path().join("fsm.yaml"),
            &LoadOptions::default(),
        )
        .unwrap()
        .config,
    );
    let state = Arc::new(ServerState {
        store: Arc::clone(&store) as Arc<dyn phasm::store::Store>,
        config: Arc::clone(&config),
        clock: Arc::new(SystemClock),
        limits: Limits::default(),
        token: token.map(str::to_string),
        metrics: None,
        throttle: Default::default(),
        allowed_hosts: None,
        trusted_proxies: Vec::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));
    (Api { addr, _dir: dir }, store, config)
}

/// Run the start task of `name` as a worker would: the instance then waits in `approval`.
async fn begin_waiting(store: &SqliteStore, config: &phasm::machine::Config, name: &str) {
    let commit = run_step(store, config, name).await;
    assert_eq!(commit.waits.len(), 1, "{commit:?}");
}

/// Run the due step of `name` as a worker would; the commit it applied.
async fn run_step(
    store: &SqliteStore,
    config: &phasm::machine::Config,
    name: &str,
) -> phasm::engine::Commit {
    use phasm::clock::Clock;
    let request = phasm::store::ClaimRequest {
        owner: "test".into(),
        lease: std::time::Duration::from_secs(30),
        limit: 1,
        queue_limits: Vec::new(),
        queues: None,
        targets: phasm::store::Targets::Any,
        shared_limits: Vec::new(),
    };
    let now = SystemClock.now();
    let task = store.claim(now, &request).await.unwrap().remove(0);
    assert_eq!(task.instance, name);
    let machine = config.machine("Approve").unwrap();
    let plan = phasm::engine::plan(machine, &task).unwrap();
    let commit = phasm::engine::complete(
        machine,
        config,
        &task,
        &plan,
        phasm::engine::Outcome {
            context: task.context.clone(),
            ..Default::default()
        },
        phasm::engine::StepTimes {
            started_at: now,
            now,
        },
        &mut fastrand::Rng::with_seed(1),
        &Limits::default(),
    );
    store.apply(now, commit.clone().into(), None).await.unwrap();
    commit
}

#[tokio::test]
async fn events_reach_waiting_instances_by_name_or_by_wait_token() {
    let token = "a-long-enough-api-token";
    let (api, store, config) = waiting_api(Some(token)).await;
    let auth = Some(token);
    for name in ["a1", "a2"] {
        let body = format!(r#"{{"name": "{name}"}}"#);
        let (code, _) = call(
            &api,
            "POST",
            "/api/machines/Approve/instances",
            Some(&body),
            auth,
        )
        .await;
        assert_eq!(code, 201);
        begin_waiting(&store, &config, name).await;
    }
    let (code, body) = call(&api, "GET", "/api/instances/a1", None, auth).await;
    assert_eq!(code, 200);
    assert_eq!(
        json(&body)["waiting"][0]["events"],
        serde_json::json!(["approved"])
    );

    let approve = r#"{"event": "approved", "data": {"by": "ana"}, "id": "m-1"}"#;
    let (code, _) = call(
        &api,
        "POST",
        "/api/instances/a1/events",
        Some(approve),
        None,
    )
    .await;
    assert_eq!(code, 401, "the API token is asked for");
    let (code, body) = call(
        &api,
        "POST",
        "/api/instances/a1/events",
        Some(approve),
        auth,
    )
    .await;
    assert_eq!(
        (code, json(&body)["delivered"].clone()),
        (202, 1.into()),
        "{body}"
    );
    let (code, body) = call(
        &api,
        "POST",
        "/api/instances/a1/events",
        Some(approve),
        auth,
    )
    .await;
    assert_eq!(
        (code, json(&body)["duplicate"].clone()),
        (200, true.into()),
        "{body}"
    );
    let (code, body) = call(
        &api,
        "POST",
        "/api/instances/a1/events",
        Some(r#"{"event": "approved"}"#),
        auth,
    )
    .await;
    // No wait now, and its pending step (approval → done) ends it: the event would be kept
    // for nothing, so the answer says so instead of "kept".
    assert_eq!(code, 409, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("will not wait for `approved` again"),
        "{body}"
    );
    let (code, body) = call(
        &api,
        "POST",
        "/api/instances/a1/events",
        Some(r#"{"event": "refused"}"#),
        auth,
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        json(&body)["error"].as_str().unwrap().contains("approved"),
        "{body}"
    );
    for bad in [
        r#"{"event": "approved", "data": [1]}"#,
        r#"{"data": {}}"#,
        r#"{"event": "approved", "extra": 1}"#,
        "[]",
    ] {
        let (code, body) = call(&api, "POST", "/api/instances/a1/events", Some(bad), auth).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    let (code, _) = call(
        &api,
        "POST",
        "/api/instances/nobody/events",
        Some(approve),
        auth,
    )
    .await;
    assert_eq!(code, 404);

    let view = store.instance("a2").await.unwrap().unwrap();
    let key = store.wait_key().await.unwrap();
    let wait_token = phasm::token::wait_token(&key, "a2", &view.waiting[0].task);
    let path = format!("/api/waits/{wait_token}");
    let (code, body) = call(&api, "POST", &path, Some(r#"{"event": "approved"}"#), None).await;
    assert_eq!(code, 202, "the wait token is the credential: {body}");
    let (code, body) = call(&api, "POST", &path, Some(r#"{"event": "approved"}"#), None).await;
    assert_eq!(code, 409, "that wait is over: {body}");
    let forged = format!("/api/waits/{}x", &wait_token[..wait_token.len() - 1]);
    let (code, _) = call(
        &api,
        "POST",
        &forged,
        Some(r#"{"event": "approved"}"#),
        None,
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_machine_page_counts_its_instances_and_starts_new_ones() {
    let api = api(None).await;
    let (status, page) = call(&api, "GET", "/machines/Job", None, None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("id=\"counts\""), "{page}");
    assert!(page.contains("No running or failed instance."), "{page}");
    assert!(
        page.contains("<td><code>A</code></td>"),
        "the action and its binding: {page}"
    );
    assert!(
        page.contains("a Rust handler registered by the program"),
        "{page}"
    );
    assert!(page.contains("<pre id=\"yaml\">"), "{page}");
    assert!(page.contains("name: Job"), "{page}");
    assert!(page.contains("<caption>Schedules</caption>"), "{page}");
    assert!(page.contains("Typed keys: count (int)"), "{page}");
    assert!(
        page.contains("initial state (thick green border)"),
        "the key: {page}"
    );
    assert!(page.contains("where branches are now"), "{page}");
    let (status, _) = call(&api, "GET", "/machines/Nope", None, None).await;
    assert_eq!(status, 404);

    // The start form: a typed value given as a string is converted; the browser goes to the
    // new instance's page.
    let started = form_post(
        &api,
        "/machines/Job/start",
        SAME_ORIGIN,
        "context=%7B%22count%22%3A+%222%22%7D&name=from-form",
    )
    .await;
    assert!(started.starts_with("HTTP/1.1 303"), "{started}");
    assert!(
        started.contains("location: /instances/from-form"),
        "{started}"
    );
    let (_, body) = call(&api, "GET", "/api/instances/from-form", None, None).await;
    assert_eq!(json(&body)["context"]["count"], 2, "{body}");
    // The machine page now counts it where it is: entering the initial state.
    let (_, page) = call(&api, "GET", "/machines/Job", None, None).await;
    assert!(page.contains("<td>a</td><td>1</td><td>0</td>"), "{page}");
    let (status, svg) = call(&api, "GET", "/machines/Job/graph.svg", None, None).await;
    assert_eq!(status, 200);
    assert!(
        svg.contains("● 1 running"),
        "the count is drawn in its state: {svg}"
    );
    assert!(svg.contains("<title>Job</title>"), "{svg}");
    assert!(!svg.contains("do: A"), "{svg}");
    let (_, svg) = call(&api, "GET", "/machines/Job/graph.svg?actions=1", None, None).await;
    assert!(svg.contains("do: A"), "the state's action is drawn: {svg}");
    let (_, page) = call(&api, "GET", "/machines/Job?actions=1", None, None).await;
    assert!(page.contains("graph.svg?actions=1"), "{page}");

    // Mistakes come back on the form, with what was typed, as a 400.
    for (body, says) in [
        ("context=%7B%22count%22%3A", "The context is not JSON"),
        (
            "context=%5B1%5D",
            "The context must be a JSON object, not [1]",
        ),
        ("context=%7B%22count%22%3A+%22two%22%7D", "count"),
        ("context=%7B%7D&name=bad+name", "invalid instance name"),
    ] {
        let answer = form_post(&api, "/machines/Job/start", SAME_ORIGIN, body).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{body}: {answer}");
        assert!(answer.contains("id=\"start-error\""), "{answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    // From another origin: refused before anything starts.
    let foreign = form_post(
        &api,
        "/machines/Job/start",
        "Origin: http://evil.example\r\n",
        "context=%7B%7D&name=evil",
    )
    .await;
    assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
    let (status, _) = call(&api, "GET", "/api/instances/evil", None, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn workers_and_queues_pages_and_api() {
    let api = api(None).await;
    let (status, page) = call(&api, "GET", "/workers", None, None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("No worker is running on this database"),
        "{page}"
    );
    let (status, _) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"name": "q1"}"#),
        None,
    )
    .await;
    assert_eq!(status, 201);
    let (status, page) = call(&api, "GET", "/queues", None, None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("<td>default</td><td>1</td><td>0</td><td>0</td>"),
        "{page}"
    );
    let (status, body) = call(&api, "GET", "/api/queues", None, None).await;
    assert_eq!(status, 200);
    let queues = json(&body);
    assert_eq!(queues["queues"][0]["queue"], "default", "{queues}");
    assert_eq!(queues["queues"][0]["due"], 1, "{queues}");
    assert_eq!(queues["parked"], 0);
}

#[tokio::test]
async fn the_instance_list_filters_and_bulk_actions_act_on_what_it_shows() {
    let api = api(None).await;
    for name in ["ord-1", "ord-2", "ord-3", "other-1"] {
        let body = format!(r#"{{"name": "{name}"}}"#);
        let (status, _) = call(
            &api,
            "POST",
            "/api/machines/Job/instances",
            Some(&body),
            None,
        )
        .await;
        assert_eq!(status, 201);
    }
    // Search by prefix, with the state each is in (entering `a`, the initial state).
    let (status, body) = call(
        &api,
        "GET",
        "/api/instances?prefix=ord-&machine=Job&state=a",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let listed = json(&body);
    let names: Vec<&str> = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ord-3", "ord-2", "ord-1"]);
    assert_eq!(listed["instances"][0]["state"], "a");
    assert_eq!(listed["instances"][0]["steps"], 0);
    let (_, body) = call(
        &api,
        "GET",
        "/api/instances?machine=Job&state=b",
        None,
        None,
    )
    .await;
    assert_eq!(json(&body)["instances"], serde_json::json!([]));
    // Mistakes are named.
    for (query, says) in [
        ("state=a", "`state` needs a `machine`"),
        ("machine=Job&state=zz", "has no state `zz`"),
        ("stuck=soon", "`stuck`"),
        ("created_after=yesterday", "`created_after`"),
        ("order=random", "unknown order"),
    ] {
        let (status, body) =
            call(&api, "GET", &format!("/api/instances?{query}"), None, None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    // The console's list: the same filters in the URL, a row per instance.
    let (status, page) = call(
        &api,
        "GET",
        "/instances?prefix=ord-&machine=Job",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("value=\"ord-2\""), "a box per row: {page}");
    assert!(!page.contains("value=\"other-1\""), "{page}");
    let (status, page) = call(&api, "GET", "/instances?machine=Job&state=zz", None, None).await;
    assert_eq!(status, 400);
    assert!(page.contains("id=\"filter-error\""), "{page}");

    // Bulk cancel of everything the filters match: first a confirmation that says how many,
    // then the action.
    let ask = form_post(
        &api,
        "/instances/bulk",
        SAME_ORIGIN,
        "action=cancel-all&prefix=ord-&machine=Job",
    )
    .await;
    assert!(ask.starts_with("HTTP/1.1 200"), "{ask}");
    assert!(ask.contains("Cancel 3 instances?"), "{ask}");
    let (_, body) = call(&api, "GET", "/api/instances/ord-1", None, None).await;
    assert_eq!(
        json(&body)["status"],
        "running",
        "nothing happens before the confirmation"
    );
    let done = form_post(
        &api,
        "/instances/bulk",
        SAME_ORIGIN,
        "action=cancel-all&prefix=ord-&machine=Job&confirm=yes",
    )
    .await;
    assert!(done.contains("3 of 3 instances cancelled"), "{done}");
    for name in ["ord-1", "ord-2", "ord-3"] {
        let (_, body) = call(&api, "GET", &format!("/api/instances/{name}"), None, None).await;
        assert_eq!(json(&body)["status"], "cancelled", "{name}");
    }
    let (_, body) = call(&api, "GET", "/api/instances/other-1", None, None).await;
    assert_eq!(json(&body)["status"], "running", "outside the filter");
    // A selection: retrying cancelled instances is refused, and said so.
    let done = form_post(
        &api,
        "/instances/bulk",
        SAME_ORIGIN,
        "action=retry-selected&name=ord-1&name=ord-2&confirm=yes",
    )
    .await;
    assert!(done.contains("0 of 2 instances retried"), "{done}");
    assert!(done.contains("ord-1 (cancelled)"), "{done}");
    let none = form_post(
        &api,
        "/instances/bulk",
        SAME_ORIGIN,
        "action=retry-selected",
    )
    .await;
    assert!(none.starts_with("HTTP/1.1 400"), "{none}");
    let foreign = form_post(
        &api,
        "/instances/bulk",
        "Origin: http://evil.example\r\n",
        "action=cancel-all&confirm=yes",
    )
    .await;
    assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
    let (_, body) = call(&api, "GET", "/api/instances/other-1", None, None).await;
    assert_eq!(json(&body)["status"], "running");
}

#[tokio::test]
async fn an_instance_page_sends_events_starts_again_and_draws_the_path() {
    let (api, store, config) = waiting_api(None).await;
    let body = r#"{"name": "w1", "context": {"order": 7}}"#;
    let (status, _) = call(
        &api,
        "POST",
        "/api/machines/Approve/instances",
        Some(body),
        None,
    )
    .await;
    assert_eq!(status, 201);
    begin_waiting(&store, &config, "w1").await;

    let (_, page) = call(&api, "GET", "/instances/w1", None, None).await;
    assert!(
        page.contains("id=\"send\""),
        "a waiting instance has a send form: {page}"
    );
    assert!(page.contains("<option>approved</option>"), "{page}");
    assert!(page.contains("now in <strong>approval</strong>"), "{page}");
    assert!(page.contains("running for "), "{page}");
    assert!(page.contains("download=\"w1.json\""), "{page}");
    assert!(page.contains("id=\"again\""), "{page}");
    // A bad event is explained, and nothing is sent.
    let refused = form_post(
        &api,
        "/instances/w1/events",
        SAME_ORIGIN,
        "event=rejected&data=%7B%7D",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 409"), "{refused}");
    assert!(refused.contains("accepts event `rejected`"), "{refused}");
    let bad = form_post(
        &api,
        "/instances/w1/events",
        SAME_ORIGIN,
        "event=approved&data=%5B%5D",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    // The form's event is delivered: the wait ends and its dispatch is queued.
    let sent = form_post(
        &api,
        "/instances/w1/events",
        SAME_ORIGIN,
        "event=approved&data=%7B%22by%22%3A+%22ann%22%7D&id=e-1",
    )
    .await;
    assert!(sent.starts_with("HTTP/1.1 303"), "{sent}");
    let (_, body) = call(&api, "GET", "/api/instances/w1", None, None).await;
    let view = json(&body);
    assert_eq!(view["waiting"], serde_json::json!([]), "{view}");
    assert_eq!(view["tasks"][0]["event"], "approved", "{view}");
    assert_eq!(view["context"]["order"], 7);
    // Once the approved step has run, the graph shows the path: the state passed through,
    // and where the instance ended.
    run_step(&store, &config, "w1").await;
    let (_, body) = call(&api, "GET", "/api/instances/w1", None, None).await;
    assert_eq!(json(&body)["status"], "completed", "{body}");
    let (_, svg) = call(&api, "GET", "/instances/w1/graph.svg", None, None).await;
    assert!(svg.contains("✓ passed"), "{svg}");
    assert!(svg.contains("■ ended here"), "{svg}");
    // Every transition, a page at a time.
    let (status, page) = call(&api, "GET", "/instances/w1/history", None, None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<table id=\"history\">"), "{page}");
    assert!(page.contains("<td>approved</td><td>done</td>"), "{page}");
    assert!(!page.contains("history-next"), "one page: {page}");
    let (status, _) = call(&api, "GET", "/instances/nobody/history", None, None).await;
    assert_eq!(status, 404);
    // A new instance with the same input.
    let again = form_post(
        &api,
        "/machines/Approve/start",
        SAME_ORIGIN,
        "context=%7B%22order%22%3A7%7D",
    )
    .await;
    assert!(again.starts_with("HTTP/1.1 303"), "{again}");
    let location = again
        .lines()
        .find_map(|l| l.strip_prefix("location: /instances/"))
        .expect("a location")
        .trim()
        .to_string();
    assert_ne!(location, "w1");
    let (_, body) = call(
        &api,
        "GET",
        &format!("/api/instances/{location}"),
        None,
        None,
    )
    .await;
    assert_eq!(json(&body)["context"]["order"], 7, "{body}");
}

#[tokio::test]
async fn cancelling_keeps_its_reason() {
    let api = api(None).await;
    for name in ["c1", "c2", "c3"] {
        let body = format!(r#"{{"name": "{name}"}}"#);
        let (status, _) = call(
            &api,
            "POST",
            "/api/machines/Job/instances",
            Some(&body),
            None,
        )
        .await;
        assert_eq!(status, 201);
    }
    let (status, body) = call(
        &api,
        "POST",
        "/api/instances/c1/cancel",
        Some(r#"{"reason": "ordered twice"}"#),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = call(&api, "GET", "/api/instances/c1", None, None).await;
    assert_eq!(json(&body)["error"], "ordered twice", "{body}");
    // No body still cancels; a wrong body is refused and cancels nothing.
    let (status, body) = call(
        &api,
        "POST",
        "/api/instances/c2/cancel",
        Some(r#"{"why": 1}"#),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (_, body) = call(&api, "GET", "/api/instances/c2", None, None).await;
    assert_eq!(json(&body)["status"], "running");
    let (status, _) = call(&api, "POST", "/api/instances/c2/cancel", None, None).await;
    assert_eq!(status, 200);
    // The console's form.
    let page = form_post(
        &api,
        "/instances/c3/cancel",
        SAME_ORIGIN,
        "reason=customer+asked",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 303"), "{page}");
    let (_, body) = call(&api, "GET", "/api/instances/c3", None, None).await;
    assert_eq!(json(&body)["error"], "customer asked", "{body}");
    assert_eq!(json(&body)["status"], "cancelled");
}

#[tokio::test]
async fn a_step_shows_its_contexts_and_a_reset_runs_the_instance_again_from_it() {
    let (api, store, config) = waiting_api(None).await;
    let body = r#"{"name": "r1", "context": {"order": 7}}"#;
    let (status, _) = call(
        &api,
        "POST",
        "/api/machines/Approve/instances",
        Some(body),
        None,
    )
    .await;
    assert_eq!(status, 201);
    begin_waiting(&store, &config, "r1").await;
    let sent = r#"{"event": "approved", "data": {"by": "ann"}}"#;
    let (status, answer) = call(&api, "POST", "/api/instances/r1/events", Some(sent), None).await;
    assert_eq!(status, 202, "{answer}");
    run_step(&store, &config, "r1").await;

    // The queue's rate counts the steps just committed (two in the last minute).
    let (_, body) = call(&api, "GET", "/api/queues", None, None).await;
    let queues = json(&body);
    let rate = queues["queues"][0]["steps_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!((rate - 2.0 / 60.0).abs() < 1e-6, "{queues}");
    let (_, page) = call(&api, "GET", "/queues", None, None).await;
    assert!(
        page.contains("steps/s (last minute)") && page.contains("<td>0.0</td>"),
        "{page}"
    );
    // Each step has an id, its input, and what it passed on.
    let (_, body) = call(&api, "GET", "/api/instances/r1/history", None, None).await;
    let history = json(&body)["history"].clone();
    let ids: Vec<i64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{history}");
    let (status, body) = call(
        &api,
        "GET",
        &format!("/api/instances/r1/history/{}", ids[0]),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let first = json(&body);
    assert_eq!(first["given"]["order"], 7, "{first}");
    assert_eq!(first["passed_on"]["to"], "step", "{first}");
    assert_eq!(first["passed_on"]["id"], ids[1], "{first}");
    assert_eq!(first["passed_on"]["context"]["by"], "ann", "{first}");
    let (_, body) = call(
        &api,
        "GET",
        &format!("/api/instances/r1/history/{}", ids[1]),
        None,
        None,
    )
    .await;
    assert_eq!(json(&body)["passed_on"]["to"], "nothing", "{body}");
    for (path, code) in [
        ("/api/instances/r1/history/999999", 404),
        ("/api/instances/r1/history/abc", 400),
        ("/api/instances/nobody/history/1", 404),
    ] {
        let (status, body) = call(&api, "GET", path, None, None).await;
        assert_eq!(status, code, "{path}: {body}");
    }
    // Branch filter: the main line has both steps, another branch none.
    let (_, body) = call(&api, "GET", "/api/instances/r1/history?branch=", None, None).await;
    assert_eq!(
        json(&body)["history"].as_array().unwrap().len(),
        2,
        "{body}"
    );
    let (_, body) = call(
        &api,
        "GET",
        "/api/instances/r1/history?branch=f1-1",
        None,
        None,
    )
    .await;
    assert_eq!(json(&body)["history"], serde_json::json!([]), "{body}");

    // The console's step page shows both contexts and the reset form; the instance page
    // draws the timeline and links each step.
    let (status, page) = call(
        &api,
        "GET",
        &format!("/instances/r1/steps/{}", ids[0]),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"given\""), "{page}");
    assert!(
        page.contains("&quot;by&quot;: &quot;ann&quot;") || page.contains("\"by\": \"ann\""),
        "{page}"
    );
    assert!(page.contains("id=\"reset\""), "{page}");
    let (_, page) = call(&api, "GET", "/instances/r1", None, None).await;
    assert!(page.contains("id=\"timeline\""), "{page}");
    assert!(
        page.contains(" steps") && page.contains(" after "),
        "the header: {page}"
    );
    assert!(
        page.contains(&format!("/instances/r1/steps/{}", ids[1])),
        "{page}"
    );
    let (_, page) = call(&api, "GET", "/machines/Approve", None, None).await;
    assert!(page.contains("id=\"rates\""), "{page}");

    // Bad ids are explained on a page, not answered with a bare rejection.
    let (status, page) = call(&api, "GET", "/instances/r1/steps/abc", None, None).await;
    assert_eq!(status, 400);
    assert!(
        page.contains("is not a step&#39;s id") || page.contains("is not a step's id"),
        "{page}"
    );
    let bad = form_post(
        &api,
        "/instances/r1/reset",
        SAME_ORIGIN,
        "step=abc&confirm=yes",
    )
    .await;
    assert!(
        bad.starts_with("HTTP/1.1 400") && bad.contains("<html"),
        "{bad}"
    );
    // So are the extractors' own rejections (a history cursor that is not a number).
    let (status, page) = call(&api, "GET", "/instances/r1/history?cursor=abc", None, None).await;
    assert_eq!(status, 400);
    assert!(page.contains("<html") && page.contains("cursor"), "{page}");
    // A reset needs the confirmation, then runs the instance again from the chosen step.
    let unconfirmed = form_post(
        &api,
        "/instances/r1/reset",
        SAME_ORIGIN,
        &format!("step={}", ids[1]),
    )
    .await;
    assert!(unconfirmed.starts_with("HTTP/1.1 400"), "{unconfirmed}");
    let reset = form_post(
        &api,
        "/instances/r1/reset",
        SAME_ORIGIN,
        &format!("step={}&confirm=yes", ids[1]),
    )
    .await;
    assert!(reset.starts_with("HTTP/1.1 303"), "{reset}");
    let (_, body) = call(&api, "GET", "/api/instances/r1", None, None).await;
    let view = json(&body);
    assert_eq!(view["status"], "running", "{view}");
    assert_eq!(view["tasks"][0]["event"], "approved", "{view}");
    run_step(&store, &config, "r1").await;
    let (_, body) = call(&api, "GET", "/api/instances/r1", None, None).await;
    assert_eq!(json(&body)["status"], "completed", "{body}");
    assert_eq!(json(&body)["context"]["order"], 7);

    // Over the API, from the start: the instance waits for its approval again.
    let (status, body) = call(
        &api,
        "POST",
        "/api/instances/r1/reset",
        Some(&format!(r#"{{"step": {}}}"#, ids[0])),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        json(&body)["note"].as_str().unwrap().contains("step"),
        "{body}"
    );
    begin_waiting(&store, &config, "r1").await;
    for (body, code) in [
        (r#"{"step": 999999}"#.to_string(), 404),
        (r#"{"stp": 1}"#.to_string(), 400),
        ("[]".to_string(), 400),
    ] {
        let (status, answer) =
            call(&api, "POST", "/api/instances/r1/reset", Some(&body), None).await;
        assert_eq!(status, code, "{body}: {answer}");
        assert!(json(&answer)["error"].is_string(), "{answer}");
    }
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_the_api_answers() {
    let api = api(Some("s3cret")).await;
    let (status, _) = call(&api, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(
        status, 401,
        "the document is behind the token like the rest of /api"
    );
    let (status, body) = call(&api, "GET", "/api/openapi.json", None, Some("s3cret")).await;
    assert_eq!(status, 200, "{body}");
    let doc = json(&body);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.push((method.to_uppercase(), path.clone()));
            assert!(op["summary"].is_string(), "{method} {path} has a summary");
            let open = path == "/healthz" || path.starts_with("/api/waits/");
            assert_eq!(
                op["responses"].get("401").is_some(),
                !open,
                "{method} {path}: the token's 401 is documented where the token is asked"
            );
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|c| c.starts_with('2')),
                "{method} {path}: a success"
            );
            if path != "/api/machines" && path != "/api/openapi.json" {
                let errors: Vec<_> = responses
                    .iter()
                    .filter(|(c, _)| !c.starts_with('2'))
                    .collect();
                assert!(!errors.is_empty(), "{method} {path} documents its errors");
                for (code, r) in errors {
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {code}"
                    );
                }
            }
        }
    }
    documented.sort();
    // The API as the README lists it: a route added or removed changes this list.
    let mut expected: Vec<(String, String)> = [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/api/openapi.json"),
        ("GET", "/api/machines"),
        ("GET", "/api/machines/{machine}/graph.svg"),
        ("GET", "/api/machines/{machine}/versions"),
        ("GET", "/api/machines/{machine}/versions/{version}"),
        ("POST", "/api/machines/{machine}/upgrade"),
        ("POST", "/api/instances/{name}/upgrade"),
        ("POST", "/api/machines/{machine}/instances"),
        ("POST", "/api/machines/{machine}/instances/batch"),
        ("GET", "/api/instances"),
        ("GET", "/api/instances/{name}"),
        ("GET", "/api/instances/{name}/history"),
        ("GET", "/api/instances/{name}/history/{id}"),
        ("GET", "/api/instances/{name}/logs"),
        ("POST", "/api/instances/{name}/cancel"),
        ("POST", "/api/instances/{name}/retry"),
        ("POST", "/api/instances/{name}/reset"),
        ("POST", "/api/instances/{name}/events"),
        ("POST", "/api/waits/{token}"),
        ("GET", "/api/workers"),
        ("GET", "/api/queues"),
        ("GET", "/api/schedules"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    expected.sort();
    assert_eq!(documented, expected);
    // Every documented route is served: no 405, and not the fallback for unknown paths.
    for (method, path) in &documented {
        let concrete = path
            .replace("{machine}", "Job")
            .replace("{name}", "nobody")
            .replace("{id}", "1")
            .replace("{token}", "not-a-token");
        let body = (method == "POST").then_some("{}");
        let (status, answer) = call(&api, method, &concrete, body, Some("s3cret")).await;
        assert_ne!(status, 405, "{method} {concrete}: {answer}");
        assert!(
            !answer.contains("no such endpoint"),
            "{method} {concrete}: {answer}"
        );
    }
    // And a route that is not documented is not served.
    let (status, answer) = call(&api, "GET", "/api/nothing-here", None, Some("s3cret")).await;
    assert_eq!(status, 404);
    assert!(answer.contains("no such endpoint"), "{answer}");
}

/// Every answer — pages, API, login, errors, the script — forbids framing (clickjacking),
/// scripts from anywhere but the server, type sniffing and cross-site referrers; and no page
/// carries an inline script the policy would have to allow.
#[tokio::test]
async fn every_answer_carries_the_browser_protection_headers() {
    let api = api(None).await;
    let out = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some("{\"name\": \"i1\"}"),
        None,
    )
    .await;
    assert_eq!(out.0, 201, "{}", out.1);
    for path in [
        "/",
        "/instances",
        "/instances?refresh=1",
        "/instances/i1",
        "/login",
        "/api/machines",
        "/api/nowhere",
        phasm::server::console::SCRIPT_PATH,
    ] {
        let response = get_with(&api, path, "").await;
        let head = response
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .to_ascii_lowercase();
        for header in [
            "x-frame-options: deny",
            "content-security-policy: default-src 'self'; script-src 'self';",
            "frame-ancestors 'none'",
            "x-content-type-options: nosniff",
            "referrer-policy: same-origin",
        ] {
            assert!(head.contains(header), "{path} lacks `{header}`:\n{head}");
        }
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        for (i, _) in body.match_indices("<script") {
            let tag = &body[i..body[i..].find('>').map_or(body.len(), |e| i + e)];
            assert!(tag.contains("src=\""), "{path} has an inline script: {tag}");
        }
    }
    let script = get_with(&api, phasm::server::console::SCRIPT_PATH, "").await;
    assert!(script.contains("text/javascript"), "{script}");
    assert!(
        script.contains("data-refresh") || script.contains("[data-refresh]"),
        "{script}"
    );
}

/// The routes that need no bearer token read little: a wait token whose signature does not
/// check is refused before its body is read, a wait's body and a login form are small.
#[tokio::test]
async fn unauthenticated_routes_read_small_bodies_and_only_for_signed_tokens() {
    let api = api(Some(BASE64_TOKEN)).await;
    // A forged token, with a body that never comes: refused at once.
    let forged = raw(
        &api,
        "POST /api/waits/forged-token HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 404"), "{forged}");
    let big = "x".repeat(phasm::server::MAX_LOGIN_BODY_BYTES + 10);
    let response = form_post(&api, "/login", SAME_ORIGIN, &format!("token={big}")).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
}

/// A wait token stops working when its wait ends, and does not come back to life when the
/// same wait is begun again by a reset (it changed an amount once): the new wait has a token
/// of its own.
#[tokio::test]
async fn a_wait_token_dies_with_its_wait_even_when_a_reset_begins_the_wait_again() {
    let (api, store, config) = waiting_api(None).await;
    let (code, _) = call(
        &api,
        "POST",
        "/api/machines/Approve/instances",
        Some(r#"{"name": "r1"}"#),
        None,
    )
    .await;
    assert_eq!(code, 201);
    begin_waiting(&store, &config, "r1").await;
    let key = store.wait_key().await.unwrap();
    let first = store.instance("r1").await.unwrap().unwrap().waiting[0]
        .task
        .clone();
    let old = format!(
        "/api/waits/{}",
        phasm::token::wait_token(&key, "r1", &first)
    );
    let approve = r#"{"event": "approved", "data": {"amount": 999}}"#;
    let (code, body) = call(&api, "POST", &old, Some(approve), None).await;
    assert_eq!(code, 202, "{body}");
    run_step(&store, &config, "r1").await;
    let (code, body) = call(&api, "GET", "/api/instances/r1", None, None).await;
    assert_eq!(code, 200);
    let view = json(&body);
    assert_eq!(view["status"], "completed", "{body}");
    let start_step = view["history"][0]["id"].as_i64().unwrap();
    let (code, body) = call(
        &api,
        "POST",
        "/api/instances/r1/reset",
        Some(&format!(r#"{{"step": {start_step}}}"#)),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    begin_waiting(&store, &config, "r1").await;
    let second = store.instance("r1").await.unwrap().unwrap().waiting[0]
        .task
        .clone();
    assert_ne!(second, first, "the wait begun again has a name of its own");
    let replay = r#"{"event": "approved", "data": {"amount": 0.01}}"#;
    let (code, body) = call(&api, "POST", &old, Some(replay), None).await;
    assert_eq!(code, 409, "the old token is dead: {body}");
    let new = format!(
        "/api/waits/{}",
        phasm::token::wait_token(&key, "r1", &second)
    );
    let (code, body) = call(&api, "POST", &new, Some(approve), None).await;
    assert_eq!(code, 202, "{body}");
}

/// A start may not take a name in a shape the engine gives its own instances: made in
/// advance, it would stand in for a spawned child or a schedule's tick, which would then never
/// run.
#[tokio::test]
async fn names_in_the_engines_own_shapes_are_refused_at_start() {
    let api = api(None).await;
    for (name, says) in [
        ("par1.s0.1", "spawned child"),
        ("par1.s3.bf2-1.0", "spawned child"),
        ("hourly-20261207T120000Z", "schedule tick"),
    ] {
        let body = format!(r#"{{"name": "{name}"}}"#);
        let (code, body) = call(
            &api,
            "POST",
            "/api/machines/Job/instances",
            Some(&body),
            None,
        )
        .await;
        assert_eq!(code, 400, "{name}: {body}");
        let error = json(&body)["error"].as_str().unwrap().to_string();
        assert!(error.contains(name) && error.contains(says), "{error}");
    }
    let (code, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"name": "v1.2-final"}"#),
        None,
    )
    .await;
    assert_eq!(code, 201, "{body}");
}

/// A value no action host could send back is refused where it enters, naming its key: a
/// start's context or an event's data nested deeper than every host can write, or an event's
/// typed value that does not convert (as a start's does not).
#[tokio::test]
async fn values_no_host_could_send_back_are_refused_where_they_enter() {
    let (api, store, config) = waiting_api(None).await;
    let deep = format!("{}1{}", "[".repeat(95), "]".repeat(95));
    let body = format!(r#"{{"name": "d1", "context": {{"tree": {deep}}}}}"#);
    let (code, body) = call(
        &api,
        "POST",
        "/api/machines/Approve/instances",
        Some(&body),
        None,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("`tree` nests 96 levels"), "{body}");
    let (code, _) = call(
        &api,
        "POST",
        "/api/machines/Approve/instances",
        Some(r#"{"name": "w1"}"#),
        None,
    )
    .await;
    assert_eq!(code, 201);
    begin_waiting(&store, &config, "w1").await;
    let event = format!(r#"{{"event": "approved", "data": {{"tree": {deep}}}}}"#);
    let (code, body) = call(&api, "POST", "/api/instances/w1/events", Some(&event), None).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("`tree` nests 96 levels"), "{body}");
    let view = store.instance("w1").await.unwrap().unwrap();
    assert_eq!(view.waiting.len(), 1, "the wait goes on");
}

/// The deployed versions of a machine over the API: listed oldest first, one read with its
/// definition and source, and an unknown one refused naming those that exist.
#[tokio::test]
async fn a_machines_versions_are_listed_and_read_with_their_texts() {
    use phasm::store::NewVersion;
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let config = load_str(YAML, dir.path().join("fsm.yaml"), &LoadOptions::default())
        .unwrap()
        .config;
    let file = phasm::control::DeployFile {
        config: &config,
        path: std::path::Path::new("fsm.yaml"),
        source: YAML,
    };
    phasm::control::deploy(&*store, &SystemClock, &[file])
        .await
        .unwrap();
    let v2 = NewVersion {
        machine: "Job".into(),
        hash: "other".into(),
        definition: "state_machines: []\n".into(),
        source: "changed\n".into(),
        path: "fsm.yaml".into(),
        if_unknown: false,
    };
    store.deploy(1, &[v2]).await.unwrap();
    let api = api_with(dir, store, None, None, &[]).await;
    let (code, body) = call(&api, "GET", "/api/machines/Job/versions", None, None).await;
    assert_eq!(code, 200, "{body}");
    let list = json(&body);
    assert_eq!(list["versions"].as_array().unwrap().len(), 2);
    assert_eq!(list["versions"][0]["version"], 1);
    let (code, body) = call(&api, "GET", "/api/machines/Job/versions/1", None, None).await;
    assert_eq!(code, 200, "{body}");
    let one = json(&body);
    assert_eq!(one["source"], YAML);
    assert!(
        one["definition"].as_str().unwrap().contains("name: Job"),
        "{one}"
    );
    let (code, body) = call(&api, "GET", "/api/machines/Job/versions/7", None, None).await;
    assert_eq!(code, 404);
    assert!(body.contains("its versions: 1, 2"), "{body}");
    let (code, _) = call(&api, "GET", "/api/machines/Job/versions/x", None, None).await;
    assert_eq!(code, 400);
    // A start may choose its version; one that is not stored is refused, naming those that
    // are, and one this phasm cannot read is reported, not guessed at.
    let start = |body: &'static str| {
        call(
            &api,
            "POST",
            "/api/machines/Job/instances",
            Some(body),
            None,
        )
    };
    let (code, body) = start(r#"{"name": "on-1", "version": 1}"#).await;
    assert_eq!(code, 201, "{body}");
    let (_, body) = call(&api, "GET", "/api/instances/on-1", None, None).await;
    assert_eq!(json(&body)["version"], 1, "{body}");
    let (code, body) = start(r#"{"version": 7}"#).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("no version 7; its versions are v1, v2"),
        "{body}"
    );
    let (code, body) = start(r#"{"version": "one"}"#).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = start(r#"{"version": 2}"#).await;
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("cannot read the stored definition of `Job` v2"),
        "{body}"
    );
    let (code, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances/batch",
        Some(r#"{"contexts": [{}], "version": 7}"#),
        None,
    )
    .await;
    assert_eq!(code, 400, "{body}");
    // Upgrades: `on-1` moves nowhere older, and to v2 only if v2 can be read.
    let upgrade =
        |path: &'static str, body: &'static str| call(&api, "POST", path, Some(body), None);
    let (code, body) = upgrade("/api/instances/on-1/upgrade", r#"{"to": 1}"#).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("it is on v1 already"), "{body}");
    let (code, body) = upgrade("/api/instances/on-1/upgrade", r#"{"to": 2}"#).await;
    assert_eq!(code, 500, "{body}");
    let (code, body) = upgrade("/api/instances/nobody/upgrade", "{}").await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = upgrade("/api/instances/on-1/upgrade", r#"{"too": 2}"#).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = upgrade("/api/machines/Job/upgrade", r#"{"to": 2}"#).await;
    assert_eq!(code, 400, "`from` is required: {body}");
    let (code, body) = upgrade(
        "/api/machines/Job/upgrade",
        r#"{"from": 1, "to": 1, "dry_run": true}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let moved = json(&body);
    assert_eq!(
        (moved["moved"].as_u64(), moved["not_moved"].as_u64()),
        (Some(0), Some(1)),
        "{moved}"
    );
}

/// The console lists a machine's versions with their instances, shows one version and the
/// changes between two, and moves an older version's instances to the latest after a dry run
/// and a confirmation.
#[tokio::test]
async fn the_console_shows_versions_and_moves_instances_after_a_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let deploy = |yaml: String| {
        let store = Arc::clone(&store);
        async move {
            let config = load_str(&yaml, "fsm.yaml", &LoadOptions::default())
                .unwrap()
                .config;
            let file = phasm::control::DeployFile {
                config: &config,
                path: std::path::Path::new("fsm.yaml"),
                source: &yaml,
            };
            phasm::control::deploy(&*store, &SystemClock, &[file])
                .await
                .unwrap();
        }
    };
    deploy(YAML.to_string()).await;
    let api = api_with(dir, Arc::clone(&store), None, None, &[]).await;
    let (code, body) = call(
        &api,
        "POST",
        "/api/machines/Job/instances",
        Some(r#"{"name": "old-1"}"#),
        None,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    deploy(YAML.replace("to: b", "to: c").replace("name: b", "name: c")).await;
    let (_, page) = call(&api, "GET", "/machines/Job", None, None).await;
    assert!(page.contains("id=\"versions\""), "{page}");
    assert!(page.contains("Upgrade 1 to v2…"), "{page}");
    assert!(
        page.contains("/machines/Job/diff?from=1&amp;to=2"),
        "{page}"
    );
    let (code, page) = call(&api, "GET", "/machines/Job/versions/1", None, None).await;
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("<pre id=\"definition\">") && page.contains("name: Job"),
        "{page}"
    );
    let (code, svg) = call(
        &api,
        "GET",
        "/machines/Job/versions/1/graph.svg",
        None,
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert!(svg.contains("<svg"), "{svg}");
    let (code, _) = call(&api, "GET", "/machines/Job/versions/9", None, None).await;
    assert_eq!(code, 404);
    let (_, page) = call(&api, "GET", "/machines/Job/diff?from=1&to=2", None, None).await;
    assert!(
        page.contains("state `b`") && page.contains("state `c`"),
        "{page}"
    );
    let dry = form_post(&api, "/machines/Job/upgrade", SAME_ORIGIN, "from=1&map=").await;
    assert!(dry.contains("1 of 1 instances would move"), "{dry}");
    assert!(dry.contains("id=\"confirm-upgrade\""), "{dry}");
    let (_, body) = call(&api, "GET", "/api/instances/old-1", None, None).await;
    assert_eq!(json(&body)["version"], 1, "a dry run moves nothing: {body}");
    let done = form_post(
        &api,
        "/machines/Job/upgrade",
        SAME_ORIGIN,
        "from=1&map=&confirm=1",
    )
    .await;
    assert!(done.contains("1 of 1 instances moved"), "{done}");
    let (_, body) = call(&api, "GET", "/api/instances/old-1", None, None).await;
    assert_eq!(json(&body)["version"], 2, "{body}");
    let (_, page) = call(&api, "GET", "/instances/old-1", None, None).await;
    assert!(page.contains("href=\"/machines/Job/versions/2\""), "{page}");
    let refused = form_post(
        &api,
        "/machines/Job/upgrade",
        SAME_ORIGIN,
        "from=1&map=oops",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
}
