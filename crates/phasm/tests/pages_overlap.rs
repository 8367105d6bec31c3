//! A continuation's next page is queued before the current page's main action runs, so
//! pages overlap — with Python actions (the host reports the token first) and with `exec`
//! programs that write `{"token": ...}` as their first line. Each page waits for the next
//! one to start; without overlap the first page would never see it.

use std::sync::Arc;
use std::time::Duration;

use phasm::action::Registry;
use phasm::clock::{Clock, SystemClock};
use phasm::config::{load_str, LoadOptions};
use phasm::control::start_instance;
use phasm::engine::{Context, Limits};
use phasm::store::{InstanceStatus, SqliteOptions, SqliteStore, Store};
use phasm::worker::{StopWhen, Worker, WorkerOptions};

const PAGE_PROGRAM: &str = r#"
import json, os, sys, time
request = json.load(sys.stdin)
page = int(request["token"] or 0)
if page < 2:
    print(json.dumps({"token": str(page + 1)}), flush=True)
folder = request["context"]["dir"]
open(os.path.join(folder, f"started-{page}"), "w").close()
saw = page == 2
for _ in range(100):
    if saw:
        break
    saw = os.path.exists(os.path.join(folder, f"started-{page + 1}"))
    time.sleep(0.1)
print(json.dumps({"event": "done", "log": [f"page {page} saw the next page: {saw}"]}))
"#;

async fn run(yaml: String, dir: &std::path::Path) -> Vec<String> {
    let loaded = load_str(&yaml, dir.join("fsm.yaml"), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut config = loaded.config;
    let mut registry = Registry::new();
    registry.bind_config(&config);
    phasm::action::python::start(&mut config, &loaded.sites, &mut registry)
        .await
        .unwrap();
    let config = Arc::new(config);
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("phasm.db"), &SqliteOptions::default()).unwrap());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut context = Context::new();
    context.insert("dir".into(), dir.display().to_string().into());
    let name = start_instance(
        &*store,
        &config,
        &*clock,
        "Pages",
        context,
        None,
        &Limits::default(),
    )
    .await
    .unwrap()
    .name()
    .to_string();
    let options = WorkerOptions {
        stop: StopWhen::Ended(vec![name.clone()]),
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::default()
    };
    let worker = Worker::new(
        Arc::clone(&store),
        config,
        Arc::new(registry),
        clock,
        options,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), worker.run(std::future::pending()))
        .await
        .expect("finishes")
        .unwrap();
    let view = store.instance(&name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let mut lines: Vec<String> = store
        .logs(&name)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message)
        .filter(|m| m.starts_with("page "))
        .collect();
    lines.sort();
    lines
}

fn machine(head: &str, action: &str) -> String {
    format!(
        "{head}state_machines:
- name: Pages
  logging: persistent
  states:
  - name: start
    initial: true
    continuation: true
    action: {action}
    transitions:
    - event: done
      to: end
  - name: end
    final: true
"
    )
}

const EXPECTED: [&str; 3] = [
    "page 0 saw the next page: True",
    "page 1 saw the next page: True",
    "page 2 saw the next page: True",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_pages_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python");
    let head = format!(
        "python:\n  path: [{}]\n  processes: 1\n",
        fixtures.display()
    );
    let lines = run(machine(&head, "fsmtests.Pages"), dir.path()).await;
    assert_eq!(lines, EXPECTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_pages_that_report_their_token_first_overlap() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("page.py"), PAGE_PROGRAM).unwrap();
    let head = "actions:\n  Page:\n    exec: [python3, page.py]\n";
    let lines = run(machine(head, "Page"), dir.path()).await;
    assert_eq!(lines, EXPECTED);
}
