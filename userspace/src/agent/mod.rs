//! `tapgate agent`: the Kubernetes node agent.
//!
//! # Theory of operation
//!
//! (Being written; see `api` for the contract.)

pub mod api;
pub mod client;
