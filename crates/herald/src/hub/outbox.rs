//! A socket's bounded queue of messages waiting to be written.
//!
//! Publishers push without waiting; the socket's session drains. When the queued bytes
//! would pass the bound, the outbox refuses the message and asks the session to close
//! with 1008: a client that cannot keep up is disconnected rather than silently skipped,
//! because offsets promise no gaps.
//!
//! An idle outbox holds no heap memory: the queue allocates on first use and is given
//! back after a large burst.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::channel::Message;
use crate::close::Close;

/// A queue that grew past this many slots is shrunk once drained, so one burst does not
/// pin memory for the life of the socket.
const SHRINK_ABOVE: usize = 64;

pub struct Outbox {
    /// The user this socket belongs to, for closing a user's sockets on a channel.
    user_id: Arc<str>,
    max_bytes: usize,
    state: Mutex<State>,
    /// Wakes the session when a message or a close request arrives. `Notify` keeps one
    /// permit, so a push between two waits is never missed.
    notify: Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Message>,
    bytes: usize,
    /// Set once; the session closes the socket with it.
    close: Option<Close>,
}

/// What a session gets when it drains its outbox.
#[derive(Debug)]
pub enum Drained {
    Messages,
    Close(Close),
}

/// The outbox was full; the socket will be closed with 1008.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl Outbox {
    pub fn new(user_id: Arc<str>, max_bytes: usize) -> Self {
        Self {
            user_id,
            max_bytes,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
        }
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // critical section is a push or a drain), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `message` without waiting. On overflow, asks the session to close with
    /// 1008 and returns [`Overflow`]; messages after a close request are dropped.
    pub fn push(&self, message: &Message) -> Result<(), Overflow> {
        let mut state = self.lock();
        if state.close.is_some() {
            return Ok(());
        }
        let len = message.bytes.len();
        if state.bytes + len > self.max_bytes && !state.queue.is_empty() {
            state.close = Some(crate::close::CloseCode::SlowConsumer.into());
            state.queue = VecDeque::new();
            state.bytes = 0;
            drop(state);
            self.notify.notify_one();
            return Err(Overflow);
        }
        state.bytes += len;
        state.queue.push_back(message.clone());
        drop(state);
        self.notify.notify_one();
        Ok(())
    }

    /// Asks the session to close the socket. The first request wins.
    pub fn request_close(&self, close: Close) {
        let mut state = self.lock();
        if state.close.is_none() {
            state.close = Some(close);
        }
        drop(state);
        self.notify.notify_one();
    }

    /// The pending close request, if any, leaving queued messages in place.
    pub fn close_requested(&self) -> Option<Close> {
        self.lock().close.clone()
    }

    /// Waits until something was pushed or a close was requested.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Moves every queued message into `out` (in order), or returns the close request.
    pub fn drain(&self, out: &mut Vec<Message>) -> Drained {
        let mut state = self.lock();
        if let Some(close) = state.close.clone() {
            return Drained::Close(close);
        }
        out.extend(state.queue.drain(..));
        state.bytes = 0;
        if state.queue.capacity() > SHRINK_ABOVE {
            state.queue = VecDeque::new();
        }
        Drained::Messages
    }
}
