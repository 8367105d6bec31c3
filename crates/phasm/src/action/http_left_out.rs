//! The `http` binding in a phasm built without the `http` feature: the binding is accepted
//! (the same files load everywhere), and each call fails saying how to get webhook actions.

use async_trait::async_trait;

use super::{Action, ActionContext, ActionError, ActionResult};
use crate::machine::HttpBinding;

/// An `http:` binding's action where webhook actions were left out of the build.
#[derive(Debug, Clone)]
pub struct HttpAction {
    binding: HttpBinding,
}

impl HttpAction {
    /// The stand-in for this binding.
    pub fn new(binding: HttpBinding) -> Self {
        Self { binding }
    }
}

#[async_trait]
impl Action for HttpAction {
    async fn run(&self, _cx: &mut ActionContext) -> ActionResult {
        Err(ActionError::new(format!(
            "cannot call {}: this phasm was built without webhook actions (the `http` cargo feature)",
            self.binding.url
        )))
    }
}
