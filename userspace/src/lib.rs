//! tapgate: user-mode-style networking for a guest behind a tap device, with
//! an eBPF fast path.
//!
//! This library holds the daemon's pieces; `main.rs` is the command-line
//! edge. See `docs/ARCHITECTURE.md` for how they fit together.
pub mod agent;
pub mod aio;
pub mod arp;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dhcp;
pub mod flow;
pub mod frag;
pub mod frame;
pub mod fwd;
pub mod guest;
pub mod icmp;
pub mod iface;
pub mod inject;
pub mod instance;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod netns;
pub mod privileges;
pub mod punt;
pub mod state;
