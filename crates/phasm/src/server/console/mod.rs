//! The web console: server-rendered pages (no JavaScript build step), written with `maud`,
//! which escapes every interpolated value (names, contexts, log lines, errors).
//!
//! The modules, one per part of the console: `layout` (the frame every page shares),
//! `login` (the token form and the check every page goes through), `machines` (the machine
//! list, a machine's page, the start form), `instances` (the list), `instance` (one
//! instance, its graph, timeline, cancel and retry), `history` (its steps in full, and a
//! reset to one of them), `operations` (workers and queues), `versions` (a machine's
//! deployed versions, their diffs, and moving instances to the latest). Every page
//! works without JavaScript; an instance page refreshes its live part every two seconds with
//! a few lines of inline script.

mod history;
mod instance;
mod instances;
mod layout;
mod login;
mod machines;
mod operations;
mod timeline;
mod versions;

/// The cookie that carries the token for the console's pages.
pub use crate::server::auth::TOKEN_COOKIE;
pub use layout::{SCRIPT, SCRIPT_PATH};

pub(crate) use history::{history, reset, step};
pub(crate) use instance::{cancel, instance, instance_graph, retry, send_event};
pub(crate) use instances::{bulk, instances};
pub(crate) use layout::{html_errors, script};
pub(crate) use login::{authorize_pages, login, login_form};
pub(crate) use machines::{machine, machine_graph, machines, start};
pub(crate) use operations::{queues, workers};
pub(crate) use versions::{diff_page, upgrade, version, version_graph};
