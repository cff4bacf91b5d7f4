//! A private bpffs mount for one test.
//!
//! # Theory of operation
//!
//! Pinned datapaths must not leak between tests (or into the machine's
//! `/sys/fs/bpf`), so each test that pins mounts a bpffs instance of its
//! own on a scratch directory: a separate superblock, whose pins nobody
//! else sees. [`Bpffs::pins`] lists what is pinned (the kernel's own
//! `maps.debug` / `progs.debug` iterators at the top are not pins), and
//! dropping the guard unmounts it lazily, which releases whatever a failed
//! test left pinned.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Result;

use crate::{
    child::{check_output, run_with_timeout},
    scratch::ScratchDir,
};

/// A bpffs mounted on a scratch directory, unmounted on drop.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
    _dir: ScratchDir,
}

impl Bpffs {
    /// Mounts a fresh bpffs.
    pub fn new() -> Result<Bpffs> {
        let dir = ScratchDir::new("bpffs")?;
        let path = dir.join("fs");
        std::fs::create_dir(&path)?;
        let out = run_with_timeout(
            Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path),
            Duration::from_secs(10),
        )?;
        check_output("mount -t bpf", out)?;
        Ok(Bpffs { path, _dir: dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every pin and directory below the mount (not the kernel's iterator
    /// files at the top).
    pub fn pins(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, out);
                }
                out.push(path);
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out);
        out.retain(|p| {
            !(p.parent() == Some(self.path.as_path())
                && p.extension().is_some_and(|e| e == "debug"))
        });
        out
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("umount").arg("-l").arg(&self.path),
            Duration::from_secs(10),
        );
    }
}
