//! `phasm bench versions`: how long `phasm versions` takes to list a machine's versions with
//! the live instances on each, on a database holding many of both.

use std::process::ExitCode;
use std::time::Instant;

use phasm::engine::{Context, NewTask, TaskKind};
use phasm::store::{NewInstance, NewVersion};
use serde_json::json;

use crate::output::outln;
use crate::{db, exit, DbArgs};

/// Store `versions` versions of one machine and `instances` running instances spread over
/// them, then time listing the versions with their counts (the median of `runs`).
pub async fn versions(
    versions: u32,
    instances: usize,
    runs: usize,
    as_json: bool,
    db_path: Option<String>,
    sync: super::SyncMode,
) -> ExitCode {
    if versions == 0 || runs == 0 {
        return exit::invalid("--versions and --runs must be at least 1");
    }
    let (_temp, path) = match crate::db::bench_db(db_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let store = match db::open(&DbArgs { db: path, sync }, 4).await {
        Ok(s) => s,
        Err(e) => return exit::database(e),
    };
    let began = Instant::now();
    for n in 1..=versions {
        let version = NewVersion {
            machine: "Order".into(),
            hash: format!("hash-{n}"),
            definition: format!("# version {n}\n"),
            source: format!("# version {n}\n"),
            path: "fsm.yaml".into(),
            if_unknown: false,
        };
        if let Err(e) = store.deploy(n.into(), &[version]).await {
            return exit::database(e);
        }
    }
    let mut next = 0;
    while next < instances {
        let chunk: Vec<NewInstance> = (next..instances.min(next + 10_000))
            .map(|i| {
                let name = format!("Order-{i:07}");
                NewInstance {
                    start: NewTask {
                        name: format!("{name}--start"),
                        from_state: None,
                        event: "start".into(),
                        kind: TaskKind::Dispatch,
                        context: Context::new(),
                        step: 0,
                        branch: String::new(),
                        queue: "default".into(),
                        target: None,
                        // Never due: the database only holds them.
                        due_at: i64::MAX / 2,
                        token: None,
                    },
                    name,
                    machine: "Order".into(),
                    context: Context::new(),
                    version: Some(u32::try_from(i).unwrap_or(0) % versions + 1),
                }
            })
            .collect();
        next += chunk.len();
        if let Err(e) = store.start_many(0, chunk).await {
            return exit::database(e);
        }
    }
    let setup = began.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(runs);
    let mut live = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let listed = store.versions(Some("Order")).await;
        let counted = store.version_counts(Some("Order")).await;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        match (listed, counted) {
            (Ok(l), Ok(c)) if l.len() == versions as usize => {
                live = c.iter().map(|c| c.running + c.failed).sum::<u64>();
            }
            (Ok(l), Ok(_)) => {
                return exit::failed(format!("listed {} versions of {versions}", l.len()))
            }
            (Err(e), _) | (_, Err(e)) => return exit::database(e),
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    if as_json {
        outln!(
            "{}",
            json!({
                "versions": versions,
                "instances": instances,
                "live_counted": live,
                "median_ms": median,
                "runs_ms": times,
                "setup_s": setup,
            })
        );
    } else {
        outln!(
            "{versions} versions, {instances} running instances ({live} counted): listed with their counts in {median:.1} ms (median of {runs}; setup {setup:.1} s)"
        );
    }
    ExitCode::SUCCESS
}
