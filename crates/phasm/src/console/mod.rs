//! The web console: server-rendered pages (no JavaScript build step), written with `maud`,
//! which escapes every interpolated value (names, contexts, log lines, errors).
//!
//! The modules, one per part of the console: `layout` (the frame every page shares),
//! `login` (the token form and the check every page goes through), `machines` (the machine
//! list, a machine's page, the start form), `instances` (the list), `instance` (one
//! instance, its graph, cancel and retry), `operations` (workers and queues). Every page
//! works without JavaScript; an instance page refreshes its live part every two seconds with
//! a few lines of inline script.

mod instance;
mod instances;
mod layout;
mod login;
mod machines;
mod operations;

/// The cookie that carries the token for the console's pages.
pub use crate::server::auth::TOKEN_COOKIE;

pub(crate) use instance::{cancel, history, instance, instance_graph, retry, send_event};
pub(crate) use instances::{bulk, instances};
pub(crate) use login::{authorize_pages, login, login_form};
pub(crate) use machines::{machine, machine_graph, machines, start};
pub(crate) use operations::{queues, workers};
