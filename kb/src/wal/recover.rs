//! Opening a log directory: pick the newest snapshot that verifies, replay it, then replay the
//! segments' records after it in order, checking that their lsns run on without a gap. A torn
//! record at the very end of the newest segment is what a crash during an append leaves; it was
//! never acknowledged, so it is cut off. Any other damage stops the open.
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::record::{find_whole_record, read_record, ReadError};
use super::{files, snapshot, Recovery, TornTail, WalError};
use crate::types::Op;

pub(crate) struct Recovered {
    pub recovery: Recovery,
    /// The newest segment, (first lsn, path, length), when appends can continue in it: its
    /// records end exactly at the last lsn. Otherwise a new segment has to be started.
    pub current: Option<(u64, PathBuf, u64)>,
    /// Bytes of records after the snapshot.
    pub bytes_since_snapshot: u64,
}

pub(crate) fn recover(dir: &Path, replay: &mut dyn FnMut(u64, Op)) -> Result<Recovered, WalError> {
    let listing = files::list(dir)?;
    for tmp in &listing.temps {
        tracing::info!(file = %tmp.display(), "removing a snapshot that a crash left unfinished");
        fs::remove_file(tmp).map_err(WalError::io("remove", tmp))?;
    }

    let mut skipped_snapshots = Vec::new();
    let mut chosen = None;
    for (lsn, path) in listing.snapshots.iter().rev() {
        match snapshot::verify(path, *lsn)? {
            Ok(count) => {
                chosen = Some((*lsn, path, count));
                break;
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "skipping a snapshot that is incomplete or damaged; trying an older one");
                skipped_snapshots.push(path.clone());
            }
        }
    }
    let mut snapshot_ops = 0;
    if let Some((lsn, path, count)) = chosen {
        snapshot::replay(path, lsn, count, replay)?;
        snapshot_ops = count;
    }
    let snapshot_lsn = chosen.map(|(lsn, ..)| lsn);
    let base = snapshot_lsn.unwrap_or(0);

    // Segments wholly before the snapshot are skipped: the snapshot holds their effect, and they
    // are only still here because a crash came before they were deleted.
    let segments = &listing.segments;
    let start = segments.iter().rposition(|(first, _)| *first <= base + 1).unwrap_or(0);
    let mut expected = segments.get(start).map_or(base + 1, |(first, _)| *first);
    if expected > base + 1 {
        return Err(WalError::Missing { from: base + 1, to: expected - 1, before: segments[start].1.clone() });
    }
    let mut records_replayed = 0;
    let mut bytes_since_snapshot = 0;
    let mut torn_tail = None;
    let mut newest_len = 0;
    for (i, (first, path)) in segments.iter().enumerate().skip(start) {
        if *first != expected {
            if *first > expected {
                return Err(WalError::Missing { from: expected, to: first - 1, before: path.clone() });
            }
            let reason = format!("it starts at lsn {first} but the segment before it ends at lsn {}", expected - 1);
            return Err(WalError::Corrupt { file: path.clone(), offset: 0, reason });
        }
        let newest = i + 1 == segments.len();
        let scan = scan_segment(path, expected, base, newest, replay)?;
        expected = scan.next_lsn;
        records_replayed += scan.replayed;
        bytes_since_snapshot += scan.bytes_after_base;
        torn_tail = torn_tail.or(scan.torn);
        newest_len = scan.len;
    }

    let last_lsn = base.max(expected - 1);
    let current = match segments.last() {
        Some((first, path)) if expected == last_lsn + 1 => Some((*first, path.clone(), newest_len)),
        _ => None,
    };
    let recovery = Recovery { snapshot_lsn, snapshot_ops, skipped_snapshots, records_replayed, last_lsn, torn_tail };
    Ok(Recovered { recovery, current, bytes_since_snapshot })
}

struct SegmentScan {
    next_lsn: u64,
    replayed: u64,
    bytes_after_base: u64,
    /// Length after any torn tail was cut off.
    len: u64,
    torn: Option<TornTail>,
}

/// Replays one segment's records with lsn > `base`. Only the `newest` segment may end torn.
fn scan_segment(path: &Path, first_lsn: u64, base: u64, newest: bool, replay: &mut dyn FnMut(u64, Op)) -> Result<SegmentScan, WalError> {
    let io = |action| WalError::io(action, path);
    let corrupt = |offset, reason| WalError::Corrupt { file: path.to_path_buf(), offset, reason };
    let file = File::open(path).map_err(io("open"))?;
    let len = file.metadata().map_err(io("stat"))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut scan = SegmentScan { next_lsn: first_lsn, replayed: 0, bytes_after_base: 0, len, torn: None };
    let mut pos = 0;
    loop {
        let record = match read_record(&mut r, len - pos) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(scan),
            Err(ReadError::Io(e)) => return Err(io("read")(e)),
            Err(ReadError::Invalid(reason)) => return Err(corrupt(pos, reason)),
            Err(ReadError::Torn(reason)) if !newest => {
                return Err(corrupt(pos, format!("{reason}, in a segment that is not the newest")));
            }
            Err(ReadError::Torn(reason)) => {
                if let Some((offset, lsn)) = whole_record_after(path, pos)? {
                    let reason = format!("{reason}, followed by a whole record (lsn {lsn}) at offset {offset}");
                    return Err(corrupt(pos, reason));
                }
                let dropped = len - pos;
                let f = OpenOptions::new().write(true).open(path).map_err(io("open to truncate"))?;
                f.set_len(pos).and_then(|()| f.sync_all()).map_err(io("truncate the torn tail of"))?;
                tracing::warn!(
                    file = %path.display(), offset = pos, bytes_dropped = dropped, %reason,
                    "cut off the torn tail of the log: a write that a crash interrupted, never acknowledged"
                );
                scan.len = pos;
                scan.torn = Some(TornTail { file: path.to_path_buf(), offset: pos, bytes_dropped: dropped, reason });
                return Ok(scan);
            }
        };
        if record.lsn != scan.next_lsn {
            return Err(corrupt(pos, format!("a record with lsn {} where lsn {} was expected", record.lsn, scan.next_lsn)));
        }
        if record.lsn > base {
            replay(record.lsn, record.op);
            scan.replayed += 1;
            scan.bytes_after_base += record.bytes;
        }
        scan.next_lsn += 1;
        pos += record.bytes;
    }
}

/// Whether a whole record starts anywhere after the bad one at `bad_at`, and where.
fn whole_record_after(path: &Path, bad_at: u64) -> Result<Option<(u64, u64)>, WalError> {
    let mut file = File::open(path).map_err(WalError::io("open", path))?;
    let mut rest = Vec::new();
    file.seek(SeekFrom::Start(bad_at + 1)).and_then(|_| file.read_to_end(&mut rest)).map_err(WalError::io("read", path))?;
    Ok(find_whole_record(&rest).map(|(offset, lsn)| (bad_at + 1 + offset as u64, lsn)))
}
