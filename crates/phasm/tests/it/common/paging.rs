//! The actions of the random fan-out machines the simulation (`tests/simulation/`) runs: a
//! continuation paging through `0..n`, a fork per item, a window join and a barrier that
//! gather every item's id (each test adds its own `Work` action between fork and join).

use async_trait::async_trait;
use phasm::action::{Action, ActionContext, ActionError, ActionResult, Registry};
use phasm::engine::Context;
use serde_json::{json, Value};

/// Pages through the ids `0..n` (`n` from the context), `size` at a time.
pub struct Page {
    pub size: u64,
}

#[async_trait]
impl Action for Page {
    async fn continuation(
        &self,
        cx: &mut ActionContext,
    ) -> Option<Result<Option<Value>, ActionError>> {
        let n = cx.get::<u64>("n").ok().flatten().unwrap_or(0);
        let at = cx.token().and_then(Value::as_u64).unwrap_or(0);
        Some(Ok((at + self.size < n).then(|| json!(at + self.size))))
    }

    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        let n: u64 = cx.get("n")?.unwrap_or(0);
        let at = cx.token().and_then(Value::as_u64).unwrap_or(0);
        let ids: Vec<u64> = (at..(at + self.size).min(n)).collect();
        cx.put("page", ids)?;
        Ok(Some("split".into()))
    }
}

/// A registry with `Page`, `Split` (a fork per id of the page), `Gather` (a window join:
/// `joined` lists its branches' ids) and `Total` (the barrier: `all` lists every id).
pub fn registry(page: u64) -> Registry {
    let mut r = Registry::new();
    r.register("Page", Page { size: page });
    r.register_fn("Split", |cx| {
        let page: Vec<u64> = cx.get("page")?.unwrap_or_default();
        let Some((first, rest)) = page.split_first() else {
            return Err("an empty page".into());
        };
        for id in rest {
            let mut data = Context::new();
            data.insert("ids".into(), json!([id]));
            cx.fork(data);
        }
        cx.put("ids", [first])?;
        Ok(Some("work".into()))
    });
    r.register_fn("Gather", |cx| {
        let ids = gathered(cx.contexts(), "ids");
        let mut out = Context::new();
        out.insert("joined".into(), Value::Array(ids));
        *cx.context_mut() = out;
        Ok(Some("done".into()))
    });
    r.register_fn("Total", |cx| {
        let all = gathered(cx.contexts(), "joined");
        let joins = cx.contexts().len();
        cx.put("all", all)?;
        cx.put("joins", joins)?;
        Ok(None)
    });
    r
}

/// The arrays under `key` in every context, end to end.
fn gathered(contexts: &[Context], key: &str) -> Vec<Value> {
    contexts
        .iter()
        .flat_map(|c| {
            c.get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

/// The ids an instance's final context says were joined, sorted.
pub fn joined_ids(result: &Context) -> Option<Vec<u64>> {
    let mut ids: Vec<u64> = result
        .get("all")?
        .as_array()?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    ids.sort_unstable();
    Some(ids)
}
