//! A continuation's next page is queued before the current page's main action runs, so
//! pages overlap — with Python actions (the host reports the token first) and with `exec`
//! programs that write `{"token": ...}` as their first line. Each page waits for the next
//! one to start; without overlap the first page would never see it.

use crate::common;

use std::time::Duration;

use phasm::engine::Context;
use phasm::store::InstanceStatus;
use phasm::worker::{StopWhen, WorkerOptions};

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
    let mut context = Context::new();
    context.insert("dir".into(), dir.display().to_string().into());
    let setup = common::setup(&yaml, dir, "Pages", context).await;
    let (store, name) = (&setup.store, &setup.name);
    let worker = setup.worker(WorkerOptions {
        stop: StopWhen::Ended(vec![name.clone()]),
        poll_interval: Duration::from_millis(50),
        ..WorkerOptions::default()
    });
    tokio::time::timeout(Duration::from_secs(60), worker.run(std::future::pending()))
        .await
        .expect("finishes")
        .unwrap();
    let view = store.instance(name).await.unwrap().unwrap();
    assert_eq!(view.status, InstanceStatus::Completed, "{view:?}");
    let mut lines: Vec<String> = store
        .logs(name)
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
