//! The statements both backends run alike, written once.
//!
//! Each is written with SQLite's numbered placeholders (`?1`, `?2`, …) and in SQL both
//! databases read the same way (`TRUE`, `CASE` rather than `MAX`/`GREATEST`, `RETURNING`);
//! PostgreSQL's text (`$1`, `$2`, …) is made from it once, the first time it is used. What
//! the two databases spell differently (lists as `json_each` or `ANY`, locks, `pg_notify`)
//! stays in each backend's module, beside its row mapping.

use std::sync::LazyLock;

use crate::clock::Micros;

use super::plan::Fence;

/// One statement, in each backend's spelling.
pub(crate) struct Sql {
    sqlite: &'static str,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    postgres: LazyLock<String>,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    postgres_returning_id: LazyLock<String>,
}

impl Sql {
    /// This statement for PostgreSQL, returning the id of the row it inserted. (SQLite asks
    /// its connection for the last row id instead: its `RETURNING` was measured to cost a
    /// chain step a fifth of its speed.)
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn postgres_returning_id(&self) -> &str {
        &self.postgres_returning_id
    }

    /// The statement for SQLite.
    pub(crate) fn sqlite(&self) -> &'static str {
        self.sqlite
    }

    /// The statement for PostgreSQL.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn postgres(&self) -> &str {
        &self.postgres
    }
}

/// `sql` with each `?N` placeholder written `$N`.
fn postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

macro_rules! statements {
    ($($(#[$doc:meta])* $name:ident = $text:expr;)*) => {
        $(
            $(#[$doc])*
            pub(crate) static $name: Sql = Sql {
                sqlite: $text,
                postgres: LazyLock::new(|| postgres($text)),
                postgres_returning_id: LazyLock::new(|| format!("{} RETURNING id", postgres($text))),
            };
        )*
    };
}

/// The fence's guard: the claim still ours, our lease unexpired; what it changed.
macro_rules! fenced {
    ($change:literal) => {
        concat!(
            $change,
            " AND claim = ?2 AND status = 'ready' AND due_at > ?3
              RETURNING instance_id, kind = 'join',
                        CASE WHEN kind = 'join' THEN NULL ELSE context END, step"
        )
    };
}

statements! {
    /// Fence: the step is done. `(id, claim, now)`.
    FENCE_DELETE = fenced!("DELETE FROM tasks WHERE id = ?1");
    /// Fence: a continuation queued its next page. `(id, claim, now)`.
    FENCE_PAGE_QUEUED = fenced!("UPDATE tasks SET page_queued = TRUE WHERE id = ?1");
    /// Fence: tried again later. `(id, claim, now, due_at, error)`.
    FENCE_RESCHEDULE = fenced!(
        "UPDATE tasks SET due_at = ?4, lease_owner = NULL, last_error = ?5 WHERE id = ?1"
    );
    /// Fence: failed for good. `(id, claim, now, due_at, error)`.
    FENCE_FAIL = fenced!(
        "UPDATE tasks SET status = 'failed', due_at = ?4, lease_owner = NULL, last_error = ?5
         WHERE id = ?1"
    );
    /// Fence: not run, its attempt given back. `(id, claim, now, due_at, reason)`.
    FENCE_GIVE_BACK = fenced!(
        "UPDATE tasks SET due_at = ?4, lease_owner = NULL, last_error = ?5,
                attempts = CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END,
                first_attempt_at = CASE WHEN attempts <= 1 THEN NULL ELSE first_attempt_at END
         WHERE id = ?1"
    );
    /// A task, unless one of that name is pending (PostgreSQL adds `RETURNING id`: see
    /// [`Sql::postgres_returning_id`]).
    INSERT_TASK = "INSERT INTO tasks (instance_id, name, kind, from_state, event, context, step,
                                      branch, queue, target, status, due_at, created_at,
                                      lease_owner, claim, attempts, first_attempt_at, token,
                                      accepts)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'ready', ?11, ?12, ?13, ?14,
                           ?15, ?16, ?17, ?18)
                   ON CONFLICT (instance_id, name) DO NOTHING";
    /// The parked branches a join took.
    DELETE_JOIN_ITEMS = "DELETE FROM items WHERE join_task = ?1";
    /// A transition.
    INSERT_HISTORY = "INSERT INTO history (instance_id, from_state, event, to_state, attempt,
                                           started_at, finished_at, task, branch, ends_branch,
                                           context, step)
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";
    /// A parked branch (PostgreSQL adds `RETURNING id`).
    INSERT_ITEM = "INSERT INTO items (instance_id, state, grp, context, branch, step, created_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
    /// A spawned instance on its machine's latest version, unless one of that name exists
    /// (PostgreSQL adds `RETURNING id`).
    INSERT_CHILD = "INSERT INTO instances (name, machine, status, context, parent, created_at,
                                           updated_at, version)
                    VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?5,
                            (SELECT id FROM machine_versions WHERE machine = ?2
                             ORDER BY version DESC LIMIT 1))
                    ON CONFLICT (name) DO NOTHING";
    /// A log line.
    INSERT_LOG = "INSERT INTO logs (instance_id, at, level, message, task)
                  VALUES (?1, ?2, ?3, ?4, ?5)";
    /// A branch's result becomes the instance's.
    SET_RESULT = "UPDATE instances SET result = ?2, updated_at = ?3
                  WHERE id = ?1 AND status = 'running'";
    /// Every ready task of a failed instance is held.
    HOLD_READY = "UPDATE tasks SET status = 'held', lease_owner = NULL
                  WHERE instance_id = ?1 AND status = 'ready'";
    /// An instance ends.
    END_INSTANCE = "UPDATE instances SET status = ?2, error = ?3, updated_at = ?4, ended_at = ?4
                    WHERE id = ?1";
    /// An instance's pending tasks go.
    DROP_TASKS = "DELETE FROM tasks WHERE instance_id = ?1";
    /// An instance's parked branches go.
    DROP_ITEMS = "DELETE FROM items WHERE instance_id = ?1";
    /// How many tasks of a queue run now. `(queue, now)`.
    RUNNING_IN_QUEUE = "SELECT COUNT(*) FROM tasks
                        WHERE queue = ?1 AND lease_owner IS NOT NULL AND status = 'ready'
                          AND due_at > ?2";
    /// A queue's bucket.
    READ_BUCKET = "SELECT tokens, updated_at FROM queue_rates WHERE queue = ?1";
    /// A queue's bucket, written. `(queue, tokens, now)`.
    WRITE_BUCKET = "INSERT INTO queue_rates (queue, tokens, updated_at) VALUES (?1, ?2, ?3)
                    ON CONFLICT (queue) DO UPDATE SET tokens = excluded.tokens,
                                                      updated_at = excluded.updated_at";
    /// A join takes its group's parked branches. `(join, instance, state, group)`.
    TAKE_ITEMS = "UPDATE items SET join_task = ?1
                  WHERE instance_id = ?2 AND state = ?3 AND grp = ?4
                    AND (join_task IS NULL OR join_task = ?1)";
    /// The contexts a join took, in parking order.
    JOIN_CONTEXTS = "SELECT context FROM items WHERE join_task = ?1 ORDER BY id";
}

/// The fence's statement for `fence`, and its two parameters after `(id, claim, now)` (due
/// time and text) when it takes them.
pub(crate) fn fence(fence: Fence<'_>, now: Micros) -> (&'static Sql, Option<(Micros, &str)>) {
    match fence {
        Fence::Delete => (&FENCE_DELETE, None),
        Fence::MarkPageQueued => (&FENCE_PAGE_QUEUED, None),
        Fence::Reschedule { due_at, error } => (&FENCE_RESCHEDULE, Some((due_at, error))),
        Fence::Fail { error } => (&FENCE_FAIL, Some((now, error))),
        Fence::GiveBack { due_at, reason } => (&FENCE_GIVE_BACK, Some((due_at, reason))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_the_postgres_way() {
        assert_eq!(
            postgres("SELECT ?1, ?12 FROM t WHERE a = '?' AND b = ?2"),
            "SELECT $1, $12 FROM t WHERE a = '?' AND b = $2"
        );
        assert!(FENCE_DELETE.postgres().contains("claim = $2"));
        assert!(FENCE_DELETE.sqlite().contains("claim = ?2"));
    }
}
