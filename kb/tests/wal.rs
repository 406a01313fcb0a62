//! The write-ahead log against the crashes it must survive: torn tails at every byte, corruption
//! that must stop an open, and a crash at each step of a snapshot (simulated by assembling the
//! directory a crash at that step would leave).
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use concierge_kb::{CollectionSpec, Document, Metric, Op, Recovery, Wal, WalError, WalOptions};

type Log = Vec<(u64, Op)>;

fn open_with(dir: &Path, opts: WalOptions) -> Result<(Wal, Recovery, Log), WalError> {
    let mut log = Vec::new();
    let (wal, recovery) = Wal::open(dir, opts, |lsn, op| log.push((lsn, op)))?;
    Ok((wal, recovery, log))
}

fn open(dir: &Path) -> (Wal, Recovery, Log) {
    open_with(dir, WalOptions::default()).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

fn open_err(dir: &Path) -> WalError {
    match open_with(dir, WalOptions::default()) {
        Ok((_, recovery, _)) => panic!("open succeeded: {recovery:?}"),
        Err(e) => e,
    }
}

/// xorshift64*: deterministic ops without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn spec(name: &str, dimension: u32) -> CollectionSpec {
    CollectionSpec { name: name.into(), dimension, metric: Metric::Cosine, min_score: Some(0.2), embedder: "minilm@1".into() }
}

fn doc(rng: &mut Rng, id: u64, dim: usize) -> Document {
    let metadata = (0..rng.below(3)).map(|k| (format!("k{k}"), format!("välue {}", rng.below(100)))).collect();
    Document {
        id: format!("doc-{id}"),
        title: format!("Títle {id}"),
        text: "text ✓ ".repeat(rng.below(4) as usize),
        metadata,
        vector: (0..dim).map(|_| rng.below(2001) as f32 / 1000.0 - 1.0).collect(),
    }
}

/// A mix of every kind of op over two collections, valid in order from an empty state.
fn ops(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = Rng(seed | 1);
    let mut out = vec![Op::CreateCollection(spec("faq", 8)), Op::CreateCollection(spec("ñotes", 3))];
    while out.len() < n {
        let (name, dim) = if rng.below(2) == 0 { ("faq", 8) } else { ("ñotes", 3) };
        let op = match rng.below(10) {
            0..=5 => Op::Upsert {
                collection: name.into(),
                documents: (0..1 + rng.below(3))
                    .map(|_| {
                        let id = rng.below(20);
                        doc(&mut rng, id, dim)
                    })
                    .collect(),
            },
            6 | 7 => Op::Delete { collection: name.into(), ids: vec![format!("doc-{}", rng.below(20))] },
            8 => Op::SetMinScore { collection: name.into(), min_score: Some(rng.below(100) as f32 / 100.0) },
            _ => {
                out.push(Op::DropCollection { name: name.into() });
                Op::CreateCollection(spec(name, dim as u32))
            }
        };
        out.push(op);
    }
    out
}

/// What the ops add up to, to check that a snapshot plus the log recreates it.
#[derive(Debug, Default, PartialEq)]
struct State(BTreeMap<String, (CollectionSpec, BTreeMap<String, Document>)>);

impl State {
    fn apply(&mut self, op: Op) {
        match op {
            Op::CreateCollection(spec) => {
                self.0.insert(spec.name.clone(), (spec, BTreeMap::new()));
            }
            Op::DropCollection { name } => {
                self.0.remove(&name);
            }
            Op::Upsert { collection, documents } => {
                let docs = &mut self.0.get_mut(&collection).expect("upsert into a collection that exists").1;
                docs.extend(documents.into_iter().map(|d| (d.id.clone(), d)));
            }
            Op::Delete { collection, ids } => {
                let docs = &mut self.0.get_mut(&collection).expect("delete from a collection that exists").1;
                ids.iter().for_each(|id| drop(docs.remove(id)));
            }
            Op::SetMinScore { collection, min_score } => {
                self.0.get_mut(&collection).expect("collection exists").0.min_score = min_score;
            }
        }
    }

    fn from_ops(ops: impl IntoIterator<Item = Op>) -> State {
        let mut state = State::default();
        ops.into_iter().for_each(|op| state.apply(op));
        state
    }

    fn from_log(log: Log) -> State {
        State::from_ops(log.into_iter().map(|(_, op)| op))
    }

    /// Each collection's spec, then its documents in upserts of up to three.
    fn snapshot_ops(&self) -> Vec<Op> {
        let mut out = Vec::new();
        for (spec, docs) in self.0.values() {
            out.push(Op::CreateCollection(spec.clone()));
            let docs: Vec<Document> = docs.values().cloned().collect();
            out.extend(docs.chunks(3).map(|c| Op::Upsert { collection: spec.name.clone(), documents: c.to_vec() }));
        }
        out
    }
}

fn numbered(first_lsn: u64, ops: &[Op]) -> Log {
    ops.iter().cloned().zip(first_lsn..).map(|(op, lsn)| (lsn, op)).collect()
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect();
    out.sort();
    out
}

/// Copies a closed log directory, as a crash would have left it.
fn copy_dir(from: &Path, to: &Path) {
    for path in files(from, "") {
        fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

#[test]
fn appends_replay_exactly_and_lsns_continue_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let all = ops(1, 40);
    let (mut wal, recovery, log) = open(dir.path());
    assert_eq!((recovery.last_lsn, recovery.snapshot_lsn, recovery.torn_tail.clone(), log.len()), (0, None, None, 0));
    assert_eq!(wal.append(&[]).unwrap(), 0, "an empty group writes nothing");
    let mut lsn = 0;
    for group in all[..25].chunks(4) {
        lsn = wal.append(group).unwrap();
    }
    assert_eq!((lsn, wal.last_lsn()), (25, 25));
    let bytes = wal.bytes_since_snapshot();
    assert!(bytes > 0);
    drop(wal);

    let (mut wal, recovery, log) = open(dir.path());
    assert_eq!(log, numbered(1, &all[..25]));
    assert_eq!((recovery.records_replayed, recovery.last_lsn), (25, 25));
    assert_eq!(wal.bytes_since_snapshot(), bytes);
    assert_eq!(wal.append(&all[25..]).unwrap(), 40);
    drop(wal);
    let (_, _, log) = open(dir.path());
    assert_eq!(log, numbered(1, &all));
}

#[test]
fn large_groups_and_segment_rotation_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions { segment_bytes: 2_000 };
    let mut all = ops(2, 120);
    let mut rng = Rng(99);
    // One big upsert: 2,000 documents of 384 dimensions, about 3 MB in one record.
    all.push(Op::Upsert { collection: "faq".into(), documents: (0..2000).map(|i| doc(&mut rng, 1000 + i, 384)).collect() });
    let (mut wal, ..) = open_with(dir.path(), opts.clone()).unwrap();
    for group in all.chunks(7) {
        wal.append(group).unwrap();
    }
    drop(wal);
    let segments = files(dir.path(), "wal-");
    assert!(segments.len() > 5, "{segments:?}");
    let (_, recovery, log) = open_with(dir.path(), opts).unwrap();
    assert_eq!(recovery.records_replayed, all.len() as u64);
    assert!(log == numbered(1, &all), "replayed log differs");
}

/// Writes `earlier` then `last` into a fresh log; returns the segment and where `last` starts.
fn log_with_last_record(dir: &Path, earlier: &[Op], last: &Op) -> (PathBuf, u64, u64) {
    let (mut wal, ..) = open(dir);
    wal.append(earlier).unwrap();
    drop(wal);
    let segment = files(dir, "wal-").pop().unwrap();
    let start = file_len(&segment);
    let (mut wal, ..) = open(dir);
    wal.append(std::slice::from_ref(last)).unwrap();
    drop(wal);
    (segment.clone(), start, file_len(&segment))
}

/// Reopens a log whose last record was damaged, checks that only that record went, and that
/// the log goes on working.
fn check_torn_recovery(dir: &Path, earlier: &[Op], dropped: u64, offset: u64) {
    let (mut wal, recovery, log) = open(dir);
    assert_eq!(log, numbered(1, earlier));
    assert_eq!(recovery.last_lsn, earlier.len() as u64);
    match &recovery.torn_tail {
        None => assert_eq!(dropped, 0),
        Some(torn) => {
            assert_eq!((torn.bytes_dropped, torn.offset), (dropped, offset), "{torn:?}");
            assert_eq!(file_len(&torn.file), offset, "the segment is cut back to its last whole record");
            assert!(torn.file.file_name().unwrap().to_str().unwrap().starts_with("wal-"));
        }
    }
    let next = Op::DropCollection { name: "after the crash".into() };
    assert_eq!(wal.append(std::slice::from_ref(&next)).unwrap(), earlier.len() as u64 + 1);
    drop(wal);
    let (_, recovery, log) = open(dir);
    assert_eq!(recovery.torn_tail, None);
    let mut expected = numbered(1, earlier);
    expected.push((earlier.len() as u64 + 1, next));
    assert_eq!(log, expected);
}

#[test]
fn a_torn_last_record_is_dropped_at_every_truncation() {
    let template = tempfile::tempdir().unwrap();
    let earlier = ops(3, 5);
    let last = Op::Delete { collection: "faq".into(), ids: vec!["doc-1".into(), "dóc-2".into()] };
    let (segment, start, end) = log_with_last_record(template.path(), &earlier, &last);
    let name = segment.file_name().unwrap();
    for cut in start..end {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        fs::OpenOptions::new().write(true).open(dir.path().join(name)).unwrap().set_len(cut).unwrap();
        check_torn_recovery(dir.path(), &earlier, cut - start, start);
    }
}

#[test]
fn a_last_record_with_any_byte_flipped_is_dropped() {
    let template = tempfile::tempdir().unwrap();
    let earlier = ops(4, 6);
    let last = Op::SetMinScore { collection: "faq".into(), min_score: Some(0.75) };
    let (segment, start, end) = log_with_last_record(template.path(), &earlier, &last);
    let name = segment.file_name().unwrap();
    for at in start..end {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        flip(&dir.path().join(name), at);
        check_torn_recovery(dir.path(), &earlier, end - start, start);
    }
}

#[test]
fn zeros_after_the_last_record_are_a_torn_tail() {
    // What a crash can leave when the file grew but its data never reached the disk.
    let dir = tempfile::tempdir().unwrap();
    let earlier = ops(5, 4);
    let (mut wal, ..) = open(dir.path());
    wal.append(&earlier).unwrap();
    drop(wal);
    let segment = files(dir.path(), "wal-").pop().unwrap();
    let len = file_len(&segment);
    fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(len + 4096).unwrap();
    check_torn_recovery(dir.path(), &earlier, 4096, len);
}

/// Offsets where each record of a single-segment log starts.
fn record_offsets(dir: &Path, all: &[Op]) -> Vec<u64> {
    let (mut wal, ..) = open(dir);
    let segment = files(dir, "wal-").pop().unwrap();
    let mut offsets = Vec::new();
    for op in all {
        offsets.push(file_len(&segment));
        wal.append(std::slice::from_ref(op)).unwrap();
    }
    offsets
}

#[test]
fn corruption_before_the_last_record_refuses_to_open() {
    let all = ops(6, 10);
    for (what, damage) in [("a flipped payload byte", 20u64), ("a flipped length byte", 2), ("a flipped checksum byte", 5)] {
        let dir = tempfile::tempdir().unwrap();
        let offsets = record_offsets(dir.path(), &all);
        let segment = files(dir.path(), "wal-").pop().unwrap();
        flip(&segment, offsets[3] + damage);
        let before = fs::read(&segment).unwrap();
        let err = open_err(dir.path());
        match &err {
            WalError::Corrupt { file, offset, .. } => assert_eq!((file, *offset), (&segment, offsets[3]), "{what}: {err}"),
            other => panic!("{what}: expected Corrupt, got {other}"),
        }
        let message = err.to_string();
        assert!(message.contains(segment.file_name().unwrap().to_str().unwrap()), "{message}");
        assert!(message.contains(&format!("offset {}", offsets[3])) && message.contains("backup"), "{message}");
        assert_eq!(fs::read(&segment).unwrap(), before, "{what}: a refused open must not touch the file");
    }
}

#[test]
fn damage_in_an_older_segment_refuses_to_open_even_at_its_end() {
    let opts = WalOptions { segment_bytes: 300 };
    let all = ops(7, 40);
    for cut_last_byte in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, ..) = open_with(dir.path(), opts.clone()).unwrap();
        for group in all.chunks(2) {
            wal.append(group).unwrap();
        }
        drop(wal);
        let segments = files(dir.path(), "wal-");
        assert!(segments.len() >= 3);
        let older = &segments[1];
        let len = file_len(older);
        if cut_last_byte {
            fs::OpenOptions::new().write(true).open(older).unwrap().set_len(len - 1).unwrap();
        } else {
            flip(older, len - 3);
        }
        let err = open_with(dir.path(), opts.clone()).unwrap_err();
        assert!(matches!(&err, WalError::Corrupt { file, .. } if file == older), "{err}");
        assert!(err.to_string().contains("not the newest"), "{err}");
    }
}

#[test]
fn a_missing_segment_refuses_to_open() {
    let opts = WalOptions { segment_bytes: 300 };
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, ..) = open_with(dir.path(), opts.clone()).unwrap();
    for group in ops(8, 40).chunks(2) {
        wal.append(group).unwrap();
    }
    drop(wal);
    fs::remove_file(&files(dir.path(), "wal-")[1]).unwrap();
    let err = open_with(dir.path(), opts).unwrap_err();
    assert!(matches!(err, WalError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
}

/// A log with a snapshot after `before` ops and `after` more ops; returns the model state.
fn snapshotted_log(dir: &Path, before: &[Op], after: &[Op]) -> State {
    let (mut wal, ..) = open(dir);
    for group in before.chunks(3) {
        wal.append(group).unwrap();
    }
    let mut state = State::from_ops(before.iter().cloned());
    wal.snapshot(state.snapshot_ops().into_iter()).unwrap();
    assert_eq!(wal.bytes_since_snapshot(), 0);
    wal.append(after).unwrap();
    after.iter().cloned().for_each(|op| state.apply(op));
    state
}

#[test]
fn snapshot_then_appends_then_reopen_recreates_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let all = ops(9, 60);
    let state = snapshotted_log(dir.path(), &all[..45], &all[45..]);
    assert_eq!(files(dir.path(), "snapshot-").len(), 1);
    assert_eq!(files(dir.path(), "wal-").len(), 1, "segments before the snapshot are deleted");
    let (mut wal, recovery, log) = open(dir.path());
    assert_eq!(recovery.snapshot_lsn, Some(45));
    assert_eq!(recovery.snapshot_ops, state_ops_len(&all[..45]));
    assert_eq!((recovery.records_replayed, recovery.last_lsn), (15, 60));
    assert!(log[..recovery.snapshot_ops as usize].iter().all(|(lsn, _)| *lsn == 45));
    assert_eq!(log[recovery.snapshot_ops as usize..], numbered(46, &all[45..]));
    assert!(wal.bytes_since_snapshot() > 0);
    assert_eq!(State::from_log(log), state);

    // A second snapshot, one straight after it with no appends, and one more append.
    wal.snapshot(state.snapshot_ops().into_iter()).unwrap();
    wal.snapshot(state.snapshot_ops().into_iter()).unwrap();
    let extra = Op::DropCollection { name: "faq".into() };
    assert_eq!(wal.append(std::slice::from_ref(&extra)).unwrap(), 61);
    drop(wal);
    assert_eq!(files(dir.path(), "snapshot-").len(), 1);
    let (_, recovery, log) = open(dir.path());
    assert_eq!((recovery.snapshot_lsn, recovery.records_replayed), (Some(60), 1));
    let mut expected = state;
    expected.apply(extra);
    assert_eq!(State::from_log(log), expected);
}

fn state_ops_len(ops: &[Op]) -> u64 {
    State::from_ops(ops.iter().cloned()).snapshot_ops().len() as u64
}

#[test]
fn a_snapshot_of_an_empty_log_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, ..) = open(dir.path());
    wal.snapshot(std::iter::empty()).unwrap();
    drop(wal);
    let (_, recovery, log) = open(dir.path());
    assert_eq!((recovery.snapshot_lsn, recovery.last_lsn, log.len()), (Some(0), 0, 0));
}

/// The directories a crash during `snapshot()` can leave, built from a log before the snapshot
/// (`old`) and the same log after it (`new`).
struct CrashScenario {
    old: tempfile::TempDir,
    new: tempfile::TempDir,
    state: State,
    old_snapshot_lsn: u64,
    lsn: u64,
}

fn crash_scenario() -> CrashScenario {
    let all = ops(10, 50);
    let old = tempfile::tempdir().unwrap();
    let state = snapshotted_log(old.path(), &all[..20], &all[20..]);
    let new = tempfile::tempdir().unwrap();
    copy_dir(old.path(), new.path());
    let (mut wal, ..) = open(new.path());
    wal.snapshot(state.snapshot_ops().into_iter()).unwrap();
    CrashScenario { old, new, state, old_snapshot_lsn: 20, lsn: 50 }
}

fn new_snapshot(s: &CrashScenario) -> PathBuf {
    files(s.new.path(), "snapshot-").pop().unwrap()
}

#[test]
fn crash_before_the_temp_snapshot_was_renamed() {
    let s = crash_scenario();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(s.old.path(), dir.path());
    let mut unfinished = fs::read(new_snapshot(&s)).unwrap();
    unfinished.truncate(unfinished.len() / 2);
    let tmp = dir.path().join(format!("snapshot-{:020}.snap.tmp", s.lsn));
    fs::write(&tmp, unfinished).unwrap();
    let (_, recovery, log) = open(dir.path());
    assert_eq!(recovery.snapshot_lsn, Some(s.old_snapshot_lsn));
    assert!(!tmp.exists(), "the unfinished snapshot is removed");
    assert_eq!(State::from_log(log), s.state);
}

#[test]
fn an_incomplete_or_damaged_snapshot_falls_back_to_the_previous_one() {
    let s = crash_scenario();
    let good = fs::read(new_snapshot(&s)).unwrap();
    let len = good.len();
    let mut flipped = good.clone();
    flipped[len / 2] ^= 1;
    let damaged: [(&str, Vec<u8>); 6] = [
        ("without its footer", good[..len - 20].to_vec()),
        ("missing its last byte", good[..len - 1].to_vec()),
        ("cut in half", good[..len / 2].to_vec()),
        ("header only", good[..20].to_vec()),
        ("empty", Vec::new()),
        ("with a flipped byte", flipped),
    ];
    for (what, bytes) in damaged {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(s.old.path(), dir.path());
        let bad = dir.path().join(new_snapshot(&s).file_name().unwrap());
        fs::write(&bad, bytes).unwrap();
        let (mut wal, recovery, log) = open(dir.path());
        assert_eq!(recovery.snapshot_lsn, Some(s.old_snapshot_lsn), "{what}");
        assert_eq!(recovery.skipped_snapshots, vec![bad.clone()], "{what}");
        assert_eq!(recovery.last_lsn, s.lsn, "{what}");
        assert_eq!(State::from_log(log), s.state, "{what}");
        // The next snapshot replaces the damaged one.
        wal.snapshot(s.state.snapshot_ops().into_iter()).unwrap();
        drop(wal);
        let (_, recovery, log) = open(dir.path());
        assert_eq!((recovery.snapshot_lsn, recovery.skipped_snapshots.len()), (Some(s.lsn), 0), "{what}");
        assert_eq!(State::from_log(log), s.state, "{what}");
    }
}

#[test]
fn crash_after_the_rename_before_the_new_segment() {
    // New snapshot durable; the old segments, ending at its lsn, are all there is of the log.
    let s = crash_scenario();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(s.old.path(), dir.path());
    fs::copy(new_snapshot(&s), dir.path().join(new_snapshot(&s).file_name().unwrap())).unwrap();
    let (mut wal, recovery, log) = open(dir.path());
    assert_eq!((recovery.snapshot_lsn, recovery.records_replayed, recovery.last_lsn), (Some(s.lsn), 0, s.lsn));
    assert_eq!(State::from_log(log), s.state);
    let extra = Op::DropCollection { name: "ñotes".into() };
    assert_eq!(wal.append(std::slice::from_ref(&extra)).unwrap(), s.lsn + 1);
    drop(wal);
    let (_, recovery, log) = open(dir.path());
    assert_eq!((recovery.snapshot_lsn, recovery.records_replayed), (Some(s.lsn), 1));
    let mut expected = s.state;
    expected.apply(extra);
    assert_eq!(State::from_log(log), expected);
}

#[test]
fn crash_before_the_old_files_were_deleted() {
    // New snapshot and new segment durable; old snapshot and old segments still there.
    let s = crash_scenario();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(s.old.path(), dir.path());
    copy_dir(s.new.path(), dir.path());
    assert_eq!(files(dir.path(), "snapshot-").len(), 2);
    assert!(files(dir.path(), "wal-").len() >= 2);
    let (mut wal, recovery, log) = open(dir.path());
    assert_eq!((recovery.snapshot_lsn, recovery.records_replayed, recovery.last_lsn), (Some(s.lsn), 0, s.lsn));
    assert_eq!(State::from_log(log), s.state);
    let extra = Op::SetMinScore { collection: "faq".into(), min_score: None };
    assert_eq!(wal.append(std::slice::from_ref(&extra)).unwrap(), s.lsn + 1);
    wal.snapshot(s.state.snapshot_ops().into_iter()).unwrap();
    drop(wal);
    assert_eq!((files(dir.path(), "snapshot-").len(), files(dir.path(), "wal-").len()), (1, 1));
}

#[test]
fn a_second_open_of_a_locked_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, ..) = open(dir.path());
    let err = open_err(dir.path());
    assert!(matches!(err, WalError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("locked by another process"), "{err}");
    drop(wal);
    open(dir.path());
}

#[test]
fn open_creates_a_missing_directory() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a/b/kb");
    let (mut wal, ..) = open(&dir);
    wal.append(&ops(11, 3)).unwrap();
    drop(wal);
    assert_eq!(open(&dir).2, numbered(1, &ops(11, 3)));
}
