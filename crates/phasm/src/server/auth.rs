//! Who may use the API and the console: the token (compared in constant time), the login
//! cookie, and one throttle of wrong tokens per client address for the API, the pages and
//! the login form alike.
//!
//! The right token always passes, even from an address that is being refused: behind a
//! proxy every client shares one address, and five wrong guesses must not lock them all out.
//! That an answer then tells a right guess from a wrong one costs nothing: a token has at
//! least [`MIN_TOKEN_CHARS`] printable characters, far beyond what guessing reaches. The
//! throttle keeps a guesser's requests cheap (a 429 before anything is looked up) and its
//! log quiet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

/// The name of the console's login cookie.
pub const TOKEN_COOKIE: &str = "phasm_token";

/// The shortest token `phasm serve` accepts.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Wrong tokens one client address may send within [`FAILURE_WINDOW`] before it is refused
/// (429) until the window ends.
pub const MAX_FAILURES: u32 = 5;

/// The window over which wrong tokens are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Check a token before serving with it: at least [`MIN_TOKEN_CHARS`] printable ASCII
/// characters, not only spaces.
///
/// # Errors
/// What is wrong with it.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.trim().is_empty() {
        return Err("the token is empty or only white space".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the token must be printable ASCII without spaces (e.g. `openssl rand -base64 32`)"
                .into(),
        );
    }
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "the token is {} characters; use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -base64 32`)",
            token.chars().count()
        ));
    }
    Ok(())
}

/// Whether `given` is the token, in time that does not depend on where they differ.
pub fn token_matches(given: Option<&str>, token: &str) -> bool {
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())))
}

/// The token a request carries: `Authorization: Bearer TOKEN`, or the login cookie.
pub fn token_given(headers: &HeaderMap) -> Option<String> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == TOKEN_COOKIE)
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// The cookie value that carries `token` (percent-encoded, so `+ / =` survive).
pub fn cookie_value(token: &str) -> String {
    percent_encoding::utf8_percent_encode(token, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Wrong tokens by client address.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// What a request's token earns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The right token: served, whatever the address did before.
    Allowed,
    /// No token at all (not counted as a wrong one).
    Missing,
    /// A wrong token, now counted against the address.
    Wrong,
    /// A wrong token from an address that sent too many: refused for this long.
    Blocked(Duration),
}

impl Throttle {
    /// Judge the token `given` by client `ip` against `token` (see [`Verdict`]).
    pub fn check(&self, ip: IpAddr, given: Option<&str>, token: &str) -> Verdict {
        if token_matches(given, token) {
            return Verdict::Allowed;
        }
        if given.is_none() {
            return Verdict::Missing;
        }
        if let Some(left) = self.blocked(ip) {
            return Verdict::Blocked(left);
        }
        self.failed(ip);
        Verdict::Wrong
    }

    /// How long `ip` must wait before it may try again (`None`: it may try now).
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let failures = self.lock();
        let (count, since) = failures.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (*count >= MAX_FAILURES).then_some(left)
    }

    /// `ip` sent a wrong token.
    pub fn failed(&self, ip: IpAddr) {
        let mut failures = self.lock();
        if failures.len() > 10_000 {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_compared() {
        assert!(check_token("short").is_err());
        assert!(check_token("                    ").is_err());
        assert!(check_token("has a space in the middle").is_err());
        assert!(check_token("aB3+/=aB3+/=aB3+/=").is_ok());
        assert!(token_matches(Some("abc"), "abc"));
        assert!(!token_matches(Some("abd"), "abc"));
        assert!(!token_matches(None, "abc"));
    }

    #[test]
    fn cookies_carry_any_printable_token() {
        let token = "aB3+/=%;,\"x";
        let mut headers = HeaderMap::new();
        let cookie = format!("other=1; {TOKEN_COOKIE}={}", cookie_value(token));
        headers.insert(header::COOKIE, cookie.parse().unwrap());
        assert_eq!(token_given(&headers).as_deref(), Some(token));
    }

    #[test]
    fn a_burst_of_wrong_tokens_is_refused_for_the_window_but_the_right_token_passes() {
        let throttle = Throttle::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let token = "the-right-token-0123";
        for _ in 0..MAX_FAILURES {
            assert_eq!(throttle.check(ip, Some("guess"), token), Verdict::Wrong);
        }
        assert!(matches!(
            throttle.check(ip, Some("guess"), token),
            Verdict::Blocked(_)
        ));
        assert_eq!(throttle.check(ip, None, token), Verdict::Missing);
        assert_eq!(throttle.check(ip, Some(token), token), Verdict::Allowed);
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(throttle.check(other, Some("guess"), token), Verdict::Wrong);
    }
}
