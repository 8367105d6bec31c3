//! A throwaway PostgreSQL cluster of a test's own, for the tests that stop, restart or kill
//! the server: `initdb` into a temporary folder, a free port on 127.0.0.1, `pg_ctl` to start
//! and stop it. Dropping it stops the server (immediate mode) and removes the folder. No test
//! ever stops or restarts a server it did not start.
//!
//! Without PostgreSQL's binaries a test prints `SKIPPED` and passes, unless
//! `PHASM_REQUIRE_POSTGRES=1` (as `.ci/run` sets it), which makes it fail instead.

use std::path::PathBuf;
use std::process::{Command, Output};

/// A PostgreSQL server this test started, in a folder of its own.
pub struct Cluster {
    /// Holds the data folder; removed after the server stops.
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// A URL of the cluster's `postgres` database, for phasm.
    pub url: String,
}

impl Cluster {
    /// A new cluster, running; `None` after saying so when PostgreSQL's binaries are missing
    /// (a failure instead under `PHASM_REQUIRE_POSTGRES=1`).
    pub fn start(test: &str) -> Option<Self> {
        let required = std::env::var("PHASM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Some(bin) = bin_dir() else {
            let why = "no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH";
            assert!(
                !required,
                "PostgreSQL is required (PHASM_REQUIRE_POSTGRES=1): {why}"
            );
            eprintln!("SKIPPED {test}: {why}");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("phasm-pg-")
            .tempdir()
            .expect("a temporary folder");
        // initdb refuses to run as root: the cluster then belongs to the `postgres` user.
        if is_root() {
            let (uid, gid) = postgres_ids().expect("a `postgres` user to own the test cluster");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let port = free_port();
        let cluster = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            port,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        cluster.pg_ctl("start");
        Some(cluster)
    }

    /// Stop the server now (fast shutdown: sessions are ended).
    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    /// Start the server again after [`Cluster::stop`].
    pub fn start_again(&self) {
        self.pg_ctl("start");
    }

    /// Restart the server (fast shutdown, then start).
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.data();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let log = log.to_string_lossy();
        let mut args = vec!["-D", &data, "-l", &log, "-w", "-t", "60", "-m", "fast"];
        if action != "stop" {
            args.extend(["-o", &options]);
        }
        args.push(action);
        self.run("pg_ctl", &args);
    }

    /// Run one of PostgreSQL's programs as the cluster's owner; panics with its output when
    /// it fails.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let program = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}{}\n{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let program = self.bin.join("pg_ctl");
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        };
    }
}

/// Whether this process runs as root (its effective user id, from `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The folder of `initdb` and `pg_ctl`: Debian's newest version, or the PATH's.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return Some(newest);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
}

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// A port nothing listens on now (the kernel's pick for an ephemeral bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
