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

use bytes::Bytes;
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
use crate::metrics::Endpoint;
use crate::ws::protocol::{self, ClientMessage, Resume, Subscribe, Welcome};

mod recovery;
mod subscriptions;

use subscriptions::{join, leave, read_offset};

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
    /// `?presence=1` on the events endpoint: send the org's presence.
    pub presence: bool,
    pub resume: Option<Resume>,
    /// [`crate::hub::Hub::revocations`] read before the membership check.
    pub revocations: u64,
    /// The user's connection slot, held for the life of the socket.
    pub slot: ConnectionSlot,
    /// The client's address, for security logs.
    pub ip: IpAddr,
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
    /// Made at the client's first ping or message: an idle client, which only answers
    /// pings, never needs them (144 B a socket; issue 19).
    limiters: Option<Box<Limiters>>,
}

/// A socket's rate limiters. A limiter made at the first frame is as full as one made
/// at the handshake and left unused since.
struct Limiters {
    /// `HERALD_CLIENT_MESSAGES_PER_MINUTE` for this socket.
    messages: governor::DefaultDirectRateLimiter,
    /// Protocol pings, which do not count as client messages but each queue a pong.
    pings: governor::DefaultDirectRateLimiter,
}

/// Runs an accepted socket until it closes.
///
/// Every idle socket holds this future for its whole life, so it is kept small (issue
/// 19): the session is built before the future, which holds it once (an
/// `async fn serve(mut self)` would hold it twice: rustc keeps the argument and the
/// moved binding apart, 536 B more a socket); the state is
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
    let mut session = Session {
        state,
        ws,
        plan,
        outbox,
        cursors: Vec::new(),
        next_sub: SOLE + 1,
        writing: false,
        batch: Batch::default(),
        limiters: None,
    };
    async move {
        let (opened_at, code) = session.serve().await;
        let endpoint = session.plan.endpoint;
        // The socket and the user's connection slot go before the close is counted.
        drop(session);
        state.metrics.connection_closed(endpoint, opened_at.elapsed());
        tracing::debug!(endpoint = endpoint.label(), code, "session closed");
    }
}

impl<S> Session<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Runs the socket to its close; returns when it opened and the close code sent.
    async fn serve(&mut self) -> (Instant, u16) {
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
        (opened_at, code)
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
        let user_id = self.plan.identity.user_id.as_str();
        let read_offset = read_offset(self.state, user_id, &cursor.channel, &position.epoch).await;
        let welcome = Welcome {
            connection_id: &connection_id,
            user_id,
            channel: cursor.channel.name(),
            org_id: self.plan.org_id.as_deref(),
            epoch: &position.epoch,
            offset: position.offset,
            read_offset,
        }
        .to_json();
        self.queue_text(welcome)?;
        let cursor = &mut self.cursors[0];
        cursor.last_offset = position.offset;
        cursor.epoch = Arc::from(position.epoch.as_str());
        if let Some(resume) = self.plan.resume.take() {
            self.replay(0, &resume, &position).await?;
        }
        if self.plan.presence {
            self.watch_presence(0).await?;
        }
        Ok(())
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
        let cancelled = crate::sync::cancelled(&state.shutdown);
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
                        if let Err(exit) = self.forward_queued().await {
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
                    } else if let Err(exit) = self.forward_queued().await {
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
    ///
    /// Most batches need no waiting: [`Session::forward_now`] sends them. Only a batch
    /// that must wait (an ended subscription, an epoch switch, a gap to fill) goes on in
    /// [`Session::forward_outbox`], boxed: inline, its future would be part of every
    /// idle socket's task for the socket's life (issue 19, idle memory).
    async fn forward_queued(&mut self) -> Result<(), Exit> {
        match self.forward_now() {
            Some(done) => done,
            None => Box::pin(self.forward_outbox()).await,
        }
    }

    /// Drains the outbox and sends what can be sent without waiting. `None` when it
    /// stopped at something that needs [`Session::forward_outbox`]: what is left of the
    /// batch, in order, is then in `self.batch`.
    fn forward_now(&mut self) -> Option<Result<(), Exit>> {
        let mut batch = std::mem::take(&mut self.batch);
        if let Drained::Close(close) = self.outbox.drain(&mut batch) {
            return Some(Err(Exit::Close(close)));
        }
        if !batch.ended.is_empty() {
            self.batch = batch;
            return None;
        }
        let mut result = self.send_notes(&mut batch.notes);
        let mut tally = Tally::default();
        let mut hint = 0;
        let mut stopped = None;
        if result.is_ok() {
            let mut queued = batch.messages.drain(..);
            while let Some((sub, message)) = queued.next() {
                let Some(idx) = self.cursor_of(sub, &mut hint) else {
                    continue;
                };
                // Another epoch: the client must be told first, which may wait.
                let place = self.same_epoch(idx, &message).then(|| self.place(idx, &message));
                match place {
                    Some(Place::Behind) => {}
                    Some(Place::Next) => {
                        if let Err(exit) = self.send(idx, message, &mut tally) {
                            result = Err(exit);
                            break;
                        }
                    }
                    None | Some(Place::After(_)) => {
                        stopped = Some(std::iter::once((sub, message)).chain(queued).collect::<Vec<_>>());
                        break;
                    }
                }
            }
        }
        tally.record(self.state);
        batch.messages.clear();
        if let Some(rest) = stopped {
            batch.messages.extend(rest);
            self.batch = batch;
            return None;
        }
        batch.notes.clear();
        self.batch = batch;
        Some(result)
    }

    /// [`Session::forward_now`]'s path for a batch that must wait, from where it stopped.
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
            result = self.send_notes(&mut batch.notes);
        }
        if result.is_ok() {
            result = self.forward(&mut batch.messages).await;
        }
        batch.messages.clear();
        batch.ended.clear();
        batch.notes.clear();
        self.batch = batch;
        result
    }

    /// Presence and read positions: sent as they are, for live subscriptions.
    fn send_notes(&mut self, notes: &mut Vec<(SubscriptionId, Bytes)>) -> Result<(), Exit> {
        for (sub, text) in notes.drain(..) {
            if self.cursors.iter().any(|c| c.sub == sub) {
                self.queue_text(text)?;
            }
        }
        Ok(())
    }

    async fn forward(&mut self, batch: &mut Vec<(SubscriptionId, ChannelMessage)>) -> Result<(), Exit> {
        let mut tally = Tally::default();
        let mut hint = 0;
        let mut result = Ok(());
        for (sub, message) in batch.drain(..) {
            let Some(idx) = self.cursor_of(sub, &mut hint) else {
                continue;
            };
            if !self.same_epoch(idx, &message) {
                match Box::pin(self.switch_epoch(idx, &message)).await {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(exit) => {
                        result = Err(exit);
                        break;
                    }
                }
            }
            let filled = match self.place(idx, &message) {
                Place::Behind => continue,
                Place::Next => Ok(()),
                Place::After(from) => Box::pin(self.fill_gap(idx, from)).await,
            };
            let sent = filled.and_then(|()| {
                if message.is_marker() {
                    Ok(())
                } else {
                    self.send(idx, message, &mut tally)
                }
            });
            if let Err(exit) = sent {
                result = Err(exit);
                break;
            }
        }
        tally.record(self.state);
        result
    }

    /// The index of the cursor of `sub`, trying `hint` first: consecutive messages are
    /// mostly of one channel. `None` once unsubscribed.
    fn cursor_of(&self, sub: SubscriptionId, hint: &mut usize) -> Option<usize> {
        if self.cursors.get(*hint).is_none_or(|cursor| cursor.sub != sub) {
            *hint = self.cursors.iter().position(|cursor| cursor.sub == sub)?;
        }
        Some(*hint)
    }

    /// Whether `message` is of the epoch the client knows for cursor `idx`. An equal
    /// epoch in another allocation is shared, so later messages compare by pointer.
    fn same_epoch(&mut self, idx: usize, message: &ChannelMessage) -> bool {
        let cursor = &mut self.cursors[idx];
        if Arc::ptr_eq(&message.epoch, &cursor.epoch) {
            return true;
        }
        if message.epoch == cursor.epoch {
            cursor.epoch = message.epoch.clone();
            return true;
        }
        false
    }

    /// Where `message`, of the cursor's epoch, stands against what the client has.
    fn place(&self, idx: usize, message: &ChannelMessage) -> Place {
        let last_offset = self.cursors[idx].last_offset;
        if message.is_marker() {
            // The channel stands at this offset: send what this socket lacks.
            return if message.offset > last_offset {
                Place::After(message.offset + 1)
            } else {
                Place::Behind
            };
        }
        if message.offset <= last_offset {
            Place::Behind
        } else if message.offset > last_offset + 1 {
            Place::After(message.offset)
        } else {
            Place::Next
        }
    }

    /// Queues `message`, the next of cursor `idx`, for the client.
    fn send(&mut self, idx: usize, message: ChannelMessage, tally: &mut Tally) -> Result<(), Exit> {
        let cursor = &mut self.cursors[idx];
        cursor.last_offset = message.offset;
        tally.oldest.get_or_insert(message.published_at);
        tally.sent[kind_idx(cursor.channel.kind())] += 1;
        self.queue_text(message.bytes)
    }

    fn limiters(&mut self) -> &Limiters {
        let per_minute = self.state.config.client_messages_per_minute;
        self.limiters.get_or_insert_with(|| {
            Box::new(Limiters {
                messages: client_message_limiter(per_minute),
                pings: protocol_ping_limiter(),
            })
        })
    }

    /// Handles one client frame. Returns the new token expiry after a refresh.
    async fn on_frame(&mut self, frame: Message) -> Result<Option<Instant>, Exit> {
        let mut new_expiry = None;
        if frame.is_binary() {
            return Err(Exit::Close(CloseCode::UnsupportedData.into()));
        }
        if frame.is_ping() && self.limiters().pings.check().is_err() {
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
        if self.limiters().messages.check().is_err() {
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
            ClientMessage::Read(request) => {
                Box::pin(self.read(request)).await?;
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

/// Where a channel message stands against what its socket's client has.
enum Place {
    /// Already sent (or a marker the client is level with): skip it.
    Behind,
    /// The next message: send it.
    Next,
    /// Ahead of the client: first send history from this offset up to it (for a marker,
    /// up to and including its offset), which waits for the broker.
    After(u64),
}

/// Messages sent in one pass over a batch, counted per channel kind (a `/ws/` batch
/// may hold several), and when the oldest of them was published.
#[derive(Default)]
struct Tally {
    sent: [u64; ChannelKind::ALL.len()],
    oldest: Option<Instant>,
}

impl Tally {
    fn record(mut self, state: &AppState) {
        for (kind, n) in ChannelKind::ALL.into_iter().zip(self.sent) {
            if n > 0 {
                let latency = self.oldest.take().map(|at: Instant| at.elapsed());
                state.metrics.delivered(kind, n, latency);
            }
        }
    }
}

/// The index of `kind` in [`ChannelKind::ALL`].
fn kind_idx(kind: ChannelKind) -> usize {
    match kind {
        ChannelKind::Notifications => 0,
        ChannelKind::Org => 1,
        ChannelKind::Frames => 2,
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
