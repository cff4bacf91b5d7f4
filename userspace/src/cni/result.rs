//! The ADD result: the previous plugins' result with the tap appended.
//!
//! # Theory of operation
//!
//! tapgate-cni is a chained plugin: the pod's `eth0` and its addresses come
//! from the primary CNI and arrive as `prevResult`. The plugin adds one
//! interface, the tap (`name`, `mac`, `sandbox` = `CNI_NETNS`, and from
//! 1.1.0 on `mtu`), and changes nothing else: the tap carries no address.
//! The result is kept as untyped JSON so that keys this plugin does not
//! know (newer spec fields, other plugins' extensions) pass through.
//!
//! The result is written in the configuration's `cniVersion`. Runtimes hand
//! a chained plugin a `prevResult` of that same version, but the layouts of
//! the supported versions differ in two small ways, so the conversion is
//! done anyway: 0.4.0 wants `ips[].version` (`"4"`/`"6"`), 1.x has none;
//! interface `mtu`, `socketPath` and `pciID` exist from 1.1.0 on. If the
//! tap is already listed (a repeated ADD) its entry is replaced.

use serde_json::{Map, Value, json};

use super::{
    config::CniVersion,
    error::{CniError, Code},
};

/// The interface the plugin reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapInterface {
    /// `CNI_IFNAME`.
    pub name: String,
    /// The tap's MAC address (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// `CNI_NETNS`.
    pub sandbox: String,
    /// The tap's MTU (reported from 1.1.0 on).
    pub mtu: Option<u32>,
}

/// Builds the ADD result in `version` from `prev` (the configuration's
/// `prevResult`, if any) and the tap. Code 7 if `prevResult` is malformed.
pub fn add_result(
    version: CniVersion,
    prev: Option<&Map<String, Value>>,
    tap: &TapInterface,
) -> Result<Value, CniError> {
    let mut result = prev.cloned().unwrap_or_default();
    result.insert("cniVersion".into(), Value::from(version.as_str()));

    let mut interfaces = match result.remove("interfaces") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad_prev("interfaces is not a list")),
    };
    for iface in &mut interfaces {
        let Value::Object(obj) = iface else {
            return Err(bad_prev("an interface is not an object"));
        };
        if version < CniVersion::V1_1_0 {
            for key in ["mtu", "socketPath", "pciID"] {
                obj.remove(key);
            }
        }
    }
    // A repeated ADD: replace the entry rather than list the tap twice.
    // (Interfaces are referenced by index from `ips`, so only an entry at
    // the end is replaced in place; an earlier one is left alone.)
    let same = |v: &Value| {
        v.get("name").and_then(Value::as_str) == Some(tap.name.as_str())
            && v.get("sandbox").and_then(Value::as_str) == Some(tap.sandbox.as_str())
    };
    if interfaces.last().is_some_and(same) {
        interfaces.pop();
    }
    if !interfaces.iter().any(same) {
        let mut entry = json!({
            "name": tap.name,
            "mac": tap.mac,
            "sandbox": tap.sandbox,
        });
        if let (Some(mtu), true) = (tap.mtu, version >= CniVersion::V1_1_0) {
            entry["mtu"] = Value::from(mtu);
        }
        interfaces.push(entry);
    }
    result.insert("interfaces".into(), Value::Array(interfaces));

    if let Some(ips) = result.get_mut("ips") {
        let Value::Array(ips) = ips else {
            return Err(bad_prev("ips is not a list"));
        };
        for ip in ips {
            let Value::Object(obj) = ip else {
                return Err(bad_prev("an ips entry is not an object"));
            };
            if version == CniVersion::V0_4_0 {
                if !obj.contains_key("version") {
                    let v6 = obj
                        .get("address")
                        .and_then(Value::as_str)
                        .is_some_and(|a| a.contains(':'));
                    obj.insert("version".into(), Value::from(if v6 { "6" } else { "4" }));
                }
            } else {
                obj.remove("version");
            }
        }
    }
    Ok(Value::Object(result))
}

fn bad_prev(why: &str) -> CniError {
    CniError::new(Code::InvalidConfig, format!("prevResult: {why}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tap() -> TapInterface {
        TapInterface {
            name: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
            sandbox: "/run/netns/pod".into(),
            mtu: Some(1450),
        }
    }

    fn prev(v: &str) -> Map<String, Value> {
        serde_json::from_str(v).unwrap()
    }

    const PREV_1: &str = r#"{"cniVersion":"1.1.0",
        "interfaces":[{"name":"eth0","mac":"0a:58:0a:f4:00:05","mtu":1450,"sandbox":"/run/netns/pod"}],
        "ips":[{"address":"10.244.0.5/24","gateway":"10.244.0.1","interface":0},
               {"address":"fd00::5/64","interface":0}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{"nameservers":["10.96.0.10"]},
        "someExtension":{"kept":true}}"#;

    #[test]
    fn appends_the_tap_in_1_1() {
        let r = add_result(CniVersion::V1_1_0, Some(&prev(PREV_1)), &tap()).unwrap();
        assert_eq!(r["cniVersion"], "1.1.0");
        let ifs = r["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 2);
        assert_eq!(ifs[0]["mtu"], 1450);
        assert_eq!(
            ifs[1],
            json!({"name":"tap0","mac":"02:00:00:00:00:01","sandbox":"/run/netns/pod","mtu":1450})
        );
        assert_eq!(r["ips"][0]["interface"], 0);
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["routes"], prev(PREV_1)["routes"]);
        assert_eq!(r["dns"], prev(PREV_1)["dns"]);
        assert_eq!(r["someExtension"]["kept"], true);
    }

    #[test]
    fn converts_to_1_0() {
        let r = add_result(CniVersion::V1_0_0, Some(&prev(PREV_1)), &tap()).unwrap();
        assert_eq!(r["cniVersion"], "1.0.0");
        let ifs = r["interfaces"].as_array().unwrap();
        assert!(ifs.iter().all(|i| i.get("mtu").is_none()));
        assert_eq!(ifs[1]["name"], "tap0");
    }

    #[test]
    fn converts_to_0_4() {
        let r = add_result(CniVersion::V0_4_0, Some(&prev(PREV_1)), &tap()).unwrap();
        assert_eq!(r["cniVersion"], "0.4.0");
        assert_eq!(r["ips"][0]["version"], "4");
        assert_eq!(r["ips"][1]["version"], "6");
        assert!(r["interfaces"][1].get("mtu").is_none());
        // ... and back: 1.0.0 drops the version again.
        let back = add_result(CniVersion::V1_0_0, r.as_object(), &tap()).unwrap();
        assert!(back["ips"][0].get("version").is_none());
        assert_eq!(back["interfaces"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn without_prev_result_only_the_tap() {
        let r = add_result(CniVersion::V1_0_0, None, &tap()).unwrap();
        assert_eq!(
            r,
            json!({"cniVersion":"1.0.0","interfaces":[
                {"name":"tap0","mac":"02:00:00:00:00:01","sandbox":"/run/netns/pod"}]})
        );
    }

    #[test]
    fn repeated_add_lists_the_tap_once() {
        let once = add_result(CniVersion::V1_1_0, Some(&prev(PREV_1)), &tap()).unwrap();
        let twice = add_result(CniVersion::V1_1_0, once.as_object(), &tap()).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn malformed_prev_result_is_code_7() {
        for p in [
            r#"{"interfaces":{}}"#,
            r#"{"interfaces":[1]}"#,
            r#"{"ips":"x"}"#,
        ] {
            let e = add_result(CniVersion::V1_0_0, Some(&prev(p)), &tap()).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig);
            assert!(e.details.starts_with("prevResult:"));
        }
    }
}
