//! Schedules: instances started on a clock (the `schedules:` list of a machine file).
//!
//! Plain data and pure time arithmetic, no IO. A schedule *ticks* at the times its `cron`
//! expression (in its time zone) or its `every` interval names; each tick fires at most once
//! across every worker sharing a database (the store's fence,
//! [`WorkStore::fire_schedule`](crate::store::WorkStore::fire_schedule)), and starts one
//! instance named [`Schedule::instance_name`]. A worker fires only the latest tick at or
//! before now: ticks missed while no worker ran are not made up, except the last of them.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::clock::{micros, Micros};
use crate::context::Context;

/// One entry of `schedules:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Unique name, `[a-zA-Z0-9-]{1,50}`; the prefix of its instances' names.
    pub name: String,
    /// The machine it starts.
    pub machine: String,
    /// When it ticks.
    pub timing: Timing,
    /// The zone a `cron` expression is read in (`timezone:`, default UTC).
    pub timezone: chrono_tz::Tz,
    /// Whether `timezone:` was written (so writing the file back keeps it as it was).
    pub timezone_written: bool,
    /// The context each instance starts with.
    pub context: Context,
    /// What a tick does while the schedule's previous instance still runs.
    pub overlap: Overlap,
}

/// When a schedule ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    /// At every minute a five-field cron expression matches, in the schedule's time zone.
    Cron {
        /// The expression as written.
        expression: String,
        /// The expression, parsed.
        cron: Box<croner::Cron>,
    },
    /// At every multiple of this interval since 1970-01-01 00:00 UTC (so `every: 1h` ticks on
    /// the hour, `every: 1d` at midnight UTC). A whole number of seconds, at least one.
    Every(Duration),
}

/// What a tick does while the schedule's previous instance still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Start nothing; the tick counts as fired (the default).
    #[default]
    Skip,
    /// Start the tick's instance anyway.
    Allow,
}

impl Overlap {
    /// As written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
        }
    }
}

/// Parse a five-field cron expression (`minute hour day-of-month month day-of-week`, with
/// names, lists, ranges, steps, `L`, `W`, `#` and the `@daily`-style nicknames).
///
/// # Errors
/// Why the text is not one.
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    let fields = text.split_whitespace().count();
    if !text.trim_start().starts_with('@') && fields != 5 {
        return Err(format!(
            "a cron expression has five fields (minute hour day-of-month month day-of-week), this one has {fields}"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| e.to_string())
}

impl Schedule {
    /// The latest tick at or before `now` (`None`: none, e.g. a cron expression that never
    /// matches).
    pub fn latest_tick(&self, now: Micros) -> Option<Micros> {
        match &self.timing {
            Timing::Every(every) => {
                let step = micros(*every).max(1);
                Some(now - now.rem_euclid(step))
            }
            Timing::Cron { cron, .. } => {
                let local = at(now)?.with_timezone(&self.timezone);
                let tick = cron.find_previous_occurrence(&local, true).ok()?;
                Some(tick.timestamp_micros())
            }
        }
    }

    /// The first tick after `now`.
    pub fn next_tick(&self, now: Micros) -> Option<Micros> {
        match &self.timing {
            Timing::Every(every) => {
                let step = micros(*every).max(1);
                Some(now - now.rem_euclid(step) + step)
            }
            Timing::Cron { cron, .. } => {
                let local = at(now)?.with_timezone(&self.timezone);
                let tick = cron.find_next_occurrence(&local, false).ok()?;
                Some(tick.timestamp_micros())
            }
        }
    }

    /// The name of the instance a tick starts: `SCHEDULE-YYYYMMDDTHHMMSSZ`, the tick in UTC.
    /// The same on every worker, so a tick fired twice starts one instance.
    pub fn instance_name(&self, tick: Micros) -> String {
        let stamp = at(tick).map_or_else(
            || "00000000T000000Z".to_string(),
            |t| t.format("%Y%m%dT%H%M%SZ").to_string(),
        );
        format!("{}-{stamp}", self.name)
    }

    /// How the timing reads: the cron expression and its zone, or `every 10m`.
    pub fn describe(&self) -> String {
        match &self.timing {
            Timing::Cron { expression, .. } => format!("cron {expression} ({})", self.timezone),
            Timing::Every(every) => format!("every {}", crate::duration::human(*every)),
        }
    }
}

/// A timestamp as a UTC date and time.
fn at(t: Micros) -> Option<DateTime<Utc>> {
    Utc.timestamp_micros(t).single()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(timing: Timing, zone: &str) -> Schedule {
        Schedule {
            name: "nightly".into(),
            machine: "Report".into(),
            timing,
            timezone: zone.parse().expect("a zone"),
            timezone_written: true,
            context: Context::new(),
            overlap: Overlap::Skip,
        }
    }

    fn cron(text: &str) -> Timing {
        Timing::Cron {
            expression: text.into(),
            cron: Box::new(parse_cron(text).expect("valid")),
        }
    }

    fn utc(text: &str) -> Micros {
        DateTime::parse_from_rfc3339(text)
            .expect("a time")
            .timestamp_micros()
    }

    #[test]
    fn cron_ticks_in_its_time_zone() {
        let s = schedule(cron("0 3 * * *"), "Europe/Paris");
        // 03:00 in Paris in winter is 02:00 UTC.
        let now = utc("2026-11-30T12:00:00Z");
        assert_eq!(s.latest_tick(now), Some(utc("2026-11-30T02:00:00Z")));
        assert_eq!(s.next_tick(now), Some(utc("2026-12-01T02:00:00Z")));
        // Exactly at a tick: it is the latest, and the next is a day later.
        let tick = utc("2026-11-30T02:00:00Z");
        assert_eq!(s.latest_tick(tick), Some(tick));
        assert_eq!(s.next_tick(tick), Some(utc("2026-12-01T02:00:00Z")));
        // In summer Paris is two hours ahead.
        let summer = utc("2026-07-01T12:00:00Z");
        assert_eq!(s.latest_tick(summer), Some(utc("2026-07-01T01:00:00Z")));
    }

    #[test]
    fn daylight_saving_changes_skip_nothing_and_repeat_nothing() {
        let s = schedule(cron("30 2 * * *"), "Europe/Paris");
        // 29 March 2026: Paris jumps from 02:00 to 03:00; 02:30 does not exist that day.
        let spring = s.next_tick(utc("2026-03-28T12:00:00Z")).expect("a tick");
        assert_eq!(
            spring,
            utc("2026-03-29T01:00:00Z"),
            "fires at 03:00, just after the gap"
        );
        assert_eq!(s.next_tick(spring), Some(utc("2026-03-30T00:30:00Z")));
        // 25 October 2026: Paris goes back from 03:00 to 02:00; 02:30 happens twice.
        let first = s.next_tick(utc("2026-10-24T12:00:00Z")).expect("a tick");
        assert_eq!(
            first,
            utc("2026-10-25T00:30:00Z"),
            "the first 02:30 (summer time)"
        );
        let next = s.next_tick(first).expect("a tick");
        assert_eq!(next, utc("2026-10-26T01:30:00Z"), "not again an hour later");
        // The latest tick during the repeated hour is still the first 02:30.
        assert_eq!(s.latest_tick(utc("2026-10-25T01:45:00Z")), Some(first));
    }

    #[test]
    fn every_ticks_on_multiples_since_the_epoch() {
        let s = schedule(Timing::Every(Duration::from_secs(600)), "UTC");
        let now = utc("2026-11-30T12:34:56Z");
        assert_eq!(s.latest_tick(now), Some(utc("2026-11-30T12:30:00Z")));
        assert_eq!(s.next_tick(now), Some(utc("2026-11-30T12:40:00Z")));
        assert_eq!(
            s.instance_name(utc("2026-11-30T12:30:00Z")),
            "nightly-20261130T123000Z"
        );
        assert!(crate::engine::is_valid_instance_name(&s.instance_name(now)));
    }

    #[test]
    fn cron_expressions_have_five_fields() {
        assert!(parse_cron("0 3 * * *").is_ok());
        assert!(parse_cron("@daily").is_ok());
        assert!(parse_cron("*/15 9-17 * * MON-FRI").is_ok());
        let six = parse_cron("0 0 3 * * *").expect_err("six fields");
        assert!(six.contains("five fields"), "{six}");
        assert!(parse_cron("0 25 * * *").is_err());
        assert!(parse_cron("every day").is_err());
    }
}
