//! The record framing that log segments and snapshots share:
//! `[u32 payload_len][u32 crc32(payload)][payload]`, payload = `[u64 lsn][encoded op]`, all LE.
//! Reading tells a torn write (cut short, or its checksum fails) apart from a whole record that
//! is wrong (checksum matches, contents don't decode): only the first may be dropped.
use std::io::{self, Read};

use crate::codec::{decode_op, encode_op, CodecError};
use crate::types::Op;

pub(crate) const HEADER_BYTES: usize = 8;
/// An lsn, a codec version byte and an op tag: anything shorter was never a record.
pub(crate) const MIN_PAYLOAD_BYTES: usize = 8 + 2;

/// Appends one framed record to `buf`; on error `buf` is left as it was.
pub(crate) fn push_record(buf: &mut Vec<u8>, lsn: u64, op: &Op) -> Result<(), CodecError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_BYTES]);
    buf.extend_from_slice(&lsn.to_le_bytes());
    let framed = encode_op(op, buf).and_then(|()| {
        let len = buf.len() - start - HEADER_BYTES;
        u32::try_from(len).map_err(|_| CodecError::TooLong { what: "record", len })
    });
    let len = match framed {
        Ok(len) => len,
        Err(e) => {
            buf.truncate(start);
            return Err(e);
        }
    };
    let crc = crc32fast::hash(&buf[start + HEADER_BYTES..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

pub(crate) struct Record {
    pub lsn: u64,
    pub op: Op,
    /// Header and payload.
    pub bytes: u64,
}

pub(crate) enum ReadError {
    /// What a write cut short by a crash leaves: a fragment, or a record whose checksum fails.
    Torn(String),
    /// A whole record (its checksum matches) that does not decode: never a torn write.
    Invalid(String),
    Io(io::Error),
}

/// Reads the record at the reader's position; `left` is how many bytes the file has from there,
/// which bounds the payload allocation. `Ok(None)` at a clean end.
pub(crate) fn read_record(r: &mut impl Read, left: u64) -> Result<Option<Record>, ReadError> {
    if left == 0 {
        return Ok(None);
    }
    if left < HEADER_BYTES as u64 {
        return Err(ReadError::Torn(format!("a {left}-byte fragment of a record header")));
    }
    let mut header = [0u8; HEADER_BYTES];
    r.read_exact(&mut header).map_err(ReadError::Io)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if (len as usize) < MIN_PAYLOAD_BYTES {
        return Err(ReadError::Torn(format!("a record length of {len}, below the minimum of {MIN_PAYLOAD_BYTES}")));
    }
    let payload_left = left - HEADER_BYTES as u64;
    if u64::from(len) > payload_left {
        return Err(ReadError::Torn(format!("a record of {len} bytes with only {payload_left} left in the file")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(ReadError::Io)?;
    if crc32fast::hash(&payload) != crc {
        return Err(ReadError::Torn("a checksum mismatch".into()));
    }
    let (lsn, op) = decode_payload(&payload)
        .map_err(|e| ReadError::Invalid(format!("the checksum matches but the op does not decode: {e}")))?;
    Ok(Some(Record { lsn, op, bytes: (HEADER_BYTES + payload.len()) as u64 }))
}

fn decode_payload(payload: &[u8]) -> Result<(u64, Op), CodecError> {
    let Some((lsn, op)) = payload.split_first_chunk::<8>() else {
        return Err(CodecError::Truncated { at: payload.len(), need: 8 - payload.len() });
    };
    Ok((u64::from_le_bytes(*lsn), decode_op(op)?))
}

/// The first offset in `bytes` where a whole record with a matching checksum starts, and its lsn.
/// After a bad record this is what tells a torn tail (nothing whole follows) from corruption in
/// the middle of the log (acknowledged records follow and must not be dropped).
pub(crate) fn find_whole_record(bytes: &[u8]) -> Option<(usize, u64)> {
    let last_start = bytes.len().checked_sub(HEADER_BYTES + MIN_PAYLOAD_BYTES)?;
    (0..=last_start).find_map(|start| {
        let at = |i: usize| [bytes[start + i], bytes[start + i + 1], bytes[start + i + 2], bytes[start + i + 3]];
        let len = u32::from_le_bytes(at(0)) as usize;
        let payload_start = start + HEADER_BYTES;
        if len < MIN_PAYLOAD_BYTES || len > bytes.len() - payload_start {
            return None;
        }
        let payload = &bytes[payload_start..payload_start + len];
        (crc32fast::hash(payload) == u32::from_le_bytes(at(4))).then(|| {
            let lsn = u64::from_le_bytes(payload[..8].try_into().expect("len >= MIN_PAYLOAD_BYTES"));
            (start, lsn)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(ops: &[(u64, Op)]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (lsn, op) in ops {
            push_record(&mut buf, *lsn, op).unwrap();
        }
        buf
    }

    #[test]
    fn records_read_back_and_end_cleanly() {
        let ops = [(7, Op::DropCollection { name: "a".into() }), (8, Op::SetMinScore { collection: "b".into(), min_score: Some(0.5) })];
        let bytes = framed(&ops);
        let mut r = &bytes[..];
        let mut left = bytes.len() as u64;
        for (lsn, op) in &ops {
            let Ok(Some(rec)) = read_record(&mut r, left) else { panic!("record {lsn} did not read") };
            assert_eq!((rec.lsn, &rec.op), (*lsn, op));
            left -= rec.bytes;
        }
        assert!(matches!(read_record(&mut r, left), Ok(None)));
    }

    #[test]
    fn every_truncation_is_torn_and_a_valid_crc_that_does_not_decode_is_not() {
        let bytes = framed(&[(1, Op::DropCollection { name: "collection".into() })]);
        for len in 1..bytes.len() {
            let result = read_record(&mut &bytes[..len], len as u64);
            assert!(matches!(result, Err(ReadError::Torn(_))), "truncation to {len} not seen as torn");
        }
        // Unknown op tag, checksum recomputed: written whole, so it must not pass for a torn write.
        let mut bad = bytes.clone();
        bad[HEADER_BYTES + 9] = 99;
        let crc = crc32fast::hash(&bad[HEADER_BYTES..]);
        bad[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(read_record(&mut &bad[..], bad.len() as u64), Err(ReadError::Invalid(_))));
    }

    #[test]
    fn find_whole_record_skips_garbage() {
        let record = framed(&[(42, Op::DropCollection { name: "x".into() })]);
        let mut bytes = vec![0u8; 13];
        bytes.extend_from_slice(&[0xff; 5]);
        bytes.extend_from_slice(&record);
        assert_eq!(find_whole_record(&bytes), Some((18, 42)));
        assert_eq!(find_whole_record(&bytes[19..]), None);
        assert_eq!(find_whole_record(&[]), None);
    }
}
