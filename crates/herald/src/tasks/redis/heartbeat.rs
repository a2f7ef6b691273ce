//! The heartbeat: while this node runs tasks, it renews its claims on their entries
//! (so they do not look idle to other workers) and passes on cancels asked elsewhere.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sync::lock;
use crate::tasks::redis::{number, RedisQueue, GROUP, QUEUE_KEY, TASK_PREFIX};
use crate::tasks::Unavailable;

impl RedisQueue {
    /// Renews this node's claims on the entries it runs and passes on cancels, until
    /// `stop` (after the drain) and no task is left.
    pub(super) async fn renew_claims(self: Arc<Self>, stop: CancellationToken) {
        // When the last renewal that succeeded was sent: the claims are this node's
        // until `lease` after it, however long the answer took.
        let mut last_renewed = Instant::now();
        let mut tick = tokio::time::interval(self.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let running: Vec<(String, String, CancellationToken, CancellationToken)> = lock(&self.running)
                .iter()
                .map(|(task_id, r)| {
                    (
                        task_id.clone(),
                        r.entry.clone(),
                        r.cancel.clone(),
                        r.abandon.clone(),
                    )
                })
                .collect();
            if running.is_empty() {
                last_renewed = Instant::now();
                *lock(&self.lease_until) = last_renewed + self.timing.lease;
                continue;
            }
            let mut args = vec![GROUP.to_owned(), self.node_id.clone(), TASK_PREFIX.to_owned()];
            for (task_id, entry, _, _) in &running {
                args.push(entry.clone());
                args.push(task_id.clone());
            }
            let sent_at = Instant::now();
            let deadline = last_renewed + self.timing.lease;
            let renewed = tokio::time::timeout_at(
                deadline,
                self.eval(&self.scripts.heartbeat, vec![QUEUE_KEY.to_owned()], args),
            )
            .await
            .unwrap_or_else(|_| Err(Unavailable("Redis did not answer within the lease".to_owned())));
            match renewed {
                Ok(codes) => {
                    last_renewed = sent_at;
                    *lock(&self.lease_until) = sent_at + self.timing.lease;
                    for ((task_id, _, cancel, abandon), code) in running.iter().zip(codes.into_array()) {
                        match number(Some(&code)) {
                            0 => {
                                tracing::warn!(
                                    task_id = task_id.as_str(),
                                    "another worker took this task over"
                                );
                                abandon.cancel();
                            }
                            2 => cancel.cancel(),
                            // 1: still this node's; 3: this node ended it, sent its
                            // final status and acknowledged it; the run is stopping.
                            _ => {}
                        }
                    }
                }
                Err(err) if Instant::now() >= deadline => {
                    tracing::warn!(
                        error = %err,
                        tasks = running.len(),
                        "cannot renew task claims in Redis; stopping those tasks so another worker can take them"
                    );
                    for (_, _, _, abandon) in &running {
                        abandon.cancel();
                    }
                }
                Err(err) => tracing::debug!(error = %err, "renewing task claims failed; retrying"),
            }
        }
    }
}
