//! Running tapgate's classifiers on hand-made frames with
//! `BPF_PROG_TEST_RUN`: kernel fixtures without devices, namespaces or
//! traffic.
//!
//! # Theory of operation
//!
//! [`ProgTest::load`] loads the eBPF object embedded in the `tapgate`
//! binary ([`tapgate::kernel::loader::EMBEDDED_OBJECT`]) with a plain
//! [`aya::EbpfLoader`]: nothing is pinned and nothing attached, the maps
//! belong to this one object (small: a few flows, a 256 KiB punt ring),
//! and the programs go through the verifier of the running kernel exactly
//! as `tapgate run` loads them. The IPv6 checksum flag global
//! ([`L4_CSUM_IPV6_GLOBAL`]) is set as the caller asks, so both of the
//! programs' IPv6 checksum paths can be run on one kernel.
//!
//! [`ProgTest::run`] hands one frame to one program through the `bpf(2)`
//! command `BPF_PROG_TEST_RUN` (aya 0.14 has no wrapper for it, so the
//! command's part of `union bpf_attr` is written out as [`TestRunAttr`]).
//! The kernel builds an skb from the frame as if it had arrived on the
//! loopback device of the calling thread's network namespace (linear,
//! `CHECKSUM_NONE`, or `CHECKSUM_COMPLETE` with [`ProgTest::run_with`]:
//! then the kernel also checks that the program left `skb->csum` right),
//! runs the program once and returns its verdict and the frame as the
//! program left it. The kernel refuses (`EINVAL`) frames with an IPv4 or
//! IPv6 EtherType that are shorter than the Ethernet and fixed network
//! headers (measured on 6.18), so truncated network headers cannot be
//! run. Redirect helpers only
//! record their target under test run: the verdict is their return code
//! (`TC_ACT_REDIRECT` for `bpf_redirect` and `bpf_redirect_neigh`) and
//! nothing is sent anywhere; `bpf_check_mtu` looks the egress ifindex up in
//! the calling thread's namespace, so flows seeded with ifindex 1 (`lo`,
//! MTU 65536) pass it.
//!
//! The fixture seeds `TG_FLOWS` ([`ProgTest::insert_flow`]), the
//! forwarded-ports trie `TG_FWD_PORTS` ([`ProgTest::insert_fwd_prefix`],
//! keys as user space publishes them) and the fragment-tracking map
//! `TG_FRAGS` ([`ProgTest::insert_frag`], with times on the programs'
//! clock, [`ktime_ns`]), and reads what the program left behind: the
//! per-CPU counters summed over CPUs ([`ProgTest::counters`]), activity
//! words ([`ProgTest::activity`]), entries (their packet counters and last
//! ACK), the datagrams in `TG_FRAGS` ([`ProgTest::frags`]) and the records
//! in the punt ring ([`ProgTest::drain_punts`]).

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::SchedClassifier,
};
use datapath_common::{
    ACTIVITY_MAP, COUNTER_SLOTS, COUNTERS_MAP, FLOWS_MAP, FRAGS_MAP, FWD_PORTS_MAP, FlowEntry,
    FlowKey, FragKey, FwdPrefix, L4_CSUM_IPV6_GLOBAL, PROG_LO_INGRESS, PROG_TAP_INGRESS,
    PROG_UPLINK_EGRESS, PROG_UPLINK_INGRESS, PUNT_RING_MAP, PuntHeader, SCRATCH_MAP,
};

/// `BPF_PROG_TEST_RUN`, the `bpf(2)` command (`enum bpf_cmd` in
/// `linux/bpf.h`).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (`linux/bpf.h`): run the skb as
/// `CHECKSUM_COMPLETE` and check `skb->csum` afterwards.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// Flow slots of a fixture's maps (two flow-map entries per slot).
pub const FIXTURE_FLOWS: u32 = 64;

/// Bytes of a fixture's punt ring (a power of two, page-aligned).
const FIXTURE_RING_BYTES: u32 = 256 << 10;

/// Largest frame a program may leave behind (64 KiB IP + Ethernet, with
/// room to spare).
const DATA_OUT_MAX: usize = 70_000;

/// The `test` member of `union bpf_attr` (`linux/bpf.h`), the argument of
/// `BPF_PROG_TEST_RUN`. Field order and widths are the kernel's;
/// `__aligned_u64` fields are `u64` here, which `repr(C)` aligns the same
/// way on every 64-bit target. The kernel copies the size passed and
/// treats fields it has beyond that as zero.
#[repr(C)]
#[derive(Debug, Default)]
pub struct TestRunAttr {
    /// The program to run.
    pub prog_fd: u32,
    /// Output: the program's return value (its verdict).
    pub retval: u32,
    /// Length of `data_in`.
    pub data_size_in: u32,
    /// Input: room at `data_out`; output: the length written there
    /// (`ENOSPC` if the room was too small).
    pub data_size_out: u32,
    /// Pointer to the input frame.
    pub data_in: u64,
    /// Pointer to the output buffer (the frame as the program left it).
    pub data_out: u64,
    /// How many times to run (0 counts as 1).
    pub repeat: u32,
    /// Output: the mean run time in nanoseconds.
    pub duration: u32,
    /// Length of `ctx_in` (0: no context given).
    pub ctx_size_in: u32,
    /// Input: room at `ctx_out`; output: the length written there.
    pub ctx_size_out: u32,
    /// Pointer to the input context (a `struct __sk_buff` for TC).
    pub ctx_in: u64,
    /// Pointer to the output context.
    pub ctx_out: u64,
    /// `BPF_F_TEST_*` flags (for skb programs only
    /// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`).
    pub flags: u32,
    /// CPU to run on (with `BPF_F_TEST_RUN_ON_CPU`, not for TC).
    pub cpu: u32,
    /// Batch size (XDP live frames only).
    pub batch_size: u32,
    /// Explicit padding to the struct's 8-byte alignment, zero: the
    /// kernel refuses (`EINVAL`) nonzero bytes after the last field it
    /// knows, and implicit padding would be uninitialised.
    pub _pad: u32,
}
const _: () = assert!(std::mem::size_of::<TestRunAttr>() == 80);

/// What one test run returned.
#[derive(Clone, Debug)]
pub struct TestRun {
    /// The program's verdict (`TC_ACT_*`, as a signed value: -1 is
    /// `TC_ACT_UNSPEC`).
    pub verdict: i32,
    /// The frame as the program left it.
    pub data: Vec<u8>,
}

/// One record read back from the punt ring.
#[derive(Clone, Debug)]
pub struct PuntRecord {
    /// The record's header.
    pub header: PuntHeader,
    /// The frame bytes (a whole punted frame, or an event's snap).
    pub data: Vec<u8>,
}

/// Summed per-CPU counters, indexed like `TG_COUNTERS`
/// (`datapath_common::Counter` and `PUNT_REASON_COUNTER_BASE + reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters(pub Vec<u64>);

impl Counters {
    /// Slot-by-slot difference `self - before` (counters only grow).
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .zip(&before.0)
                .map(|(a, b)| a.wrapping_sub(*b))
                .collect(),
        )
    }
}

/// How to load the fixture.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgTestOptions {
    /// Set the programs' `TG_L4_CSUM_IPV6` (pass `BPF_F_IPV6`, Linux ≥
    /// 6.16), as the loader does on such kernels.
    pub l4_csum_ipv6: bool,
}

/// The datapath's programs loaded (not attached) with private maps.
pub struct ProgTest {
    ebpf: Ebpf,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    activity: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    punts: RingBuf<MapData>,
    fwd_ports: LpmTrie<MapData, FwdPrefix, u8>,
    frags: HashMap<MapData, FragKey, u64>,
}

/// Now on the clock of `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`), in
/// nanoseconds: the time base of `TG_FRAGS` entries.
pub fn ktime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

impl ProgTest {
    /// Loads the embedded object and verifies its four classifiers (tap
    /// ingress, uplink ingress and egress, loopback ingress). Needs root
    /// (or CAP_BPF + CAP_NET_ADMIN).
    pub fn load(opts: ProgTestOptions) -> Result<Self> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| anyhow!("{what}: {e}"))?
            .max(1);
        let cpus = u32::try_from(cpus).context("CPU count")?;
        let csum_flag = u8::from(opts.l4_csum_ipv6);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(SCRATCH_MAP, cpus)
            .map_max_entries(FLOWS_MAP, 2 * FIXTURE_FLOWS)
            .map_max_entries(ACTIVITY_MAP, FIXTURE_FLOWS)
            .map_max_entries(PUNT_RING_MAP, FIXTURE_RING_BYTES)
            // aya-log's level: off, so the log ring stays empty.
            .override_global("AYA_LOG_LEVEL", &0u8, false)
            .override_global(L4_CSUM_IPV6_GLOBAL, &csum_flag, true);
        let mut ebpf = loader
            .load(tapgate::kernel::loader::EMBEDDED_OBJECT)
            .context("loading the embedded eBPF object")?;
        for name in [
            PROG_TAP_INGRESS,
            PROG_UPLINK_INGRESS,
            PROG_UPLINK_EGRESS,
            PROG_LO_INGRESS,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()
                .with_context(|| format!("{name} is not a classifier"))?;
            prog.load().map_err(|e| match &e {
                aya::programs::ProgramError::LoadError { verifier_log, .. } => {
                    anyhow!("the verifier refused {name}: {e}\n{verifier_log}")
                }
                _ => anyhow!("loading {name}: {e}"),
            })?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the object has no map {name}"))
        };
        let flows = HashMap::try_from(take(&mut ebpf, FLOWS_MAP)?)?;
        let activity = Array::try_from(take(&mut ebpf, ACTIVITY_MAP)?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, COUNTERS_MAP)?)?;
        let punts = RingBuf::try_from(take(&mut ebpf, PUNT_RING_MAP)?)?;
        let fwd_ports = LpmTrie::try_from(take(&mut ebpf, FWD_PORTS_MAP)?)?;
        let frags = HashMap::try_from(take(&mut ebpf, FRAGS_MAP)?)?;
        Ok(Self {
            ebpf,
            flows,
            activity,
            counters,
            punts,
            fwd_ports,
            frags,
        })
    }

    /// Runs `frame` through `program` once (`BPF_PROG_TEST_RUN`), as a
    /// `CHECKSUM_NONE` skb.
    pub fn run(&self, program: &str, frame: &[u8]) -> Result<TestRun> {
        self.run_with(program, frame, false)
    }

    /// Runs `frame` through `program` once; with `checksum_complete` the
    /// skb is `CHECKSUM_COMPLETE` (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`:
    /// `skb->csum` is the sum of the packet after the Ethernet header, as a
    /// NIC would report it) and the kernel checks afterwards that
    /// `skb->csum` still matches the packet, failing the run with
    /// `EBADMSG` when the program left it wrong. Errors carry the
    /// `std::io::Error` of the syscall.
    pub fn run_with(
        &self,
        program: &str,
        frame: &[u8],
        checksum_complete: bool,
    ) -> Result<TestRun> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        let fd = prog.fd()?.as_fd().as_raw_fd();
        let mut out = vec![0u8; DATA_OUT_MAX];
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(fd)?,
            data_size_in: u32::try_from(frame.len())?,
            data_size_out: u32::try_from(out.len())?,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            flags: if checksum_complete {
                BPF_F_TEST_SKB_CHECKSUM_COMPLETE
            } else {
                0
            },
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` is a valid BPF_PROG_TEST_RUN argument of the size
        // passed; `data_in` points to `frame.len()` readable bytes and
        // `data_out` to `out.len()` writable bytes, both alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(anyhow::Error::new(err).context(format!("BPF_PROG_TEST_RUN of {program}")));
        }
        out.truncate(attr.data_size_out as usize);
        Ok(TestRun {
            verdict: attr.retval as i32,
            data: out,
        })
    }

    /// How many instructions the verifier went through for `program`
    /// (the kernel's limit is one million).
    pub fn verified_instructions(&self, program: &str) -> Result<Option<u32>> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        Ok(prog.info()?.verified_instruction_count())
    }

    /// Inserts (or replaces) a flow entry.
    pub fn insert_flow(&mut self, key: &FlowKey, entry: &FlowEntry) -> Result<()> {
        self.flows.insert(key, entry, 0)?;
        Ok(())
    }

    /// The entry of `key`, if there is one.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.get(key, 0).ok()
    }

    /// Removes every flow entry.
    pub fn clear_flows(&mut self) -> Result<()> {
        let keys: Vec<FlowKey> = self.flows.keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.flows.remove(&k)?;
        }
        Ok(())
    }

    /// Publishes a forwarded-ports prefix: `prefix_len` leading bits of
    /// `data` (`FWD_PREFIX_FIXED_BITS` plus the port bits) must match.
    pub fn insert_fwd_prefix(&mut self, data: FwdPrefix, prefix_len: u32) -> Result<()> {
        self.fwd_ports.insert(&Key::new(prefix_len, data), 1, 0)?;
        Ok(())
    }

    /// Removes every forwarded-ports prefix.
    pub fn clear_fwd_prefixes(&mut self) -> Result<()> {
        let keys: Vec<Key<FwdPrefix>> = self.fwd_ports.keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.fwd_ports.remove(&k)?;
        }
        Ok(())
    }

    /// Enters a datagram in `TG_FRAGS` as if its first fragment had
    /// arrived at `at_ns` ([`ktime_ns`]'s clock).
    pub fn insert_frag(&mut self, key: &FragKey, at_ns: u64) -> Result<()> {
        self.frags.insert(key, at_ns, 0)?;
        Ok(())
    }

    /// Every datagram in `TG_FRAGS` with the time of its first fragment.
    pub fn frags(&self) -> Result<Vec<(FragKey, u64)>> {
        Ok(self.frags.iter().collect::<Result<_, _>>()?)
    }

    /// Removes every `TG_FRAGS` entry.
    pub fn clear_frags(&mut self) -> Result<()> {
        let keys: Vec<FragKey> = self.frags.keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.frags.remove(&k)?;
        }
        Ok(())
    }

    /// The activity word of `slot`.
    pub fn activity(&self, slot: u32) -> Result<u64> {
        Ok(self.activity.get(&slot, 0)?)
    }

    /// Clears every activity word.
    pub fn clear_activity(&mut self) -> Result<()> {
        for slot in 0..FIXTURE_FLOWS {
            self.activity.set(slot, 0, 0)?;
        }
        Ok(())
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        (0..COUNTER_SLOTS)
            .map(|i| Ok(self.counters.get(&i, 0)?.iter().sum()))
            .collect::<Result<_>>()
            .map(Counters)
    }

    /// Takes every record out of the punt ring.
    pub fn drain_punts(&mut self) -> Result<Vec<PuntRecord>> {
        let hdr_len = std::mem::size_of::<PuntHeader>();
        let mut records = Vec::new();
        while let Some(item) = self.punts.next() {
            let bytes: &[u8] = &item;
            if bytes.len() < hdr_len {
                bail!("punt record of {} bytes", bytes.len());
            }
            let u32_at =
                |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
            let header = PuntHeader {
                len: u32_at(0),
                orig_len: u32_at(4),
                ifindex: u32_at(8),
                reason: u16::from_ne_bytes([bytes[12], bytes[13]]),
                origin: bytes[14],
                _pad: bytes[15],
            };
            let end = (hdr_len + header.len as usize).min(bytes.len());
            records.push(PuntRecord {
                header,
                data: bytes[hdr_len..end].to_vec(),
            });
        }
        Ok(records)
    }
}
