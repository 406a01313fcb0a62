//! File names in the log directory, listing them, fsyncing the directory, and the lock that keeps
//! a second server out. Names carry zero-padded LSNs so that `ls` shows them in log order.
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::WalError;

const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".tmp";
const LOCK_FILE: &str = "LOCK";

/// A log segment, named by the lsn of its first record.
pub(crate) fn segment_path(dir: &Path, first_lsn: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_lsn:020}{SEGMENT_SUFFIX}"))
}

/// A snapshot, named by the lsn of the last record it includes.
pub(crate) fn snapshot_path(dir: &Path, lsn: u64) -> PathBuf {
    dir.join(format!("{SNAPSHOT_PREFIX}{lsn:020}{SNAPSHOT_SUFFIX}"))
}

/// Where a snapshot is written before it is complete and renamed to [`snapshot_path`].
pub(crate) fn snapshot_tmp_path(dir: &Path, lsn: u64) -> PathBuf {
    dir.join(format!("{SNAPSHOT_PREFIX}{lsn:020}{SNAPSHOT_SUFFIX}{TMP_SUFFIX}"))
}

#[derive(Debug, Default)]
pub(crate) struct Listing {
    /// (first lsn, path), in lsn order.
    pub segments: Vec<(u64, PathBuf)>,
    /// (lsn, path), in lsn order.
    pub snapshots: Vec<(u64, PathBuf)>,
    /// Snapshots a crash left unfinished.
    pub temps: Vec<PathBuf>,
}

pub(crate) fn list(dir: &Path) -> Result<Listing, WalError> {
    let mut listing = Listing::default();
    let entries = fs::read_dir(dir).map_err(WalError::io("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(WalError::io("list", dir))?;
        let name = entry.file_name();
        // Names this module did not write are none of its business.
        let Some(name) = name.to_str() else { continue };
        if let Some(lsn) = parse_lsn(name, SEGMENT_PREFIX, SEGMENT_SUFFIX) {
            listing.segments.push((lsn, entry.path()));
        } else if let Some(lsn) = parse_lsn(name, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX) {
            listing.snapshots.push((lsn, entry.path()));
        } else if name.strip_suffix(TMP_SUFFIX).and_then(|n| parse_lsn(n, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX)).is_some() {
            listing.temps.push(entry.path());
        }
    }
    listing.segments.sort();
    listing.snapshots.sort();
    Ok(listing)
}

fn parse_lsn(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Makes creations, renames and deletions in `dir` durable: without it a crash can undo a rename
/// whose file contents were fsynced.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(WalError::io("fsync the directory", dir))
}

/// An exclusive `flock` on `dir/LOCK`, held for as long as this value lives. The kernel drops it
/// when the process dies, so a crash never leaves a stale lock behind.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<Self, WalError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(WalError::io("open the lock file", &path))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock only reads the descriptor, which `file` keeps open for this call.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::WouldBlock {
                    return Err(WalError::Locked { dir: dir.to_path_buf() });
                }
                return Err(WalError::io("lock", &path)(err));
            }
        }
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_lsn_order_and_parse_back() {
        let dir = Path::new("/x");
        let names: Vec<String> =
            [1u64, 9, 10, 420, u64::MAX].iter().map(|&l| segment_path(dir, l).file_name().unwrap().to_str().unwrap().to_owned()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(parse_lsn(&names[3], SEGMENT_PREFIX, SEGMENT_SUFFIX), Some(420));
        assert_eq!(parse_lsn("wal-.log", SEGMENT_PREFIX, SEGMENT_SUFFIX), None);
        assert_eq!(parse_lsn("wal-+1.log", SEGMENT_PREFIX, SEGMENT_SUFFIX), None);
        assert_eq!(parse_lsn("snapshot-00000000000000000420.snap", SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX), Some(420));
    }
}
