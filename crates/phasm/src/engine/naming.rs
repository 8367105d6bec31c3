//! Instance and task names, Fantasm's way.

use crate::clock::Micros;

/// A generated instance name: `MACHINE-YYYYMMDDHHMMSS-XXXXXX` (UTC, six random characters).
pub fn instance_name(machine: &str, now: Micros, rng: &mut fastrand::Rng) -> String {
    let stamp = chrono::DateTime::from_timestamp_micros(now).map_or_else(
        || "00000000000000".into(),
        |t| t.format("%Y%m%d%H%M%S").to_string(),
    );
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

/// The shape of names the engine gives instances itself, when `name` has one: a spawned
/// child's (`PARENT.sSTEP[.bBRANCH].N`, or `PARENT.HASH.N` when shortened) or a schedule
/// tick's (`SCHEDULE-YYYYMMDDTHHMMSSZ`). A caller may not start an instance under such a
/// name: made in advance, it would stand in for the child or the tick, which would then
/// never run.
pub fn reserved_shape(name: &str) -> Option<&'static str> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((rest, n)) = name.rsplit_once('.') {
        if digits(n) {
            let spawned = rest
                .split('.')
                .skip(1)
                .any(|part| part.strip_prefix('s').is_some_and(digits));
            let hashed = rest
                .rsplit_once('.')
                .is_some_and(|(_, h)| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if spawned || hashed {
                return Some("a spawned child's name (PARENT.sSTEP.N)");
            }
        }
    }
    if let Some((_, stamp)) = name.rsplit_once('-') {
        let b = stamp.as_bytes();
        let tick = b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && digits(&stamp[..8])
            && digits(&stamp[9..15]);
        if tick {
            return Some("a schedule tick's name (SCHEDULE-YYYYMMDDTHHMMSSZ)");
        }
    }
    None
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

/// The name of the wait task of a branch waiting in `state` as its step `step`, begun by the
/// task `begun_by` (the id of the task whose step entered the state):
/// `INSTANCE[--branch-BRANCH]--STATE--wait--step-N--by-ID` (no transition's task has this
/// shape). Task ids are never reused, so a wait begun again — after a reset, or by an
/// instance made again under a scrubbed one's name — has a name, and so a token, of its own;
/// every attempt of the step that begins it computes the same name.
pub fn wait_task_name(
    instance: &str,
    branch: &str,
    state: &str,
    step: u64,
    begun_by: i64,
) -> String {
    if branch.is_empty() {
        format!("{instance}--{state}--wait--step-{step}--by-{begun_by}")
    } else {
        format!("{instance}--branch-{branch}--{state}--wait--step-{step}--by-{begun_by}")
    }
}

#[cfg(test)]
mod reserved_tests {
    use super::*;

    #[test]
    fn the_engines_own_name_shapes_are_recognised() {
        for name in [
            "par1.s0.1",
            "par1.s12.bf3-1.0",
            "a.b.s3.bj7.f2-1.12",
            "p.0123456789abcdef.3",
            "nightly-20261207T120650Z",
            "a-b-20260101T000000Z",
        ] {
            assert!(reserved_shape(name).is_some(), "{name}");
        }
        for name in [
            "order-1",
            "v1.2",
            "s0.1",
            "a.sx.1",
            "nightly-2026",
            "x-20261207T1206Z",
            "par1.s0.x",
        ] {
            assert_eq!(reserved_shape(name), None, "{name}");
        }
    }
}
