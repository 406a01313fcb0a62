//! The binary encoding of an [`Op`], as the log and snapshots store it: little-endian, a version
//! byte and a tag byte, then the fields in declaration order. Strings and lists carry a `u32`
//! length; vectors are raw `f32` LE bytes. Decoding checks every length against the bytes that
//! are left before allocating, so a corrupt length is an error, never a huge allocation or a panic.
//!
//! ```text
//! op       = version:u8 tag:u8 body
//! 1 create = str(name) u32(dimension) u8(metric: 0 cosine, 1 dot) opt_f32(min_score) str(embedder)
//! 2 drop   = str(name)
//! 3 upsert = str(collection) u32(n) n * doc
//! 4 delete = str(collection) u32(n) n * str(id)
//! 5 min    = str(collection) opt_f32(min_score)
//! doc      = str(id) str(title) str(text) u32(m) m * (str(key) str(value)) u32(d) d * f32
//! str      = u32(len) len * utf-8 byte        opt_f32 = 0:u8 | 1:u8 f32
//! ```
use std::collections::BTreeMap;

use crate::types::{CollectionSpec, Document, Metric, Op};

/// The encoding this build writes. Decoding refuses other versions rather than guessing.
pub const CODEC_VERSION: u8 = 1;

const TAG_CREATE: u8 = 1;
const TAG_DROP: u8 = 2;
const TAG_UPSERT: u8 = 3;
const TAG_DELETE: u8 = 4;
const TAG_SET_MIN_SCORE: u8 = 5;

/// The fewest bytes one encoded document takes: three empty strings, no metadata, no vector.
const MIN_DOCUMENT_BYTES: usize = 5 * 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("input ends at byte {at}, {need} more bytes were expected")]
    Truncated { at: usize, need: usize },
    #[error("encoding version {0} is not the version this build reads ({CODEC_VERSION}): was it written by a newer server?")]
    UnsupportedVersion(u8),
    #[error("unknown op tag {0}")]
    UnknownTag(u8),
    #[error("invalid {what} at byte {at}")]
    Invalid { what: &'static str, at: usize },
    #[error("a count of {count} at byte {at} cannot fit in the {left} bytes that are left")]
    CountTooLarge { count: u32, at: usize, left: usize },
    #[error("{0} bytes left over after the op")]
    TrailingBytes(usize),
    #[error("{what} is {len} long, more than the format's limit of {} (u32)", u32::MAX)]
    TooLong { what: &'static str, len: usize },
}

/// Appends the encoding of `op` to `out`. Fails only for a string or list longer than `u32::MAX`.
pub fn encode_op(op: &Op, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(CODEC_VERSION);
    match op {
        Op::CreateCollection(spec) => {
            out.push(TAG_CREATE);
            put_str(out, &spec.name, "collection name")?;
            out.extend_from_slice(&spec.dimension.to_le_bytes());
            out.push(match spec.metric {
                Metric::Cosine => 0,
                Metric::Dot => 1,
            });
            put_opt_f32(out, spec.min_score);
            put_str(out, &spec.embedder, "embedder")?;
        }
        Op::DropCollection { name } => {
            out.push(TAG_DROP);
            put_str(out, name, "collection name")?;
        }
        Op::Upsert { collection, documents } => {
            out.push(TAG_UPSERT);
            put_str(out, collection, "collection name")?;
            put_len(out, documents.len(), "document list")?;
            for doc in documents {
                put_document(out, doc)?;
            }
        }
        Op::Delete { collection, ids } => {
            out.push(TAG_DELETE);
            put_str(out, collection, "collection name")?;
            put_len(out, ids.len(), "id list")?;
            for id in ids {
                put_str(out, id, "document id")?;
            }
        }
        Op::SetMinScore { collection, min_score } => {
            out.push(TAG_SET_MIN_SCORE);
            put_str(out, collection, "collection name")?;
            put_opt_f32(out, *min_score);
        }
    }
    Ok(())
}

/// Decodes exactly one op that fills all of `bytes`.
pub fn decode_op(bytes: &[u8]) -> Result<Op, CodecError> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u8()?;
    if version != CODEC_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let op = match r.u8()? {
        TAG_CREATE => {
            let name = r.string()?;
            let dimension = r.u32()?;
            let at = r.pos;
            let metric = match r.u8()? {
                0 => Metric::Cosine,
                1 => Metric::Dot,
                _ => return Err(CodecError::Invalid { what: "metric", at }),
            };
            let min_score = r.opt_f32()?;
            let embedder = r.string()?;
            Op::CreateCollection(CollectionSpec { name, dimension, metric, min_score, embedder })
        }
        TAG_DROP => Op::DropCollection { name: r.string()? },
        TAG_UPSERT => {
            let collection = r.string()?;
            let n = r.count(MIN_DOCUMENT_BYTES)?;
            let mut documents = Vec::with_capacity(n);
            for _ in 0..n {
                documents.push(r.document()?);
            }
            Op::Upsert { collection, documents }
        }
        TAG_DELETE => {
            let collection = r.string()?;
            let n = r.count(4)?;
            let mut ids = Vec::with_capacity(n);
            for _ in 0..n {
                ids.push(r.string()?);
            }
            Op::Delete { collection, ids }
        }
        TAG_SET_MIN_SCORE => Op::SetMinScore { collection: r.string()?, min_score: r.opt_f32()? },
        tag => return Err(CodecError::UnknownTag(tag)),
    };
    match r.left() {
        0 => Ok(op),
        n => Err(CodecError::TrailingBytes(n)),
    }
}

fn put_len(out: &mut Vec<u8>, len: usize, what: &'static str) -> Result<(), CodecError> {
    let len = u32::try_from(len).map_err(|_| CodecError::TooLong { what, len })?;
    out.extend_from_slice(&len.to_le_bytes());
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), CodecError> {
    put_len(out, s.len(), what)?;
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_opt_f32(out: &mut Vec<u8>, value: Option<f32>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn put_document(out: &mut Vec<u8>, doc: &Document) -> Result<(), CodecError> {
    put_str(out, &doc.id, "document id")?;
    put_str(out, &doc.title, "document title")?;
    put_str(out, &doc.text, "document text")?;
    put_len(out, doc.metadata.len(), "metadata")?;
    for (key, value) in &doc.metadata {
        put_str(out, key, "metadata key")?;
        put_str(out, value, "metadata value")?;
    }
    put_len(out, doc.vector.len(), "vector")?;
    out.reserve(doc.vector.len() * 4);
    for x in &doc.vector {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.left() {
            return Err(CodecError::Truncated { at: self.bytes.len(), need: n - self.left() });
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_le_bytes)
    }

    /// A count of items that take at least `min_item_bytes` each, refused if they cannot fit in
    /// what is left: this is what bounds every allocation by the input's length.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, CodecError> {
        let at = self.pos;
        let count = self.u32()?;
        let left = self.left();
        if count as usize > left / min_item_bytes {
            return Err(CodecError::CountTooLarge { count, at, left });
        }
        Ok(count as usize)
    }

    fn string(&mut self) -> Result<String, CodecError> {
        let len = self.count(1)?;
        let at = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::Invalid { what: "utf-8 string", at })
    }

    fn opt_f32(&mut self) -> Result<Option<f32>, CodecError> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(f32::from_le_bytes(self.array()?))),
            _ => Err(CodecError::Invalid { what: "optional f32 flag", at }),
        }
    }

    fn document(&mut self) -> Result<Document, CodecError> {
        let id = self.string()?;
        let title = self.string()?;
        let text = self.string()?;
        let pairs = self.count(8)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..pairs {
            let key = self.string()?;
            metadata.insert(key, self.string()?);
        }
        let dim = self.count(4)?;
        let vector = self.take(dim * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Document { id, title, text, metadata, vector })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, dim: usize, meta: &[(&str, &str)]) -> Document {
        Document {
            id: id.into(),
            title: format!("title of {id}"),
            text: "Ünïcödé text — 日本語 and emoji 🦀".into(),
            metadata: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            vector: (0..dim).map(|i| (i as f32 * 0.37).sin() * 1e3).collect(),
        }
    }

    fn every_variant() -> Vec<Op> {
        vec![
            Op::CreateCollection(CollectionSpec {
                name: "faq-ü".into(),
                dimension: 384,
                metric: Metric::Cosine,
                min_score: Some(0.25),
                embedder: "minilm@1".into(),
            }),
            Op::CreateCollection(CollectionSpec {
                name: String::new(),
                dimension: 0,
                metric: Metric::Dot,
                min_score: None,
                embedder: String::new(),
            }),
            Op::DropCollection { name: "old 🗑".into() },
            Op::Upsert { collection: "faq".into(), documents: vec![] },
            Op::Upsert {
                collection: "faq".into(),
                documents: vec![
                    doc("a", 0, &[]),
                    doc("b", 3, &[("lang", "fr"), ("", ""), ("clé", "värde")]),
                    doc("big", 100_000, &[("k", "v")]),
                ],
            },
            Op::Delete { collection: "faq".into(), ids: vec!["a".into(), String::new(), "ß".into()] },
            Op::Delete { collection: "faq".into(), ids: vec![] },
            Op::SetMinScore { collection: "faq".into(), min_score: Some(-1.5) },
            Op::SetMinScore { collection: "faq".into(), min_score: None },
        ]
    }

    fn encode(op: &Op) -> Vec<u8> {
        let mut out = Vec::new();
        encode_op(op, &mut out).unwrap();
        out
    }

    #[test]
    fn every_variant_round_trips() {
        for op in every_variant() {
            assert_eq!(decode_op(&encode(&op)).unwrap(), op);
        }
    }

    #[test]
    fn special_floats_round_trip_bit_for_bit() {
        let values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, f32::MIN_POSITIVE, f32::MAX];
        let op = Op::Upsert {
            collection: "c".into(),
            documents: vec![Document { vector: values.to_vec(), ..doc("x", 0, &[]) }],
        };
        let Op::Upsert { documents, .. } = decode_op(&encode(&op)).unwrap() else { panic!("wrong variant") };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&documents[0].vector), bits(&values));
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        for op in every_variant().into_iter().filter(|op| !matches!(op, Op::Upsert { documents, .. } if documents.len() > 2)) {
            let bytes = encode(&op);
            for len in 0..bytes.len() {
                assert!(decode_op(&bytes[..len]).is_err(), "{op:?} truncated to {len} bytes decoded");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode_op(&longer), Err(CodecError::TrailingBytes(1)));
        }
    }

    #[test]
    fn wrong_version_tag_and_flags_are_named() {
        let mut bytes = encode(&Op::DropCollection { name: "x".into() });
        bytes[0] = 9;
        assert_eq!(decode_op(&bytes), Err(CodecError::UnsupportedVersion(9)));
        bytes[0] = CODEC_VERSION;
        bytes[1] = 42;
        assert_eq!(decode_op(&bytes), Err(CodecError::UnknownTag(42)));
        let mut bytes = encode(&Op::SetMinScore { collection: "c".into(), min_score: None });
        *bytes.last_mut().unwrap() = 7;
        assert!(matches!(decode_op(&bytes), Err(CodecError::Invalid { what: "optional f32 flag", .. })));
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        // An upsert that claims u32::MAX documents in a handful of bytes.
        let mut bytes = vec![CODEC_VERSION, TAG_UPSERT];
        put_str(&mut bytes, "c", "").unwrap();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 64]);
        assert!(matches!(decode_op(&bytes), Err(CodecError::CountTooLarge { count: u32::MAX, .. })));
        // A string whose length runs past the end.
        let mut bytes = vec![CODEC_VERSION, TAG_DROP];
        bytes.extend_from_slice(&1_000_000u32.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        assert!(matches!(decode_op(&bytes), Err(CodecError::CountTooLarge { count: 1_000_000, .. })));
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift64*: deterministic, no dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let valid: Vec<Vec<u8>> = every_variant().iter().filter(|op| !matches!(op, Op::Upsert { documents, .. } if documents.len() > 2)).map(encode).collect();
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                let len = (next() % 200) as usize;
                let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                // Mostly well-formed prefixes, so decoding gets past the first bytes.
                if b.len() >= 2 {
                    b[0] = CODEC_VERSION;
                    b[1] = (next() % 6) as u8;
                }
                b
            } else {
                valid[(next() % valid.len() as u64) as usize].clone()
            };
            // Flip a few bytes of the valid encodings.
            if round % 2 == 1 {
                for _ in 0..1 + next() % 3 {
                    let i = (next() % bytes.len() as u64) as usize;
                    bytes[i] ^= 1 << (next() % 8);
                }
            }
            let _ = decode_op(&bytes);
        }
    }
}
