//! Text that phasm stores and logs (errors, reasons, log lines, group values): never a NUL
//! (PostgreSQL's text columns refuse it, and C strings end at it), and never longer than a
//! bound (one failing step must not write megabytes to the database or the server's log).

use std::borrow::Cow;

/// Most bytes of an error, a reason or a log line that are stored and logged; the rest is
/// cut, and the cut is marked.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;

/// `text` as phasm stores it: each NUL written as the two characters `\0`, and anything past
/// [`MAX_TEXT_BYTES`] cut at a character boundary, with `… [cut: N more bytes]` in its place.
pub fn storable(text: String) -> String {
    let text = match without_nul(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(escaped) => escaped,
    };
    cut(text, MAX_TEXT_BYTES)
}

/// Whether [`storable`] leaves `text` as it is: no NUL, and within [`MAX_TEXT_BYTES`].
pub fn is_storable(text: &str) -> bool {
    !has_nul(text) && text.len() <= MAX_TEXT_BYTES
}

/// Whether `text` holds a NUL ([`without_nul`] would escape it).
pub fn has_nul(text: &str) -> bool {
    text.contains('\0')
}

/// `text` with each NUL written as `\0` (borrowed when it has none).
pub fn without_nul(text: &str) -> Cow<'_, str> {
    if has_nul(text) {
        Cow::Owned(text.replace('\0', "\\0"))
    } else {
        Cow::Borrowed(text)
    }
}

/// `text` cut to at most `max` bytes (plus the marker) at a character boundary.
pub fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let more = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… [cut: {more} more bytes]"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_escaped_and_long_text_is_cut_at_a_character_boundary() {
        assert_eq!(storable("a\0b".into()), "a\\0b");
        assert_eq!(storable("plain".into()), "plain");
        let long = "é".repeat(MAX_TEXT_BYTES); // two bytes each
        let stored = storable(long);
        assert!(
            stored.ends_with(&format!("… [cut: {MAX_TEXT_BYTES} more bytes]")),
            "{}",
            &stored[stored.len() - 40..]
        );
        assert!(stored.len() < MAX_TEXT_BYTES + 40);
        let odd = format!("a{}", "é".repeat(MAX_TEXT_BYTES));
        assert!(storable(odd).contains("… [cut: "));
    }

    #[test]
    fn is_storable_says_whether_storable_changes_the_text() {
        let long = "y".repeat(MAX_TEXT_BYTES + 1);
        let exact = "z".repeat(MAX_TEXT_BYTES);
        for text in ["", "plain", "nul\0inside", long.as_str(), exact.as_str()] {
            assert_eq!(
                is_storable(text),
                storable(text.to_string()) == text,
                "{:.20}",
                text
            );
        }
    }
}
