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
    let broker = MemoryBroker::new(Arc::new(Hub::default()), 10, Duration::from_secs(60), 1 << 20);
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
    let broker = MemoryBroker::new(Arc::new(Hub::default()), 5, Duration::from_secs(60), 1 << 20);
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
    // A ring slot keeps neither offset nor epoch: both are given back from its place and
    // the channel, and match the bytes the message was sent as.
    let h = broker.history(&ch, 0, 100).await.unwrap();
    assert_eq!(offsets(&h), vec![4, 5, 6, 7, 8]);
    for message in &h.messages {
        let text = std::str::from_utf8(&message.bytes).unwrap();
        assert!(
            text.contains(&format!("\"offset\":{},", message.offset)),
            "{text}"
        );
        assert!(
            text.contains(&format!("\"epoch\":\"{}\"", message.epoch)),
            "{text}"
        );
        assert!(text.contains(&format!("\"n\":{}", message.offset)), "{text}");
    }
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
    let broker = MemoryBroker::new(hub, 100, Duration::from_secs(10), 1 << 20);
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

#[tokio::test]
async fn history_stays_within_the_byte_budget() {
    let budget = 64 * 1024;
    let broker = MemoryBroker::new(Arc::new(Hub::default()), 1000, Duration::from_secs(600), budget);
    let mut first_epoch = None;
    for i in 0..2000u64 {
        let ch = Channel::parse(&format!("notifications:u{i}")).unwrap();
        let published = broker.publish(&ch, &draft(i)).await.unwrap();
        first_epoch.get_or_insert(published.epoch);
        assert!(
            broker.memory_stats().history_bytes <= budget,
            "over budget after {i} publishes"
        );
    }
    let stats = broker.memory_stats();
    assert!(stats.history_evictions > 0);
    assert_eq!(stats.channels, 2000, "channel state (offsets, epochs) is kept");
    // The oldest channel lost its history, so a resume there is not complete, but its
    // offsets go on in the same epoch.
    let oldest = Channel::parse("notifications:u0").unwrap();
    assert!(!broker.history(&oldest, 0, 10).await.unwrap().complete);
    let next = broker.publish(&oldest, &draft(1)).await.unwrap();
    assert_eq!((next.offset, Some(next.epoch)), (2, first_epoch));
    // The newest channel still has its message.
    let newest = Channel::parse("notifications:u1999").unwrap();
    let history = broker.history(&newest, 0, 10).await.unwrap();
    assert!(history.complete && history.messages.len() == 1);
}
