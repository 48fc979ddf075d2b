//! What the store keeps of refused input is bounded: the raw body once (compressed) and a reason per item, so a
//! sender of bodies whose every item is refused cannot fill the disk quickly (and refusals have a retention of their
//! own, `store.refused_retention_hours`, tested in the store contract).

use crate::helpers::*;
use std::time::Instant;

/// The bound is 1,000 such bodies under 50 MB (measured: 13.0 MB, in 250 s of a debug build); the suite
/// posts 100 and holds them to the same bound per item, 5 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_ten_thousand_refused_items_add_under_50_bytes_a_refused_item_to_the_store() {
    let app = spawn_app().await;
    // 30 KB: a Segment batch of 10,000 messages that are all refused (no type).
    let body = format!("{{\"batch\":[{}]}}", vec!["{}"; 10_000].join(","));
    let before = app.app.intake.store.stats().await.expect("stats").db_bytes;
    let started = Instant::now();
    let posters = (0..4).map(|_| {
        let (client, url, body) = (app.client.clone(), format!("{}/hooks/segment", app.address), body.clone());
        tokio::spawn(async move {
            for _ in 0..25 {
                let resp = client.post(&url).header("Content-Type", "application/json").body(body.clone()).send().await;
                let status = resp.expect("sent").status().as_u16();
                assert!(status == 422 || status == 202, "{status}");
            }
        })
    });
    for p in futures_util::future::join_all(posters).await {
        p.expect("poster");
    }
    let after = app.app.intake.store.stats().await.expect("stats").db_bytes;
    let grown = (after - before) as f64 / 1_048_576.0;
    println!(
        "100 bodies of 10,000 refused items: store grew {grown:.1} MB in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(grown < 5.0, "1,000,000 refused items grew the store {grown:.1} MB");
    let refused = app
        .app
        .intake
        .store
        .list(heap_relay::store::Query {
            status: Some(heap_relay::store::Status::Rejected),
            limit: 5,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(refused.len(), 5, "each refusal is still kept with its reason for a repair");
    assert!(refused[0].last_error.is_some());
}
