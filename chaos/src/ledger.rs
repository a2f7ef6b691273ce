//! The accounting: what the publisher was told (`202`s) against what each client
//! handed to its app.
//!
//! A client subscribed to a channel should get every acknowledged message of that
//! channel whose publish started after the client's first welcome. One it never got is
//! **told** when the client received a `recovered:false` after the publish started and
//! before it received any later message of the channel (its position was declared lost
//! before it moved past the message); otherwise it is **lost** (silently). Duplicated:
//! a content id handed to the app twice. Out of order: a message whose sequence number is
//! below one already handed over. Offsets reused: a channel + epoch + offset that carried
//! two different message ids on the wire, over all clients.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::ClientRecord;
use crate::publish::Publish;

/// The message columns of a row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    pub published: u64,
    pub acknowledged: u64,
    /// Distinct messages handed to apps (client × message).
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Of those, messages that never got a 202 (stored after a timeout).
    #[serde(default)]
    pub out_of_order_unacknowledged: u64,
    /// What those publishes were answered (`503`, `timeout`, …), with counts.
    #[serde(default)]
    pub out_of_order_answers: BTreeMap<String, u64>,
    pub offsets_reused: u64,
    /// `recovered:false` notices received.
    pub told: u64,
    /// Messages missing but covered by a notice.
    pub told_messages: u64,
    /// Clients with at least one silently lost message.
    pub clients_with_loss: u64,
    pub clients: u64,
    /// Messages whose epoch changed under a client with no notice first.
    pub untold_epoch_switches: u64,
    /// Offsets skipped inside an epoch with no notice.
    pub offset_gaps: u64,
    pub socket_kills: u64,
    /// A few clients with a silent loss, described (to find the cause).
    #[serde(default)]
    pub loss_examples: Vec<String>,
}

pub fn tally(publishes: &[Publish], clients: &[ClientRecord]) -> Tally {
    let mut tally = Tally {
        published: publishes.len() as u64,
        acknowledged: publishes.iter().filter(|p| p.acked_at.is_some()).count() as u64,
        clients: clients.len() as u64,
        ..Tally::default()
    };
    let mut by_channel: HashMap<&str, Vec<&Publish>> = HashMap::new();
    for publish in publishes.iter().filter(|p| p.acked_at.is_some()) {
        by_channel
            .entry(publish.channel.as_str())
            .or_default()
            .push(publish);
    }
    let unacked: HashMap<&str, &Publish> = publishes
        .iter()
        .filter(|p| p.acked_at.is_none())
        .map(|p| (p.cid.as_str(), p))
        .collect();
    let mut wire: HashMap<(&str, &str, u64), HashSet<&str>> = HashMap::new();
    for client in clients {
        tally.told += client.notices.len() as u64;
        tally.untold_epoch_switches += client.untold_epoch_switches;
        tally.offset_gaps += client.offset_gaps;
        tally.socket_kills += client.kills;
        for (epoch, offset, id) in &client.wire {
            wire.entry((client.channel.as_str(), epoch.as_str(), *offset))
                .or_default()
                .insert(id.as_str());
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let mut max_seq = 0;
        for delivery in &client.deliveries {
            let Some(cid) = delivery.cid.as_deref() else {
                continue;
            };
            if !seen.insert(cid) {
                tally.duplicated += 1;
                continue;
            }
            let seq = delivery.seq.unwrap_or(0);
            if seq < max_seq {
                tally.out_of_order += 1;
                if let Some(publish) = unacked.get(cid) {
                    tally.out_of_order_unacknowledged += 1;
                    *tally
                        .out_of_order_answers
                        .entry(publish.attempts.join("+"))
                        .or_default() += 1;
                }
            }
            max_seq = max_seq.max(seq);
        }
        tally.delivered += seen.len() as u64;
        let Some(first_welcome) = client.first_welcome else {
            continue;
        };
        let mut lost_here = 0;
        for publish in by_channel.get(client.channel.as_str()).into_iter().flatten() {
            if publish.first_sent <= first_welcome || seen.contains(publish.cid.as_str()) {
                continue;
            }
            if client.gave_up.is_some_and(|(at, _)| at <= publish.first_sent) {
                continue;
            }
            if told(client, publish.first_sent, publish.seq) {
                tally.told_messages += 1;
            } else {
                lost_here += 1;
            }
        }
        tally.lost += lost_here;
        if lost_here > 0 {
            tally.clients_with_loss += 1;
            if tally.loss_examples.len() < 3 {
                tally
                    .loss_examples
                    .push(describe(client, lost_here, first_welcome));
            }
        }
    }
    tally.offsets_reused = wire.values().map(|ids| ids.len().saturating_sub(1) as u64).sum();
    tally
}

/// One client's story in a line: what it lost, its sockets, its last message.
fn describe(client: &ClientRecord, lost: u64, since: Instant) -> String {
    let secs = |at: Instant| at.saturating_duration_since(since).as_secs_f64();
    let failed: Vec<&str> = client
        .handshakes
        .iter()
        .filter(|h| !h.ok)
        .filter_map(|h| h.failure.as_deref())
        .collect();
    format!(
        "{} on {}: {lost} lost; {} handshakes ({} failed{}); closes by the server: {:?}; last message at {:.1}s, last handshake at {:.1}s after its first welcome (node {}); {} frames dropped as already seen; socket open at the end: {}",
        client.spec_user,
        client.channel,
        client.handshakes.len(),
        failed.len(),
        failed.last().map(|f| format!(", last: {f}")).unwrap_or_default(),
        client.closes.iter().map(|(_, code)| *code).collect::<Vec<_>>(),
        client.deliveries.last().map_or(0.0, |d| secs(d.at)),
        client.handshakes.last().map_or(0.0, |h| secs(h.at)),
        client.handshakes.last().map_or("-", |h| h.node.as_str()),
        client.dropped_as_seen,
        client.open_at_end,
    )
}

/// Whether a notice reached `client` after `sent` and before any later message.
fn told(client: &ClientRecord, sent: Instant, seq: u64) -> bool {
    let Some(notice) = client.notices.iter().find(|at| **at >= sent) else {
        return false;
    };
    !client
        .deliveries
        .iter()
        .any(|d| d.at < *notice && d.at >= sent && d.seq.is_some_and(|s| s > seq))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::Delivery;

    fn publish(t0: Instant, seq: u64, acked: bool) -> Publish {
        let sent = t0 + Duration::from_millis(100 * seq);
        Publish {
            channel: "org:o".to_owned(),
            cid: format!("o-{seq}"),
            seq,
            first_sent: sent,
            acked_at: acked.then(|| sent + Duration::from_millis(5)),
            id: Some(format!("id{seq}")),
            offset: Some(seq),
            attempts: vec![if acked { "202" } else { "503" }.to_owned()],
            outcome_unknown: 0,
            replayed: false,
        }
    }

    fn delivery(t0: Instant, seq: u64) -> Delivery {
        Delivery {
            at: t0 + Duration::from_millis(100 * seq + 10),
            cid: Some(format!("o-{seq}")),
            seq: Some(seq),
            llm: None,
        }
    }

    fn client(t0: Instant, seqs: &[u64]) -> ClientRecord {
        ClientRecord {
            spec_user: "u".to_owned(),
            channel: "org:o".to_owned(),
            first_welcome: Some(t0),
            deliveries: seqs.iter().map(|s| delivery(t0, *s)).collect(),
            wire: seqs
                .iter()
                .map(|s| ("e".to_owned(), *s, format!("id{s}")))
                .collect(),
            notices: Vec::new(),
            handshakes: Vec::new(),
            closes: Vec::new(),
            gave_up: None,
            untold_epoch_switches: 0,
            offset_gaps: 0,
            dropped_as_seen: 0,
            kills: 0,
            open_at_end: true,
        }
    }

    #[test]
    fn a_missing_acknowledged_message_is_lost_unless_a_notice_came_first() {
        let t0 = Instant::now();
        let publishes: Vec<Publish> = (1..=5).map(|s| publish(t0, s, true)).collect();
        // Message 3 never arrives and 4 comes next: a silent gap.
        let silent = client(t0, &[1, 2, 4, 5]);
        let counted = tally(&publishes, &[silent]);
        assert_eq!(
            (counted.lost, counted.told_messages, counted.delivered),
            (1, 0, 4)
        );
        // Told recovered:false after 3 was published and before 4 arrived.
        let mut told = client(t0, &[1, 2, 4, 5]);
        told.notices.push(t0 + Duration::from_millis(350));
        let counted = tally(&publishes, &[told]);
        assert_eq!((counted.lost, counted.told_messages, counted.told), (0, 1, 1));
        // A notice that came only after 4 does not cover 3.
        let mut late = client(t0, &[1, 2, 4, 5]);
        late.notices.push(t0 + Duration::from_millis(450));
        assert_eq!(tally(&publishes, &[late]).lost, 1);
    }

    #[test]
    fn unacknowledged_and_earlier_messages_are_not_expected() {
        let t0 = Instant::now();
        let mut publishes: Vec<Publish> = (1..=3).map(|s| publish(t0, s, true)).collect();
        publishes.push(publish(t0, 4, false));
        // The client's first welcome came after message 1 was published.
        let mut late_joiner = client(t0, &[2, 3]);
        late_joiner.first_welcome = Some(t0 + Duration::from_millis(150));
        let counted = tally(&publishes, &[late_joiner]);
        assert_eq!((counted.published, counted.acknowledged, counted.lost), (4, 3, 0));
    }

    #[test]
    fn duplicates_reordering_and_reused_offsets_are_counted() {
        let t0 = Instant::now();
        let publishes: Vec<Publish> = (1..=3).map(|s| publish(t0, s, true)).collect();
        let mut record = client(t0, &[1, 3, 2, 3]);
        // Another message carried offset 2 of the same epoch on the wire.
        record.wire.push(("e".to_owned(), 2, "other".to_owned()));
        let counted = tally(&publishes, &[record]);
        assert_eq!(
            (
                counted.duplicated,
                counted.out_of_order,
                counted.offsets_reused,
                counted.lost
            ),
            (1, 1, 1, 0)
        );
    }
}
