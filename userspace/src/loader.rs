//! Loading the eBPF object and attaching its programs.
//!
//! # Theory of operation
//!
//! The object built from `datapath-ebpf` is embedded in the binary (see
//! `build.rs`); `--ebpf-object` loads another file instead. Loading happens
//! in three steps, each with its own error: the object is parsed and its maps
//! created (the scratch array sized to the number of possible CPUs, the
//! in-kernel log level set from `--log-level`), each program is verified and
//! loaded, and each is attached to the ingress of its interface.
//!
//! Attachment uses tcx links where the kernel has them (6.6 and later): a
//! link belongs to the file descriptor that created it, so the kernel
//! detaches it even if tapgate is killed, and it never disturbs other tc or
//! tcx programs on the device. On older kernels the legacy netlink classifier
//! is used; the `clsact` qdisc is added if missing and removed again at
//! detach if tapgate added it. [`Datapath::detach`] (or dropping the
//! [`Datapath`]) removes everything tapgate attached.

use std::process::Command;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::LinkOrder,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};
use datapath_common::{
    ACTIVITY_MAP, COUNTERS_MAP, Counter, FLOWS_MAP, FWD_PORTS_MAP, PROG_TAP_INGRESS,
    PROG_UPLINK_EGRESS, PROG_UPLINK_INGRESS, PUNT_REASON_COUNTER_BASE, PUNT_RING_MAP, PuntReason,
    SCRATCH_MAP,
};
use log::{debug, info, warn};
use thiserror::Error;

use crate::iface::Iface;

/// The eBPF object built by `build.rs`.
pub static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapgate.bpf.o"));

/// Errors while loading or attaching the datapath.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The object could not be parsed or its maps created.
    #[error("loading the eBPF object: {0}")]
    Object(#[source] EbpfError),
    /// A program the daemon needs is missing from the object.
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    /// A map the daemon needs is missing from the object.
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    /// A map has the wrong type.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// aya's reason.
        source: aya::maps::MapError,
    },
    /// The verifier refused a program.
    #[error("program {program} rejected by the kernel verifier: {io_error}")]
    Verifier {
        /// Program name.
        program: &'static str,
        /// The load syscall's error.
        io_error: std::io::Error,
        /// The verifier's log.
        log: String,
    },
    /// Loading a program failed otherwise.
    #[error("loading program {program}: {source}")]
    Load {
        /// Program name.
        program: &'static str,
        /// aya's reason.
        source: ProgramError,
    },
    /// Attaching a program failed.
    #[error("attaching {program} to {iface}: {source}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Interface name.
        iface: String,
        /// aya's reason.
        source: ProgramError,
    },
    /// Mapping the activity array into memory failed.
    #[error("mapping the activity array: {0}")]
    Mmap(#[source] std::io::Error),
    /// Adding the clsact qdisc (legacy tc only) failed.
    #[error("adding the clsact qdisc to {iface}: {source}")]
    Qdisc {
        /// Interface name.
        iface: String,
        /// aya's reason.
        source: TcError,
    },
}

impl LoaderError {
    /// The verifier log, if this error carries one.
    pub fn verifier_log(&self) -> Option<&str> {
        match self {
            Self::Verifier { log, .. } => Some(log),
            _ => None,
        }
    }
}

/// Options for [`Datapath::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Log level for `aya-log` statements in the programs (0 = off,
    /// 1 = error ... 5 = trace).
    pub bpf_log_level: u8,
    /// Number of flow slots (the flow map holds two entries per flow).
    pub max_flows: u32,
}

/// One attachment made by tapgate.
struct Attachment {
    program: &'static str,
    iface: String,
    link: SchedClassifierLinkId,
    /// The clsact qdisc was added by us (legacy tc only).
    added_qdisc: bool,
}

/// The loaded programs and maps, and what tapgate attached.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
}

/// Whether this kernel attaches TC programs with tcx links.
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl Datapath {
    /// Parses `object`, creates its maps and loads (verifies) both programs.
    pub fn load(object: &[u8], opts: &LoadOptions) -> Result<Self, LoaderError> {
        let cpus = aya::util::nr_cpus().unwrap_or(1).max(1);
        let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
        let level = opts.bpf_log_level;
        let max_flows = opts.max_flows.max(1);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(SCRATCH_MAP, cpus)
            .map_max_entries(FLOWS_MAP, max_flows.saturating_mul(2))
            .map_max_entries(ACTIVITY_MAP, max_flows)
            .override_global(aya_log::LEVEL, &level, false)
            .load(object)
            .map_err(LoaderError::Object)?;
        for name in [PROG_TAP_INGRESS, PROG_UPLINK_INGRESS, PROG_UPLINK_EGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(LoaderError::MissingProgram(name))?
                .try_into()
                .map_err(|source| LoaderError::Load {
                    program: name,
                    source,
                })?;
            prog.load().map_err(|source| match source {
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } => LoaderError::Verifier {
                    program: name,
                    io_error,
                    log: verifier_log.to_string(),
                },
                source => LoaderError::Load {
                    program: name,
                    source,
                },
            })?;
            debug!("loaded program {name}");
        }
        Ok(Self {
            ebpf,
            attached: Vec::new(),
        })
    }

    /// Attaches the tap program to `tap`'s ingress and the uplink program to
    /// `uplink`'s ingress; with `host_egress` (`--allow-host`) also the
    /// egress program to `uplink`'s egress, where the host's replies to
    /// host-local flows pass. On error, whatever was attached is detached
    /// again.
    pub fn attach(
        &mut self,
        tap: &Iface,
        uplink: &Iface,
        host_egress: bool,
    ) -> Result<(), LoaderError> {
        let res = self
            .attach_one(PROG_TAP_INGRESS, tap, TcAttachType::Ingress)
            .and_then(|()| self.attach_one(PROG_UPLINK_INGRESS, uplink, TcAttachType::Ingress))
            .and_then(|()| {
                if host_egress {
                    self.attach_one(PROG_UPLINK_EGRESS, uplink, TcAttachType::Egress)
                } else {
                    Ok(())
                }
            });
        if res.is_err() {
            self.detach();
        }
        res
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        iface: &Iface,
        direction: TcAttachType,
    ) -> Result<(), LoaderError> {
        let tcx = kernel_has_tcx();
        let mut added_qdisc = false;
        if !tcx {
            match tc::qdisc_add_clsact(&iface.name) {
                Ok(()) => added_qdisc = true,
                Err(TcError::AlreadyAttached) => {}
                Err(source) => {
                    return Err(LoaderError::Qdisc {
                        iface: iface.name.clone(),
                        source,
                    });
                }
            }
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .ok_or(LoaderError::MissingProgram(program))?
            .try_into()
            .map_err(|source| LoaderError::Load { program, source })?;
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::default())
        } else {
            TcAttachOptions::Netlink(NlOptions::default())
        };
        let link = prog
            .attach_with_options(&iface.name, direction, options)
            .map_err(|source| LoaderError::Attach {
                program,
                iface: iface.name.clone(),
                source,
            })?;
        let prog_id = prog.info().map(|i| i.id()).unwrap_or(0);
        info!(
            "attached {program} to {} {} ({}, prog id {prog_id})",
            iface.name,
            if direction == TcAttachType::Egress {
                "egress"
            } else {
                "ingress"
            },
            if tcx { "tcx" } else { "tc clsact" }
        );
        self.attached.push(Attachment {
            program,
            iface: iface.name.clone(),
            link,
            added_qdisc,
        });
        Ok(())
    }

    /// Detaches everything tapgate attached (idempotent).
    pub fn detach(&mut self) {
        while let Some(a) = self.attached.pop() {
            let prog: Option<&mut SchedClassifier> = self
                .ebpf
                .program_mut(a.program)
                .and_then(|p| p.try_into().ok());
            match prog.map(|p| p.detach(a.link)) {
                Some(Ok(())) => debug!("detached {} from {}", a.program, a.iface),
                Some(Err(e)) => warn!("detaching {} from {}: {e}", a.program, a.iface),
                None => warn!("detaching {} from {}: program gone", a.program, a.iface),
            }
            if a.added_qdisc {
                remove_clsact(&a.iface);
            }
        }
    }

    /// Takes the punt ring buffer out of the object.
    pub fn take_punt_ring(&mut self) -> Result<RingBuf<MapData>, LoaderError> {
        let map = self
            .ebpf
            .take_map(PUNT_RING_MAP)
            .ok_or(LoaderError::MissingMap(PUNT_RING_MAP))?;
        RingBuf::try_from(map).map_err(|source| LoaderError::Map {
            name: PUNT_RING_MAP,
            source,
        })
    }

    /// Takes the per-CPU counters out of the object.
    pub fn take_counters(&mut self) -> Result<KernelCounters, LoaderError> {
        let map = self
            .ebpf
            .take_map(COUNTERS_MAP)
            .ok_or(LoaderError::MissingMap(COUNTERS_MAP))?;
        let map = PerCpuArray::try_from(map).map_err(|source| LoaderError::Map {
            name: COUNTERS_MAP,
            source,
        })?;
        Ok(KernelCounters { map })
    }

    /// Takes the flow map and the activity array out of the object.
    pub fn take_flow_maps(&mut self) -> Result<crate::maps::KernelFlowMaps, LoaderError> {
        let flows = self
            .ebpf
            .take_map(FLOWS_MAP)
            .ok_or(LoaderError::MissingMap(FLOWS_MAP))?;
        let activity = self
            .ebpf
            .take_map(ACTIVITY_MAP)
            .ok_or(LoaderError::MissingMap(ACTIVITY_MAP))?;
        crate::maps::KernelFlowMaps::new(flows, activity)
    }

    /// Takes the forwarded-ports map out of the object.
    pub fn take_fwd_ports(&mut self) -> Result<crate::maps::KernelFwdPorts, LoaderError> {
        let map = self
            .ebpf
            .take_map(FWD_PORTS_MAP)
            .ok_or(LoaderError::MissingMap(FWD_PORTS_MAP))?;
        crate::maps::KernelFwdPorts::new(map)
    }

    /// The underlying aya object (for the log forwarder).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Removes a clsact qdisc tapgate added (legacy tc only).
fn remove_clsact(iface: &str) {
    match Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .status()
    {
        Ok(s) if s.success() => debug!("removed clsact qdisc from {iface}"),
        Ok(s) => warn!("removing clsact qdisc from {iface}: tc exited with {s}"),
        Err(e) => warn!("removing clsact qdisc from {iface}: {e}"),
    }
}

/// Read access to the kernel's per-CPU counters.
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    fn sum(&self, idx: u32) -> u64 {
        self.map
            .get(&idx, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    /// The sum over all CPUs of counter `c` (0 if it cannot be read).
    pub fn get(&self, c: Counter) -> u64 {
        self.sum(c as u32)
    }

    /// Records punted (or events emitted) for `reason`, summed over CPUs.
    pub fn punts(&self, reason: PuntReason) -> u64 {
        self.sum(PUNT_REASON_COUNTER_BASE + reason as u32)
    }
}
