//! Durations as machine files write them: a number of seconds (as Fantasm did) or `90s`, `5m`, `1h30m`,
//! with millisecond resolution.

use std::time::Duration;

/// Parse a duration: plain seconds (`30`, `2.5`), or one or more `<number><unit>` parts with
/// units `ms`, `s`, `m`, `h`, `d` (`500ms`, `90s`, `1h30m`). Negative values are rejected.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if text.starts_with('-') {
        return Err("a duration cannot be negative".into());
    }
    if let Ok(secs) = text.parse::<f64>() {
        return seconds(secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{text}` is not a duration"));
        }
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{number}` is not a number"))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "" => return Err(format!("`{text}` mixes units and plain numbers")),
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}` (use ms, s, m, h or d)"
                ))
            }
        };
        total += seconds(value * scale)?;
        rest = tail;
    }
    Ok(total)
}

/// Durations have millisecond resolution, so that every one can be written back exactly.
fn seconds(secs: f64) -> Result<Duration, String> {
    let millis = (secs * 1000.0).round();
    if !(0.0..=1e15).contains(&millis) {
        return Err(format!("{secs} seconds is not a valid duration"));
    }
    Ok(Duration::from_millis(millis as u64))
}

/// Write a duration back the way `parse` reads it: whole seconds as a plain number (Fantasm's
/// style), anything finer in milliseconds (`1500ms`).
pub fn format(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A duration for people: its largest whole unit (`10m`, `2h`, `1d`, `90s`, `1500ms`).
pub fn human(d: Duration) -> String {
    if d.subsec_nanos() != 0 || d.is_zero() {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs % size == 0 {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seconds_and_units() {
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn rejects_nonsense() {
        assert!(parse("-1").is_err());
        assert!(parse("abc").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("").is_err());
        assert!(parse("5x").is_err());
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(90),
            Duration::from_millis(1500),
        ] {
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
