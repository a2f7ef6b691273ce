//! Unit tests for the memory broker: offsets, history bounds, epochs and eviction.

use super::*;

fn draft(n: u64) -> Draft {
    let serde_json::Value::Object(map) = serde_json::json!({"type": "t", "n": n}) else {
        unreachable!()
    };
    Draft::from_object(map)
}

fn offsets(history: &History) -> Vec<u64> {
    history.messages.iter().map(|m| m.offset).collect()
}

#[tokio::test]
async fn offsets_grow_by_one_per_channel() {
    let broker = MemoryBroker::new(Arc::new(Hub::default()), 10, Duration::from_secs(60));
    let a = Channel::parse("org:a").unwrap();
    let b = Channel::parse("org:b").unwrap();
    assert_eq!(broker.position(&a).await.unwrap().offset, 0);
    for expected in 1..=3 {
        assert_eq!(
            broker.publish(&a, &draft(expected)).await.unwrap().offset,
            expected
        );
    }
    assert_eq!(broker.publish(&b, &draft(1)).await.unwrap().offset, 1);
    let position = broker.position(&a).await.unwrap();
    assert_eq!(position.offset, 3);
    let published = broker.publish(&a, &draft(4)).await.unwrap();
    assert_eq!(published.epoch, position.epoch);
}

#[tokio::test]
async fn history_since_is_exclusive_and_limited() {
    let broker = MemoryBroker::new(Arc::new(Hub::default()), 5, Duration::from_secs(60));
    let ch = Channel::parse("frames:u1").unwrap();
    for n in 1..=8 {
        broker.publish(&ch, &draft(n)).await.unwrap();
    }
    let h = broker.history(&ch, 5, 100).await.unwrap();
    assert_eq!(offsets(&h), vec![6, 7, 8]);
    assert!(h.complete);
    let h = broker.history(&ch, 3, 2).await.unwrap();
    assert_eq!(offsets(&h), vec![4, 5]);
    assert!(h.complete, "offset 4 is the oldest kept");
    let h = broker.history(&ch, 2, 100).await.unwrap();
    assert!(!h.complete, "offset 3 has left history");
    let h = broker.history(&ch, 8, 100).await.unwrap();
    assert!(h.complete && h.messages.is_empty());
    let h = broker.history(&ch, 9, 100).await.unwrap();
    assert!(
        !h.complete,
        "an offset beyond the channel's last is not resumable"
    );
}

#[tokio::test(start_paused = true)]
async fn history_expires_and_idle_channels_are_evicted() {
    let hub = Arc::new(Hub::default());
    let broker = MemoryBroker::new(hub, 100, Duration::from_secs(10));
    let ch = Channel::parse("org:x").unwrap();
    let epoch = broker.publish(&ch, &draft(1)).await.unwrap().epoch;
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(broker.evict_idle(), 0);
    tokio::time::advance(Duration::from_secs(6)).await;
    let h = broker.history(&ch, 0, 100).await.unwrap();
    assert!(h.messages.is_empty() && !h.complete);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(broker.evict_idle(), 1);
    assert_eq!(broker.channel_count(), 0);
    let after = broker.publish(&ch, &draft(2)).await.unwrap();
    assert_eq!(after.offset, 1);
    assert_ne!(
        after.epoch, epoch,
        "a channel that restarts its offsets gets a new epoch"
    );
}
