//! The `http` binding: an action carried out by a web service. phasm `POST`s the same JSON
//! request an `exec` program gets on stdin, and reads the same JSON response from the body.
//! A status other than 2xx, a timeout, a body that is not a JSON object, or a body over
//! [`super::MAX_EXEC_OUTPUT_BYTES`] fails the attempt.

use std::time::Duration;

use async_trait::async_trait;

use super::exec::{apply_response, request, DEFAULT_EXEC_TIMEOUT, MAX_EXEC_OUTPUT_BYTES};
use super::{Action, ActionContext, ActionError, ActionResult};
use crate::machine::HttpBinding;

/// An action that calls a URL per call.
#[derive(Debug, Clone)]
pub struct HttpAction {
    binding: HttpBinding,
    client: reqwest::Client,
}

impl HttpAction {
    /// An action for this binding.
    pub fn new(binding: HttpBinding) -> Self {
        Self {
            binding,
            client: reqwest::Client::new(),
        }
    }
}

#[async_trait]
impl Action for HttpAction {
    fn timeout(&self) -> Option<Duration> {
        Some(self.binding.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT))
    }

    async fn run(&self, cx: &mut ActionContext) -> ActionResult {
        let timeout = self.binding.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
        let url = &self.binding.url;
        let mut call = self
            .client
            .post(url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            // The idempotency key, for services that deduplicate by header.
            .header("Idempotency-Key", cx.task.as_str())
            .body(serde_json::to_vec(&request(cx))?);
        for (name, value) in &self.binding.headers {
            call = call.header(name.as_str(), value.as_str());
        }
        let response = call.send().await.map_err(|e| {
            if e.is_timeout() {
                ActionError::new(format!(
                    "`{url}` timed out after {}s",
                    timeout.as_secs_f64()
                ))
            } else {
                ActionError::new(format!("calling `{url}` failed: {e}"))
            }
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| ActionError::new(format!("reading the answer of `{url}` failed: {e}")))?;
        if body.len() > MAX_EXEC_OUTPUT_BYTES {
            return Err(ActionError::new(format!(
                "`{url}` answered with more than {MAX_EXEC_OUTPUT_BYTES} bytes"
            )));
        }
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(500)]).replace('\n', " ");
            return Err(ActionError::new(format!(
                "`{url}` answered {status}: {text}"
            )));
        }
        apply_response(cx, &body).map_err(|e| ActionError::new(format!("`{url}`: {e}")))
    }
}
