//! Unit tests for the Redis subscriber's per-channel bookkeeping: which pub/sub
//! messages are delivered, dropped as late, or reveal offsets handed out again.

use super::*;

#[test]
fn a_channel_stream_delivers_in_order_and_finds_reused_offsets() {
    let mut listening = Listening::default();
    assert_eq!(listening.judge("e1", 1).0, Verdict::Deliver);
    assert_eq!(listening.judge("e1", 2).0, Verdict::Deliver);
    // A gap is for the sessions to fill; it is still delivered.
    assert_eq!(listening.judge("e1", 5).0, Verdict::Deliver);
    // The same epoch going back: Redis lost writes. Nothing more of that epoch is
    // delivered, not even offsets beyond the highest seen.
    assert_eq!(listening.judge("e1", 5).0, Verdict::Reused);
    assert_eq!(listening.judge("e1", 3).0, Verdict::Stale);
    assert_eq!(listening.judge("e1", 6).0, Verdict::Stale);
}

#[test]
fn a_new_epoch_is_delivered_and_the_old_one_is_then_late() {
    let mut listening = Listening::default();
    listening.judge("e1", 7);
    let (verdict, epoch) = listening.judge("e2", 1);
    assert_eq!(verdict, Verdict::Deliver);
    assert_eq!(&*epoch, "e2");
    assert_eq!(listening.judge("e1", 8).0, Verdict::Stale);
    assert_eq!(listening.judge("e2", 2).0, Verdict::Deliver);
}

#[test]
fn noted_positions_raise_what_was_seen_but_not_the_stream() {
    let mut listening = Listening::default();
    listening.judge("e1", 3);
    // A read or publish on this node saw offset 9; pub/sub messages 4..9 may still be
    // on their way and are not reused offsets.
    listening.note("e1", 9);
    assert_eq!(listening.seen.as_ref().map(|(_, max)| *max), Some(9));
    assert_eq!(listening.judge("e1", 4).0, Verdict::Deliver);
}

#[test]
fn interned_epochs_are_shared() {
    let mut listening = Listening::default();
    let (_, first) = listening.judge("e1", 1);
    let (_, second) = listening.judge("e1", 2);
    assert!(
        Arc::ptr_eq(&first, &second),
        "one allocation per epoch, not per message"
    );
}

#[test]
fn a_channel_remembers_a_few_left_epochs() {
    let mut listening = Listening::default();
    for n in 0..10 {
        listening.judge(&format!("e{n}"), 1);
    }
    assert_eq!(listening.retired.len(), RETIRED_EPOCHS);
    assert_eq!(listening.judge("e8", 2).0, Verdict::Stale);
}

#[test]
fn cluster_redirections_name_their_server() {
    use fred::types::config::Server;
    assert_eq!(
        super::super::shards::redirection("MOVED 2119 127.0.0.1:46139"),
        Some((false, Server::new("127.0.0.1", 46139)))
    );
    assert_eq!(
        super::super::shards::redirection("Cluster Error: ASK 7 10.0.0.1:7000"),
        Some((true, Server::new("10.0.0.1", 7000)))
    );
    assert_eq!(
        super::super::shards::redirection("NOSCRIPT No matching script"),
        None
    );
    assert_eq!(super::super::shards::redirection("MOVED 1 nohostport"), None);
}

#[test]
fn the_shard_subscription_count_is_read_from_a_client_list_line() {
    use super::super::shards::ssub_of;
    let line = "id=7 addr=127.0.0.1:5000 laddr=127.0.0.1:7000 fd=9 name= age=3 idle=0 flags=P db=0 sub=0 psub=0 ssub=12 multi=-1 qbuf=0\n";
    assert_eq!(ssub_of(line), Some(12));
    // Redis before 7.0.3 has no `ssub`: unknown, never taken for zero.
    assert_eq!(ssub_of("id=7 addr=127.0.0.1:5000 sub=0 psub=0 multi=-1"), None);
}
