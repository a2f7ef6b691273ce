//! One socket's life after the handshake: one task, one `select!` loop over every event
//! source, and one place where the socket is closed.
//!
//! A socket receives one channel (the single-channel endpoints) or any number of them
//! (`/ws/`, whose client subscribes and unsubscribes by message). Either way it has one
//! outbox, and one [`Cursor`] per channel: the epoch and last offset its client was
//! told. Forwarding, epoch checks, gap filling and replay are the same code for both;
//! only the welcome and the client messages differ.
//!
//! Writing never blocks reading: published messages are queued into the WebSocket's
//! frame queue in batches, and the same poll that reads client frames also flushes
//! writes. While a batch is being written, new messages wait in the outbox, where its
//! byte bound applies; a client that cannot keep up is closed with 1008.

use std::future::poll_fn;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, Instant};
use tokio_websockets::{CloseCode as WsCloseCode, Message, Payload, WebSocketStream};

use crate::app::AppState;
use crate::auth::{Identity, LEEWAY};
use crate::broker::Position;
use crate::channel::{new_id, unix_to_rfc3339, Channel, ChannelKind, Message as ChannelMessage};
use crate::close::{Close, CloseCode};
use crate::hub::{Batch, Drained, Outbox, SubscriptionId, SOLE};
use crate::limits::{client_message_limiter, protocol_ping_limiter, ConnectionSlot};
use crate::ws::protocol::{self, ClientMessage, Subscribe, Welcome};
use crate::ws::Endpoint;

/// How long closing may take: flushing what is queued, the close frame, and the
/// client's answering close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handshake decided for an accepted socket.
pub struct Plan {
    pub endpoint: Endpoint,
    /// The channel of a single-channel endpoint; `None` on `/ws/`, whose client
    /// subscribes after the welcome.
    pub channel: Option<Channel>,
    pub identity: Identity,
    pub org_id: Option<String>,
    pub resume: Option<Resume>,
    /// [`crate::hub::Hub::revocations`] read before the membership check.
    pub revocations: u64,
    /// The user's connection slot, held for the life of the socket.
    pub slot: ConnectionSlot,
    /// The client's address, for security logs.
    pub ip: IpAddr,
}

/// `?since=<offset>&epoch=<epoch>`: the client's last position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    /// `None` accepts whatever epoch the channel has (`since=0` without an epoch
    /// replays the whole history).
    pub epoch: Option<String>,
}

/// How the loop ended.
enum Exit {
    /// Send this close frame.
    Close(Close),
    /// The WebSocket layer already queued its own close frame (protocol error or a
    /// message over the size limit); flush it.
    Flush,
    /// The client is gone or unresponsive; nothing more can be sent.
    Gone,
}

/// One channel as this socket's client knows it.
struct Cursor {
    channel: Channel,
    /// What the hub queues this channel's messages with in this socket's outbox.
    sub: SubscriptionId,
    /// The channel's epoch as the client knows it: every message forwarded must belong
    /// to it. Set by the welcome (or `subscribed`), changed only by telling the client.
    epoch: Arc<str>,
    /// Epochs this channel has left: their late messages are dropped.
    retired: Vec<Arc<str>>,
    /// Offset, in `epoch`, of the last message of this channel written to the socket.
    last_offset: u64,
}

impl Cursor {
    fn new(channel: Channel, sub: SubscriptionId, position: Option<&Position>) -> Self {
        Self {
            channel,
            sub,
            epoch: Arc::from(position.map_or("", |p| p.epoch.as_str())),
            retired: Vec::new(),
            last_offset: position.map_or(0, |p| p.offset),
        }
    }

    fn retire(&mut self, epoch: Arc<str>) {
        if !self.retired.contains(&epoch) {
            if self.retired.len() == 4 {
                self.retired.remove(0);
            }
            self.retired.push(epoch);
        }
    }
}

struct Session<'a, S> {
    state: &'a AppState,
    ws: WebSocketStream<S>,
    plan: Box<Plan>,
    outbox: Arc<Outbox>,
    /// The channels this socket receives: exactly one on a single-channel endpoint, up
    /// to `HERALD_MAX_SUBSCRIPTIONS_PER_CONNECTION` on `/ws/`.
    cursors: Vec<Cursor>,
    /// The id the next `/ws/` subscription gets (never [`SOLE`], never reused).
    next_sub: SubscriptionId,
    /// True while a batch sits in the WebSocket's frame queue, not yet flushed.
    writing: bool,
    /// Reused batch buffer.
    batch: Batch,
    /// `HERALD_CLIENT_MESSAGES_PER_MINUTE` for this socket.
    limiter: governor::DefaultDirectRateLimiter,
    /// Protocol pings, which do not count as client messages but each queue a pong.
    ping_limiter: governor::DefaultDirectRateLimiter,
}

/// Runs an accepted socket until it closes.
///
/// Every idle socket holds this future for its whole life, so it is kept small (issue
/// 19): the session is built before the future, which holds it once; the state is
/// borrowed and the plan stays boxed; the rare, larger awaits (starting, a client
/// message, filling a gap, closing) are boxed so their futures exist only while they
/// run; and one timer serves every deadline.
pub fn run<'a, S>(
    state: &'a AppState,
    ws: WebSocketStream<S>,
    plan: Box<Plan>,
) -> impl std::future::Future<Output = ()> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
{
    let outbox = Arc::new(Outbox::new(
        Arc::from(plan.identity.user_id.as_str()),
        state.config.outbox_max_bytes,
    ));
    let session = Session {
        state,
        ws,
        plan,
        outbox,
        cursors: Vec::new(),
        next_sub: SOLE + 1,
        writing: false,
        batch: Batch::default(),
        limiter: client_message_limiter(state.config.client_messages_per_minute),
        ping_limiter: protocol_ping_limiter(),
    };
    session.serve()
}

/// Adds `outbox` to `channel` on this node, and the node to the channel in the broker
/// when it is the channel's first socket here: a node listens once per channel, however
/// many sockets and subscriptions it has on it.
async fn join(state: &AppState, channel: &Channel, outbox: &Arc<Outbox>, sub: SubscriptionId) {
    if state.hub.subscribe(channel, outbox.clone(), sub) {
        if let Err(err) = state.broker.subscribe(channel).await {
            tracing::warn!(%channel, error = %err, "broker subscribe failed");
        }
    }
}

/// Whether `identity` may read `channel`: their own notifications and frames, and the
/// orgs they belong to.
async fn may_read(state: &AppState, identity: &Identity, channel: &Channel) -> bool {
    match channel.kind() {
        ChannelKind::Notifications | ChannelKind::Frames => channel.id() == identity.user_id.as_str(),
        ChannelKind::Org => state.membership.is_member(channel.id(), identity).await,
    }
}

/// Undoes [`join`].
async fn leave(state: &AppState, channel: &Channel, outbox: &Arc<Outbox>, sub: SubscriptionId) {
    if state.hub.unsubscribe(channel, outbox, sub) {
        state.broker.unsubscribe(channel).await;
    }
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn serve(mut self) {
        let state = self.state;
        let outbox = self.outbox.clone();
        let endpoint = self.plan.endpoint;
        let opened_at = Instant::now();
        state.metrics.connection_opened(endpoint, self.plan.slot.count);
        if let Some(channel) = self.plan.channel.take() {
            join(state, &channel, &outbox, SOLE).await;
            // A member removed while this socket was being admitted: the removal may
            // have run between the handshake's membership check and the subscription
            // above, and found no socket to close. If any removal ran meanwhile, check
            // again. The rare awaits of a session (this check, a token refresh, a
            // subscribe) are boxed, so their futures (a webhook or JWKS request) do not
            // enlarge every socket's task for its whole life (BENCHMARKS.md, idle
            // memory).
            if endpoint == Endpoint::Events
                && state.hub.revocations() != self.plan.revocations
                && !Box::pin(state.membership.is_member(channel.id(), &self.plan.identity)).await
            {
                outbox.request_close(Close::new(CloseCode::Forbidden, "membership revoked"));
            }
            self.cursors.push(Cursor::new(channel, SOLE, None));
        }
        let exit = match Box::pin(self.start()).await {
            Ok(()) => self.run().await,
            Err(exit) => exit,
        };
        // Leave every channel before the close handshake: nothing more will be written.
        for cursor in &self.cursors {
            leave(state, &cursor.channel, &outbox, cursor.sub).await;
        }
        let code = Box::pin(self.finish(exit)).await;
        drop(self);
        state.metrics.connection_closed(endpoint, opened_at.elapsed());
        tracing::debug!(endpoint = endpoint.label(), code, "session closed");
    }

    fn queue_text(&mut self, text: impl Into<Payload>) -> Result<(), Exit> {
        self.ws
            .start_send_unpin(Message::text(text))
            .map_err(|_| Exit::Gone)?;
        self.writing = true;
        Ok(())
    }

    /// Sends the welcome, then (on resume) the missed messages and the `recovered`
    /// message.
    async fn start(&mut self) -> Result<(), Exit> {
        // A membership revoked while this socket was being admitted: nothing of the
        // channel may be sent.
        if let Some(close) = self.outbox.close_requested() {
            return Err(Exit::Close(close));
        }
        let connection_id = new_id();
        if self.plan.endpoint == Endpoint::Multiplexed {
            let welcome = protocol::multiplexed_welcome(&connection_id, self.plan.identity.user_id.as_str());
            return self.queue_text(welcome);
        }
        let Some(cursor) = self.cursors.first() else {
            return Err(Exit::Close(Close::new(CloseCode::BadRequest, "missing channel")));
        };
        let position = self
            .state
            .broker
            .position(&cursor.channel)
            .await
            .map_err(|_| Exit::Close(Close::new(CloseCode::GoingAway, "broker unavailable")))?;
        let welcome = Welcome {
            connection_id: &connection_id,
            user_id: self.plan.identity.user_id.as_str(),
            channel: cursor.channel.name(),
            org_id: self.plan.org_id.as_deref(),
            epoch: &position.epoch,
            offset: position.offset,
        }
        .to_json();
        self.queue_text(welcome)?;
        let cursor = &mut self.cursors[0];
        cursor.last_offset = position.offset;
        cursor.epoch = Arc::from(position.epoch.as_str());
        match self.plan.resume.take() {
            Some(resume) => self.replay(0, &resume, &position).await,
            None => Ok(()),
        }
    }

    /// Resumes channel `idx` after its welcome or `subscribed`, which told the client
    /// `position`: the messages after `resume.since` from history, then the
    /// `recovered` message (`recovered:false`, nothing replayed, when the epoch changed
    /// or the gap left history).
    async fn replay(&mut self, idx: usize, resume: &Resume, position: &Position) -> Result<(), Exit> {
        let epoch_matches = resume.epoch.as_deref().is_none_or(|e| e == position.epoch);
        let mut missed = 0;
        let mut recovered = false;
        if epoch_matches && resume.since <= position.offset {
            let history = self
                .state
                .broker
                .history(&self.cursors[idx].channel, resume.since, usize::MAX)
                .await
                .map_err(|_| Exit::Close(Close::new(CloseCode::GoingAway, "broker unavailable")))?;
            if let Some(close) = self.outbox.close_requested() {
                return Err(Exit::Close(close));
            }
            if history.complete && history.position.epoch == position.epoch {
                recovered = true;
                for message in history.messages {
                    let cursor = &mut self.cursors[idx];
                    cursor.last_offset = cursor.last_offset.max(message.offset);
                    missed += 1;
                    self.queue_text(message.bytes)?;
                }
            }
        }
        let cursor = &self.cursors[idx];
        self.state
            .metrics
            .delivered(cursor.channel.kind(), missed as u64, None);
        let text = protocol::recovered(
            cursor.channel.name(),
            recovered,
            missed,
            &position.epoch,
            cursor.last_offset,
        );
        self.queue_text(text)
    }

    async fn run(&mut self) -> Exit {
        let state = self.state;
        let ping_interval = state.config.ping_interval;
        let mut last_heard = Instant::now();
        // The socket's deadlines: the next protocol ping, the connection's age (once
        // shutdown starts, the moment to close with 1001) and the token's expiry. One
        // timer, set to the earliest, serves them all: each tokio timer is about 110
        // bytes that every idle socket would hold for its life.
        let mut next_ping = Instant::now() + ping_interval;
        let mut age_at = Instant::now() + jittered(state.config.max_connection_age);
        let mut expiry_at = expiry_instant(self.plan.identity.expires_at);
        let timer = sleep_until(next_ping.min(age_at).min(expiry_at));
        tokio::pin!(timer);
        let cancelled = state.shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut draining = false;

        loop {
            let writing = self.writing;
            let ws = &mut self.ws;
            let io = poll_fn(|cx| {
                if writing {
                    match ws.poll_flush_unpin(cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Io::Flushed),
                        Poll::Ready(Err(_)) => return Poll::Ready(Io::Read(None)),
                        Poll::Pending => {}
                    }
                }
                ws.poll_next_unpin(cx).map(Io::Read)
            });
            tokio::select! {
                io = io => match io {
                    Io::Flushed => {
                        self.writing = false;
                        if let Err(exit) = self.forward_outbox().await {
                            return exit;
                        }
                    }
                    Io::Read(None) => return Exit::Gone,
                    Io::Read(Some(Err(tokio_websockets::Error::Io(_)))) => return Exit::Gone,
                    // The layer queued its own close (1009 for a message over 4 KiB,
                    // 1002/1007 for protocol errors); it only needs flushing.
                    // A message over 4 KiB, also when it arrives in fragments (for
                    // which the layer queues no close frame of its own).
                    Io::Read(Some(Err(tokio_websockets::Error::PayloadTooLong { .. }))) => {
                        return Exit::Close(CloseCode::MessageTooBig.into());
                    }
                    Io::Read(Some(Err(_))) => return Exit::Flush,
                    Io::Read(Some(Ok(frame))) => {
                        last_heard = Instant::now();
                        match Box::pin(self.on_frame(frame)).await {
                            Ok(Some(new_expiry)) => {
                                expiry_at = new_expiry;
                                timer.as_mut().reset(next_ping.min(age_at).min(expiry_at));
                            }
                            Ok(None) => {}
                            Err(exit) => return exit,
                        }
                    }
                },
                // A message or a close request for this socket.
                () = self.outbox.wait() => {
                    if self.writing {
                        if let Some(close) = self.outbox.close_requested() {
                            return Exit::Close(close);
                        }
                    } else if let Err(exit) = self.forward_outbox().await {
                        return exit;
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= expiry_at {
                        return Exit::Close(Close::new(CloseCode::Unauthorized, "token expired"));
                    }
                    if now >= age_at {
                        if draining {
                            return Exit::Close(CloseCode::GoingAway.into());
                        }
                        return Exit::Close(Close::new(CloseCode::Normal, "max connection age"));
                    }
                    if now >= next_ping {
                        if last_heard.elapsed() >= state.config.pong_timeout {
                            tracing::debug!("no pong in time; dropping socket");
                            return Exit::Gone;
                        }
                        if self.ws.start_send_unpin(Message::ping(Payload::from(&b""[..]))).is_err() {
                            return Exit::Gone;
                        }
                        self.writing = true;
                        next_ping = now + ping_interval;
                    }
                    timer.as_mut().reset(next_ping.min(age_at).min(expiry_at));
                }
                // Shutdown: each socket closes at a random moment within the drain
                // window, so clients do not all reconnect at once.
                () = &mut cancelled, if !draining => {
                    let window = state.config.shutdown_drain;
                    let delay = rand::rng().random_range(Duration::ZERO..=window);
                    age_at = age_at.min(Instant::now() + delay);
                    timer.as_mut().reset(next_ping.min(age_at).min(expiry_at));
                    draining = true;
                }
            }
        }
    }

    /// Moves queued messages into the WebSocket's frame queue, skipping any the client
    /// already has and filling a gap from history. Subscriptions ended meanwhile end
    /// first, so nothing of theirs is sent after.
    async fn forward_outbox(&mut self) -> Result<(), Exit> {
        let mut batch = std::mem::take(&mut self.batch);
        if let Drained::Close(close) = self.outbox.drain(&mut batch) {
            return Err(Exit::Close(close));
        }
        let mut result = Ok(());
        for (sub, close) in batch.ended.drain(..) {
            if let Some(idx) = self.cursors.iter().position(|c| c.sub == sub) {
                result = Box::pin(self.end_subscription(idx, &close)).await;
                if result.is_err() {
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.forward(&mut batch.messages).await;
        }
        batch.messages.clear();
        batch.ended.clear();
        self.batch = batch;
        result
    }

    async fn forward(&mut self, batch: &mut Vec<(SubscriptionId, ChannelMessage)>) -> Result<(), Exit> {
        // Counted per channel kind: a `/ws/` batch may hold several.
        let mut n_sent = [0u64; ChannelKind::ALL.len()];
        let mut oldest = None;
        let mut idx = 0;
        for (sub, message) in batch.drain(..) {
            // Consecutive messages are mostly of one channel: search only on a change.
            if self.cursors.get(idx).is_none_or(|cursor| cursor.sub != sub) {
                match self.cursors.iter().position(|cursor| cursor.sub == sub) {
                    Some(found) => idx = found,
                    // Unsubscribed after the message was queued.
                    None => continue,
                }
            }
            if !Arc::ptr_eq(&message.epoch, &self.cursors[idx].epoch) {
                if message.epoch == self.cursors[idx].epoch {
                    // Share the broker's copy, so later messages compare by pointer.
                    self.cursors[idx].epoch = message.epoch.clone();
                } else if !Box::pin(self.switch_epoch(idx, &message)).await? {
                    continue;
                }
            }
            let last_offset = self.cursors[idx].last_offset;
            if message.is_marker() {
                // The channel stands at this offset: send what this socket lacks.
                if message.offset > last_offset {
                    Box::pin(self.fill_gap(idx, message.offset + 1)).await?;
                }
                continue;
            }
            if message.offset <= last_offset {
                continue;
            }
            if message.offset > last_offset + 1 {
                Box::pin(self.fill_gap(idx, message.offset)).await?;
            }
            self.cursors[idx].last_offset = message.offset;
            oldest.get_or_insert(message.published_at);
            n_sent[kind_idx(self.cursors[idx].channel.kind())] += 1;
            self.queue_text(message.bytes)?;
        }
        for (kind, n) in ChannelKind::ALL.into_iter().zip(n_sent) {
            if n > 0 {
                let latency = oldest.take().map(|at: Instant| at.elapsed());
                self.state.metrics.delivered(kind, n, latency);
            }
        }
        Ok(())
    }

    /// A message of channel `idx` from an epoch other than the client's. If the channel
    /// has moved to it (Redis lost the channel's state, or a failover lost writes), the
    /// client is told in band, `recovered:false` with the new epoch and the offset after
    /// which it will receive every message, and the message is then forwarded; a late
    /// message of an epoch the channel has left is dropped. Returns whether to forward
    /// the message.
    ///
    /// Which epoch is current is asked of the broker, not inferred: a message queued
    /// before this socket's welcome may come from the epoch before it.
    async fn switch_epoch(&mut self, idx: usize, message: &ChannelMessage) -> Result<bool, Exit> {
        if self.cursors[idx].retired.contains(&message.epoch) {
            return Ok(false);
        }
        let position = Box::pin(self.state.broker.position(&self.cursors[idx].channel))
            .await
            .map_err(|_| {
                Exit::Close(Close::new(
                    CloseCode::GoingAway,
                    "lost position; resume with since",
                ))
            })?;
        let cursor = &mut self.cursors[idx];
        if *position.epoch == *cursor.epoch {
            cursor.retire(message.epoch.clone());
            return Ok(false);
        }
        let (epoch, offset, forward) = if *position.epoch == *message.epoch {
            let offset = if message.is_marker() {
                message.offset.min(position.offset)
            } else {
                message.offset - 1
            };
            (message.epoch.clone(), offset, true)
        } else {
            // The channel moved on again: start from where it stands now.
            cursor.retire(message.epoch.clone());
            (Arc::from(position.epoch.as_str()), position.offset, false)
        };
        let old = std::mem::replace(&mut cursor.epoch, epoch);
        cursor.retire(old);
        cursor.last_offset = offset;
        tracing::info!(channel = %cursor.channel, offset, "channel epoch changed under a socket: told recovered:false");
        let text = protocol::recovered(cursor.channel.name(), false, 0, &cursor.epoch, offset);
        self.queue_text(text)?;
        Ok(forward)
    }

    /// Sends channel `idx`'s messages between the last one written and `next` from
    /// history. If they have left history, the client must resume (and will learn it
    /// lost messages).
    async fn fill_gap(&mut self, idx: usize, next: u64) -> Result<(), Exit> {
        let lost = || {
            Exit::Close(Close::new(
                CloseCode::GoingAway,
                "lost position; resume with since",
            ))
        };
        let last_offset = self.cursors[idx].last_offset;
        let history = self
            .state
            .broker
            .history(
                &self.cursors[idx].channel,
                last_offset,
                (next - last_offset - 1) as usize,
            )
            .await
            .map_err(|_| lost())?;
        if !history.complete || *history.position.epoch != *self.cursors[idx].epoch {
            return Err(lost());
        }
        let mut n_sent = 0;
        for message in history.messages {
            let cursor = &mut self.cursors[idx];
            if message.offset < next && message.offset == cursor.last_offset + 1 {
                cursor.last_offset = message.offset;
                n_sent += 1;
                self.queue_text(message.bytes)?;
            }
        }
        let cursor = &self.cursors[idx];
        self.state.metrics.delivered(cursor.channel.kind(), n_sent, None);
        if cursor.last_offset + 1 == next {
            Ok(())
        } else {
            Err(lost())
        }
    }

    /// `/ws/`: subscribes to a channel the user may read, answering `subscribed` (then
    /// the replay and `recovered` with `since`), or `subscribe_error` with the socket
    /// left open.
    async fn subscribe(&mut self, request: Subscribe) -> Result<(), Exit> {
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
    async fn unsubscribe(&mut self, channel: &str) {
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
    async fn end_subscription(&mut self, idx: usize, close: &Close) -> Result<(), Exit> {
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

    /// Handles one client frame. Returns the new token expiry after a refresh.
    async fn on_frame(&mut self, frame: Message) -> Result<Option<Instant>, Exit> {
        let mut new_expiry = None;
        if frame.is_binary() {
            return Err(Exit::Close(CloseCode::UnsupportedData.into()));
        }
        if frame.is_ping() && self.ping_limiter.check().is_err() {
            // Each ping queues a pong; a client that floods pings and never reads would
            // otherwise grow that queue without bound.
            crate::limits::refusal_log("ping_flood", self.plan.ip, "protocol ping flood");
            self.state.metrics.rate_limited("client_messages");
            return Err(Exit::Close(Close::new(
                CloseCode::TooManyRequests,
                "too many pings",
            )));
        }
        let Some(text) = frame.as_text() else {
            // Ping (answered by the layer), pong and close frames.
            return Ok(None);
        };
        if self.limiter.check().is_err() {
            crate::limits::refusal_log("client_messages", self.plan.ip, "client message rate limited");
            self.state.metrics.rate_limited("client_messages");
            return Err(Exit::Close(Close::new(
                CloseCode::TooManyRequests,
                "too many client messages",
            )));
        }
        let multiplexed = self.plan.endpoint == Endpoint::Multiplexed;
        let mut message = ClientMessage::parse(text);
        if !multiplexed
            && matches!(
                message,
                ClientMessage::Subscribe(_) | ClientMessage::Unsubscribe { .. }
            )
        {
            // The single-channel endpoints answer as they always did.
            message = ClientMessage::Unsupported;
        }
        self.state.metrics.client_message(message.label());
        let reply = match message {
            ClientMessage::Ping => protocol::pong(),
            ClientMessage::Heartbeat => protocol::heartbeat_ack(),
            ClientMessage::InvalidJson => protocol::invalid_json(),
            ClientMessage::Unsupported => protocol::unsupported_message(multiplexed),
            ClientMessage::Subscribe(request) => {
                Box::pin(self.subscribe(request)).await?;
                return Ok(None);
            }
            ClientMessage::Unsubscribe { channel, id } => {
                Box::pin(self.unsubscribe(&channel)).await;
                protocol::unsubscribed(&channel, &id)
            }
            ClientMessage::Refresh { token } => {
                let identity = Box::pin(self.state.auth.authenticate(&token))
                    .await
                    .map_err(|failure| {
                        tracing::warn!(reason = failure.reason(), "token refresh refused");
                        Exit::Close(Close::new(CloseCode::Unauthorized, failure.to_string()))
                    })?;
                if identity.user_id != self.plan.identity.user_id {
                    tracing::warn!("token refresh for another user refused");
                    return Err(Exit::Close(Close::new(
                        CloseCode::Unauthorized,
                        "refresh token is for another user",
                    )));
                }
                // In claims mode the token is the membership: a refreshed token must
                // still name the org. On `/ws/` only that org's subscription ends.
                for idx in (0..self.cursors.len()).rev() {
                    let channel = &self.cursors[idx].channel;
                    if channel.kind() != ChannelKind::Org
                        || Box::pin(self.state.membership.is_member(channel.id(), &identity)).await
                    {
                        continue;
                    }
                    tracing::warn!(user_id = %identity.user_id, org_id = channel.id(),
                        "refreshed token is no longer a member");
                    let close = Close::new(CloseCode::Forbidden, "not a member of this organization");
                    if !multiplexed {
                        return Err(Exit::Close(close));
                    }
                    Box::pin(self.end_subscription(idx, &close)).await?;
                }
                new_expiry = Some(expiry_instant(identity.expires_at));
                let expires_at = unix_to_rfc3339(identity.expires_at);
                self.plan.identity = identity;
                protocol::refreshed(&expires_at)
            }
        };
        self.queue_text(reply)?;
        Ok(new_expiry)
    }

    /// The one place a socket is closed. Returns the close code sent (0 if none).
    async fn finish(&mut self, exit: Exit) -> u16 {
        match exit {
            Exit::Gone => 0,
            // The layer queued its own close frame: flush it and wait for the client.
            Exit::Flush => {
                close_socket(&mut self.ws, None).await;
                0
            }
            Exit::Close(close) => {
                self.state.metrics.close_sent(close.code);
                if close.code == CloseCode::SlowConsumer {
                    self.state.metrics.slow_consumers(1);
                    let channel = self.cursors.first().map_or("", |cursor| cursor.channel.name());
                    tracing::warn!(ip = %self.plan.ip, user_id = %self.plan.identity.user_id,
                        channel, n_channels = self.cursors.len(), "slow consumer closed (1008)");
                }
                close_socket(&mut self.ws, Some(&close)).await;
                close.code.code()
            }
        }
    }
}

/// Sends `close` (if any) after whatever is queued, flushes, and waits for the
/// client's answering close frame, all within [`CLOSE_TIMEOUT`]. Used by the session and
/// by the handshake's immediate rejections, so every socket closes the same way.
pub async fn close_socket<S>(ws: &mut WebSocketStream<S>, close: Option<&Close>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(close) = close {
        if let Ok(code) = WsCloseCode::try_from(close.code.code()) {
            // If the layer already queued a close of its own (the client's close crossed
            // ours, or a protocol error), ours is refused; flush anyway.
            let _ = ws.start_send_unpin(Message::close(Some(code), &close.reason));
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.flush().await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

enum Io {
    Flushed,
    Read(Option<Result<Message, tokio_websockets::Error>>),
}

/// The index of `kind` in [`ChannelKind::ALL`].
fn kind_idx(kind: ChannelKind) -> usize {
    match kind {
        ChannelKind::Notifications => 0,
        ChannelKind::Org => 1,
        ChannelKind::Frames => 2,
    }
}

/// Why a subscription to `channel` was refused with 4003.
fn forbidden_reason(channel: &Channel) -> &'static str {
    match channel.kind() {
        ChannelKind::Org => "not a member of this organization",
        ChannelKind::Notifications | ChannelKind::Frames => "this channel belongs to another user",
    }
}

/// The moment a token with this `exp` stops being accepted (with the leeway).
fn expiry_instant(exp: u64) -> Instant {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let remaining = exp.saturating_add(LEEWAY.as_secs()).saturating_sub(now);
    Instant::now() + Duration::from_secs(remaining.min(10 * 365 * 24 * 3600))
}

/// `age` shortened by up to 10 %, so sockets opened together do not all close together.
fn jittered(age: Duration) -> Duration {
    let max_cut = age / 10;
    age - rand::rng().random_range(Duration::ZERO..=max_cut)
}
