//! Quality on real data: Banking77's training queries go into a collection (label as metadata)
//! through `Upsert`; every tenth query is held aside and classified by its nearest neighbour
//! through `Search`. Runs when the data set is beside the repository (`../shared/data`, as in
//! CI) or at `$CONCIERGE_BANKING77`; says so and passes when it is not there.
mod common;

use std::collections::HashMap;

use common::serve;
use concierge_proto::v1 as pb;
use concierge_proto::v1::knowledge_base_client::KnowledgeBaseClient;

/// `text,label` records (RFC 4180: a quoted field may hold commas, newlines and "" for a quote).
fn read(path: &std::path::Path) -> Vec<(String, String)> {
    let raw = std::fs::read_to_string(path).unwrap();
    let (mut records, mut fields, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut chars, mut quoted) = (raw.chars().peekable(), false);
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (false, '\n') => {
                fields.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut fields));
            }
            (false, '\r') => {}
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push(fields);
    }
    records
        .into_iter()
        .skip(1)
        .filter_map(|r| match <[String; 2]>::try_from(r) {
            Ok([text, label]) if !text.trim().is_empty() => Some((text, label)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nearest_neighbour_search_classifies_banking77() {
    let path = std::env::var_os("CONCIERGE_BANKING77").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/banking77/train.csv")
    });
    if !path.is_file() {
        eprintln!("SKIPPED: Banking77 is not at {} (set CONCIERGE_BANKING77 to run this check)", path.display());
        return;
    }
    let rows = read(&path);
    assert!(rows.len() > 10_000, "{} records read", rows.len());
    let (held, docs): (Vec<_>, Vec<_>) = rows.into_iter().enumerate().partition(|(i, _)| i % 10 == 0);

    let running = serve(&[]).await;
    let mut kb = KnowledgeBaseClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();
    kb.create_collection(pb::CreateCollectionRequest { name: "banking77".into(), ..Default::default() }).await.unwrap();
    for chunk in docs.chunks(500) {
        let documents = chunk
            .iter()
            .map(|(i, (text, label))| pb::Document {
                id: format!("row-{i}"),
                text: text.clone(),
                metadata: HashMap::from([("label".to_string(), label.clone())]),
                ..Default::default()
            })
            .collect();
        kb.upsert(pb::UpsertRequest { collection: "banking77".into(), documents, truncate: Some(true), ..Default::default() }).await.unwrap();
    }
    // 32 searches in flight at a time.
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut searches = tokio::task::JoinSet::new();
    for (_, (text, label)) in &held {
        let (mut kb, permits) = (kb.clone(), permits.clone());
        let req = pb::SearchRequest { collection: "banking77".into(), query: text.clone(), top_k: Some(1), truncate: Some(true), ..Default::default() };
        let label = label.clone();
        searches.spawn(async move {
            let _permit = permits.acquire().await.unwrap();
            (kb.search(req).await.unwrap().into_inner().hits[0].metadata["label"] == label) as usize
        });
    }
    let mut correct = 0;
    while let Some(ok) = searches.join_next().await {
        correct += ok.unwrap();
    }
    let accuracy = correct as f64 / held.len() as f64;
    eprintln!("Banking77 nearest neighbour: {correct}/{} = {accuracy:.4} top-1 accuracy ({} documents)", held.len(), docs.len());
    assert!(accuracy >= 0.88, "top-1 accuracy {accuracy:.4} is below the 0.88 this encoder reaches");
    running.shutdown().await.unwrap();
}
