//! Instance and task names, Fantasm's way.

use crate::clock::Micros;

/// A generated instance name: `MACHINE-YYYYMMDDHHMMSS-XXXXXX` (UTC, six random characters).
pub fn instance_name(machine: &str, now: Micros, rng: &mut fastrand::Rng) -> String {
    let stamp = chrono::DateTime::from_timestamp_micros(now)
        .map(|t| t.format("%Y%m%d%H%M%S").to_string())
        .unwrap_or_else(|| "00000000000000".into());
    let suffix: String = (0..6)
        .map(|_| rng.alphanumeric().to_ascii_lowercase())
        .collect();
    format!("{machine}-{stamp}-{suffix}")
}

/// True for a name a caller may give an instance: 1 to 200 characters of letters, digits,
/// `-`, `_` and `.`, other than `.` and `..` (names appear as URL path segments, where those
/// two mean "this folder" and "the folder above", and in task names).
pub fn is_valid_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The name of the task that dispatches `event` from `from` to `to` as the branch's step
/// `step`: `INSTANCE[--BRANCH]--FROM--EVENT--TO--step-N`. Unique per instance, and the same
/// every time the same logical dispatch is computed, so it doubles as the idempotency key.
pub fn task_name(
    instance: &str,
    branch: &str,
    from: &str,
    event: &str,
    to: &str,
    step: u64,
) -> String {
    if branch.is_empty() {
        format!("{instance}--{from}--{event}--{to}--step-{step}")
    } else {
        format!("{instance}--branch-{branch}--{from}--{event}--{to}--step-{step}")
    }
}

/// The name of the wait task of a branch waiting in `state` as its step `step`:
/// `INSTANCE[--branch-BRANCH]--STATE--wait--step-N` (no transition's task has this shape).
pub fn wait_task_name(instance: &str, branch: &str, state: &str, step: u64) -> String {
    if branch.is_empty() {
        format!("{instance}--{state}--wait--step-{step}")
    } else {
        format!("{instance}--branch-{branch}--{state}--wait--step-{step}")
    }
}
