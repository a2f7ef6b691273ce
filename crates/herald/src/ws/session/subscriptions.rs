//! `/ws/` subscriptions: joining and leaving a channel, who may read it, and the
//! `subscribe` / `unsubscribe` messages.

use super::*;

/// Adds `outbox` to `channel` on this node, and the node to the channel in the broker
/// when it is the channel's first socket here: a node listens once per channel, however
/// many sockets and subscriptions it has on it.
pub(super) async fn join(state: &AppState, channel: &Channel, outbox: &Arc<Outbox>, sub: SubscriptionId) {
    if state.hub.subscribe(channel, outbox.clone(), sub) {
        if let Err(err) = state.broker.subscribe(channel).await {
            tracing::warn!(%channel, error = %err, "broker subscribe failed");
        }
    }
}

/// Whether `identity` may read `channel`: their own notifications and frames, and the
/// orgs they belong to.
pub(super) async fn may_read(state: &AppState, identity: &Identity, channel: &Channel) -> bool {
    match channel.kind() {
        ChannelKind::Notifications | ChannelKind::Frames => channel.id() == identity.user_id.as_str(),
        ChannelKind::Org => state.membership.is_member(channel.id(), identity).await,
    }
}

/// Undoes [`join`].
pub(super) async fn leave(state: &AppState, channel: &Channel, outbox: &Arc<Outbox>, sub: SubscriptionId) {
    if state.hub.unsubscribe(channel, outbox, sub) {
        state.broker.unsubscribe(channel).await;
    }
}

/// Why a subscription to `channel` was refused with 4003.
pub(super) fn forbidden_reason(channel: &Channel) -> &'static str {
    match channel.kind() {
        ChannelKind::Org => "not a member of this organization",
        ChannelKind::Notifications | ChannelKind::Frames => "this channel belongs to another user",
    }
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// `/ws/`: subscribes to a channel the user may read, answering `subscribed` (then
    /// the replay and `recovered` with `since`), or `subscribe_error` with the socket
    /// left open.
    pub(super) async fn subscribe(&mut self, request: Subscribe) -> Result<(), Exit> {
        let refuse = |code: CloseCode, message: &str| {
            let error = match code {
                CloseCode::Forbidden => "forbidden",
                CloseCode::TooManyRequests => "too_many_subscriptions",
                _ => "bad_request",
            };
            protocol::subscribe_error(&request.channel, &request.id, code.code(), error, message)
        };
        let channel = match request.channel.as_str().map(Channel::parse) {
            Some(Ok(channel)) => channel,
            Some(Err(err)) => return self.queue_text(refuse(CloseCode::BadRequest, &err.to_string())),
            None => {
                return self.queue_text(refuse(
                    CloseCode::BadRequest,
                    "channel must be a channel name such as org:acme",
                ))
            }
        };
        let resume = match request.resume {
            Ok(resume) => resume,
            Err(reason) => return self.queue_text(refuse(CloseCode::BadRequest, reason)),
        };
        if self.cursors.iter().any(|cursor| cursor.channel == channel) {
            return self.queue_text(refuse(
                CloseCode::BadRequest,
                "already subscribed to this channel on this socket",
            ));
        }
        let max = self.state.config.max_subscriptions_per_connection;
        if self.cursors.len() >= max as usize {
            crate::limits::refusal_log(
                "subscriptions_per_connection",
                self.plan.ip,
                "too many subscriptions on one socket",
            );
            return self.queue_text(refuse(
                CloseCode::TooManyRequests,
                &format!("at most {max} channels per socket (HERALD_MAX_SUBSCRIPTIONS_PER_CONNECTION)"),
            ));
        }
        let revocations = self.state.hub.revocations();
        if !may_read(self.state, &self.plan.identity, &channel).await {
            crate::limits::refusal_log(
                "subscribe_forbidden",
                self.plan.ip,
                "subscription refused: another user's channel, or not a member of the org",
            );
            return self.queue_text(refuse(CloseCode::Forbidden, forbidden_reason(&channel)));
        }
        let sub = self.next_sub;
        self.next_sub = self.next_sub.checked_add(1).unwrap_or(SOLE + 1);
        join(self.state, &channel, &self.outbox, sub).await;
        // A removal that ran between the check and the join found no subscription to
        // end: check again (as `run` does for a single-channel socket).
        if channel.kind() == ChannelKind::Org
            && self.state.hub.revocations() != revocations
            && !may_read(self.state, &self.plan.identity, &channel).await
        {
            leave(self.state, &channel, &self.outbox, sub).await;
            return self.queue_text(refuse(CloseCode::Forbidden, forbidden_reason(&channel)));
        }
        let position = match self.state.broker.position(&channel).await {
            Ok(position) => position,
            Err(err) => {
                tracing::warn!(%channel, error = %err, "subscribe: broker unavailable");
                leave(self.state, &channel, &self.outbox, sub).await;
                return Err(Exit::Close(Close::new(
                    CloseCode::GoingAway,
                    "broker unavailable",
                )));
            }
        };
        // Read state (SPEC §12) is not kept yet: `read_offset` is 0.
        let text = protocol::subscribed(channel.name(), &request.id, &position.epoch, position.offset, 0);
        self.cursors.push(Cursor::new(channel, sub, Some(&position)));
        self.queue_text(text)?;
        match resume {
            Some(resume) => self.replay(self.cursors.len() - 1, &resume, &position).await,
            None => Ok(()),
        }
    }

    /// `/ws/`: leaves `channel` if subscribed (an unknown one is already left).
    pub(super) async fn unsubscribe(&mut self, channel: &str) {
        if let Some(idx) = self
            .cursors
            .iter()
            .position(|cursor| cursor.channel.name() == channel)
        {
            let cursor = self.cursors.swap_remove(idx);
            leave(self.state, &cursor.channel, &self.outbox, cursor.sub).await;
        }
    }

    /// Ends subscription `idx` from the server's side (membership lost): leaves the
    /// channel and tells the client `unsubscribed` with `close`'s code and reason. The
    /// socket stays open.
    pub(super) async fn end_subscription(&mut self, idx: usize, close: &Close) -> Result<(), Exit> {
        let cursor = self.cursors.swap_remove(idx);
        leave(self.state, &cursor.channel, &self.outbox, cursor.sub).await;
        tracing::info!(channel = %cursor.channel, user_id = %self.plan.identity.user_id,
            code = close.code.code(), "subscription ended");
        self.queue_text(protocol::subscription_ended(
            cursor.channel.name(),
            close.code.code(),
            &close.reason,
        ))
    }
}
