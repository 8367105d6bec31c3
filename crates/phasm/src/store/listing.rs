//! The instance list's query ([`ReadStore::list`](super::ReadStore::list)), written once for
//! every backend: a [`ListFilter`] becomes SQL text and its parameters, which each backend
//! binds in its own way. Only the few spellings that differ between SQLite and PostgreSQL
//! depend on the [`Dialect`].

use super::{InstanceStatus, ListFilter, ListOrder};

/// [`ListOrder::Duration`] sorts at most this many instances: those that ended last.
pub const DURATION_WINDOW: usize = 10_000;

/// The SQL spellings of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `?N` placeholders.
    Sqlite,
    /// `$N` placeholders, typed.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Postgres,
}

/// A parameter of the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    /// Text.
    Text(String),
    /// A 64-bit integer.
    Int(i64),
}

/// The query for a filter: its SQL and parameters, in placeholder order. The columns are,
/// in order: name, machine, status, created_at, updated_at, error, parent, ended_at, the
/// number of transitions, and the oldest pending step's from_state, event, whether it is a
/// wait, and created_at (NULL without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    pub sql: String,
    pub params: Vec<Param>,
}

struct Builder {
    dialect: Dialect,
    params: Vec<Param>,
}

impl Builder {
    /// Add a parameter; its placeholder.
    fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        let n = self.params.len();
        match (self.dialect, self.params.last()) {
            (Dialect::Sqlite, _) => format!("?{n}"),
            (Dialect::Postgres, Some(Param::Int(_))) => format!("${n}::BIGINT"),
            (Dialect::Postgres, _) => format!("${n}::TEXT"),
        }
    }

    fn text(&mut self, s: &str) -> String {
        self.bind(Param::Text(s.to_string()))
    }

    fn int(&mut self, i: i64) -> String {
        self.bind(Param::Int(i))
    }
}

/// The query that lists what `filter` asks for.
pub(crate) fn query(filter: &ListFilter, dialect: Dialect) -> Query {
    let mut b = Builder {
        dialect,
        params: Vec::new(),
    };
    let mut conditions: Vec<String> = Vec::new();
    if let Some(m) = &filter.machine {
        conditions.push(format!("i.machine = {}", b.text(m)));
    }
    if let Some(v) = filter.version {
        conditions.push(format!(
            "i.version IN (SELECT v.id FROM machine_versions v WHERE v.machine = i.machine AND v.version = {})",
            b.int(i64::from(v))
        ));
    }
    if let Some(s) = filter.status {
        conditions.push(format!("i.status = {}", b.text(InstanceStatus::as_str(s))));
    }
    if let Some(prefix) = &filter.prefix {
        let p = b.text(prefix);
        conditions.push(match dialect {
            // Names are ASCII letters, digits, `-`, `_` and `.`, all below DEL (127): the
            // names starting with `p` are a range of the name index.
            Dialect::Sqlite => format!("i.name >= {p} AND i.name < {p} || char(127)"),
            Dialect::Postgres => format!("starts_with(i.name, {p})"),
        });
    }
    for (column, bound, op) in [
        ("created_at", filter.created_after, ">="),
        ("created_at", filter.created_before, "<"),
        ("ended_at", filter.ended_after, ">="),
        ("ended_at", filter.ended_before, "<"),
    ] {
        if let Some(t) = bound {
            conditions.push(format!("i.{column} {op} {}", b.int(t)));
        }
    }
    if filter.steps.is_some() || filter.queued_before.is_some() {
        let mut step = Vec::new();
        if let Some(kinds) = &filter.steps {
            let mut any = Vec::new();
            for k in kinds {
                let from = match &k.from {
                    Some(f) => format!("t.from_state = {}", b.text(f)),
                    None => "t.from_state IS NULL".to_string(),
                };
                any.push(match &k.event {
                    Some(e) => format!("({from} AND t.event = {} AND t.kind <> 'wait')", b.text(e)),
                    None => format!("({from} AND t.kind = 'wait')"),
                });
            }
            step.push(if any.is_empty() {
                "1 = 0".to_string()
            } else {
                format!("({})", any.join(" OR "))
            });
        }
        if let Some(t) = filter.queued_before {
            step.push(format!("t.created_at < {}", b.int(t)));
        }
        // Pending steps are few next to ended instances: the matching ones drive the query.
        conditions.push(format!(
            "i.id IN (SELECT t.instance_id FROM tasks t WHERE {})",
            step.join(" AND ")
        ));
    }
    let order = match filter.order {
        // With a name prefix, name order (descending: `MACHINE-YYYYMMDD…` names newest
        // first): the name index gives the page without sorting every match.
        ListOrder::Created if filter.prefix.is_some() => {
            if let Some(c) = &filter.before {
                conditions.push(format!("i.name < {}", b.text(c)));
            }
            "i.name DESC"
        }
        // With a created range, by creation time through its index (in id order, a range
        // far in the past would walk every instance created since).
        ListOrder::Created if filter.created_after.is_some() || filter.created_before.is_some() => {
            if let Some(c) = &filter.before {
                conditions.push(format!(
                    "(i.created_at, i.id) < (SELECT created_at, id FROM instances WHERE name = {})",
                    b.text(c)
                ));
            }
            "i.created_at DESC, i.id DESC"
        }
        ListOrder::Created => {
            if let Some(c) = &filter.before {
                conditions.push(format!(
                    "i.id < (SELECT id FROM instances WHERE name = {})",
                    b.text(c)
                ));
            }
            "i.id DESC"
        }
        ListOrder::Ended => {
            // (Ended instances are never running: the condition lets an index of ended
            // instances serve the order.)
            conditions.push("i.ended_at IS NOT NULL AND i.status <> 'running'".to_string());
            if let Some(c) = &filter.before {
                conditions.push(format!(
                    "(i.ended_at, i.id) < (SELECT ended_at, id FROM instances WHERE name = {})",
                    b.text(c)
                ));
            }
            "i.ended_at DESC, i.id DESC"
        }
        ListOrder::Duration => {
            // Sorted among the machine's DURATION_WINDOW instances that ended last (within
            // the ended range): bounded reading through the index of ended instances, and no
            // index of durations for every ending to write.
            let mut window = vec![
                "w.status <> 'running'".to_string(),
                "w.ended_at IS NOT NULL".to_string(),
            ];
            if let Some(m) = &filter.machine {
                window.push(format!("w.machine = {}", b.text(m)));
            }
            if let Some(t) = filter.ended_after {
                window.push(format!("w.ended_at >= {}", b.int(t)));
            }
            if let Some(t) = filter.ended_before {
                window.push(format!("w.ended_at < {}", b.int(t)));
            }
            let size = b.int(i64::try_from(DURATION_WINDOW).unwrap_or(i64::MAX));
            conditions.push(format!(
                "i.id IN (SELECT w.id FROM instances w WHERE {} ORDER BY w.ended_at DESC LIMIT {size})",
                window.join(" AND ")
            ));
            if let Some(c) = &filter.before {
                conditions.push(format!(
                    "(i.ended_at - i.created_at, i.id) < \
                     (SELECT ended_at - created_at, id FROM instances WHERE name = {})",
                    b.text(c)
                ));
            }
            "i.ended_at - i.created_at DESC, i.id DESC"
        }
        ListOrder::Oldest => {
            if let Some(c) = &filter.before {
                conditions.push(format!(
                    "i.id > (SELECT id FROM instances WHERE name = {})",
                    b.text(c)
                ));
            }
            "i.id"
        }
    };
    let limit =
        b.int(i64::try_from(if filter.limit == 0 { 100 } else { filter.limit }).unwrap_or(100));
    let wait = match dialect {
        Dialect::Sqlite => "p.kind = 'wait'",
        Dialect::Postgres => "p.kind IS NOT DISTINCT FROM 'wait'",
    };
    let steps = match dialect {
        Dialect::Sqlite => "(SELECT COUNT(*) FROM history h WHERE h.instance_id = i.id)",
        Dialect::Postgres => "(SELECT COUNT(*) FROM history h WHERE h.instance_id = i.id)::BIGINT",
    };
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    // The oldest pending step of each listed instance: SQLite looks the row up by its id;
    // PostgreSQL would test that condition against every task row, so it reads it laterally.
    let pending = match dialect {
        Dialect::Sqlite => {
            "LEFT JOIN tasks p ON p.id = (SELECT MIN(id) FROM tasks WHERE instance_id = i.id)"
        }
        Dialect::Postgres => {
            "LEFT JOIN LATERAL (SELECT from_state, event, kind, created_at FROM tasks
                                WHERE instance_id = i.id ORDER BY id LIMIT 1) p ON TRUE"
        }
    };
    let sql = format!(
        "SELECT i.name, i.machine, i.status, i.created_at, i.updated_at, i.error, i.parent, i.ended_at,
                {steps}, p.from_state, p.event, {wait}, p.created_at
         FROM instances i
         {pending}
         {where_clause}
         ORDER BY {order} LIMIT {limit}"
    );
    Query {
        sql,
        params: b.params,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StepMatch;

    #[test]
    fn every_condition_binds_its_value_in_order() {
        let filter = ListFilter {
            machine: Some("Orders".into()),
            prefix: Some("ord-".into()),
            steps: Some(vec![
                StepMatch {
                    from: Some("received".into()),
                    event: Some("pay".into()),
                },
                StepMatch {
                    from: Some("approval".into()),
                    event: None,
                },
            ]),
            queued_before: Some(5),
            before: Some("ord-9".into()),
            limit: 20,
            ..ListFilter::default()
        };
        let q = query(&filter, Dialect::Postgres);
        assert_eq!(
            q.params,
            [
                Param::Text("Orders".into()),
                Param::Text("ord-".into()),
                Param::Text("received".into()),
                Param::Text("pay".into()),
                Param::Text("approval".into()),
                Param::Int(5),
                Param::Text("ord-9".into()),
                Param::Int(20),
            ]
        );
        assert!(q.sql.contains("starts_with(i.name, $2::TEXT)"), "{}", q.sql);
        assert!(q.sql.contains("ORDER BY i.name DESC"), "{}", q.sql);
        assert!(q.sql.contains("LIMIT $8::BIGINT"), "{}", q.sql);
        let q = query(&ListFilter::default(), Dialect::Sqlite);
        assert!(!q.sql.contains("i.status ="), "{}", q.sql);
        assert_eq!(q.params, [Param::Int(100)]);
    }
}
