//! kappa as a library: an application defines its views and runs them embedded, in one
//! process with the log and the Kafka broker (and the HTTP API as it lands):
//!
//! ```no_run
//! use kappa::{App, View};
//! # struct Counter;
//! # impl kappa::Reducer for Counter {
//! #     type State = u64;
//! #     fn key(&self, e: &kappa::Event) -> Option<String> { e.key_str().map(str::to_owned) }
//! #     fn apply(&self, s: Option<u64>, _: &kappa::Event) -> Result<Option<u64>, kappa::EventError> { Ok(Some(s.unwrap_or(0) + 1)) }
//! # }
//! fn main() -> anyhow::Result<()> {
//!     App::new().topic("events", 4, Default::default()).view(View::reducer("counts", 1, &["events"], Counter)).main()
//! }
//! ```
//!
//! `App::main` parses the same command line as the `kappa` binary (`serve`, `view`, `topic`,
//! `produce`, `consume`, `group`).

pub mod allocator;
pub mod app;
pub mod channels;
pub mod cli;
mod consume_cli;
mod group_admin;
mod group_cli;
pub mod http_client;
mod produce_cli;
pub mod settings;
mod topic_cli;
mod view_cli;
mod work;

pub use crate::app::App;
pub use kappa_views::{
    AsOf, ErrorPolicy, Event, EventError, Processor, Reducer, Schemas, StateAccess, View, ViewEngine,
};
