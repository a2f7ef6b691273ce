//! Unit tests of `Idempotency-Key` parsing and the record states, on the memory backend.

use std::time::Duration;

use super::*;

fn channels(names: &[&str]) -> Vec<Channel> {
    names.iter().map(|name| Channel::parse(name).unwrap()).collect()
}

fn key(text: &str) -> Key {
    Key::parse(text.as_bytes()).unwrap()
}

fn answer(body: &str) -> Answer {
    Answer {
        status: 202,
        body: body.to_owned(),
    }
}

async fn publish_ticket(store: &Idempotency, on: &[Channel], key: &Key) -> Ticket {
    match store.claim(on, key, 1).await.unwrap() {
        Claim::Publish(ticket) => ticket,
        Claim::Replay(answer) => panic!("expected to publish, got a replay of {answer:?}"),
    }
}

#[test]
fn keys_are_1_to_128_characters_counted_as_unicode_scalar_values() {
    assert!(Key::parse(b"").is_err());
    assert!(Key::parse("a".repeat(128).as_bytes()).is_ok());
    assert!(Key::parse("a".repeat(129).as_bytes()).is_err());
    // 128 characters of 3 bytes each: 384 bytes, still 128 characters.
    assert!(Key::parse("€".repeat(128).as_bytes()).is_ok());
    assert!(Key::parse("€".repeat(129).as_bytes()).is_err());
    assert!(Key::parse(&[0xff, 0xfe]).is_err());
}

#[test]
fn a_record_is_per_key_and_per_channel_set_in_the_first_channels_slot() {
    let alice = channels(&["notifications:alice"]);
    let bob = channels(&["notifications:bob"]);
    let both = channels(&["notifications:alice", "notifications:bob"]);
    let k = key("k1");
    assert_ne!(storage_key(&alice, &k), storage_key(&bob, &k));
    assert_ne!(storage_key(&alice, &k), storage_key(&both, &k));
    assert_ne!(storage_key(&alice, &k), storage_key(&alice, &key("k2")));
    assert!(storage_key(&both, &k).starts_with("herald:{notifications:alice}:idem:"));
}

#[tokio::test]
async fn an_answered_key_is_replayed() {
    let store = Idempotency::memory(Duration::from_secs(60));
    let on = channels(&["org:acme"]);
    let k = key("once");
    let ticket = publish_ticket(&store, &on, &k).await;
    store.answer(ticket, answer("{\"offset\":1}")).await;
    match store.claim(&on, &k, 1).await.unwrap() {
        Claim::Replay(replayed) => assert_eq!(replayed, answer("{\"offset\":1}")),
        Claim::Publish(_) => panic!("a repeat must not publish"),
    }
    // Another channel, same key: another call.
    let other = channels(&["org:other"]);
    assert!(matches!(
        store.claim(&other, &k, 1).await.unwrap(),
        Claim::Publish(_)
    ));
}

#[tokio::test]
async fn a_repeat_waits_for_the_owner_and_gets_its_answer() {
    let store = std::sync::Arc::new(Idempotency::memory(Duration::from_secs(60)));
    let on = channels(&["org:acme"]);
    let k = key("race");
    let ticket = publish_ticket(&store, &on, &k).await;
    let repeat = tokio::spawn({
        let store = store.clone();
        let on = on.clone();
        let k = k.clone();
        async move { store.claim(&on, &k, 1).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !repeat.is_finished(),
        "the repeat waits while the owner publishes"
    );
    store.answer(ticket, answer("{}")).await;
    match repeat.await.unwrap().unwrap() {
        Claim::Replay(replayed) => assert_eq!(replayed, answer("{}")),
        Claim::Publish(_) => panic!("two requests published under one key"),
    }
}

#[tokio::test]
async fn a_release_with_nothing_published_frees_the_key_and_progress_is_kept() {
    let store = Idempotency::memory(Duration::from_secs(60));
    let on = channels(&["org:a", "org:b"]);
    let k = key("batch");
    let ticket = publish_ticket(&store, &on, &k).await;
    store.release(ticket, Vec::new(), None).await;
    let ticket = publish_ticket(&store, &on, &k).await;
    assert!(ticket.done.is_empty() && ticket.unconfirmed.is_none());
    // The first item went out, the second's outcome is unknown.
    let first = serde_json::json!({"id": "m1", "channel": "org:a", "offset": 1});
    let sent = Unconfirmed {
        channel: "org:b".to_owned(),
        id: Some("m2".to_owned()),
    };
    store
        .release(ticket, vec![first.clone()], Some(sent.clone()))
        .await;
    let ticket = publish_ticket(&store, &on, &k).await;
    assert_eq!(ticket.done, vec![first]);
    assert_eq!(ticket.unconfirmed, Some(sent));
}

#[tokio::test]
async fn an_owner_past_its_deadline_makes_the_outcome_unknown() {
    let store = Idempotency::memory(Duration::from_secs(60));
    let on = channels(&["org:acme"]);
    let k = key("gone");
    let storage = storage_key(&on, &k);
    let record = Record {
        owner: Some(Owner {
            token: "dead".to_owned(),
            until_ms: unix_ms() - 1,
        }),
        ..Record::default()
    };
    store
        .cas(&storage, None, Some(&record.encode()))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        store.claim(&on, &k, 1).await,
        Err(ClaimError::Unknown(_))
    ));
}
