//! Loading the eBPF object and attaching its programs.
//!
//! # Theory of operation
//!
//! The object built from `datapath-ebpf` is embedded in the binary (see
//! `build.rs`); `--ebpf-object` loads another file instead. Loading happens
//! in three steps, each with its own error: the object is parsed and its maps
//! created (the scratch array sized to the number of possible CPUs, the
//! in-kernel log level set from `--log-level`, `BPF_F_IPV6` for IPv6
//! checksum updates enabled on Linux 6.16 and later), each program is
//! verified and loaded, and each is attached to the ingress of its
//! interface. The loopback program (`tg_lo_ingress`: host-local clients of
//! forwarded ports) is loaded always but attached to loopback's ingress
//! only while there are forwarding rules ([`Datapath::attach_loopback`],
//! [`Datapath::detach_loopback`]: the rules may come and go at runtime);
//! with no rules, the host's own loopback traffic meets no program at all.
//!
//! Attachment uses tcx links where the kernel has them (6.6 and later): a
//! link belongs to the file descriptor that created it, so the kernel
//! detaches it even if tapgate is killed, and it never disturbs other tc or
//! tcx programs on the device. On older kernels the legacy netlink classifier
//! is used; the `clsact` qdisc is added if missing and removed again at
//! detach if tapgate added it. [`Datapath::detach`] (or dropping the
//! [`Datapath`]) removes everything tapgate attached.
//!
//! **Pinning (restart without loss).** With [`LoadOptions::pin`] the maps
//! in [`PINNED_MAPS`] and the tcx links are pinned under
//! `DIR/v<MAP_LAYOUT_VERSION>/` (see `pin.rs`). A later load with the same
//! directory *adopts* them: the maps are reused as they are (the flow
//! table, activity bits, counters and the punts queued in the ring while
//! no daemon ran), the new programs are verified against them, and each
//! pinned link gets the new program with one atomic `BPF_LINK_UPDATE` —
//! established flows never stop being forwarded (loopback's link too, as
//! `link_tg_lo_ingress`; a pinned link this daemon does not attach, such
//! as loopback's when it has no rules, is removed). A directory holding
//! another layout version is refused before anything is loaded.
//! [`Datapath::leave_pinned`] exits leaving everything in the kernel;
//! [`Datapath::detach`] removes the links, the pins and the directory.

mod pin;

pub use pin::remove_base as remove_pins;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{
            self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcError,
        },
    },
    util::KernelVersion,
};
use datapath_common::{
    ACTIVITY_MAP, COUNTERS_MAP, Counter, FLOWS_MAP, FRAGS_MAP, FWD_PORTS_MAP, L4_CSUM_IPV6_GLOBAL,
    PINNED_MAPS, PROG_LO_INGRESS, PROG_TAP_INGRESS, PROG_UPLINK_EGRESS, PROG_UPLINK_INGRESS,
    PUNT_REASON_COUNTER_BASE, PUNT_RING_MAP, PuntReason, SCRATCH_MAP,
};
use log::{debug, info, warn};
use thiserror::Error;

use crate::iface::Iface;

/// The loopback device's name (its index is always
/// [`datapath_common::LOOPBACK_IFINDEX`]).
const LOOPBACK_NAME: &str = "lo";

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
    /// A pinned datapath of another map layout is in the pin directory.
    #[error(
        "{dir} holds a datapath pinned with map layout {found}, this tapgate uses layout {ours}: \
         remove it (delete the attachment, or stop it without keeping the datapath) before \
         starting this version"
    )]
    IncompatiblePins {
        /// The pin directory.
        dir: PathBuf,
        /// What was found (`v2`, ...).
        found: String,
        /// This build's layout version.
        ours: u32,
    },
    /// A pinned map does not have the layout this build expects.
    #[error("pinned map {path}: {what}; it was not made by this tapgate version")]
    PinnedMapMismatch {
        /// The pin.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// Pinning or adopting failed at the file-system level.
    #[error("{what} {path}: {source}")]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Pinning needs tcx links.
    #[error("keeping the datapath across restarts needs tcx links (Linux 6.6 or later)")]
    PinNeedsTcx,
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
    /// An adopted datapath keeps the size it was created with.
    pub max_flows: u32,
    /// Size of the punt ring buffer in bytes (a power of two, at least a
    /// page).
    pub ring_bytes: u32,
    /// Pin the maps and links under this directory, adopting a datapath
    /// already pinned there (`None`: nothing is pinned).
    pub pin: Option<PathBuf>,
    /// Capacity of the fragment-tracking LRU map (preallocated, as LRU
    /// maps are): datagrams of our flows in reassembly at once.
    pub frags_max: u32,
    /// Load the uplink egress program too (`--allow-host`).
    pub host_egress: bool,
}

impl LoadOptions {
    /// `tapgate run`'s defaults for `max_flows` flows.
    pub fn new(bpf_log_level: u8, max_flows: u32) -> Self {
        Self {
            bpf_log_level,
            max_flows,
            ring_bytes: datapath_common::PUNT_RING_BYTES,
            pin: None,
            frags_max: datapath_common::FRAGS_MAX,
            host_egress: false,
        }
    }
}

/// How tapgate holds one of its links.
enum LinkHold {
    /// Owned by the program object (not pinned).
    Owned(SchedClassifierLinkId),
    /// Pinned at `path`; `fd` keeps it alive while we run.
    Pinned { fd: FdLink, path: PathBuf },
}

/// One attachment made by tapgate.
struct Attachment {
    program: &'static str,
    iface: String,
    link: LinkHold,
    /// The clsact qdisc was added by us (legacy tc only).
    added_qdisc: bool,
}

/// The loaded programs and maps, and what tapgate attached.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
    /// The versioned pin directory, when pinning.
    pin_dir: Option<PathBuf>,
    /// Whether the maps were adopted from an earlier daemon's pins.
    adopted: bool,
    /// Flow slots of the (possibly adopted) maps.
    max_flows: u32,
    /// [`Datapath::leave_pinned`] was called: dropping leaves the kernel
    /// side running.
    keep: bool,
}

/// Whether this kernel attaches TC programs with tcx links.
pub fn kernel_has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Whether this kernel's `bpf_l4_csum_replace` takes `BPF_F_IPV6` (Linux
/// 6.16 and later: it keeps `skb->csum` of `CHECKSUM_COMPLETE` packets
/// right when an IPv6 address changes; older kernels refuse the flag).
/// The loader then sets the programs' [`L4_CSUM_IPV6_GLOBAL`].
pub fn kernel_has_l4_csum_ipv6() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 16, 0))
}

impl Datapath {
    /// Parses `object`, creates its maps and loads (verifies) both programs.
    pub fn load(object: &[u8], opts: &LoadOptions) -> Result<Self, LoaderError> {
        let cpus = aya::util::nr_cpus().unwrap_or(1).max(1);
        let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
        let level = opts.bpf_log_level;
        let mut max_flows = opts.max_flows.max(1);
        let (pin_dir, adopted) = match &opts.pin {
            Some(base) => {
                if !kernel_has_tcx() {
                    return Err(LoaderError::PinNeedsTcx);
                }
                let (dir, existing) = pin::prepare(base)?;
                if let Some(pinned_flows) = existing {
                    max_flows = pinned_flows;
                }
                (Some(dir), existing.is_some())
            }
            None => (None, false),
        };
        let pin_paths: Vec<(&str, PathBuf)> = match &pin_dir {
            Some(dir) => PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(SCRATCH_MAP, cpus)
            .map_max_entries(FLOWS_MAP, max_flows.saturating_mul(2))
            .map_max_entries(ACTIVITY_MAP, max_flows)
            .map_max_entries(PUNT_RING_MAP, opts.ring_bytes)
            .map_max_entries(FRAGS_MAP, opts.frags_max.max(1))
            .override_global(aya_log::LEVEL, &level, false);
        if kernel_has_l4_csum_ipv6() {
            // Not required: an object without the global (an older build, a
            // test fixture) simply keeps its default.
            loader.override_global(L4_CSUM_IPV6_GLOBAL, &1u8, false);
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(LoaderError::Object)?;
        if adopted {
            info!(
                "adopted the datapath pinned at {} ({max_flows} flow slots)",
                pin_dir.as_deref().unwrap_or(Path::new("?")).display()
            );
        }
        // The loopback program is loaded whether or not ports are
        // forwarded now: `tapgate rules add` may attach it later.
        let mut programs = vec![PROG_TAP_INGRESS, PROG_UPLINK_INGRESS, PROG_LO_INGRESS];
        if opts.host_egress {
            programs.push(PROG_UPLINK_EGRESS);
        }
        for name in programs {
            let prog = classifier(&mut ebpf, name)?;
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
            pin_dir,
            adopted,
            max_flows,
            keep: false,
        })
    }

    /// Whether the maps (and flows) were adopted from pins an earlier
    /// daemon left.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The number of flow slots of the maps in use.
    pub fn max_flows(&self) -> u32 {
        self.max_flows
    }

    /// The versioned pin directory, when pinning.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Ends this process's hold on the datapath but leaves it running in
    /// the kernel, pinned, for the next daemon to adopt.
    pub fn leave_pinned(mut self) {
        if self.pin_dir.is_some() {
            self.keep = true;
            info!("leaving the datapath pinned for the next daemon");
        }
    }

    /// Attaches the tap program to `tap`'s ingress and the uplink program to
    /// `uplink`'s ingress; with `host_egress` (`--allow-host`) also the
    /// egress program to `uplink`'s egress, where the host's replies to
    /// host-local flows pass; with `loopback` (ports are forwarded) the
    /// loopback program to loopback's ingress. On error, whatever was
    /// attached is detached again.
    pub fn attach(
        &mut self,
        tap: &Iface,
        uplink: &Iface,
        host_egress: bool,
        loopback: bool,
    ) -> Result<(), LoaderError> {
        if !host_egress {
            // A datapath adopted from a run with --allow-host may have it.
            self.drop_stale_pin(PROG_UPLINK_EGRESS);
        }
        if !loopback {
            // ... and one adopted from a run with forwarding rules this one.
            self.drop_stale_pin(PROG_LO_INGRESS);
        }
        let res = self
            .attach_one(PROG_TAP_INGRESS, tap, TcAttachType::Ingress)
            .and_then(|()| self.attach_one(PROG_UPLINK_INGRESS, uplink, TcAttachType::Ingress))
            .and_then(|()| {
                if host_egress {
                    self.attach_one(PROG_UPLINK_EGRESS, uplink, TcAttachType::Egress)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                if loopback {
                    self.attach_loopback()
                } else {
                    Ok(())
                }
            });
        if res.is_err() {
            self.detach();
        }
        res
    }

    /// Whether the loopback program is attached.
    pub fn loopback_attached(&self) -> bool {
        self.attached.iter().any(|a| a.program == PROG_LO_INGRESS)
    }

    /// Attaches the loopback program to loopback's ingress (host-local
    /// clients of forwarded ports), unless it is attached already; pinned
    /// as `link_tg_lo_ingress` when pinning (an earlier daemon's link is
    /// reused).
    pub fn attach_loopback(&mut self) -> Result<(), LoaderError> {
        if self.loopback_attached() {
            return Ok(());
        }
        let lo = Iface::by_name(LOOPBACK_NAME).map_err(|e| LoaderError::Attach {
            program: PROG_LO_INGRESS,
            iface: LOOPBACK_NAME.to_owned(),
            source: ProgramError::IOError(std::io::Error::other(e.to_string())),
        })?;
        self.attach_one(PROG_LO_INGRESS, &lo, TcAttachType::Ingress)
    }

    /// Detaches the loopback program (the last forwarding rule went), and
    /// removes its pinned link; nothing happens if it is not attached.
    pub fn detach_loopback(&mut self) {
        if self.keep {
            return;
        }
        let (lo, rest): (Vec<Attachment>, Vec<Attachment>) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(|a| a.program == PROG_LO_INGRESS);
        self.attached = rest;
        for a in lo {
            self.detach_attachment(a);
        }
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
        let pin_path = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_{program}")));
        if let Some(path) = &pin_path
            && path.exists()
        {
            match self.replace_pinned(program, iface, direction, path) {
                Ok(fd) => {
                    self.attached.push(Attachment {
                        program,
                        iface: iface.name.clone(),
                        link: LinkHold::Pinned {
                            fd,
                            path: path.clone(),
                        },
                        added_qdisc,
                    });
                    return Ok(());
                }
                Err(e) => {
                    warn!(
                        "the link pinned at {} cannot be reused ({e}); attaching anew",
                        path.display()
                    );
                    pin::remove_file(path);
                }
            }
        }
        let prog = classifier(&mut self.ebpf, program)?;
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
        let link = match pin_path {
            Some(path) => {
                let attach_err = |source| LoaderError::Attach {
                    program,
                    iface: iface.name.clone(),
                    source,
                };
                let owned = prog.take_link(link).map_err(attach_err)?;
                let fd = FdLink::try_from(owned).map_err(|e| {
                    attach_err(ProgramError::IOError(std::io::Error::other(e.to_string())))
                })?;
                let pinned = fd.pin(&path).map_err(|e| LoaderError::Pin {
                    what: "pinning link",
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                LinkHold::Pinned {
                    fd: FdLink::from(pinned),
                    path,
                }
            }
            None => LinkHold::Owned(link),
        };
        self.attached.push(Attachment {
            program,
            iface: iface.name.clone(),
            link,
            added_qdisc,
        });
        Ok(())
    }

    /// Gives the link pinned at `path` our `program` with one atomic
    /// `BPF_LINK_UPDATE`, then checks that the link still sits on
    /// `iface` (a link whose device went away is defunct).
    fn replace_pinned(
        &mut self,
        program: &'static str,
        iface: &Iface,
        direction: TcAttachType,
        path: &Path,
    ) -> Result<FdLink, LoaderError> {
        let attach_err = |source| LoaderError::Attach {
            program,
            iface: iface.name.clone(),
            source,
        };
        let other = |e: &dyn std::fmt::Display| {
            attach_err(ProgramError::IOError(std::io::Error::other(e.to_string())))
        };
        let pinned = PinnedLink::from_pin(path).map_err(|e| other(&e))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| other(&e))?;
        let prog = classifier(&mut self.ebpf, program)?;
        let id = prog.attach_to_link(link).map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd = FdLink::try_from(link).map_err(|e| other(&e))?;
        let ours = prog.info().map_err(attach_err)?.id();
        let (_, progs) = SchedClassifier::query_tcx(&iface.name, direction).map_err(attach_err)?;
        if !progs.iter().any(|p| p.id() == ours) {
            return Err(other(&format!(
                "the link is no longer attached to {}",
                iface.name
            )));
        }
        info!(
            "replaced the program of the link pinned at {} on {} (prog id {ours})",
            path.display(),
            iface.name
        );
        Ok(fd)
    }

    /// Removes the pinned link of `program`, if an earlier daemon left one
    /// that this one does not attach.
    fn drop_stale_pin(&mut self, program: &str) {
        if let Some(path) = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_{program}")))
            .filter(|p| p.exists())
        {
            info!("removing the pinned link of {program}, not attached any more");
            pin::remove_file(&path);
        }
    }

    /// Detaches everything tapgate attached and removes its pins
    /// (idempotent). After [`Datapath::leave_pinned`], only lets go of the
    /// file descriptors.
    pub fn detach(&mut self) {
        if self.keep {
            self.attached.clear();
            return;
        }
        while let Some(a) = self.attached.pop() {
            self.detach_attachment(a);
        }
        if let Some(dir) = self.pin_dir.take() {
            pin::remove_dir(&dir);
        }
    }

    /// Detaches one attachment (its pin removed first).
    fn detach_attachment(&mut self, a: Attachment) {
        match a.link {
            LinkHold::Owned(link) => {
                let prog: Option<&mut SchedClassifier> = self
                    .ebpf
                    .program_mut(a.program)
                    .and_then(|p| p.try_into().ok());
                match prog.map(|p| p.detach(link)) {
                    Some(Ok(())) => debug!("detached {} from {}", a.program, a.iface),
                    Some(Err(e)) => warn!("detaching {} from {}: {e}", a.program, a.iface),
                    None => warn!("detaching {} from {}: program gone", a.program, a.iface),
                }
            }
            LinkHold::Pinned { fd, path } => {
                // Without its pin, closing the last descriptor destroys the
                // link.
                pin::remove_file(&path);
                drop(fd);
                debug!("detached {} from {}", a.program, a.iface);
            }
        }
        if a.added_qdisc {
            remove_clsact(&a.iface);
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
    pub fn take_flow_maps(&mut self) -> Result<crate::kernel::maps::KernelFlowMaps, LoaderError> {
        let flows = self
            .ebpf
            .take_map(FLOWS_MAP)
            .ok_or(LoaderError::MissingMap(FLOWS_MAP))?;
        let activity = self
            .ebpf
            .take_map(ACTIVITY_MAP)
            .ok_or(LoaderError::MissingMap(ACTIVITY_MAP))?;
        crate::kernel::maps::KernelFlowMaps::new(flows, activity)
    }

    /// Takes the forwarded-ports map out of the object.
    pub fn take_fwd_ports(&mut self) -> Result<crate::kernel::maps::KernelFwdPorts, LoaderError> {
        let map = self
            .ebpf
            .take_map(FWD_PORTS_MAP)
            .ok_or(LoaderError::MissingMap(FWD_PORTS_MAP))?;
        crate::kernel::maps::KernelFwdPorts::new(map)
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

/// The classifier `program` of `ebpf`.
fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    ebpf.program_mut(program)
        .ok_or(LoaderError::MissingProgram(program))?
        .try_into()
        .map_err(|source| LoaderError::Load { program, source })
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
