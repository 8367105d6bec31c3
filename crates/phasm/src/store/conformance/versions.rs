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
    let applied = store.apply(T0, c, Some(&successors)).await.unwrap();
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
