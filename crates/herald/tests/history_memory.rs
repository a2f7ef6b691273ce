//! Issue 3: history memory stays under its documented bound while 100,000 distinct
//! channels are published to. Heap bytes are counted exactly by a wrapping allocator,
//! so the check measures what the broker really holds, not what it believes it holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use cap::Cap;
use herald::broker::memory::{MemoryBroker, CHANNEL_OVERHEAD};
use herald::broker::Broker;
use herald::channel::{Channel, Draft};
use herald::hub::Hub;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

const CHANNELS: usize = 100_000;
const BUDGET: usize = 8 << 20;

#[tokio::test(flavor = "current_thread")]
async fn history_memory_stays_under_the_bound_across_100k_channels() {
    let hub = Arc::new(Hub::default());
    let broker = MemoryBroker::new(hub, 1000, Duration::from_secs(600), BUDGET);
    let serde_json::Value::Object(body) = serde_json::json!({
        "type": "notification",
        "notification": {"title": "Task Complete", "body": "x".repeat(160)},
    }) else {
        unreachable!()
    };
    let draft = Draft::from_object(body);
    let names: Vec<Channel> = (0..CHANNELS)
        .map(|i| Channel::parse(&format!("notifications:user_{i:06}")).unwrap())
        .collect();

    let before = ALLOCATOR.allocated();
    let mut peak = 0;
    for (i, channel) in names.iter().enumerate() {
        broker.publish(channel, &draft).await.unwrap();
        if i % 1000 == 999 {
            peak = peak.max(ALLOCATOR.allocated() - before);
        }
    }
    let held = ALLOCATOR.allocated() - before;
    let stats = broker.memory_stats();
    let bound = BUDGET + CHANNELS * CHANNEL_OVERHEAD;
    println!(
        "channels={} history_bytes={} evictions={} heap_held={held} heap_peak={peak} bound={bound} \
         per_channel_state={}",
        stats.channels,
        stats.history_bytes,
        stats.history_evictions,
        held.saturating_sub(stats.history_bytes) / CHANNELS,
    );
    assert_eq!(stats.channels, CHANNELS);
    assert!(stats.history_bytes <= BUDGET);
    assert!(
        stats.history_evictions > 0,
        "100k messages of ~250 B cannot fit in 8 MiB"
    );
    assert!(
        peak <= bound,
        "heap peaked at {peak} bytes, over the documented bound {bound}"
    );
    assert!(
        held <= bound,
        "heap holds {held} bytes, over the documented bound {bound}"
    );
}
