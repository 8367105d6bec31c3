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

/// A body sent a byte at a time holds its connection no longer than the request deadline:
/// it gets a 408 and the connection is closed, and the server answers others meanwhile.
#[tokio::test]
async fn a_body_dribbled_a_byte_at_a_time_gets_a_408_at_the_request_deadline() {
    let (addr, _dir) = server(ServeOptions {
        request_timeout: Duration::from_millis(800),
        ..ServeOptions::default()
    })
    .await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /api/machines/Job/instances HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let dribble = async {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(300), dribble).await;
    // Others are served while it dribbles.
    assert!(exchange(addr, HEALTH).await.starts_with("HTTP/1.1 200"));
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes at the deadline")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("send the body at once"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// One client address cannot hold every connection: beyond its share its new connections are
/// closed at once, and another address is still served.
#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let (addr, _dir) = server(ServeOptions {
        max_connections: Some(8),
        header_read_timeout: Duration::from_secs(30),
        ..ServeOptions::default()
    })
    .await;
    // Three quarters of 8: six silent connections from 127.0.0.1 are held.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seventh = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), seventh.read(&mut buf))
        .await
        .expect("a connection over the address's share is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Another address (all of 127/8 is loopback) still gets an answer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(addr).await.unwrap();
    other.write_all(HEALTH.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut answer))
        .await
        .expect("another address is served")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    drop(held);
}
