//! The `http` (webhook) binding against a real local web service.

use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use phasm::action::Registry;
use phasm::config::{load_str, LoadOptions};
use phasm::engine::Context;
use phasm::store::InstanceStatus;
use phasm::testing::Immediate;
use serde_json::{json, Value};

async fn service() -> std::net::SocketAddr {
    let app = Router::new()
        .route(
            "/ok",
            post(
                |headers: axum::http::HeaderMap, Json(request): Json<Value>| async move {
                    Json(json!({
                        "event": "next",
                        "context": {
                            "task": request["task"],
                            "seen": request["context"]["n"],
                            "key": headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
                            "auth": headers.get("x-api-key").and_then(|v| v.to_str().ok()),
                        }
                    }))
                },
            ),
        )
        .route(
            "/fail",
            post(|| async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "down for maintenance",
                )
            }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "{}"
            }),
        )
        .route("/garbage", post(|| async { "not json" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn machine(addr: std::net::SocketAddr, path: &str) -> phasm::machine::Config {
    let yaml = format!(
        "actions:\n  Hook:\n    http: http://{addr}{path}\n    timeout: 500ms\n    headers:\n      X-Api-Key: k123\nstate_machines:\n- name: W\n  task_retry_limit: 0\n  states:\n  - name: a\n    initial: true\n    action: Hook\n    transitions:\n    - event: next\n      to: b\n  - name: b\n    final: true\n"
    );
    load_str(&yaml, "w.yaml", &LoadOptions::default())
        .unwrap()
        .config
}

#[tokio::test]
async fn a_webhook_answers_like_an_exec_program() {
    let addr = service().await;
    let run = Immediate::new(machine(addr, "/ok"), Registry::new()).unwrap();
    let mut start = Context::new();
    start.insert("n".into(), json!(7));
    let view = run.run("W", start).await.unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{:?}", view.error);
    let context = view.current_context.unwrap();
    assert_eq!(context["seen"], 7);
    assert_eq!(context["auth"], "k123");
    assert_eq!(
        context["key"], context["task"],
        "the idempotency key header is the task name"
    );
}

#[tokio::test]
async fn webhook_failures_fail_the_attempt_clearly() {
    let addr = service().await;
    for (path, message) in [
        (
            "/fail",
            "answered 503 Service Unavailable: down for maintenance",
        ),
        ("/slow", "timed out after 0.5s"),
        ("/garbage", "output is not JSON"),
    ] {
        let run = Immediate::new(machine(addr, path), Registry::new()).unwrap();
        let view = run.run("W", Context::new()).await.unwrap();
        assert_eq!(view.status, InstanceStatus::Failed, "{path}");
        let error = view.error.unwrap();
        assert!(error.contains(message), "{path}: {error}");
    }
}

#[test]
fn a_webhook_url_must_be_http() {
    let yaml = "actions:\n  Hook:\n    http: ftp://example\nstate_machines:\n- name: W\n  states:\n  - name: a\n    initial: true\n    final: true\n    action: Hook\n";
    let err = load_str(yaml, "w.yaml", &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`http` must be an http:// or https:// URL"),
        "{err}"
    );
}
