//! Snapshot files: the whole state as ops, so the log before them can be deleted.
//!
//! ```text
//! header  = "CKBSNAP\0" u32(format version) u64(lsn)
//! records = the log's record framing, every record's lsn = the snapshot's lsn
//! footer  = u64(record count) u32(crc32 of header and records) "CKBSEND\0"
//! ```
//!
//! A snapshot is only read after its footer has been checked, so an unfinished or damaged one is
//! skipped before any of its ops reach the caller, and the previous snapshot is used instead.
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::record::{push_record, read_record, ReadError};
use super::{files, WalError};
use crate::types::Op;

const MAGIC: &[u8; 8] = b"CKBSNAP\0";
const END_MAGIC: &[u8; 8] = b"CKBSEND\0";
const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: u64 = 8 + 4 + 8;
const FOOTER_BYTES: u64 = 8 + 4 + 8;
const IO_BUFFER: usize = 1 << 20;

/// Writes the snapshot for `lsn` durably: temp file, fsync, rename, fsync of the directory.
/// Returns its path and how many records it holds.
pub(crate) fn write(dir: &Path, lsn: u64, ops: impl Iterator<Item = Op>) -> Result<(PathBuf, u64), WalError> {
    let tmp = files::snapshot_tmp_path(dir, lsn);
    let result = write_tmp(&tmp, lsn, ops);
    let count = match result {
        Ok(count) => count,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let path = files::snapshot_path(dir, lsn);
    fs::rename(&tmp, &path).map_err(WalError::io("rename the finished snapshot", &tmp))?;
    files::sync_dir(dir)?;
    Ok((path, count))
}

fn write_tmp(tmp: &Path, lsn: u64, ops: impl Iterator<Item = Op>) -> Result<u64, WalError> {
    let io = |action| WalError::io(action, tmp);
    let file = File::create(tmp).map_err(io("create"))?;
    let mut out = BufWriter::with_capacity(IO_BUFFER, file);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(HEADER_BYTES as usize);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&lsn.to_le_bytes());
    crc.update(&buf);
    out.write_all(&buf).map_err(io("write"))?;
    let mut count = 0u64;
    for (index, op) in ops.enumerate() {
        buf.clear();
        push_record(&mut buf, lsn, &op).map_err(|source| WalError::Encode { index, source })?;
        crc.update(&buf);
        out.write_all(&buf).map_err(io("write"))?;
        count += 1;
    }
    buf.clear();
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(END_MAGIC);
    out.write_all(&buf).map_err(io("write"))?;
    let file = out.into_inner().map_err(|e| io("write")(e.into_error()))?;
    file.sync_all().map_err(io("fsync"))?;
    Ok(count)
}

/// Checks a snapshot's footer, checksum and header without handing out any op. `Ok(Err(why))`
/// for a snapshot that is incomplete or damaged (skip it); `Err` when the disk fails or the
/// snapshot is whole but in a format this build does not know (falling back would lose data).
pub(crate) fn verify(path: &Path, lsn: u64) -> Result<Result<u64, String>, WalError> {
    let io = |action| WalError::io(action, path);
    let mut file = File::open(path).map_err(io("open"))?;
    let len = file.metadata().map_err(io("stat"))?.len();
    if len < HEADER_BYTES + FOOTER_BYTES {
        return Ok(Err(format!("it is {len} bytes, shorter than a header and footer")));
    }
    let mut footer = [0u8; FOOTER_BYTES as usize];
    file.seek(SeekFrom::Start(len - FOOTER_BYTES)).map_err(io("read"))?;
    file.read_exact(&mut footer).map_err(io("read"))?;
    if &footer[12..] != END_MAGIC {
        return Ok(Err("it has no footer: it was not finished".into()));
    }
    let count = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
    let expected_crc = u32::from_le_bytes(footer[8..12].try_into().expect("4 bytes"));

    file.seek(SeekFrom::Start(0)).map_err(io("read"))?;
    let mut body = BufReader::with_capacity(IO_BUFFER, file).take(len - FOOTER_BYTES);
    let mut header = [0u8; HEADER_BYTES as usize];
    body.read_exact(&mut header).map_err(io("read"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    let mut chunk = vec![0u8; IO_BUFFER];
    loop {
        let n = body.read(&mut chunk).map_err(io("read"))?;
        if n == 0 {
            break;
        }
        crc.update(&chunk[..n]);
    }
    if crc.finalize() != expected_crc {
        return Ok(Err("its checksum does not match".into()));
    }
    if &header[..8] != MAGIC {
        return Ok(Err("it does not start with the snapshot magic".into()));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(WalError::UnsupportedSnapshot { file: path.to_path_buf(), version });
    }
    let header_lsn = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
    if header_lsn != lsn {
        return Ok(Err(format!("its header says lsn {header_lsn} but its name says {lsn}")));
    }
    Ok(Ok(count))
}

/// Feeds a verified snapshot's ops to `replay`. Any problem now is an error: ops have already
/// been handed out, so falling back to an older snapshot is no longer possible.
pub(crate) fn replay(path: &Path, lsn: u64, count: u64, replay: &mut dyn FnMut(u64, Op)) -> Result<(), WalError> {
    let io = |action| WalError::io(action, path);
    let file = File::open(path).map_err(io("open"))?;
    let len = file.metadata().map_err(io("stat"))?.len();
    let corrupt = |offset, reason: String| WalError::Corrupt { file: path.to_path_buf(), offset, reason };
    let end = len.checked_sub(FOOTER_BYTES).ok_or_else(|| corrupt(0, "it shrank since it was verified".into()))?;
    let mut r = BufReader::with_capacity(IO_BUFFER, file);
    r.seek(SeekFrom::Start(HEADER_BYTES)).map_err(io("read"))?;
    let mut pos = HEADER_BYTES;
    let mut seen = 0u64;
    while pos < end {
        let record = match read_record(&mut r, end - pos) {
            Ok(Some(record)) => record,
            Ok(None) => break,
            Err(ReadError::Io(e)) => return Err(io("read")(e)),
            Err(ReadError::Torn(why) | ReadError::Invalid(why)) => return Err(corrupt(pos, why)),
        };
        if record.lsn != lsn {
            return Err(corrupt(pos, format!("a record with lsn {} in the snapshot for lsn {lsn}", record.lsn)));
        }
        replay(lsn, record.op);
        seen += 1;
        pos += record.bytes;
    }
    if seen != count {
        return Err(corrupt(end, format!("the footer counts {count} records but {seen} were read")));
    }
    Ok(())
}
