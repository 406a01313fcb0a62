//! The write-ahead log: every [`Op`] is made durable here before it is applied in memory.
//! A directory holds log segments (`wal-<first lsn>.log`), snapshots (`snapshot-<lsn>.snap`) and
//! a `LOCK`. Appends write a whole group of ops with one write and one fsync, which is what group
//! commit rests on; snapshots let the log before them be deleted.
//!
//! Crash safety rests on two orders. Append: the records are fsynced before `append` returns, so
//! what was acknowledged is on disk, and a crash mid-write leaves at most a torn tail that was
//! never acknowledged. Snapshot: the new snapshot is durable (temp file, fsync, rename, fsync of
//! the directory) before the new segment is started and anything old is deleted, so a crash at
//! any step leaves either the old snapshot with the old segments or the new one with its segment.
mod files;
mod record;
mod recover;
mod snapshot;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::codec::CodecError;
use crate::types::Op;

#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A new segment is started before an append once the current one has reached this size.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_bytes: 64 << 20 }
    }
}

/// What [`Wal::open`] found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The lsn of the snapshot that was loaded, if there was one.
    pub snapshot_lsn: Option<u64>,
    /// Ops fed from that snapshot.
    pub snapshot_ops: u64,
    /// Newer snapshots passed over because they were incomplete or damaged, newest first.
    pub skipped_snapshots: Vec<PathBuf>,
    /// Log records after the snapshot that were fed to `replay`.
    pub records_replayed: u64,
    /// The lsn of the last op recovered; the next append gets `last_lsn + 1`.
    pub last_lsn: u64,
    /// The end of the newest segment that a crash cut short, if any (now truncated away).
    pub torn_tail: Option<TornTail>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TornTail {
    pub file: PathBuf,
    /// Where the dropped bytes began: the file's length now.
    pub offset: u64,
    pub bytes_dropped: u64,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is locked by another process: stop the server using it, or give this one another directory", dir.display())]
    Locked { dir: PathBuf },
    #[error(
        "{} is corrupt at offset {offset} ({reason}), and not at the tail of the log where a crash could have \
         cut a write short: restore the directory from a backup, or move the file aside or truncate it to \
         {offset} bytes, accepting the loss of everything after that point",
        file.display()
    )]
    Corrupt { file: PathBuf, offset: u64, reason: String },
    #[error(
        "log records {from} to {to} are missing: no snapshot covers them and the segments jump to {}; \
         restore the missing segment from a backup",
        before.display()
    )]
    Missing { from: u64, to: u64, before: PathBuf },
    #[error("snapshot {} is in format version {version}, which this build cannot read: run the newer server", file.display())]
    UnsupportedSnapshot { file: PathBuf, version: u32 },
    #[error("op {index} of the group cannot be encoded: {source}")]
    Encode {
        index: usize,
        #[source]
        source: CodecError,
    },
    #[error(
        "an earlier write or fsync of the log failed ({0}), so what reached the disk is unknown and the log \
         accepts no more changes: restart the server to recover from the disk"
    )]
    Poisoned(String),
}

impl WalError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WalError {
        let path = path.to_path_buf();
        move |source| WalError::Io { action, path, source }
    }
}

/// An open log directory; see the module docs. Holds the directory's lock until dropped.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    _lock: files::DirLock,
    segment: File,
    segment_path: PathBuf,
    segment_first_lsn: u64,
    segment_len: u64,
    last_lsn: u64,
    bytes_since_snapshot: u64,
    /// Reused across appends so a group is encoded without allocating.
    buf: Vec<u8>,
    /// Why the log refuses writes, once a write or fsync has failed.
    poisoned: Option<String>,
}

impl Wal {
    /// Opens (creating if needed) and locks `dir`, feeding every recovered op to `replay` in lsn
    /// order: first the newest complete snapshot's ops (all with the snapshot's lsn), then the
    /// log records after it.
    pub fn open(dir: &Path, opts: WalOptions, mut replay: impl FnMut(u64, Op)) -> Result<(Wal, Recovery), WalError> {
        std::fs::create_dir_all(dir).map_err(WalError::io("create", dir))?;
        let lock = files::DirLock::acquire(dir)?;
        let recovered = recover::recover(dir, &mut replay)?;
        let last_lsn = recovered.recovery.last_lsn;
        let (first, path, len) = match recovered.current {
            Some(current) => current,
            None => (last_lsn + 1, create_segment(dir, last_lsn + 1)?, 0),
        };
        let segment = OpenOptions::new().append(true).open(&path).map_err(WalError::io("open", &path))?;
        let r = &recovered.recovery;
        tracing::info!(
            dir = %dir.display(), snapshot_lsn = ?r.snapshot_lsn, snapshot_ops = r.snapshot_ops,
            records_replayed = r.records_replayed, last_lsn, "opened the write-ahead log"
        );
        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            _lock: lock,
            segment,
            segment_path: path,
            segment_first_lsn: first,
            segment_len: len,
            last_lsn,
            bytes_since_snapshot: recovered.bytes_since_snapshot,
            buf: Vec::new(),
            poisoned: None,
        };
        Ok((wal, recovered.recovery))
    }

    /// Makes `ops` durable as consecutive records: one write and one fsync for the whole group.
    /// Returns the lsn of the last one (`last_lsn()` unchanged for an empty group). After a write
    /// or fsync error every later call fails: the kernel may have dropped the dirty pages, so a
    /// retried fsync could report success for data that is not on disk.
    pub fn append(&mut self, ops: &[Op]) -> Result<u64, WalError> {
        if let Some(why) = &self.poisoned {
            return Err(WalError::Poisoned(why.clone()));
        }
        if ops.is_empty() {
            return Ok(self.last_lsn);
        }
        // Before writing, so a failure to start the new segment leaves nothing half done.
        if self.segment_len >= self.opts.segment_bytes {
            self.rotate()?;
        }
        self.buf.clear();
        for (index, op) in ops.iter().enumerate() {
            record::push_record(&mut self.buf, self.last_lsn + 1 + index as u64, op)
                .map_err(|source| WalError::Encode { index, source })?;
        }
        let started = Instant::now();
        let written = self.segment.write_all(&self.buf).map_err(|e| ("write to", e));
        if let Err((action, source)) = written.and_then(|()| self.segment.sync_data().map_err(|e| ("fsync", e))) {
            self.poisoned = Some(format!("cannot {action} {}: {source}", self.segment_path.display()));
            return Err(WalError::Io { action, path: self.segment_path.clone(), source });
        }
        metrics::histogram!("concierge_kb_wal_fsync_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("concierge_kb_wal_group_records").record(ops.len() as f64);
        metrics::counter!("concierge_kb_wal_bytes_total").increment(self.buf.len() as u64);
        let bytes = self.buf.len() as u64;
        self.last_lsn += ops.len() as u64;
        self.segment_len += bytes;
        self.bytes_since_snapshot += bytes;
        if self.buf.capacity() > 16 << 20 {
            // One huge upsert should not pin its buffer for the life of the server.
            self.buf = Vec::new();
        }
        Ok(self.last_lsn)
    }

    /// Writes a snapshot of the state as of [`last_lsn`](Self::last_lsn), then starts a new
    /// segment and deletes older segments and snapshots. `ops`, replayed on an empty state, must
    /// recreate the whole state, and no append may happen meanwhile (`&mut self` sees to that).
    pub fn snapshot(&mut self, ops: impl Iterator<Item = Op>) -> Result<(), WalError> {
        if let Some(why) = &self.poisoned {
            return Err(WalError::Poisoned(why.clone()));
        }
        let started = Instant::now();
        let lsn = self.last_lsn;
        let (path, count) = snapshot::write(&self.dir, lsn, ops)?;
        self.rotate()?;
        // The new snapshot and segment are durable: nothing older is needed any more. A file that
        // will not go is only wasted space, and the next snapshot tries again.
        let listing = files::list(&self.dir)?;
        let old_segments = listing.segments.iter().filter(|(first, _)| *first < self.segment_first_lsn);
        let old_snapshots = listing.snapshots.iter().filter(|(_, p)| *p != path);
        for (_, old) in old_segments.chain(old_snapshots) {
            if let Err(e) = std::fs::remove_file(old) {
                tracing::warn!(file = %old.display(), error = %e, "cannot delete a file the new snapshot replaces");
            }
        }
        if let Err(e) = files::sync_dir(&self.dir) {
            tracing::warn!(error = %e, "cannot fsync the log directory after deleting old files");
        }
        self.bytes_since_snapshot = 0;
        tracing::info!(lsn, ops = count, seconds = started.elapsed().as_secs_f64(), "wrote a snapshot");
        Ok(())
    }

    /// Bytes of log records written since the last snapshot (or, after open, since the one loaded).
    pub fn bytes_since_snapshot(&self) -> u64 {
        self.bytes_since_snapshot
    }

    /// The lsn of the last durable op; 0 for an empty log.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves appends to a new segment starting at the next lsn; nothing to do if the current
    /// one is still empty (it already starts there).
    fn rotate(&mut self) -> Result<(), WalError> {
        if self.segment_len == 0 {
            return Ok(());
        }
        let first = self.last_lsn + 1;
        let path = create_segment(&self.dir, first)?;
        self.segment = OpenOptions::new().append(true).open(&path).map_err(WalError::io("open", &path))?;
        self.segment_path = path;
        self.segment_first_lsn = first;
        self.segment_len = 0;
        Ok(())
    }
}

/// Creates the empty segment starting at `first_lsn` and makes its name durable. An empty file
/// of that name may exist (a rotation that failed at the directory fsync); one with records
/// must not.
fn create_segment(dir: &Path, first_lsn: u64) -> Result<PathBuf, WalError> {
    let path = files::segment_path(dir, first_lsn);
    let file = OpenOptions::new().create(true).append(true).open(&path).map_err(WalError::io("create", &path))?;
    let len = file.metadata().map_err(WalError::io("stat", &path))?.len();
    if len != 0 {
        let reason = format!("a new segment was to start here, but the file already holds {len} bytes");
        return Err(WalError::Corrupt { file: path, offset: 0, reason });
    }
    files::sync_dir(dir)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_poisons_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), WalOptions::default(), |_, _| {}).unwrap();
        let op = Op::DropCollection { name: "c".into() };
        assert_eq!(wal.append(std::slice::from_ref(&op)).unwrap(), 1);
        // A read-only handle makes the next write fail the way a full or failing disk would.
        wal.segment = File::open(&wal.segment_path).unwrap();
        assert!(matches!(wal.append(std::slice::from_ref(&op)), Err(WalError::Io { action: "write to", .. })));
        let err = wal.append(std::slice::from_ref(&op)).unwrap_err();
        assert!(matches!(err, WalError::Poisoned(_)), "{err}");
        assert!(err.to_string().contains("restart"), "{err}");
        assert!(matches!(wal.snapshot(std::iter::empty()), Err(WalError::Poisoned(_))));
        assert_eq!(wal.last_lsn(), 1);
        drop(wal);
        let mut seen = Vec::new();
        let (_, recovery) = Wal::open(dir.path(), WalOptions::default(), |lsn, op| seen.push((lsn, op))).unwrap();
        assert_eq!((recovery.last_lsn, seen), (1, vec![(1, op)]));
    }
}
