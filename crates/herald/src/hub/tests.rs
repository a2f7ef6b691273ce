//! Unit tests for `hub`: subscription bookkeeping, fan-out and outbox overflow.

use bytes::Bytes;

use super::*;
use crate::close::CloseCode;

fn message(offset: u64, len: usize) -> Message {
    Message {
        offset,
        epoch: std::sync::Arc::from("e"),
        bytes: Bytes::from(vec![b'x'; len]),
        published_at: tokio::time::Instant::now(),
    }
}

fn drain(outbox: &Outbox) -> Result<Vec<Message>, Close> {
    drain_batch(outbox).map(|batch| batch.messages.into_iter().map(|(_, m)| m).collect())
}

fn drain_batch(outbox: &Outbox) -> Result<Batch, Close> {
    let mut out = Batch::default();
    match outbox.drain(&mut out) {
        Drained::Messages => Ok(out),
        Drained::Close(close) => Err(close),
    }
}

/// Issue 2: a publish to 1,000 subscribers serializes once. Every subscriber's
/// queued message points at the very same buffer.
#[test]
fn fanout_shares_one_buffer() {
    let hub = Hub::default();
    let channel = Channel::parse("org:acme").unwrap();
    let outboxes: Vec<Arc<Outbox>> = (0..1000)
        .map(|i| Arc::new(Outbox::new(Arc::from(format!("u{i}")), 1 << 20)))
        .collect();
    for outbox in &outboxes {
        hub.subscribe(&channel, outbox.clone(), SOLE);
    }
    let msg = message(1, 300);
    let delivery = hub.deliver(channel.name(), &msg);
    assert_eq!(
        delivery,
        Delivery {
            queued: 1000,
            slow: 0
        }
    );
    for outbox in &outboxes {
        let got = drain(outbox).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].bytes.as_ptr(), msg.bytes.as_ptr(), "bytes were copied");
    }
}

#[test]
fn overflow_closes_only_the_slow_outbox() {
    let hub = Hub::default();
    let channel = Channel::parse("org:acme").unwrap();
    let slow = Arc::new(Outbox::new(Arc::from("slow"), 1000));
    let fast = Arc::new(Outbox::new(Arc::from("fast"), 1000));
    hub.subscribe(&channel, slow.clone(), SOLE);
    hub.subscribe(&channel, fast.clone(), SOLE);
    let mut fast_got = Vec::new();
    let mut slow_seen = 0;
    for offset in 1..=10 {
        let delivery = hub.deliver(channel.name(), &message(offset, 300));
        slow_seen += delivery.slow;
        fast_got.extend(drain(&fast).unwrap());
    }
    assert_eq!(slow_seen, 1, "the slow outbox overflows once and is dropped");
    assert_eq!(drain(&slow).unwrap_err().code, CloseCode::SlowConsumer);
    let offsets: Vec<u64> = fast_got.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
    assert!(hub.has_subscribers(channel.name()));
    assert_eq!(hub.subscription_count(), 1);
}

#[test]
fn a_single_large_message_is_accepted_into_an_empty_outbox() {
    let outbox = Outbox::new(Arc::from("u"), 10);
    assert_eq!(outbox.push(SOLE, &message(1, 50)), Ok(()));
    assert_eq!(outbox.push(SOLE, &message(2, 1)), Err(Overflow));
}

#[test]
fn disconnect_user_targets_only_that_user() {
    let hub = Hub::default();
    let channel = Channel::parse("org:acme").unwrap();
    let a1 = Arc::new(Outbox::new(Arc::from("a"), 100));
    let a2 = Arc::new(Outbox::new(Arc::from("a"), 100));
    let b = Arc::new(Outbox::new(Arc::from("b"), 100));
    for o in [&a1, &a2, &b] {
        hub.subscribe(&channel, (*o).clone(), SOLE);
    }
    let n = hub.disconnect_user(&channel, "a", &CloseCode::Forbidden.into());
    assert_eq!(n, 2);
    assert_eq!(drain(&a1).unwrap_err().code, CloseCode::Forbidden);
    assert_eq!(drain(&a2).unwrap_err().code, CloseCode::Forbidden);
    assert!(drain(&b).unwrap().is_empty());
    assert!(!hub.unsubscribe(&channel, &a1, SOLE));
    assert!(!hub.unsubscribe(&channel, &a2, SOLE));
    assert!(hub.unsubscribe(&channel, &b, SOLE));
    assert!(!hub.has_subscribers(channel.name()));
}

/// Issue 17: one outbox in several channels. Each message is queued with the
/// subscription it was delivered for, and a membership removal ends only that user's
/// subscription to that channel, not the socket.
#[test]
fn one_outbox_serves_several_subscriptions() {
    let hub = Hub::default();
    let org = Channel::parse("org:acme").unwrap();
    let notes = Channel::parse("notifications:a").unwrap();
    let outbox = Arc::new(Outbox::new(Arc::from("a"), 1 << 20));
    assert!(hub.subscribe(&org, outbox.clone(), 1));
    assert!(hub.subscribe(&notes, outbox.clone(), 2));
    hub.deliver(org.name(), &message(1, 10));
    hub.deliver(notes.name(), &message(1, 10));
    let batch = drain_batch(&outbox).unwrap();
    let subs: Vec<SubscriptionId> = batch.messages.iter().map(|(sub, _)| *sub).collect();
    assert_eq!(subs, [1, 2]);
    assert_eq!(hub.subscription_count(), 2);

    assert_eq!(hub.disconnect_user(&org, "a", &CloseCode::Forbidden.into()), 1);
    hub.deliver(notes.name(), &message(2, 10));
    let batch = drain_batch(&outbox).expect("the socket stays open");
    assert_eq!(batch.ended.len(), 1);
    assert_eq!(batch.ended[0].0, 1);
    assert_eq!(batch.ended[0].1.code, CloseCode::Forbidden);
    assert_eq!(batch.messages.len(), 1);
    assert!(hub.unsubscribe(&org, &outbox, 1));
    assert!(!hub.has_subscribers(org.name()));
    // Unsubscribing another subscription id of the same outbox leaves this one.
    assert!(!hub.unsubscribe(&notes, &outbox, 1));
    assert!(hub.unsubscribe(&notes, &outbox, 2));
}
