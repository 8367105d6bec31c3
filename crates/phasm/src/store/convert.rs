//! Conversions between the database's integers and Rust's, without `as`: the store denies the
//! lossy casts, so a corrupt row (or a count past a column's range) saturates instead of
//! wrapping around silently. Also the stored forms of contexts, statuses, kinds and tokens,
//! the same in every backend.

use crate::engine::{Context, TaskKind};

use super::{InstanceStatus, StoreError, StoreResult};

/// A count, step or id read from a `BIGINT`/`INTEGER` column; a negative value (which phasm
/// never writes) reads as 0.
pub(crate) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// An attempt number read from the database, clamped to `0..=u32::MAX`.
pub(crate) fn attempt(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A Rust count, size or step for a `BIGINT`/`INTEGER` column, saturating at `i64::MAX`.
pub(crate) fn bigint(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// The whole tokens of a rate bucket: rounded down, never negative.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn whole(x: f64) -> usize {
    // A float-to-integer `as` saturates at the target's bounds and reads NaN as 0.
    x.floor().max(0.0) as usize
}

/// A context as stored (JSON text).
pub(crate) fn to_json(context: &Context) -> StoreResult<String> {
    serde_json::to_string(context).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A context read back from its stored JSON text.
pub(crate) fn from_json(text: &str) -> StoreResult<Context> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("bad context JSON: {e}")))
}

/// An instance status read from its column.
pub(crate) fn parse_status(s: &str) -> StoreResult<InstanceStatus> {
    InstanceStatus::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown instance status `{s}`")))
}

/// A task kind read from its column.
pub(crate) fn task_kind(kind: &str) -> StoreResult<TaskKind> {
    TaskKind::parse(kind).ok_or_else(|| StoreError::Corrupt(format!("task kind `{kind}`")))
}

/// A wait token read from its column (JSON text).
pub(crate) fn parse_token(token: Option<String>) -> StoreResult<Option<serde_json::Value>> {
    token
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("bad token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_saturate() {
        assert_eq!(count(-5), 0);
        assert_eq!(count(7), 7);
        assert_eq!(attempt(-1), 0);
        assert_eq!(attempt(i64::MAX), u32::MAX);
        assert_eq!(bigint(u64::MAX), i64::MAX);
        assert_eq!(bigint(12usize), 12);
        assert_eq!(whole(f64::NAN), 0);
        assert_eq!(whole(-3.5), 0);
        assert_eq!(whole(2.9), 2);
        assert_eq!(whole(f64::INFINITY), usize::MAX);
    }
}
