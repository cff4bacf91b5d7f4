//! Which eBPF programs are attached to an interface with tcx.
//!
//! # Theory of operation
//!
//! tcx (kernel 6.6+) attaches TC programs through BPF links instead of a
//! `clsact` qdisc with filters. Debian's bpftool 7.1 predates tcx, so its
//! `bpftool net show dev DEV` lists nothing for such attachments and
//! iproute2's `tc filter show` cannot see them either. This module asks the
//! kernel through aya instead: a helper thread `setns(2)`s into the
//! interface's namespace (interface names and indexes are per namespace) and
//! calls [`SchedClassifier::query_tcx`], which returns the attached programs
//! in execution order with their (kernel-truncated, 15-byte) names.
//!
//! The thread exists only so that `setns` never changes a test thread's
//! namespace; it is joined before returning.

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType},
};
use nix::sched::{CloneFlags, setns};

use crate::netns::Netns;

/// A tcx hook of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcxDirection {
    /// Frames received by the interface.
    Ingress,
    /// Frames sent by the interface.
    Egress,
}

impl TcxDirection {
    fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }
}

/// A program attached to a tcx hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProgram {
    /// The kernel's program id (as in `bpftool prog show id ID`).
    pub id: u32,
    /// The program's name, truncated to 15 bytes as the kernel keeps it
    /// (see [`kernel_name`]).
    pub name: String,
}

/// Runs `f` on a thread that has entered `ns`'s network namespace.
fn in_netns<T: Send + 'static>(
    ns: &Netns,
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns_path = ns.path();
    std::thread::Builder::new()
        .name(what.to_owned())
        .spawn(move || {
            let file =
                std::fs::File::open(&ns_path).with_context(|| format!("cannot open {ns_path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({ns_path}) failed"))?;
            f()
        })
        .with_context(|| format!("cannot spawn the {what} thread"))?
        .join()
        .map_err(|_| anyhow::anyhow!("{what} thread panicked"))?
}

/// Lists the programs attached with tcx to `iface`'s `direction` hook in
/// namespace `ns`, in execution order.
pub fn attached(ns: &Netns, iface: &str, direction: TcxDirection) -> Result<Vec<AttachedProgram>> {
    let iface = iface.to_owned();
    in_netns(ns, "tcx-query", move || {
        let (_revision, programs) = SchedClassifier::query_tcx(&iface, direction.attach_type())
            .with_context(|| format!("querying tcx {direction:?} programs of {iface}"))?;
        Ok(programs
            .iter()
            .map(|p| AttachedProgram {
                id: p.id(),
                name: p.name_as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    })
}

/// Names of the programs attached with tcx to `iface`'s `direction` hook in
/// `ns`.
pub fn attached_names(ns: &Netns, iface: &str, direction: TcxDirection) -> Result<Vec<String>> {
    Ok(attached(ns, iface, direction)?
        .into_iter()
        .map(|p| p.name)
        .collect())
}

/// A program attached by [`attach_pass_program`]; dropping it detaches and
/// unloads the program.
pub struct PassProgram {
    _ebpf: Ebpf,
}

/// Loads the classifier `name` from `object` (see
/// [`crate::fixtures::pass_ebpf_object`]) and attaches it with tcx to
/// `iface`'s `direction` hook in `ns`. For harness self-tests.
pub fn attach_pass_program(
    ns: &Netns,
    iface: &str,
    direction: TcxDirection,
    object: &Path,
    name: &str,
) -> Result<PassProgram> {
    let iface = iface.to_owned();
    let name = name.to_owned();
    let object = object.to_path_buf();
    in_netns(ns, "tcx-attach", move || {
        let mut ebpf =
            Ebpf::load_file(&object).with_context(|| format!("loading {}", object.display()))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(&name)
            .with_context(|| format!("{} has no program {name}", object.display()))?
            .try_into()
            .context("not a classifier")?;
        prog.load()
            .with_context(|| format!("loading program {name}"))?;
        prog.attach(&iface, direction.attach_type())
            .with_context(|| format!("attaching {name} to {iface}"))?;
        Ok(PassProgram { _ebpf: ebpf })
    })
}

/// The name the kernel keeps for a program called `name` (at most 15
/// bytes: `tg_uplink_ingress` is kept as `tg_uplink_ingre`).
pub fn kernel_name(name: &str) -> &str {
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Whether `names` (as returned by [`attached_names`]) contains the
/// program called `name` (compared as the kernel truncates it).
pub fn contains_program(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n == kernel_name(name))
}
