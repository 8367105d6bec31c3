//! The server against clients that hold connections: silent or dribbling connections are
//! closed at the request-head deadline, open connections are capped (later ones wait, and are
//! served once room frees), and oversized request heads get JSON errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use phasm::clock::SystemClock;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Limits;
use phasm::server::{serve_with, ServeOptions, ServerState};
use phasm::store::{SqliteOptions, SqliteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const YAML: &str =
    "state_machines:\n- name: Job\n  states:\n  - name: a\n    initial: true\n    final: true\n";

async fn server(options: ServeOptions) -> (std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(SqliteStore::open(dir.path().join("p.db"), &SqliteOptions::default()).unwrap());
    let config = Arc::new(
        load_str(YAML, dir.path().join("fsm.yaml"), &LoadOptions::default())
            .unwrap()
            .config,
    );
    let state = Arc::new(ServerState {
        store,
        config,
        clock: Arc::new(SystemClock),
        limits: Limits::default(),
        token: None,
        metrics: None,
        throttle: Default::default(),
        allowed_hosts: None,
        trusted_proxies: Vec::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_with(listener, state, options, std::future::pending()));
    (addr, dir)
}

/// Send `request` and read the whole answer (the server closes after it).
async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

const HEALTH: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn silent_and_dribbling_connections_are_closed_at_the_head_deadline() {
    let (addr, _dir) = server(ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    })
    .await;
    // Silent: never sends a byte.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the server closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Dribbling: a header line now and then, never finishing the head.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let closed = async {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
        let mut buf = [0u8; 64];
        let _ = slow.read(&mut buf).await;
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the server closes a connection that dribbles its head");
    // Kept alive but idle after a request: closed as well.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read_all =
        tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut answer)).await;
    assert!(read_all.is_ok(), "an idle kept-alive connection is closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_room() {
    let (addr, _dir) = server(ServeOptions {
        max_connections: Some(2),
        header_read_timeout: Duration::from_secs(30),
        ..ServeOptions::default()
    })
    .await;
    let first = TcpStream::connect(addr).await.unwrap();
    let second = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let third = tokio::spawn(exchange(addr, HEALTH));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection is served while two are held"
    );
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a held connection closes")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(second);
}

#[tokio::test]
async fn oversized_request_heads_get_json_errors() {
    let (addr, _dir) = server(ServeOptions::default()).await;
    let long = format!(
        "GET /api/instances?machine={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = exchange(addr, &long).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer:.200}");
    assert!(
        answer.contains(r#"{"error":"the request target is"#),
        "{answer:.400}"
    );
    let big = format!(
        "GET /api/machines HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(100_000)
    );
    let answer = exchange(addr, &big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    assert!(
        answer.contains(r#"{"error":"the request's headers are"#),
        "{answer:.400}"
    );
}
