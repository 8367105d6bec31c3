//! Wait tokens: a string that addresses one waiting branch, for a system outside to send the
//! event that ends its wait (`POST /api/waits/{token}`, `phasm send --token`) — the pattern of
//! AWS Step Functions' task tokens.
//!
//! A token is `PAYLOAD.TAG`: the payload names the instance and the wait task, the tag is an
//! HMAC-SHA-256 of it under the store's key ([`crate::store::WorkStore::wait_key`]), both in
//! URL-safe base64. It is the same on every attempt of the step that begins the wait (an entry
//! action may send it before a retry), needs no row of its own, and cannot be made or altered
//! without the key. It stops working when the wait is over.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Bytes of the tag kept (128 bits).
const TAG_BYTES: usize = 16;

/// The longest token accepted: instance names and task names are bounded, so anything longer
/// is not a token.
pub const MAX_TOKEN_CHARS: usize = 2048;

fn mac(key: &[u8], payload: &[u8]) -> Option<Hmac<Sha256>> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).ok()?;
    m.update(payload);
    Some(m)
}

/// The token of the wait task `wait` of `instance`.
pub fn wait_token(key: &[u8], instance: &str, wait: &str) -> String {
    let payload = format!("{instance}\n{wait}");
    let tag = mac(key, payload.as_bytes())
        .map(|m| m.finalize().into_bytes().to_vec())
        .unwrap_or_default();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(payload.as_bytes()),
        URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES.min(tag.len())])
    )
}

/// The instance and wait task a token addresses, when it was made with `key`.
pub fn open(key: &[u8], token: &str) -> Option<(String, String)> {
    if token.len() > MAX_TOKEN_CHARS {
        return None;
    }
    let (payload, tag) = token.split_once('.')?;
    let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    if tag.len() != TAG_BYTES {
        return None;
    }
    mac(key, &payload)?.verify_truncated_left(&tag).ok()?;
    let text = String::from_utf8(payload).ok()?;
    let (instance, wait) = text.split_once('\n')?;
    Some((instance.to_string(), wait.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_with_its_key_only_and_not_once_altered() {
        let t = wait_token(b"key-one", "order-1", "order-1--approval--wait--step-1");
        assert_eq!(
            open(b"key-one", &t),
            Some((
                "order-1".to_string(),
                "order-1--approval--wait--step-1".to_string()
            ))
        );
        assert_eq!(open(b"key-two", &t), None);
        let forged = wait_token(b"key-two", "order-1", "order-1--approval--wait--step-1");
        assert_eq!(open(b"key-one", &forged), None);
        let (payload, tag) = t.split_once('.').unwrap();
        let other = URL_SAFE_NO_PAD.encode("order-2\norder-2--approval--wait--step-1");
        assert_eq!(open(b"key-one", &format!("{other}.{tag}")), None);
        assert_eq!(open(b"key-one", payload), None);
        assert_eq!(open(b"key-one", "not a token"), None);
        assert_eq!(open(b"key-one", &"a".repeat(5000)), None);
    }

    #[test]
    fn the_same_wait_always_gets_the_same_token() {
        assert_eq!(wait_token(b"k", "i", "w"), wait_token(b"k", "i", "w"));
        assert_ne!(wait_token(b"k", "i", "w"), wait_token(b"k", "i", "w2"));
    }
}
