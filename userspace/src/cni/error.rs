//! CNI errors: a code, a message and details, as the spec's error result.
//!
//! # Theory of operation
//!
//! Every failure of the plugin ends as one [`CniError`], printed on stdout
//! as the spec's error JSON (`{"cniVersion","code","msg","details"}`) with
//! a non-zero exit status. The codes below 100 are the spec's well-known
//! ones ([`Code`]); tapgate's own start at 100. `msg` is a short fixed
//! phrase per situation, `details` says what exactly went wrong (naming
//! the configuration key or environment variable at fault).

use serde::Serialize;
use thiserror::Error;

/// The spec's well-known error codes and tapgate's own (≥ 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: the configuration's `cniVersion` is not one this plugin speaks.
    IncompatibleVersion,
    /// 2: a configuration field this plugin does not support.
    UnsupportedField,
    /// 3: the container is unknown or does not exist.
    UnknownContainer,
    /// 4: a required environment variable is missing or invalid.
    InvalidEnv,
    /// 5: an I/O failure (creating the tap, ...).
    Io,
    /// 6: stdin could not be decoded.
    Decode,
    /// 7: the network configuration is invalid.
    InvalidConfig,
    /// 11: a transient condition; the runtime should retry.
    TryAgainLater,
    /// 50: the plugin cannot serve ADD requests (the agent is down).
    NotAvailable,
    /// 100: the agent refused the request.
    AgentRefused,
    /// 101: the agent failed (server error, broken answer).
    AgentFailed,
    /// 102: CHECK found the attachment missing or not as expected.
    CheckFailed,
}

impl Code {
    /// The number on the wire.
    pub fn number(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::UnknownContainer => 3,
            Self::InvalidEnv => 4,
            Self::Io => 5,
            Self::Decode => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::NotAvailable => 50,
            Self::AgentRefused => 100,
            Self::AgentFailed => 101,
            Self::CheckFailed => 102,
        }
    }

    /// The short message that goes with the code.
    pub fn msg(self) -> &'static str {
        match self {
            Self::IncompatibleVersion => "incompatible CNI version",
            Self::UnsupportedField => "unsupported field in network configuration",
            Self::UnknownContainer => "container unknown or does not exist",
            Self::InvalidEnv => "invalid necessary environment variables",
            Self::Io => "I/O failure",
            Self::Decode => "failed to decode content",
            Self::InvalidConfig => "invalid network configuration",
            Self::TryAgainLater => "try again later",
            Self::NotAvailable => "plugin not available",
            Self::AgentRefused => "tapgate agent refused the request",
            Self::AgentFailed => "tapgate agent failed",
            Self::CheckFailed => "attachment is not as expected",
        }
    }
}

/// A failed CNI operation.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{} (code {}): {details}", code.msg(), code.number())]
pub struct CniError {
    /// What kind of failure.
    pub code: Code,
    /// What exactly went wrong.
    pub details: String,
}

impl CniError {
    /// An error of kind `code`.
    pub fn new(code: Code, details: impl Into<String>) -> Self {
        Self {
            code,
            details: details.into(),
        }
    }

    /// Code 7 for configuration key `key`.
    pub fn config(key: &str, why: impl std::fmt::Display) -> Self {
        Self::new(Code::InvalidConfig, format!("{key}: {why}"))
    }

    /// Code 4 for environment variable `var`.
    pub fn env(var: &str, why: impl std::fmt::Display) -> Self {
        Self::new(Code::InvalidEnv, format!("{var}: {why}"))
    }

    /// The spec's error result, reported under `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            details: &'a str,
        }
        serde_json::to_value(Wire {
            cni_version,
            code: self.code.number(),
            msg: self.code.msg(),
            details: &self.details,
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_shape() {
        let e = CniError::config("tap.mtu", "70000 is not an MTU");
        let v = e.to_json("1.0.0");
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 4);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "invalid network configuration");
        assert_eq!(v["details"], "tap.mtu: 70000 is not an MTU");
    }

    #[test]
    fn plugin_codes_are_at_least_100() {
        for c in [Code::AgentRefused, Code::AgentFailed, Code::CheckFailed] {
            assert!(c.number() >= 100);
        }
        assert_eq!(Code::NotAvailable.number(), 50);
        assert_eq!(Code::TryAgainLater.number(), 11);
    }
}
