//! Checks of what the console reads about a machine as a whole.

use super::{apply_one, commit, request, start, SEC, T0};
use crate::engine::{Disposition, InstanceChange};
use crate::store::{InstanceStatus, Store};

/// Check the machine overview: running and failed counts, ended instances by period, pending
/// steps by state, failures grouped by error; other machines' instances are not counted.
pub async fn a_machine_overview_counts_where_its_instances_are(store: &dyn Store) {
    for name in ["done", "bad-1", "bad-2"] {
        start(store, name, T0).await;
    }
    // `live` keeps its start step, due later.
    start(store, "live", T0 + 1000 * SEC).await;
    // Finish `done`, fail `bad-1` and `bad-2` with one error.
    for _ in 0..3 {
        let t = store.claim(T0, &request(1)).await.unwrap().remove(0);
        let mut c = commit(&t);
        if t.instance == "done" {
            c.instance_change = InstanceChange::BranchEnded(super::ctx(1));
        } else {
            c.history.clear();
            c.disposition = Disposition::Failed {
                error: "card declined".into(),
            };
            c.instance_change = InstanceChange::Fail("card declined".into());
        }
        apply_one(store, T0 + SEC, c).await;
    }
    let hour = T0 - 3600 * SEC;
    let o = store
        .machine_overview("M", hour, T0 - 86_400 * SEC)
        .await
        .unwrap();
    assert_eq!((o.running, o.failed), (1, 2), "{o:?}");
    assert!(
        o.ended_last_hour.contains(&(InstanceStatus::Completed, 1)),
        "{o:?}"
    );
    assert!(o.ended_last_day.contains(&(InstanceStatus::Completed, 1)));
    // Every pending step here is a start step (no state left yet).
    assert_eq!(o.states.len(), 1, "{o:?}");
    assert_eq!(o.states[0].state, None);
    assert!(!o.states[0].waiting);
    assert_eq!((o.states[0].running, o.states[0].failed), (1, 2));
    assert_eq!(o.states[0].oldest, T0);
    assert_eq!(o.failures.len(), 1, "{o:?}");
    assert_eq!(o.failures[0].error, "card declined");
    assert_eq!(o.failures[0].instances, 2);
    assert!(o.failures[0].latest.starts_with("bad-"));
    // Nothing ended in a window after everything happened; another machine has nothing.
    let later = store
        .machine_overview("M", T0 + 10 * SEC, T0 + 10 * SEC)
        .await
        .unwrap();
    assert!(later.ended_last_hour.is_empty() && later.ended_last_day.is_empty());
    let other = store.machine_overview("Other", hour, hour).await.unwrap();
    assert_eq!(other, crate::store::MachineOverview::default());
}
