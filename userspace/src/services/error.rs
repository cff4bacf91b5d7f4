//! Errors shared by the per-protocol guest services.
//!
//! # Theory of operation
//!
//! Every frame from the guest is untrusted. Each protocol module parses with
//! smoltcp's `wire` views, which check lengths and fields, and reports what
//! it could not accept as a [`FrameError`]; the dispatcher counts it as a
//! drop and goes on. Nothing a guest sends can make a service panic.

use thiserror::Error;

/// Why a frame from the guest was not answered.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The frame or one of its headers failed smoltcp's checks.
    #[error("malformed {layer}: {source}")]
    Malformed {
        /// Which header was being parsed ("ethernet", "ipv4", "dhcp", ...).
        layer: &'static str,
        /// smoltcp's reason.
        source: smoltcp::wire::Error,
    },
    /// The frame parsed but carries something this service does not accept.
    #[error("unsupported {0}")]
    Unsupported(&'static str),
}

impl FrameError {
    /// Builds a mapper from a smoltcp error to [`FrameError::Malformed`].
    pub fn malformed(layer: &'static str) -> impl FnOnce(smoltcp::wire::Error) -> Self {
        move |source| Self::Malformed { layer, source }
    }
}
