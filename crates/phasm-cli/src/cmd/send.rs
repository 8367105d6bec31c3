//! `phasm send`: an event from outside, to an instance's waiting branches or to the one wait a
//! token addresses.

use std::path::PathBuf;
use std::process::ExitCode;

use phasm::clock::SystemClock;
use phasm::control::{self, SendError, SendOutcome, SendRequest, SendTo};
use phasm::engine::{Context, Limits};

use super::files::load;
use super::inspect::open_db;
use crate::output::outln;
use crate::{exit, DbArgs};

/// What `phasm send` was given.
pub struct SendArgs {
    /// `INSTANCE EVENT`, or `EVENT` with a token.
    pub args: Vec<String>,
    /// The data, a JSON object.
    pub data: Option<String>,
    /// The event's id.
    pub id: Option<String>,
    /// A wait token.
    pub token: Option<String>,
    /// The machine file, for checking the event.
    pub file: Option<PathBuf>,
    /// Most events an instance keeps.
    pub max_kept_events: usize,
}

/// `phasm send`: 0 when the event was accepted (delivered, kept for the next wait, or sent
/// before with the same id), 1 when the instance cannot take it, 2 for bad input or an
/// unknown instance, 3 when the database fails.
pub async fn send(args: SendArgs, db: &DbArgs) -> ExitCode {
    let (to, event) = match (args.token, args.args.as_slice()) {
        (Some(token), [event]) => (SendTo::Token(token), event.clone()),
        (None, [instance, event]) => (SendTo::Instance(instance.clone()), event.clone()),
        (Some(_), _) => return exit::invalid("with --token, give only the EVENT"),
        (None, _) => {
            return exit::invalid("give the INSTANCE and the EVENT (or --token TOKEN EVENT)")
        }
    };
    let data = match args
        .data
        .as_deref()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        None => Context::new(),
        Some(Ok(serde_json::Value::Object(map))) => map,
        Some(Ok(other)) => {
            return exit::invalid(format!(
                "--data must be a JSON object (its keys are merged into the context), not {other}"
            ))
        }
        Some(Err(e)) => return exit::invalid(format!("--data is not JSON: {e}")),
    };
    let config = match &args.file {
        Some(file) => match load(file) {
            Some(config) => Some(config),
            None => return exit::invalid_reported(),
        },
        None => None,
    };
    let store = match open_db(db, phasm::store::Access::Existing).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let request = SendRequest {
        to,
        event: event.clone(),
        data,
        id: args.id,
    };
    let sent = control::send(
        &*store,
        config.as_ref(),
        &SystemClock,
        request,
        &Limits {
            max_kept_events: args.max_kept_events,
            ..Limits::default()
        },
    )
    .await;
    match sent {
        Ok(SendOutcome::Delivered { instance, branches }) => {
            let what = if branches == 1 {
                "its waiting branch".to_string()
            } else {
                format!("{branches} waiting branches")
            };
            outln!("{instance}: `{event}` delivered to {what}");
            ExitCode::SUCCESS
        }
        Ok(SendOutcome::Buffered { instance }) => {
            outln!("{instance}: `{event}` accepted; no branch waits for it yet, so it is kept for the next wait that accepts it");
            ExitCode::SUCCESS
        }
        Ok(SendOutcome::Duplicate { instance }) => {
            outln!("{instance}: an event with this id was accepted before; nothing done");
            ExitCode::SUCCESS
        }
        Err(SendError::Store(e)) => exit::database(e),
        Err(e) if e.is_conflict() => exit::failed(e),
        Err(e) => exit::invalid(e),
    }
}
