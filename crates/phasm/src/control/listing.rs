//! Listing instances as people ask for them (`GET /api/instances`, the console's list):
//! query parameters checked and turned into a [`ListFilter`], with a clear error for each
//! mistake.

use serde::Deserialize;

use crate::clock::Micros;
use crate::engine::PSEUDO_INIT;
use crate::machine::{Config, Machine};
use crate::store::{InstanceStatus, ListFilter, ListOrder, StepMatch};

/// Most instances one page lists.
pub const MAX_PAGE: usize = 1000;

/// The query parameters of an instance list, as given (every one optional).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "server", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "server", into_params(parameter_in = Query))]
pub struct ListParams {
    /// Only this machine.
    pub machine: Option<String>,
    /// Only this status.
    pub status: Option<String>,
    /// Only names that start with this text.
    pub prefix: Option<String>,
    /// Only instances with a branch in this state (needs `machine`).
    pub state: Option<String>,
    /// Only instances whose pending step (in `state`, when given) was queued longer ago than
    /// this duration (`1h`, `30m`).
    pub stuck: Option<String>,
    /// Created at or after this time (RFC 3339).
    pub created_after: Option<String>,
    /// Created before this time.
    pub created_before: Option<String>,
    /// Ended at or after this time.
    pub ended_after: Option<String>,
    /// Ended before this time.
    pub ended_before: Option<String>,
    /// `created` (newest first, the default), `oldest` (oldest first), `ended` (most recently
    /// ended first) or `duration` (longest first, among the 10,000 that ended last).
    pub order: Option<String>,
    /// At most this many (default 50, at most [`MAX_PAGE`]).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl ListParams {
    /// The filters (every parameter but `order`, `limit` and `cursor`), by name.
    fn filter_slots(&mut self) -> [(&'static str, &mut Option<String>); 9] {
        [
            ("prefix", &mut self.prefix),
            ("machine", &mut self.machine),
            ("status", &mut self.status),
            ("state", &mut self.state),
            ("stuck", &mut self.stuck),
            ("created_after", &mut self.created_after),
            ("created_before", &mut self.created_before),
            ("ended_after", &mut self.ended_after),
            ("ended_before", &mut self.ended_before),
        ]
    }

    /// The filters that are given (not empty), as `(name, value)` pairs: what a form must
    /// carry to list the same instances again.
    pub fn given_filters(&self) -> Vec<(&'static str, String)> {
        let mut copy = self.clone();
        copy.filter_slots()
            .into_iter()
            .filter_map(|(name, value)| value.take().filter(|v| !v.is_empty()).map(|v| (name, v)))
            .collect()
    }

    /// Filters read by name (`get`), the rest left out: the inverse of
    /// [`ListParams::given_filters`].
    pub fn from_filters(get: impl Fn(&str) -> Option<String>) -> Self {
        let mut params = ListParams::default();
        for (name, slot) in params.filter_slots() {
            *slot = get(name);
        }
        params
    }

    /// The filter these parameters ask for, at `now`.
    ///
    /// # Errors
    /// What is wrong with a parameter, naming it.
    pub fn to_filter(&self, config: &Config, now: Micros) -> Result<ListFilter, String> {
        let given = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let machine = given(&self.machine);
        let status = match given(&self.status) {
            None => None,
            Some(s) => Some(InstanceStatus::parse(&s).ok_or_else(|| {
                format!("unknown status `{s}`; use running, completed, failed, halted or cancelled")
            })?),
        };
        let steps = match given(&self.state) {
            None => None,
            Some(state) => {
                let Some(name) = &machine else {
                    return Err("`state` needs a `machine`: states belong to one machine".into());
                };
                let m = config
                    .machine(name)
                    .ok_or_else(|| format!("no machine named `{name}`"))?;
                if m.state(&state).is_none() {
                    return Err(format!("machine `{name}` has no state `{state}`"));
                }
                Some(steps_into(m, &state))
            }
        };
        let queued_before = match given(&self.stuck) {
            None => None,
            Some(d) => {
                let d = crate::config::parse_duration(&d)
                    .map_err(|e| format!("`stuck`: {e} (write e.g. `1h` or `30m`)"))?;
                Some(now - crate::clock::micros(d))
            }
        };
        let time = |key: &str, v: &Option<String>| -> Result<Option<Micros>, String> {
            given(v)
                .map(|t| {
                    parse_time(&t).ok_or_else(|| {
                        format!("`{key}`: `{t}` is not a time; write RFC 3339 (2026-11-30T12:00:00Z), or a UTC date and time (2026-11-30T12:00) or date (2026-11-30)")
                    })
                })
                .transpose()
        };
        let order = match given(&self.order).as_deref() {
            None | Some("created") => ListOrder::Created,
            Some("ended") => ListOrder::Ended,
            Some("duration") => ListOrder::Duration,
            Some("oldest") => ListOrder::Oldest,
            Some(other) => {
                return Err(format!(
                    "unknown order `{other}`; use created, oldest, ended or duration"
                ))
            }
        };
        let cursor = given(&self.cursor);
        if let Some(c) = cursor
            .as_deref()
            .filter(|c| !crate::engine::is_valid_instance_name(c))
        {
            return Err(format!("unknown cursor `{c}`"));
        }
        Ok(ListFilter {
            machine,
            version: None,
            status,
            limit: self.limit.unwrap_or(50).clamp(1, MAX_PAGE),
            before: cursor,
            prefix: given(&self.prefix),
            steps,
            queued_before,
            created_after: time("created_after", &self.created_after)?,
            created_before: time("created_before", &self.created_before)?,
            ended_after: time("ended_after", &self.ended_after)?,
            ended_before: time("ended_before", &self.ended_before)?,
            order,
        })
    }
}

/// A time as people type it: RFC 3339, or a date and time without zone (UTC, as a browser's
/// `datetime-local` field sends it), or a date (midnight UTC).
fn parse_time(text: &str) -> Option<Micros> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_micros());
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_micros())
}

/// The pending steps that put a branch of `machine` in `state`: the start step when it is
/// the initial state, the dispatch of every transition into it, and a wait in it.
pub fn steps_into(machine: &Machine, state: &str) -> Vec<StepMatch> {
    let mut steps = Vec::new();
    if machine.initial_state().is_some_and(|s| s.name == state) {
        steps.push(StepMatch {
            from: None,
            event: Some(PSEUDO_INIT.to_string()),
        });
    }
    for s in &machine.states {
        for t in s.transitions.iter().filter(|t| t.to == state) {
            steps.push(StepMatch {
                from: Some(s.name.clone()),
                event: Some(t.event.clone()),
            });
        }
    }
    if machine.state(state).is_some_and(|s| s.wait.is_some()) {
        steps.push(StepMatch {
            from: Some(state.to_string()),
            event: None,
        });
    }
    steps
}

/// The state a listed instance's oldest pending step puts its branch in.
pub fn pending_state(machine: Option<&Machine>, step: &crate::store::PendingStep) -> String {
    match machine {
        Some(m) => {
            super::overview::state_entered(m, step.from.as_deref(), &step.event, step.waiting)
        }
        None => step.from.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_given_filters_read_back_as_the_same_parameters() {
        let params = ListParams {
            prefix: Some("ord-".into()),
            machine: Some("Orders".into()),
            state: Some("payment".into()),
            stuck: Some(String::new()),
            ended_before: Some("2026-11-30".into()),
            limit: Some(5),
            ..ListParams::default()
        };
        let given = params.given_filters();
        assert_eq!(
            given,
            [
                ("prefix", "ord-".to_string()),
                ("machine", "Orders".to_string()),
                ("state", "payment".to_string()),
                ("ended_before", "2026-11-30".to_string()),
            ]
        );
        let back = ListParams::from_filters(|name| {
            given
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        });
        assert_eq!(
            back,
            ListParams {
                stuck: None,
                limit: None,
                ..params
            }
        );
    }
}
