//! tapgate: user-mode-style networking for a guest behind a tap device, with
//! an eBPF fast path.
//!
//! This library holds the daemon's pieces; `main.rs` is the command-line
//! edge. See `docs/ARCHITECTURE.md` for how they fit together. By directory:
//!
//! * [`kernel`]: the interface to the eBPF datapath — loading and pinning
//!   the programs, the maps, the punt reader, and the writers that send
//!   frames to the guest and packets to the world;
//! * [`services`]: the gateway's own services for the guest (ARP, DHCPv4,
//!   echo), one file per protocol;
//! * [`flow`]: the flow manager (NAT flows by protocol, policy, NAT ports,
//!   the clock algorithm, adoption of a kept datapath);
//! * [`fwd`]: the port-forwarding rules; [`frag`]: IPv4 reassembly;
//! * [`daemon`]: one attachment's event loop, the one datapath code path;
//! * [`control`] and [`metrics`]: what operators ask a running daemon;
//! * [`agent`] and [`cni`]: the Kubernetes node agent and its CNI plugin.
pub mod agent;
pub mod aio;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod daemon;
pub mod flow;
pub mod frag;
pub mod fwd;
pub mod iface;
pub mod instance;
pub mod kernel;
pub mod metrics;
pub mod netns;
pub mod privileges;
pub mod services;
pub mod state;
