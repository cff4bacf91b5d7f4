//! Reading punted frames from the kernel.
//!
//! # Theory of operation
//!
//! The programs hand frames to user space through one BPF ring buffer; each
//! record is a [`PuntHeader`] followed by the frame. The ring buffer's file
//! descriptor is registered with tokio; when it is readable the reader
//! drains records in batches of [`PUNT_BATCH`] and passes each to a handler.
//! The batch size is a tuning knob, not a limit (the tap seed): a longer
//! burst is simply more batches, with a yield to the runtime between them so
//! the punt path never starves other tasks. Replies collected during a batch
//! are written to the guest after it. Records that fail to decode are
//! counted and skipped; nothing a record contains can stop the reader.

use std::{
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, RingBuf};
use datapath_common::{Origin, PuntHeader, PuntReason};
use log::warn;
use tokio::io::Interest;

use crate::kernel::inject::{Injectors, Output};

/// Records handled per wake-up before yielding to other tasks.
pub const PUNT_BATCH: usize = 64;

/// One decoded punt record.
#[derive(Debug)]
pub struct Punted<'a> {
    /// Where the frame came from.
    pub origin: Origin,
    /// Why it was punted.
    pub reason: PuntReason,
    /// Interface index it arrived on.
    pub ifindex: u32,
    /// The frame, starting with its Ethernet header.
    pub frame: &'a [u8],
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than a header.
    Short,
    /// Header length beyond the record.
    BadLength,
    /// Unknown origin or reason code.
    BadCode,
}

/// Decodes a ring-buffer record.
pub fn decode(record: &[u8]) -> Result<Punted<'_>, DecodeError> {
    let hdr_len = std::mem::size_of::<PuntHeader>();
    let hdr_bytes = record.get(..hdr_len).ok_or(DecodeError::Short)?;
    let hdr: PuntHeader = bytemuck::pod_read_unaligned(hdr_bytes);
    let len = usize::try_from(hdr.len).map_err(|_| DecodeError::BadLength)?;
    let frame = record
        .get(hdr_len..hdr_len.saturating_add(len))
        .ok_or(DecodeError::BadLength)?;
    Ok(Punted {
        origin: Origin::from_u8(hdr.origin).ok_or(DecodeError::BadCode)?,
        reason: PuntReason::from_u16(hdr.reason).ok_or(DecodeError::BadCode)?,
        ifindex: hdr.ifindex,
        frame,
    })
}

/// Counters of the reader itself.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Records decoded and handed on.
    pub records: AtomicU64,
    /// Records that failed to decode.
    pub bad_records: AtomicU64,
    /// Frames for the guest that could not be written.
    pub inject_errors: AtomicU64,
}

/// Drains the punt ring forever.
///
/// `handle` is called for every record in ring order and may push frames
/// for the guest or packets for the world into the outbox it is given;
/// after each batch the outbox is sent (waiting for room rather than
/// dropping), so outputs leave in the order their causes arrived.
pub async fn run<F>(
    ring: RingBuf<MapData>,
    stats: &ReaderStats,
    injectors: &Injectors,
    mut handle: F,
) -> Result<(), PuntError>
where
    F: FnMut(Punted<'_>, &mut Vec<Output>),
{
    let mut fd = crate::aio::register(ring, Interest::READABLE).map_err(PuntError::Register)?;
    log::debug!("punt reader on ring fd {}", fd.get_ref().as_raw_fd());
    let mut outbox: Vec<Output> = Vec::with_capacity(PUNT_BATCH);
    loop {
        let mut guard = fd.readable_mut().await.map_err(PuntError::Register)?;
        let ring = guard.get_inner_mut();
        let mut handled = 0;
        while handled < PUNT_BATCH {
            let Some(item) = ring.next() else { break };
            handled += 1;
            match decode(&item) {
                Ok(p) => {
                    stats.records.fetch_add(1, Ordering::Relaxed);
                    handle(p, &mut outbox);
                }
                Err(e) => {
                    stats.bad_records.fetch_add(1, Ordering::Relaxed);
                    warn!("undecodable punt record ({e:?}, {} bytes)", item.len());
                }
            }
        }
        if handled < PUNT_BATCH {
            // Drained: the next wake-up comes from the kernel.
            guard.clear_ready();
        }
        drop(guard);
        for out in outbox.drain(..) {
            if let Err(e) = injectors.send(&out).await {
                stats.inject_errors.fetch_add(1, Ordering::Relaxed);
                warn!("{e}");
            }
        }
        if handled == PUNT_BATCH {
            // More records may be waiting: let other tasks run, then go on.
            tokio::task::yield_now().await;
        }
    }
}

/// Errors that stop the punt reader.
#[derive(Debug, thiserror::Error)]
pub enum PuntError {
    /// The ring buffer's descriptor could not be polled.
    #[error("polling the punt ring buffer: {0}")]
    Register(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: u32, frame: &[u8], origin: u8, reason: u16) -> Vec<u8> {
        let hdr = PuntHeader {
            len,
            orig_len: len,
            ifindex: 7,
            reason,
            origin,
            _pad: 0,
        };
        let mut v = bytemuck::bytes_of(&hdr).to_vec();
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn decodes_record() {
        let r = record(3, &[1, 2, 3], 1, 2);
        let p = decode(&r).expect("decodes");
        assert_eq!(p.origin, Origin::Tap);
        assert_eq!(p.reason, PuntReason::Ipv4NoFlow);
        assert_eq!(p.ifindex, 7);
        assert_eq!(p.frame, &[1, 2, 3]);
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0; 5]).err(), Some(DecodeError::Short));
        assert_eq!(
            decode(&record(10, &[1, 2], 1, 2)).err(),
            Some(DecodeError::BadLength)
        );
        assert_eq!(
            decode(&record(u32::MAX, &[], 1, 2)).err(),
            Some(DecodeError::BadLength)
        );
        assert_eq!(
            decode(&record(0, &[], 9, 2)).err(),
            Some(DecodeError::BadCode)
        );
        assert_eq!(
            decode(&record(0, &[], 1, 99)).err(),
            Some(DecodeError::BadCode)
        );
    }

    #[test]
    fn empty_frame_is_valid_record() {
        let r = record(0, &[], 2, 1);
        let p = decode(&r).expect("decodes");
        assert!(p.frame.is_empty());
        assert_eq!(p.origin, Origin::Uplink);
    }
}
