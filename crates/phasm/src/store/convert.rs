//! Conversions between the database's integers and Rust's, without `as`: the store denies the
//! lossy casts, so a corrupt row (or a count past a column's range) saturates instead of
//! wrapping around silently.

/// A count, step or id read from a `BIGINT`/`INTEGER` column; a negative value (which phasm
/// never writes) reads as 0.
pub(crate) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// An attempt number read from the database, clamped to `0..=u32::MAX`.
pub(crate) fn attempt(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A size read from the database; a negative value reads as 0.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn size(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_saturate() {
        assert_eq!(count(-5), 0);
        assert_eq!(count(7), 7);
        assert_eq!(attempt(-1), 0);
        assert_eq!(attempt(i64::MAX), u32::MAX);
        assert_eq!(size(-1), 0);
        assert_eq!(bigint(u64::MAX), i64::MAX);
        assert_eq!(bigint(12usize), 12);
        assert_eq!(whole(f64::NAN), 0);
        assert_eq!(whole(-3.5), 0);
        assert_eq!(whole(2.9), 2);
        assert_eq!(whole(f64::INFINITY), usize::MAX);
    }
}
