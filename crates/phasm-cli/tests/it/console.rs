//! The web console in a real browser: headless Chromium loads the pages of a `phasm serve`
//! process, watches an instance started through the API complete, and takes a screenshot.
//! Without Chromium the test prints `SKIPPED` — or fails when `PHASM_REQUIRE_CHROMIUM=1`
//! (as `.ci/run` sets it, after installing Debian's `chromium`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    let candidates = [
        std::env::var("PHASM_CHROMIUM").ok(),
        Some("/usr/bin/chromium".into()),
        Some("/usr/bin/chromium-browser".into()),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            !std::env::var("PHASM_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1"),
            "Chromium is required (PHASM_REQUIRE_CHROMIUM=1) but was not found"
        );
        eprintln!("SKIPPED console test: no Chromium (install Debian's `chromium`)");
    }
    found
}

/// Run headless Chromium on a URL with extra arguments; returns its stdout. A Chromium that
/// hangs is killed after 45 s (its output so far is returned), so a test never waits forever.
fn browse(chromium: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-breakpad",
            "--no-first-run",
            "--virtual-time-budget=3000",
            "--timeout=30000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium runs");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(45);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.wait();
    reader.join().unwrap_or_default()
}

fn post(port: u16, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_console_shows_an_instance_run_to_completion() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        "actions:\n  Work:\n    exec: [sh, -c, \"cat > /dev/null; sleep 1; echo '{\\\"event\\\": \\\"done\\\"}'\"]\nstate_machines:\n- name: Console\n  states:\n  - name: working\n    initial: true\n    action: Work\n    transitions:\n    - event: done\n      to: finished\n  - name: finished\n    final: true\n",
    )
    .unwrap();
    let (port, _server) = serve(d);
    let created = post(
        port,
        "/api/machines/Console/instances",
        r#"{"name": "c1", "context": {"note": "<script>alert(1)</script>"}}"#,
    );
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");

    let base = format!("http://127.0.0.1:{port}");
    let machines = browse(
        &chromium,
        &d.join("p1"),
        &["--dump-dom"],
        &format!("{base}/"),
    );
    assert!(
        machines.contains("<a href=\"/machines/Console\">Console</a>"),
        "{machines}"
    );
    let list = browse(
        &chromium,
        &d.join("p2"),
        &["--dump-dom"],
        &format!("{base}/instances"),
    );
    assert!(list.contains("href=\"/instances/c1\""), "{list}");

    let deadline = Instant::now() + Duration::from_secs(40);
    let page = loop {
        let page = browse(
            &chromium,
            &d.join("p3"),
            &["--dump-dom"],
            &format!("{base}/instances/c1"),
        );
        if page.contains("class=\"s-completed\"") {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed the instance completed:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(page.contains("<td>working</td>"), "the history is shown");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "context is escaped"
    );
    assert!(
        !page.contains("<script>alert(1)"),
        "context is never markup"
    );

    // The machine page, the workers (this server's own worker) and the queues.
    let machine = browse(
        &chromium,
        &d.join("p5"),
        &["--dump-dom"],
        &format!("{base}/machines/Console"),
    );
    assert!(machine.contains("id=\"counts\""), "{machine}");
    assert!(machine.contains("Start an instance"), "{machine}");
    assert!(
        machine.contains("program: sh -c"),
        "the action's binding: {machine}"
    );
    let workers = browse(
        &chromium,
        &d.join("p6"),
        &["--dump-dom"],
        &format!("{base}/workers"),
    );
    assert!(workers.contains("<table id=\"workers\">"), "{workers}");
    assert!(workers.contains("<td>Console</td>"), "{workers}");
    let queues = browse(
        &chromium,
        &d.join("p7"),
        &["--dump-dom"],
        &format!("{base}/queues"),
    );
    assert!(queues.contains("<h1>Queues</h1>"), "{queues}");

    let shot = d.join("console.png");
    browse(
        &chromium,
        &d.join("p4"),
        &[
            "--window-size=1200,1000",
            &format!("--screenshot={}", shot.display()),
        ],
        &format!("{base}/instances/c1"),
    );
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot of {} bytes",
        png.len()
    );
}

/// `phasm serve fsm.yaml` in `d` on a free loopback port, once it accepts connections.
fn serve(d: &Path) -> (u16, KillOnDrop) {
    let port = free_port();
    let server = Command::new(env!("CARGO_BIN_EXE_phasm"))
        .args([
            "serve",
            "fsm.yaml",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .current_dir(d)
        .env("PHASM_DB", d.join("phasm.db"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = KillOnDrop(server);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (port, server)
}

/// Stops the server however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_page_on_another_origin_can_neither_start_nor_cancel() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        "actions:\n  Wait:\n    exec: [sh, -c, \"cat > /dev/null; sleep 60\"]\nstate_machines:\n- name: Victim\n  states:\n  - name: waiting\n    initial: true\n    final: true\n    action: Wait\n",
    )
    .unwrap();
    let (port, _server) = serve(d);
    let deadline = Instant::now() + Duration::from_secs(20);
    assert!(
        post(port, "/api/machines/Victim/instances", r#"{"name": "v1"}"#)
            .starts_with("HTTP/1.1 201")
    );
    // The attacker's page: another origin on the same site (another port of 127.0.0.1).
    let site = d.join("site");
    std::fs::create_dir(&site).unwrap();
    // A form posted on load (a page navigating away), and a `no-cors` fetch (a page that
    // stays), each on its own page: headless Chromium stalls on a page that does both.
    std::fs::write(
        site.join("form.html"),
        format!(
            "<html><body onload=\"document.getElementById('f').submit()\"><form id=\"f\" method=\"post\" action=\"http://127.0.0.1:{port}/instances/v1/cancel\"></form></body></html>"
        ),
    )
    .unwrap();
    std::fs::write(
        site.join("fetch.html"),
        format!(
            "<html><body><script>fetch('http://127.0.0.1:{port}/api/machines/Victim/instances', {{method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}}, body: '{{\"name\": \"forged\"}}'}}).then(() => document.body.append('fetch-sent'), (e) => document.body.append('fetch-failed ' + e));</script></body></html>"
        ),
    )
    .unwrap();
    let other = free_port();
    let attacker = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &other.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&site)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _attacker = KillOnDrop(attacker);
    while TcpStream::connect(("127.0.0.1", other)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the attacker's server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The form did go: the browser shows the console's refusal.
    let shown = browse(
        &chromium,
        &d.join("p5"),
        &["--dump-dom"],
        &format!("http://127.0.0.1:{other}/form.html"),
    );
    assert!(shown.contains("another origin"), "{shown}");
    // The fetch did go too (its answer is opaque to the page, as no-cors answers are).
    let shown = browse(
        &chromium,
        &d.join("p6"),
        &["--dump-dom"],
        &format!("http://127.0.0.1:{other}/fetch.html"),
    );
    assert!(shown.contains("fetch-sent"), "{shown}");
    let v1 = get(port, "/api/instances/v1");
    assert!(v1.contains("\"status\":\"running\""), "{v1}");
    let forged = get(port, "/api/instances/forged");
    assert!(forged.starts_with("HTTP/1.1 404"), "{forged}");
}

/// An operator's round in the browser (`tests/browser/console_operator.py`, driving Chromium
/// over the DevTools protocol): the start form, search and filter, a confirmed bulk retry, and
/// the keyboard alone — every control of the list reached by Tab with a visible focus, a link
/// followed with Enter, a step's page, and a reset ticked with Space and sent with Enter.
#[test]
fn an_operator_starts_finds_and_retries_instances_in_the_browser() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("fsm.yaml"),
        r#"actions:
  Work:
    exec: [sh, -c, "read r; case \"$r\" in *'\"fail\":true'*) echo boom >&2; exit 3;; esac; echo '{\"event\": \"done\"}'"]
state_machines:
- name: Console
  task_retry_limit: 0
  states:
  - name: working
    initial: true
    action: Work
    transitions:
    - event: done
      to: finished
  - name: finished
    final: true
"#,
    )
    .unwrap();
    let (port, _server) = serve(d);
    for (name, fail) in [("bad-1", true), ("bad-2", true), ("ok-1", false)] {
        let body = format!(r#"{{"name": "{name}", "context": {{"fail": {fail}}}}}"#);
        let created = post(port, "/api/machines/Console/instances", &body);
        assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/console_operator.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}"))
        .arg(&chromium)
        .arg(d.join("profile"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
