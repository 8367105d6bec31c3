//! Reading a batch start's body (`POST /api/machines/{machine}/instances/batch`) item by
//! item: the items are counted as they are read and reading stops past
//! [`MAX_BATCH_START`], each item's size is checked before it is parsed, and no tree of the
//! whole body is ever built (a 32 MiB body parsed whole took 600 MB).

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::control::{BatchItem, MAX_BATCH_START};

/// A batch start's body, read.
#[derive(Debug)]
pub(super) struct BatchRequest {
    /// The instances to start.
    pub items: Vec<BatchItem>,
    /// The batch's idempotency key, if it gave one.
    pub key: Option<String>,
    /// The version of the machine to start on, if it gave one.
    pub version: Option<u32>,
}

/// Why a body was refused.
#[derive(Debug)]
pub(super) enum BodyError {
    /// More than [`MAX_BATCH_START`] items (413).
    TooMany,
    /// Not the body's shape, or an item that is not one (400): the message says which.
    Bad(String),
}

const USAGE: &str = "the body must be a JSON object: {\"contexts\": [{...} or {\"name\": NAME, \"context\": {...}}, ...], \"key\": KEY (optional), \"version\": N (optional)}";

/// Read `body`; each item may take at most `max_item_bytes` (and a little for its name).
pub(super) fn read(body: &[u8], max_item_bytes: usize) -> Result<BatchRequest, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw = de
        .deserialize_map(BodyVisitor)
        .map_err(|e| match e.to_string() {
            m if m.starts_with(TOO_MANY) => BodyError::TooMany,
            m => BodyError::Bad(format!("{USAGE} ({m})")),
        })?;
    de.end()
        .map_err(|e| BodyError::Bad(format!("{USAGE} ({e})")))?;
    let Some(contexts) = raw.contexts else {
        return Err(BodyError::Bad(USAGE.into()));
    };
    let mut items = Vec::with_capacity(contexts.len());
    for (i, item) in contexts.into_iter().enumerate() {
        let text = item.get();
        if text.len() > max_item_bytes + 1024 {
            return Err(BodyError::Bad(format!(
                "contexts[{i}] is {} bytes, over the context limit of {max_item_bytes} bytes; nothing was started",
                text.len()
            )));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| BodyError::Bad(format!("contexts[{i}]: {e}")))?;
        let Value::Object(object) = value else {
            return Err(BodyError::Bad(format!(
                "contexts[{i}] must be a JSON object"
            )));
        };
        items.push(
            BatchItem::from_object(object)
                .map_err(|e| BodyError::Bad(format!("contexts[{i}]: {e}")))?,
        );
    }
    Ok(BatchRequest {
        items,
        key: raw.key,
        version: raw.version,
    })
}

const TOO_MANY: &str = "too many contexts";

struct RawBody<'a> {
    contexts: Option<Vec<&'a RawValue>>,
    key: Option<String>,
    version: Option<u32>,
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = RawBody<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut body = RawBody {
            contexts: None,
            key: None,
            version: None,
        };
        while let Some(field) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match field.as_ref() {
                "contexts" => body.contexts = Some(map.next_value_seed(Items)?),
                "key" => body.key = Some(map.next_value()?),
                "version" => body.version = map.next_value()?,
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown field `{other}`; expected `contexts`, `key` or `version`"
                    )))
                }
            }
        }
        Ok(body)
    }
}

/// The `contexts` array, item by item as raw JSON, refused once it passes the limit.
struct Items;

impl<'de> de::DeserializeSeed<'de> for Items {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Items {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of contexts")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if items.len() == MAX_BATCH_START {
                return Err(de::Error::custom(TOO_MANY));
            }
            items.push(item);
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_contexts_or_named_contexts_and_the_key_is_kept() {
        let body = br#"{"contexts": [{"a": 1}, {"name": "n1", "context": {"b": 2}}, {"name": "x", "other": 1}], "key": "k1"}"#;
        let r = read(body, 1000).unwrap();
        assert_eq!(r.key.as_deref(), Some("k1"));
        assert_eq!(r.items[0].name, None);
        assert_eq!(r.items[1].name.as_deref(), Some("n1"));
        assert_eq!(r.items[1].context.get("b"), Some(&2.into()));
        assert_eq!(
            r.items[2].name, None,
            "an object with other keys is a context"
        );
        assert!(matches!(
            read(br#"{"contexts": [1]}"#, 1000),
            Err(BodyError::Bad(_))
        ));
        assert!(matches!(
            read(br#"{"contexts": [], "x": 1}"#, 1000),
            Err(BodyError::Bad(_))
        ));
        assert!(matches!(read(br"[]", 1000), Err(BodyError::Bad(_))));
    }

    #[test]
    fn reading_stops_past_the_limit() {
        let mut body = String::from(r#"{"contexts": ["#);
        for i in 0..=MAX_BATCH_START {
            body.push_str(if i == 0 { "{}" } else { ",{}" });
        }
        // The rest is never looked at: not even valid JSON.
        body.push_str(",garbage");
        assert!(matches!(
            read(body.as_bytes(), 1000),
            Err(BodyError::TooMany)
        ));
        let big = format!(r#"{{"contexts": [{{"pad": "{}"}}]}}"#, "x".repeat(5000));
        assert!(
            matches!(read(big.as_bytes(), 1000), Err(BodyError::Bad(m)) if m.contains("contexts[0] is"))
        );
    }
}
