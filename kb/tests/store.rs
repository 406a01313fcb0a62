//! The store as a whole: exact search against brute force, read-your-writes, group commit under
//! concurrent writers, validation that leaves nothing half-written, snapshots and reopening.
use std::collections::BTreeMap;
use std::sync::Arc;

use concierge_kb::store::{Applied, KbError, Store, StoreOptions};
use concierge_kb::{CollectionSpec, Document, Metric, Op, Query};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, d: usize) -> Vec<f32> {
        (0..d).map(|_| self.f()).collect()
    }
}

fn spec(name: &str, dim: u32, metric: Metric) -> CollectionSpec {
    CollectionSpec { name: name.into(), dimension: dim, metric, min_score: None, embedder: "test".into() }
}

fn doc(id: &str, vector: Vec<f32>, meta: &[(&str, &str)]) -> Document {
    Document {
        id: id.into(),
        title: String::new(),
        text: format!("text of {id}"),
        metadata: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        vector,
    }
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreOptions::default()).expect("store opens").0
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// Every search equals a brute-force ranking (f64 scores), with filters, min_score and k
/// larger than the collection; over sizes that take the single-thread and the parallel path.
#[test]
fn search_equals_brute_force() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut rng = Rng(3);
    for (name, n, d, metric) in [("small", 37usize, 19usize, Metric::Cosine), ("big", 40_000, 64, Metric::Dot)] {
        store.write(Op::CreateCollection(spec(name, d as u32, metric))).unwrap();
        let docs: Vec<Document> = (0..n)
            .map(|i| doc(&format!("{name}-{i}"), rng.vec(d), &[("shard", if i % 3 == 0 { "a" } else { "b" })]))
            .collect();
        let stored: Vec<Vec<f32>> =
            docs.iter().map(|x| if metric == Metric::Cosine { unit(x.vector.clone()) } else { x.vector.clone() }).collect();
        for chunk in docs.chunks(5000) {
            store.write(Op::Upsert { collection: name.into(), documents: chunk.to_vec() }).unwrap();
        }
        let c = store.collection(name).unwrap();
        assert_eq!(c.len(), n);
        let queries: Vec<Query> = (0..9)
            .map(|i| Query {
                vector: if metric == Metric::Cosine { unit(rng.vec(d)) } else { rng.vec(d) },
                top_k: [1, 5, 10, 100][i % 4],
                min_score: (i % 3 == 1).then_some(0.1),
                filter: if i % 2 == 0 { vec![("shard".into(), "a".into())] } else { vec![] },
            })
            .collect();
        let refs: Vec<&Query> = queries.iter().collect();
        let got = c.search(&refs);
        for (q, hits) in queries.iter().zip(&got) {
            let mut want: Vec<(f64, usize)> = (0..n)
                .filter(|&i| q.filter.is_empty() || i % 3 == 0)
                .map(|i| (stored[i].iter().zip(&q.vector).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>(), i))
                .filter(|(s, _)| q.min_score.is_none_or(|m| *s >= m as f64))
                .collect();
            want.sort_by(|a, b| b.0.total_cmp(&a.0));
            want.truncate(q.top_k);
            assert_eq!(hits.len(), want.len(), "{name}: hit count");
            for (h, (s, i)) in hits.iter().zip(&want) {
                assert!((h.score as f64 - s).abs() < 1e-4, "{name}: score {} vs {s}", h.score);
                // Equal ids, unless two scores are within float noise of each other.
                if h.entry.id != format!("{name}-{i}") {
                    let other = hits.iter().find(|x| x.entry.id == format!("{name}-{i}"));
                    assert!(other.is_some_and(|o| (o.score - h.score).abs() < 1e-5), "{name}: {} vs {name}-{i}", h.entry.id);
                }
            }
            for w in hits.windows(2) {
                assert!(w[0].score >= w[1].score, "hits are best first");
            }
        }
    }
}

/// Upsert replaces by id, delete removes (moving the last row into the hole), and search sees it.
#[test]
fn upsert_replace_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    store.write(Op::CreateCollection(spec("c", 3, Metric::Dot))).unwrap();
    let up = |docs| store.write(Op::Upsert { collection: "c".into(), documents: docs }).unwrap();
    assert_eq!(up(vec![doc("a", vec![1., 0., 0.], &[]), doc("b", vec![0., 1., 0.], &[]), doc("c", vec![0., 0., 1.], &[])]),
        Applied::Upserted { inserted: 3, updated: 0 });
    assert_eq!(up(vec![doc("a", vec![0., 2., 0.], &[("v", "2")]), doc("d", vec![1., 1., 1.], &[])]),
        Applied::Upserted { inserted: 1, updated: 1 });
    let del = store.write(Op::Delete { collection: "c".into(), ids: vec!["b".into(), "zz".into()] }).unwrap();
    assert_eq!(del, Applied::Deleted { deleted: 1, missing: 1 });
    let c = store.collection("c").unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c.get("a").unwrap().vector, vec![0., 2., 0.]);
    assert_eq!(c.get("a").unwrap().metadata.get("v").map(String::as_str), Some("2"));
    assert!(c.get("b").is_none());
    assert_eq!(c.get("d").unwrap().vector, vec![1., 1., 1.]);
    let q = Query { vector: vec![0., 1., 0.], top_k: 10, min_score: None, filter: vec![] };
    let hits = c.search(&[&q]).remove(0);
    let ids: Vec<&str> = hits.iter().map(|h| h.entry.id.as_str()).collect();
    assert_eq!(ids, ["a", "d", "c"]);
}

/// Bad writes are refused whole: nothing of them is applied or logged.
#[test]
fn bad_writes_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = open(tmp.path());
        store.write(Op::CreateCollection(spec("c", 2, Metric::Cosine))).unwrap();
        let bad = |docs: Vec<Document>| store.write(Op::Upsert { collection: "c".into(), documents: docs }).unwrap_err();
        let e = bad(vec![doc("x", vec![1., 0.], &[]), doc("x", vec![0., 1.], &[])]);
        assert!(matches!(e, KbError::InvalidArgument(ref m) if m.contains("more than once")), "{e}");
        let e = bad(vec![doc("x", vec![1., 0.], &[]), doc("y", vec![1., 0., 0.], &[])]);
        assert!(matches!(e, KbError::InvalidArgument(ref m) if m.contains("dimension 3")), "{e}");
        let e = bad(vec![doc("z", vec![0., 0.], &[])]);
        assert!(matches!(e, KbError::InvalidArgument(ref m) if m.contains("all-zero")), "{e}");
        let e = bad(vec![doc("n", vec![f32::NAN, 1.], &[])]);
        assert!(matches!(e, KbError::InvalidArgument(_)), "{e}");
        let e = store.write(Op::Upsert { collection: "nope".into(), documents: vec![doc("x", vec![1., 0.], &[])] }).unwrap_err();
        assert_eq!(e, KbError::NotFound("nope".into()));
        let e = store.write(Op::CreateCollection(spec("c", 2, Metric::Cosine))).unwrap_err();
        assert_eq!(e, KbError::AlreadyExists("c".into()));
        assert!(store.collection("c").unwrap().is_empty());
    }
    let (store, rec) = Store::open(tmp.path(), StoreOptions::default()).unwrap();
    assert_eq!(rec.records_replayed, 1, "only the create was logged: {rec:?}");
    assert!(store.collection("c").unwrap().is_empty());
}

/// Many writers at once: each write is visible to a search the moment it is acknowledged, the
/// commits are grouped (fewer fsyncs than writes), and all of it is there after reopening.
#[test]
fn concurrent_writers_read_their_writes_and_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let d = 16;
    {
        let store = Arc::new(open(tmp.path()));
        store.write(Op::CreateCollection(spec("c", d as u32, Metric::Cosine))).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(100 + t);
                    for i in 0..40 {
                        let id = format!("t{t}-{i}");
                        let v = rng.vec(d);
                        store.write(Op::Upsert { collection: "c".into(), documents: vec![doc(&id, v.clone(), &[])] }).unwrap();
                        // Read-your-writes: the vector's own document is its best match now.
                        let q = Query { vector: unit(v), top_k: 1, min_score: None, filter: vec![] };
                        let hits = store.collection("c").unwrap().search(&[&q]).remove(0);
                        assert_eq!(hits[0].entry.id, id);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(store.collection("c").unwrap().len(), 320);
    }
    let (store, rec) = Store::open(tmp.path(), StoreOptions::default()).unwrap();
    assert_eq!(store.collection("c").unwrap().len(), 320);
    assert_eq!(rec.last_lsn, 321);
}

/// With a tiny snapshot threshold the store snapshots and compacts as it goes; reopening gives
/// exactly the state before, including deletes, drops and thresholds.
#[test]
fn snapshots_and_compaction_keep_the_state() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = || StoreOptions { snapshot_after_bytes: 4096, ..StoreOptions::default() };
    let mut rng = Rng(9);
    let expected: Vec<(String, Vec<f32>)>;
    {
        let (store, _) = Store::open(tmp.path(), opts()).unwrap();
        store.write(Op::CreateCollection(spec("keep", 8, Metric::Dot))).unwrap();
        store.write(Op::CreateCollection(spec("gone", 8, Metric::Dot))).unwrap();
        for i in 0..200 {
            let c = if i % 2 == 0 { "keep" } else { "gone" };
            store.write(Op::Upsert { collection: c.into(), documents: vec![doc(&format!("d{i}"), rng.vec(8), &[])] }).unwrap();
        }
        store.write(Op::Delete { collection: "keep".into(), ids: (0..50).map(|i| format!("d{}", i * 2)).collect() }).unwrap();
        store.write(Op::DropCollection { name: "gone".into() }).unwrap();
        store.write(Op::SetMinScore { collection: "keep".into(), min_score: Some(0.25) }).unwrap();
        let c = store.collection("keep").unwrap();
        expected = (0..200).step_by(2).skip(50).map(|i| (format!("d{i}"), c.get(&format!("d{i}")).unwrap().vector)).collect();
    }
    let snaps = std::fs::read_dir(tmp.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".snap")).count();
    assert!(snaps >= 1, "a snapshot was written");
    let (store, rec) = Store::open(tmp.path(), opts()).unwrap();
    assert!(rec.snapshot_lsn.is_some(), "{rec:?}");
    assert!(store.collection("gone").is_err());
    let c = store.collection("keep").unwrap();
    assert_eq!(c.len(), 50);
    assert_eq!(c.spec().min_score, Some(0.25));
    for (id, v) in expected {
        assert_eq!(c.get(&id).unwrap().vector, v);
    }
}
