//! `/ws/` subscriptions: joining and leaving a channel, who may read it, and the
//! `subscribe` / `unsubscribe` messages; presence and read positions of a channel.

use super::*;

/// Adds `outbox` to `channel` on this node, and the node to the channel in the broker
/// when it is the channel's first socket here: a node listens once per channel, however
/// many sockets and subscriptions it has on it.
pub(super) async fn join(state: &AppState, channel: &Channel, outbox: &Arc<Outbox>, sub: SubscriptionId) {
    if channel.kind() == ChannelKind::Org {
        state.presence.enter(channel.id(), outbox.user_id());
    }
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
    if channel.kind() == ChannelKind::Org {
        state.presence.unwatch(channel.id(), outbox, sub);
        state.presence.exit(channel.id(), outbox.user_id());
    }
    if state.hub.unsubscribe(channel, outbox, sub) {
        state.broker.unsubscribe(channel).await;
    }
}

/// The user's read position in `channel` for the client's `epoch`: 0 when none is
/// kept, when it is of another epoch, or when the database does not answer (logged).
pub(super) async fn read_offset(state: &AppState, user_id: &str, channel: &Channel, epoch: &str) -> u64 {
    match state.store.read_position(user_id, channel.name()).await {
        Ok(Some(read)) if read.epoch == epoch => read.offset,
        Ok(_) => 0,
        Err(err) => {
            tracing::warn!(%channel, error = %err, "reading the read position failed; answering 0");
            0
        }
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
        let read_offset = read_offset(
            self.state,
            self.plan.identity.user_id.as_str(),
            &channel,
            &position.epoch,
        )
        .await;
        let text = protocol::subscribed(
            channel.name(),
            &request.id,
            &position.epoch,
            position.offset,
            read_offset,
        );
        let watch = request.presence && channel.kind() == ChannelKind::Org;
        self.cursors.push(Cursor::new(channel, sub, Some(&position)));
        self.queue_text(text)?;
        if let Some(resume) = resume {
            self.replay(self.cursors.len() - 1, &resume, &position).await?;
        }
        if watch {
            self.watch_presence(self.cursors.len() - 1).await?;
        }
        Ok(())
    }

    /// Makes channel `idx` (an org) a presence watcher and sends its `presence` message;
    /// when presence cannot be read, an `error` message instead (the subscription stays).
    pub(super) async fn watch_presence(&mut self, idx: usize) -> Result<(), Exit> {
        let cursor = &self.cursors[idx];
        let org = cursor.channel.id().to_owned();
        let sub = cursor.sub;
        // Boxed: presence may read Redis, and its 8 KB future would otherwise be part
        // of every `start` (boxed, and so copied into fresh memory at every handshake)
        // and of every `subscribe` message's future (issue 19).
        match Box::pin(self.state.presence.watch(&org, &self.outbox, sub)).await {
            Ok(users) => self.queue_text(crate::presence::presence_message(&org, &users)),
            Err(err) => {
                tracing::warn!(org_id = %org, error = %err, "presence unavailable");
                self.queue_text(protocol::error(
                    "presence_unavailable",
                    "presence cannot be read now (Redis is unreachable); subscribe again to retry",
                ))
            }
        }
    }

    /// `{"type":"read","channel","offset"}`: keeps the user's read position (the highest
    /// offset of the channel's epoch) and tells their other sockets on the channel, on
    /// every node. A malformed or refused read is answered with an `error` message; the
    /// socket stays open. A read changes nothing when it is not past the kept position.
    pub(super) async fn read(&mut self, request: protocol::Read) -> Result<(), Exit> {
        let (channel, offset) = match (request.channel, request.offset) {
            (Ok(channel), Ok(offset)) => (channel, offset),
            (Err(reason), _) | (_, Err(reason)) => {
                return self.queue_text(protocol::error("invalid_read", reason));
            }
        };
        let Some(idx) = self.cursors.iter().position(|c| c.channel.name() == channel) else {
            return self.queue_text(protocol::error(
                "not_subscribed",
                "read is for a channel this socket receives; subscribe to it first",
            ));
        };
        let cursor = &self.cursors[idx];
        let epoch = cursor.epoch.clone();
        if offset > cursor.last_offset {
            // Beyond what this socket was sent: it may still be in the channel (on its
            // way here, or seen on another socket). Ask where the channel stands.
            let beyond = match self.state.broker.position(&cursor.channel).await {
                Ok(position) => *position.epoch != *epoch || offset > position.offset,
                Err(_) => true,
            };
            if beyond {
                return self.queue_text(protocol::error(
                    "offset_out_of_range",
                    "offset is beyond the channel's last offset in this socket's epoch",
                ));
            }
        }
        let user_id = self.plan.identity.user_id.as_str();
        match self
            .state
            .store
            .mark_read(user_id, &channel, &epoch, offset)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(err) => {
                tracing::warn!(channel, error = %err, "keeping a read position failed");
                return self.queue_text(protocol::error(
                    "unavailable",
                    "the read position could not be saved; send it again shortly",
                ));
            }
        }
        let text = crate::control::read_message(&channel, offset);
        self.state
            .hub
            .notify_user(&channel, user_id, Some(&self.outbox), &text);
        let action = crate::control::Action::Read {
            channel,
            user_id: user_id.to_owned(),
            offset,
        };
        if let Err(err) = self.state.control.broadcast(action).await {
            tracing::warn!(error = %err, "read position not told to the other nodes");
        }
        Ok(())
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
