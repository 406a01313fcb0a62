//! Durability: the real server binary is killed with SIGKILL in the middle of concurrent
//! writes, again and again, on the same knowledge-base folder (with snapshots every 1 MiB, so
//! some kills land during a snapshot). After every restart: every acknowledged document is
//! there, byte for byte; nothing is there that was never sent; and each upsert that was in
//! flight at the kill is there whole or not at all.
mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fresh_dir, model_dir};
use concierge_proto::v1 as pb;
use concierge_proto::v1::knowledge_base_client::KnowledgeBaseClient;
use tonic::transport::Channel;

const DIM: usize = 64;
const CYCLES: u64 = 12;
const WRITERS: usize = 8;

/// The vector a document id always gets, so a stored one can be checked exactly.
fn vector_of(id: &str) -> Vec<f32> {
    let mut h: u64 = 1469598103934665603;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(1099511628211);
    }
    (0..DIM)
        .map(|_| {
            h = h.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Starts the binary; returns it once it serves, with its gRPC address.
fn start(dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_concierge"))
        .args([
            "--listen=127.0.0.1:0".to_string(),
            "--metrics-listen=127.0.0.1:0".to_string(),
            format!("--model-dir={}", model_dir().display()),
            format!("--kb-dir={}", dir.display()),
            "--kb-snapshot-mb=1".to_string(),
            "--log-format=json".to_string(),
            "--no-image-model".to_string(),
            "--no-entity-model".to_string(),
            "--no-intent-model".to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the concierge binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the log to the end, so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut addr = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            match v["message"].as_str() {
                Some("concierge listening") => addr = v["grpc_addr"].as_str().map(str::to_owned),
                Some("models loaded; serving") => {
                    let _ = tx.send(Ok(addr.clone().expect("listening is logged before serving")));
                }
                _ if v["level"] == "ERROR" || v["level"] == "WARN" => eprintln!("server: {line}"),
                _ => {}
            }
        }
        let _ = tx.send(Err("the server exited before serving".to_string()));
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("server became ready in time").expect("server became ready");
    (child, addr)
}

#[derive(Default, Clone)]
struct Ledger {
    /// Every upsert ever sent: its ids.
    sent: Vec<Vec<String>>,
    /// Indexes into `sent` that were acknowledged.
    acked: HashSet<usize>,
}

async fn check(kb: &mut KnowledgeBaseClient<Channel>, ledger: &Ledger, cycle: u64) -> usize {
    let all: Vec<&String> = ledger.sent.iter().flatten().collect();
    let mut found: HashMap<String, pb::Document> = HashMap::new();
    for chunk in all.chunks(1000) {
        let req = pb::GetRequest { collection: "crash".into(), ids: chunk.iter().map(|s| s.to_string()).collect(), with_vectors: true };
        for d in kb.get(req).await.expect("get").into_inner().documents {
            found.insert(d.id.clone(), d);
        }
    }
    for (i, ids) in ledger.sent.iter().enumerate() {
        let present = ids.iter().filter(|id| found.contains_key(*id)).count();
        if ledger.acked.contains(&i) {
            assert_eq!(present, ids.len(), "cycle {cycle}: acknowledged upsert {i} lost documents: {ids:?}");
        } else {
            assert!(present == 0 || present == ids.len(), "cycle {cycle}: upsert {i} in flight at the kill is half there: {ids:?}");
        }
    }
    for (id, d) in &found {
        assert_eq!(&d.text, id, "cycle {cycle}: {id} has the wrong text");
        assert_eq!(d.vector, vector_of(id), "cycle {cycle}: {id} has the wrong vector");
    }
    let info = kb.get_collection(pb::GetCollectionRequest { name: "crash".into() }).await.unwrap().into_inner();
    assert_eq!(info.documents as usize, found.len(), "cycle {cycle}: the collection holds documents nobody sent");
    found.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = fresh_dir("kb-crash");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut seed = 0x5eed_u64;
    let mut kills_during_writes = 0;
    for cycle in 0..CYCLES {
        let (mut child, addr) = start(&dir);
        let mut kb = KnowledgeBaseClient::connect(format!("http://{addr}")).await.unwrap();
        if cycle == 0 {
            let req = pb::CreateCollectionRequest {
                name: "crash".into(),
                dimension: DIM as u32,
                metric: pb::Metric::DotProduct as i32,
                ..Default::default()
            };
            kb.create_collection(req).await.unwrap();
        } else {
            let seen = ledger.lock().unwrap().clone();
            let n = check(&mut kb, &seen, cycle).await;
            eprintln!("cycle {cycle}: {n} documents recovered intact");
        }

        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (mut kb, ledger) = (kb.clone(), ledger.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let ids: Vec<String> = (0..1 + i % 3).map(|j| format!("c{cycle}-w{w}-{i}-{j}")).collect();
                        let documents = ids
                            .iter()
                            .map(|id| pb::Document { id: id.clone(), text: id.clone(), vector: vector_of(id), ..Default::default() })
                            .collect();
                        let k = {
                            let mut l = ledger.lock().unwrap();
                            l.sent.push(ids);
                            l.sent.len() - 1
                        };
                        match kb.upsert(pb::UpsertRequest { collection: "crash".into(), documents, ..Default::default() }).await {
                            Ok(_) => {
                                ledger.lock().unwrap().acked.insert(k);
                            }
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let after = Duration::from_millis(50 + (seed >> 33) % 400);
        tokio::time::sleep(after).await;
        let acked_before = ledger.lock().unwrap().acked.len();
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        for w in writers {
            w.await.unwrap();
        }
        let l = ledger.lock().unwrap();
        if l.acked.len() > acked_before || l.sent.len() > l.acked.len() {
            kills_during_writes += 1;
        }
        eprintln!("cycle {cycle}: killed after {after:?}; {} upserts sent, {} acknowledged so far", l.sent.len(), l.acked.len());
    }
    assert!(kills_during_writes >= CYCLES / 2, "most kills should land with writes in flight");
    let (mut child, addr) = start(&dir);
    let mut kb = KnowledgeBaseClient::connect(format!("http://{addr}")).await.unwrap();
    let seen = ledger.lock().unwrap().clone();
    let n = check(&mut kb, &seen, CYCLES).await;
    assert!(n > 1000, "the test wrote too little to mean much: {n} documents");
    child.kill().unwrap();
    child.wait().unwrap();
}
