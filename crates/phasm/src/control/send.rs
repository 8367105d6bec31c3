//! Sending an event to an instance from outside: `phasm send`, `POST
//! /api/instances/{name}/events` and `POST /api/waits/{token}`.

use crate::clock::Clock;
use crate::engine::{Context, Limits};
use crate::machine::{is_valid_event, Config, Machine};
use crate::store::{
    Delivered, Delivery, DeliveryChecks, InstanceStatus, Reachable, Store, StoreError,
};

/// Where an event is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendTo {
    /// Every branch of the instance waiting for the event (or, with none, the next to wait).
    Instance(String),
    /// The one wait a token addresses (see [`crate::token`]).
    Token(String),
}

/// An event to send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    /// Where.
    pub to: SendTo,
    /// The event.
    pub event: String,
    /// Merged into the context of each branch that takes the event (top-level keys replace).
    pub data: Context,
    /// The sender's id: the same id sent again to the instance changes nothing.
    pub id: Option<String>,
}

/// What sending did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Taken by this many waiting branches; their next steps are queued.
    Delivered {
        /// The instance.
        instance: String,
        /// How many branches took it.
        branches: u32,
    },
    /// No branch waits for it yet: kept, in order, for the next wait that accepts it.
    Buffered {
        /// The instance.
        instance: String,
    },
    /// The id was accepted before; nothing was done.
    Duplicate {
        /// The instance.
        instance: String,
    },
}

/// The longest event id accepted.
pub const MAX_EVENT_ID_CHARS: usize = 200;

/// Why an event was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request itself is malformed (the event's name, the id, the data's size).
    #[error("{0}")]
    Invalid(String),
    /// No instance has that name.
    #[error("no instance named `{0}`")]
    NotFound(String),
    /// The token was not made by this database, or was altered.
    #[error(
        "the wait token is not valid for this database (altered, cut short, or from another phasm)"
    )]
    BadToken,
    /// The instance has ended or failed.
    #[error("instance `{instance}` is {status}: it takes no events{hint}")]
    NotRunning {
        /// The instance.
        instance: String,
        /// Its status.
        status: InstanceStatus,
        /// What to do.
        hint: &'static str,
    },
    /// No waiting state of the instance's machine has a transition for the event.
    #[error("no waiting state of machine `{machine}` accepts event `{event}` ({accepted})")]
    NotAccepted {
        /// The machine.
        machine: String,
        /// The event.
        event: String,
        /// What its waiting states accept, for the message.
        accepted: String,
    },
    /// The wait the token addresses is over (an event or its timeout ended it), or does not
    /// accept this event.
    #[error("the wait this token addresses is over, or does not accept event `{0}` (a token never sends its wait's timeout event)")]
    WaitOver(String),
    /// Merged into a waiting branch's context, the event's data would pass the context limit;
    /// nothing was done.
    #[error("instance `{instance}`: with the event's data merged, a waiting branch's context would be {bytes} bytes, over the limit of {max} bytes; nothing was changed (send less data)")]
    TooLarge {
        /// The instance.
        instance: String,
        /// The merged context's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The instance keeps as many events as it may.
    #[error("instance `{instance}` already keeps {kept} events sent before a wait takes them (at most {max}); nothing was kept")]
    TooManyKept {
        /// The instance.
        instance: String,
        /// Events kept now.
        kept: usize,
        /// The limit.
        max: usize,
    },
    /// No branch waits for the event, and none can any more.
    #[error("instance `{instance}` will not wait for `{event}` again: no branch waits for it now, and none of its pending steps can reach a state that would (it is ending); nothing was kept")]
    CannotWait {
        /// The instance.
        instance: String,
        /// The event.
        event: String,
    },
    /// The version the instance runs on is stored, but this phasm cannot read it: the event
    /// cannot be checked, so it is not sent.
    #[error(transparent)]
    Unreadable(#[from] crate::config::UnreadableDefinition),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SendError {
    /// Whether the event could not be taken because of the instance's state (HTTP 409), as
    /// opposed to a bad request or an unknown instance.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            SendError::NotRunning { .. }
                | SendError::NotAccepted { .. }
                | SendError::WaitOver(_)
                | SendError::TooLarge { .. }
                | SendError::TooManyKept { .. }
                | SendError::CannotWait { .. }
        )
    }
}

/// Send an event: deliver it to the waiting branches that accept it, or buffer it for the next
/// wait when the instance is running but not waiting for it yet. The instance's machine must
/// have a waiting state that accepts the event (else nothing could ever take it): the machine
/// of the version the instance runs on, as stored; for an instance started before its machine
/// was ever deployed, the machine of `config` (without one, that is not checked).
///
/// # Errors
/// See [`SendError`].
pub async fn send(
    store: &dyn Store,
    config: Option<&Config>,
    clock: &dyn Clock,
    request: SendRequest,
    limits: &Limits,
) -> Result<SendOutcome, SendError> {
    if !is_valid_event(&request.event) {
        return Err(SendError::Invalid(format!(
            "`{}` is not an event name: use letters, digits and `-` (at most 50)",
            request.event
        )));
    }
    if let Some(id) = &request.id {
        if id.is_empty() || id.chars().count() > MAX_EVENT_ID_CHARS {
            return Err(SendError::Invalid(format!(
                "an event id must be 1 to {MAX_EVENT_ID_CHARS} characters"
            )));
        }
    }
    let bytes = serde_json::to_vec(&request.data).map_or(0, |v| v.len());
    if bytes > limits.max_context_bytes {
        return Err(SendError::Invalid(format!(
            "the event's data is {bytes} bytes, over the context limit of {} bytes",
            limits.max_context_bytes
        )));
    }
    let (instance, wait) = match request.to {
        SendTo::Instance(name) => (name, None),
        SendTo::Token(token) => {
            let key = store.wait_key().await?;
            let (instance, wait) = crate::token::open(&key, &token).ok_or(SendError::BadToken)?;
            (instance, Some(wait))
        }
    };
    // The instance's machine is read only to check the event against it.
    let Some(view) = store.instance(&instance).await? else {
        return Err(SendError::NotFound(instance));
    };
    let pinned: Option<Config> =
        super::versions::version_config::<SendError>(store, &view.machine, view.version).await?;
    let machine = pinned
        .as_ref()
        .or(config)
        .and_then(|c| c.machine(&view.machine));
    if let Some(machine) = machine {
        let waiting: Vec<&str> = machine
            .states
            .iter()
            .filter(|s| s.wait.is_some())
            .flat_map(super::super::machine::State::accepted_events)
            .collect();
        if !waiting.contains(&request.event.as_str()) {
            let accepted = if waiting.is_empty() {
                "it has no waiting state".to_string()
            } else {
                let mut events = waiting.clone();
                events.sort_unstable();
                events.dedup();
                format!("they accept: {}", events.join(", "))
            };
            return Err(SendError::NotAccepted {
                machine: machine.name.clone(),
                event: request.event,
                accepted,
            });
        }
    }
    // What enters a context is checked as a start's context is: typed by the machine's
    // `context_types` (a float key given "nan" is refused here, naming the key, instead of
    // failing a step later), and no deeper than every host can send back.
    let data = match machine {
        Some(m) => super::typed_context(m, request.data).map_err(SendError::Invalid)?,
        None => request.data,
    };
    super::check_depth(&data).map_err(SendError::Invalid)?;
    let delivery = Delivery {
        instance: instance.clone(),
        event: request.event.clone(),
        data,
        id: request.id,
        wait,
        checks: DeliveryChecks {
            max_context_bytes: Some(limits.max_context_bytes),
            max_kept_events: Some(limits.max_kept_events),
            reachable: machine.map(|m| reachable(m, &request.event)),
        },
    };
    let delivered = deliver_retrying(store, clock, &delivery).await?;
    match delivered {
        Delivered::Dispatched(branches) => Ok(SendOutcome::Delivered { instance, branches }),
        Delivered::Buffered => Ok(SendOutcome::Buffered { instance }),
        Delivered::Duplicate => Ok(SendOutcome::Duplicate { instance }),
        Delivered::NotFound => Err(SendError::NotFound(instance)),
        Delivered::NotRunning(status) => Err(SendError::NotRunning {
            instance,
            status,
            hint: match status {
                InstanceStatus::Failed => "; `phasm retry` resumes it, then send again",
                _ => "",
            },
        }),
        Delivered::WaitOver => Err(SendError::WaitOver(request.event)),
        Delivered::TooLarge(bytes) => Err(SendError::TooLarge {
            instance,
            bytes,
            max: limits.max_context_bytes,
        }),
        Delivered::TooManyKept(kept) => Err(SendError::TooManyKept {
            instance,
            kept,
            max: limits.max_kept_events,
        }),
        Delivered::CannotWait => Err(SendError::CannotWait {
            instance,
            event: request.event,
        }),
    }
}

/// Where in `machine` an `event` could still be taken: the states from which a waiting state
/// accepting it can be reached (those waits included), and the dispatches into them.
pub fn reachable(machine: &Machine, event: &str) -> Reachable {
    let mut states: std::collections::BTreeSet<&str> = machine
        .states
        .iter()
        .filter(|s| s.wait.is_some() && s.accepted_events().any(|e| e == event))
        .map(|s| s.name.as_str())
        .collect();
    loop {
        let before = states.len();
        for s in &machine.states {
            if s.transitions.iter().any(|t| states.contains(t.to.as_str())) {
                states.insert(s.name.as_str());
            }
        }
        if states.len() == before {
            break;
        }
    }
    let mut dispatches = Vec::new();
    if machine
        .initial_state()
        .is_some_and(|s| states.contains(s.name.as_str()))
    {
        dispatches.push(format!("\u{1f}{}", crate::engine::PSEUDO_INIT));
    }
    for s in &machine.states {
        for t in &s.transitions {
            if states.contains(t.to.as_str()) {
                dispatches.push(format!("{}\u{1f}{}", s.name, t.event));
            }
        }
    }
    Reachable {
        states: states.into_iter().map(str::to_string).collect(),
        dispatches,
    }
}

/// Deliver, trying again on a transient failure (a lost connection, a deadlock between the
/// delivery and a commit of the same instance): a delivery is one transaction, and an id
/// makes a retry after a lost answer harmless.
async fn deliver_retrying(
    store: &dyn Store,
    clock: &dyn Clock,
    delivery: &Delivery,
) -> Result<Delivered, StoreError> {
    let mut tries = 0;
    loop {
        match store.deliver(clock.now(), delivery).await {
            Err(e) if e.is_transient() && tries < 3 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50 << tries)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_reachable_from_the_steps_that_can_still_lead_to_a_wait_for_it() {
        let yaml = "state_machines:\n- name: M\n  states:\n  - name: a\n    initial: true\n    action: A\n    transitions:\n    - {event: ask, to: approval}\n    - {event: skip, to: done}\n  - name: approval\n    wait: true\n    transitions:\n    - {event: approved, to: done}\n  - name: done\n    final: true\n";
        let config = crate::config::load_str(yaml, "m.yaml", &Default::default())
            .unwrap()
            .config;
        let m = config.machine("M").unwrap();
        let r = reachable(m, "approved");
        assert_eq!(r.states, ["a", "approval"]);
        assert_eq!(r.dispatches, ["\u{1f}pseudo-init", "a\u{1f}ask"]);
        let none = reachable(m, "unknown");
        assert!(none.states.is_empty() && none.dispatches.is_empty());
    }
}
