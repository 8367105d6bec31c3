//! Checks of machine versions: a deploy stores each changed machine once, as its next
//! version, and nothing for a machine whose latest version holds the same definition.

use super::T0;
use crate::store::{Deployed, NewVersion, Store};

fn v(machine: &str, hash: &str) -> NewVersion {
    NewVersion {
        machine: machine.into(),
        hash: hash.into(),
        definition: format!("state_machines: # {machine} {hash}\n"),
        source: format!("source of {machine} {hash}\n"),
        path: "fsm.yaml".into(),
        if_unknown: false,
    }
}

fn deployed(machine: &str, version: u32, new: bool) -> Deployed {
    Deployed {
        machine: machine.into(),
        version,
        new,
    }
}

/// Check that deploying stores each changed machine as its next version, the same content
/// again stores nothing, going back to earlier content is a new version, two deploys at once
/// store one version between them, and versions read back with their texts.
pub async fn deploying_stores_each_changed_machine_as_its_next_version(store: &dyn Store) {
    let first = store
        .deploy(T0, &[v("A", "a1"), v("B", "b1")])
        .await
        .unwrap();
    assert_eq!(first, [deployed("A", 1, true), deployed("B", 1, true)]);
    let again = store
        .deploy(T0, &[v("A", "a1"), v("B", "b1")])
        .await
        .unwrap();
    assert_eq!(again, [deployed("A", 1, false), deployed("B", 1, false)]);
    let changed = store
        .deploy(T0 + 1, &[v("A", "a2"), v("B", "b1")])
        .await
        .unwrap();
    assert_eq!(changed, [deployed("A", 2, true), deployed("B", 1, false)]);
    let back = store.deploy(T0 + 2, &[v("A", "a1")]).await.unwrap();
    assert_eq!(
        back,
        [deployed("A", 3, true)],
        "going back is a new version"
    );
    // Two deploys at once of the same new content: one stores it, the other finds it.
    let (x, y) = futures_util::future::join(
        store.deploy(T0 + 3, &[v("A", "a4")]),
        store.deploy(T0 + 3, &[v("A", "a4")]),
    )
    .await;
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x[0].version, 4);
    assert_eq!(y[0].version, 4);
    assert!(x[0].new != y[0].new, "exactly one stored it: {x:?} {y:?}");
    let a: Vec<(u32, String)> = store
        .versions(Some("A"))
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.version, r.hash))
        .collect();
    assert_eq!(
        a,
        [
            (1, "a1".to_string()),
            (2, "a2".to_string()),
            (3, "a1".to_string()),
            (4, "a4".to_string())
        ]
    );
    assert_eq!(store.versions(None).await.unwrap().len(), 5);
    let two = store.version("A", 2).await.unwrap().unwrap();
    assert_eq!(two.definition, "state_machines: # A a2\n");
    assert_eq!(two.source, "source of A a2\n");
    assert_eq!(two.record.deployed_at, T0 + 1);
    assert_eq!(two.record.path, "fsm.yaml");
    assert!(store.version("A", 9).await.unwrap().is_none());
    assert!(store.version("Nope", 1).await.unwrap().is_none());
    // A worker deploying its file stores only content no version holds: an older file
    // answers with its version and leaves the latest where it is.
    let known = |hash: &str| NewVersion {
        if_unknown: true,
        ..v("A", hash)
    };
    assert_eq!(
        store.deploy(T0 + 2, &[known("a2")]).await.unwrap(),
        [deployed("A", 2, false)]
    );
    assert_eq!(
        store.deploy(T0 + 2, &[known("a5")]).await.unwrap(),
        [deployed("A", 5, true)]
    );
    assert_eq!(store.versions(Some("A")).await.unwrap().len(), 5);
}

/// Check that an instance records the version of its machine it started on: the latest when
/// it starts (a spawned child too); none before its machine was ever deployed, when the first
/// deploy adopts it as version 1; and a later deploy leaves it where it is.
pub async fn instances_record_the_version_they_started_on(store: &dyn Store) {
    use super::{commit, request, start};
    start(store, "early", T0).await;
    assert_eq!(
        store.instance("early").await.unwrap().unwrap().version,
        None
    );
    store.deploy(T0, &[v("M", "m1")]).await.unwrap();
    assert_eq!(
        store.instance("early").await.unwrap().unwrap().version,
        Some(1),
        "the first deploy adopts what started before it"
    );
    store.deploy(T0, &[v("M", "m2")]).await.unwrap();
    start(store, "later", T0 + 1).await;
    assert_eq!(
        store.instance("later").await.unwrap().unwrap().version,
        Some(2)
    );
    assert_eq!(
        store.instance("early").await.unwrap().unwrap().version,
        Some(1)
    );
    // A child spawned after v3 is deployed starts on v3, while its parent stays on v1.
    store.deploy(T0, &[v("M", "m3")]).await.unwrap();
    let claimed = store.claim(T0 + 1, &request(10)).await.unwrap();
    // A claimed task carries its instance's version, for the worker to run it on.
    for (name, number) in [("early", 1), ("later", 2)] {
        let id = claimed
            .iter()
            .find(|t| t.instance == name)
            .and_then(|t| t.version)
            .unwrap_or_else(|| panic!("{name}'s task carries its version"));
        let stored = store.version_by_id(id).await.unwrap().unwrap();
        assert_eq!(
            (stored.record.machine.as_str(), stored.record.version),
            ("M", number)
        );
        assert_eq!(
            stored.definition,
            format!("state_machines: # M m{number}\n")
        );
    }
    assert!(store.version_by_id(-1).await.unwrap().is_none());
    let task = claimed.into_iter().find(|t| t.instance == "early").unwrap();
    let child = crate::engine::Spawned {
        name: "early.s1.0".into(),
        machine: "M".into(),
        context: crate::engine::Context::new(),
        start: super::new_task("early.s1.0--start", None, T0),
    };
    let mut c = crate::engine::Commit {
        spawns: vec![child],
        ..commit(&task)
    };
    c.new_tasks
        .push(super::new_task("early--next", Some("a"), T0));
    // The successor handed back leased runs on the instance's version too.
    let successors = crate::store::SuccessorClaim {
        owner: "w1".into(),
        lease: std::time::Duration::from_secs(10),
        queues: None,
        exclude: Vec::new(),
        machines: vec!["M".into()],
        targets: crate::store::Targets::Any,
        max: 5,
    };
    let applied = store.apply(T0, c.into(), Some(&successors)).await.unwrap();
    assert_eq!(applied.applied, crate::store::Applied::Yes);
    assert_eq!(applied.claimed.len(), 1);
    assert_eq!(applied.claimed[0].version, task.version);
    assert_eq!(
        store.instance("early.s1.0").await.unwrap().unwrap().version,
        Some(3)
    );
    assert_eq!(
        store.instance("early").await.unwrap().unwrap().version,
        Some(1)
    );
}

/// Version 2 of `M` for the upgrade check: the wait is in `review` and accepts `approved`.
const M_V2: &str = "state_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    action: A\n    transitions:\n    - event: next\n      to: review\n  - name: review\n    wait: {timeout: 1h, timeout_event: late}\n    transitions:\n    - event: approved\n      to: done\n    - event: late\n      to: done\n  - name: done\n    final: true\n";

/// Check that an upgrade moves an instance only when every place of it exists in the target:
/// refused while a step runs, refused (naming the state) without a map, a dry run writes
/// nothing; with the map its wait keeps its deadline and takes the target's events (an event
/// then dispatches from the renamed state), the instance records the target and the move is
/// logged; an instance on another version, or unknown, is not touched.
pub async fn an_upgrade_moves_an_instance_only_when_its_places_exist(store: &dyn Store) {
    use super::{apply_one, commit, request, start, SEC};
    use crate::engine::{Accept, NewTask, NewWait, TaskKind};
    use crate::store::{Applied, Delivered, Delivery, UpgradeRequest, Upgraded};
    store.deploy(T0, &[v("M", "m1")]).await.unwrap();
    start(store, "u", T0).await;
    store.deploy(T0, &[v("M", "m2")]).await.unwrap();
    let target = crate::config::load_str(M_V2, "m.yaml", &Default::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .config
        .machines
        .remove(0);
    let upgrade = |map: &[(&str, &str)], dry_run: bool| UpgradeRequest {
        instance: "u".into(),
        from: 1,
        to: 2,
        target: target.clone(),
        map: map
            .iter()
            .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
            .collect(),
        dry_run,
    };
    let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
    assert_eq!(
        store.upgrade(T0, &upgrade(&[], false)).await.unwrap(),
        Upgraded::StepRunning
    );
    // The step begins a wait in `approval`, due in 100 s.
    let wait = NewWait {
        task: NewTask {
            name: crate::engine::wait_task_name("u", "", "approval", 1, t.id),
            from_state: Some("approval".into()),
            event: "expired".into(),
            kind: TaskKind::Wait,
            context: crate::engine::Context::new(),
            step: 1,
            branch: String::new(),
            queue: "default".into(),
            target: None,
            due_at: T0 + 100 * SEC,
            token: None,
        },
        accepts: vec![Accept {
            event: "approve".into(),
            name: crate::engine::task_name("u", "", "approval", "approve", "done", 1),
            queue: "default".into(),
            target: None,
            delay: 0,
        }],
    };
    let c = crate::engine::Commit {
        waits: vec![wait],
        ..commit(&t)
    };
    assert_eq!(apply_one(store, T0, c).await, Applied::Yes);
    let counts = |version, running, waiting| crate::store::VersionCounts {
        machine: "M".into(),
        version,
        running,
        waiting,
        failed: 0,
    };
    assert_eq!(
        store.version_counts(Some("M")).await.unwrap(),
        [counts(1, 1, 1)]
    );
    assert!(store
        .version_counts(Some("Other"))
        .await
        .unwrap()
        .is_empty());
    let Upgraded::Refused(reasons) = store.upgrade(T0, &upgrade(&[], false)).await.unwrap() else {
        panic!("`approval` is not in v2")
    };
    assert_eq!(
        reasons,
        ["state `approval` is not in v2: map it with `--map approval=NEW`"]
    );
    let moved = Upgraded::Moved {
        tasks: 1,
        parked: 0,
    };
    let map = [("approval", "review")];
    assert_eq!(
        store.upgrade(T0, &upgrade(&map, true)).await.unwrap(),
        moved
    );
    assert_eq!(store.instance("u").await.unwrap().unwrap().version, Some(1));
    assert_eq!(
        store.upgrade(T0, &upgrade(&map, false)).await.unwrap(),
        moved
    );
    let view = store.instance("u").await.unwrap().unwrap();
    assert_eq!(view.version, Some(2));
    assert_eq!(view.tasks.len(), 1);
    assert_eq!(view.tasks[0].from.as_deref(), Some("review"));
    assert_eq!(view.tasks[0].event, "late", "v2's timeout event");
    assert_eq!(view.tasks[0].due_at, T0 + 100 * SEC, "the deadline is kept");
    assert_eq!(store.version_counts(None).await.unwrap(), [counts(2, 1, 1)]);
    let logs = store.logs("u").await.unwrap();
    assert!(
        logs.iter()
            .any(|l| l.message
                == "upgraded from v1 to v2 of `M` (states renamed: approval → review)"),
        "{logs:?}"
    );
    assert_eq!(
        store.upgrade(T0, &upgrade(&map, false)).await.unwrap(),
        Upgraded::OnVersion(Some(2))
    );
    let nope = UpgradeRequest {
        instance: "nope".into(),
        ..upgrade(&map, false)
    };
    assert_eq!(store.upgrade(T0, &nope).await.unwrap(), Upgraded::NotFound);
    // v2's event is taken by the moved wait, and dispatched from `review`.
    let delivery = Delivery {
        instance: "u".into(),
        event: "approved".into(),
        data: crate::engine::Context::new(),
        id: None,
        wait: None,
        checks: Default::default(),
    };
    assert_eq!(
        store.deliver(T0 + SEC, &delivery).await.unwrap(),
        Delivered::Dispatched(1)
    );
    let next = store.claim(T0 + SEC, &request(1)).await.unwrap().remove(0);
    assert_eq!(
        (next.from_state.as_deref(), next.event.as_str()),
        (Some("review"), "approved")
    );
    assert_eq!(next.name, "u--review--approved--done--step-1");
}

/// Check that scrubbing versions deletes those no instance records, but never the latest of a
/// machine nor one an instance (running or ended) records.
pub async fn scrubbing_versions_keeps_the_latest_and_those_in_use(store: &dyn Store) {
    use super::start;
    store
        .deploy(T0, &[v("M", "m1"), v("N", "n1")])
        .await
        .unwrap();
    start(store, "x", T0).await;
    store.deploy(T0, &[v("M", "m2")]).await.unwrap();
    store.deploy(T0, &[v("M", "m3")]).await.unwrap();
    assert_eq!(
        store.scrub_versions().await.unwrap(),
        [("M".to_string(), 2)],
        "v1 has an instance, v3 is the latest, N v1 is N's latest"
    );
    let left: Vec<u32> = store
        .versions(Some("M"))
        .await
        .unwrap()
        .iter()
        .map(|r| r.version)
        .collect();
    assert_eq!(left, [1, 3]);
    assert!(store.scrub_versions().await.unwrap().is_empty());
    // The next deploy still numbers after the latest.
    assert_eq!(
        store.deploy(T0, &[v("M", "m4")]).await.unwrap(),
        [deployed("M", 4, true)]
    );
}
