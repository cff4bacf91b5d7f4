//! The interface to the kernel datapath.
//!
//! # Theory of operation
//!
//! Everything user space does with the eBPF side lives here: [`loader`]
//! loads, verifies, pins and attaches the programs (and adopts a datapath
//! left pinned by a previous daemon); [`maps`] reads and writes the flow
//! map, the mmapped activity array and the forwarded-ports trie; [`punt`]
//! reads the ring buffer the programs punt frames and events into; and
//! [`inject`] is the way back — frames written on the tap for the guest,
//! packets sent through the host's routing to the world.
pub mod inject;
pub mod loader;
pub mod maps;
pub mod punt;
