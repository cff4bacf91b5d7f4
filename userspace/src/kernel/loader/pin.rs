//! The pin directory of a datapath that outlives its daemon.
//!
//! # Theory of operation
//!
//! A datapath kept across restarts lives under `BASE/v<N>/`, `N` being
//! [`MAP_LAYOUT_VERSION`]: one pin per map of [`PINNED_MAPS`] (named as
//! the map) and one per tcx link (`link_<program>`). The version in the
//! path is the compatibility check: a daemon only ever adopts its own
//! layout version, and refuses to start (rather than misread a flow
//! table) where another version is pinned. Belt and braces, each pinned
//! map's type, key and value sizes are compared with what this build
//! expects before the object is loaded against them.
//!
//! bpffs only holds pins, so nothing else (no metadata file) is kept here.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use datapath_common::{
    ACTIVITY_MAP, ActivityWord, COUNTERS_MAP, FLOWS_MAP, FRAGS_MAP, FWD_PORTS_MAP, FlowEntry,
    FlowKey, FragKey, FwdPrefix, MAP_LAYOUT_VERSION, PINNED_MAPS, PUNT_RING_MAP,
};
use log::{debug, warn};

use super::LoaderError;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What a pinned map must look like: type, key size, value size.
fn expected(name: &str) -> Option<(MapType, u32, u32)> {
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Some(match name {
        FLOWS_MAP => (
            MapType::Hash,
            size(size_of::<FlowKey>()),
            size(size_of::<FlowEntry>()),
        ),
        ACTIVITY_MAP => (MapType::Array, 4, size(size_of::<ActivityWord>())),
        PUNT_RING_MAP => (MapType::RingBuf, 0, 0),
        COUNTERS_MAP => (MapType::PerCpuArray, 4, 8),
        FWD_PORTS_MAP => (MapType::LpmTrie, 4 + size(size_of::<FwdPrefix>()), 1),
        FRAGS_MAP => (MapType::LruHash, size(size_of::<FragKey>()), 8),
        _ => return None,
    })
}

/// Prepares `base` for pinning: refuses another layout version, creates
/// `base/v<N>`, and if a datapath is pinned there, checks its maps.
/// Returns the versioned directory and, for an existing datapath, the
/// number of flow slots it was made with.
pub(super) fn prepare(base: &Path) -> Result<(PathBuf, Option<u32>), LoaderError> {
    let io_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| LoaderError::Pin { what, path, source }
    };
    fs::create_dir_all(base).map_err(io_err("creating pin directory", base))?;
    check_bpffs(base)?;
    let ours = format!("v{MAP_LAYOUT_VERSION}");
    for entry in fs::read_dir(base).map_err(io_err("reading pin directory", base))? {
        let name = entry
            .map_err(io_err("reading pin directory", base))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with('v') && name != ours {
            return Err(LoaderError::IncompatiblePins {
                dir: base.to_owned(),
                found: name,
                ours: MAP_LAYOUT_VERSION,
            });
        }
    }
    let dir = base.join(&ours);
    fs::create_dir_all(&dir).map_err(io_err("creating pin directory", &dir))?;
    if !dir.join(FLOWS_MAP).exists() {
        // Nothing to adopt; clear what a failed start may have left.
        clear_files(&dir);
        return Ok((dir, None));
    }
    let mut slots = None;
    for name in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| LoaderError::PinnedMapMismatch {
            path: path.clone(),
            what: format!("cannot be read ({e})"),
        })?;
        if let Some((ty, key, value)) = expected(name) {
            let found_ty = info.map_type().ok();
            if found_ty != Some(ty) || info.key_size() != key || info.value_size() != value {
                return Err(LoaderError::PinnedMapMismatch {
                    path,
                    what: format!(
                        "type {found_ty:?}, key {} B, value {} B (expected {ty:?}, {key} B, {value} B)",
                        info.key_size(),
                        info.value_size()
                    ),
                });
            }
        }
        if name == ACTIVITY_MAP {
            slots = Some(info.max_entries());
        }
    }
    match slots {
        Some(n) => Ok((dir, Some(n))),
        None => Err(LoaderError::PinnedMapMismatch {
            path: dir.join(ACTIVITY_MAP),
            what: "missing while the flow map is pinned".into(),
        }),
    }
}

/// Refuses a directory that is not on bpffs (pins need it).
fn check_bpffs(dir: &Path) -> Result<(), LoaderError> {
    let st = nix::sys::statfs::statfs(dir).map_err(|e| LoaderError::Pin {
        what: "checking the file system of",
        path: dir.to_owned(),
        source: io::Error::from(e),
    })?;
    #[allow(clippy::useless_conversion)] // the field's type differs by libc
    let magic = i64::from(st.filesystem_type().0);
    if magic != BPF_FS_MAGIC {
        return Err(LoaderError::Pin {
            what: "pinning under",
            path: dir.to_owned(),
            source: io::Error::other("not on a bpf file system (mount -t bpf bpf /sys/fs/bpf)"),
        });
    }
    Ok(())
}

/// Removes one pin (a missing one is fine).
pub(super) fn remove_file(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => debug!("unpinned {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing pin {}: {e}", path.display()),
    }
}

/// Removes every pin in `dir`.
fn clear_files(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            remove_file(&entry.path());
        }
    }
}

/// Removes the versioned directory `dir` with every pin in it, and its
/// parent (the base directory) if that is then empty.
pub(super) fn remove_dir(dir: &Path) {
    clear_files(dir);
    if let Err(e) = fs::remove_dir(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!("removing pin directory {}: {e}", dir.display());
    }
    if let Some(base) = dir.parent() {
        // Fails (and stays) if something else is pinned there.
        let _ = fs::remove_dir(base);
    }
}

/// Removes a whole pin base directory (every layout version), for a
/// datapath whose daemon will never come back (its pod is gone). Returns
/// whether anything was there.
pub fn remove_base(base: &Path) -> bool {
    let Ok(entries) = fs::read_dir(base) else {
        return false;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            clear_files(&path);
            let _ = fs::remove_dir(&path);
        } else {
            remove_file(&path);
        }
    }
    let _ = fs::remove_dir(base);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_has_an_expected_layout() {
        for name in PINNED_MAPS {
            assert!(expected(name).is_some(), "{name}");
        }
    }

    #[test]
    fn a_directory_off_bpffs_is_refused() {
        let dir = std::env::temp_dir().join(format!("tg-pin-test-{}", std::process::id()));
        let r = prepare(&dir);
        let _ = fs::remove_dir_all(&dir);
        assert!(matches!(r, Err(LoaderError::Pin { .. })), "{r:?}");
    }
}
