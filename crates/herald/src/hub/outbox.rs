//! A socket's bounded queue of messages waiting to be written.
//!
//! Publishers push without waiting; the socket's session drains. When the queued bytes
//! would pass the bound, the outbox refuses the message and asks the session to close
//! with 1008: a client that cannot keep up is disconnected rather than silently skipped,
//! because offsets promise no gaps.
//!
//! One outbox serves every channel of its socket: each queued message carries the
//! [`SubscriptionId`] it was delivered for, so a `/ws/` socket with many subscriptions
//! still has one queue, one bound and one wake-up. Ending one subscription (membership
//! lost) is queued beside the messages; closing the socket ends them all.
//!
//! An idle outbox holds no heap memory: the queue allocates on first use and is given
//! back after a large burst.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use bytes::Bytes;

use crate::channel::Message;
use crate::close::Close;

/// A queue that grew past this many slots is shrunk once drained, so one burst does not
/// pin memory for the life of the socket.
const SHRINK_ABOVE: usize = 64;

/// Which of a socket's subscriptions a queued message is for: [`SOLE`] on the
/// single-channel endpoints, 1, 2, 3, … for the subscriptions of a `/ws/` socket.
pub type SubscriptionId = u32;

/// The subscription of a single-channel socket: its channel is the whole socket, so
/// ending it closes the socket.
pub const SOLE: SubscriptionId = 0;

pub struct Outbox {
    /// The user this socket belongs to, for closing a user's sockets on a channel.
    user_id: Arc<str>,
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<(SubscriptionId, Message)>,
    bytes: usize,
    /// Set once; the session closes the socket with it.
    close: Option<Close>,
    /// Subscriptions to end (not the socket), with the reason the client is told.
    ended: Vec<(SubscriptionId, Close)>,
    /// Messages without an offset (presence, read positions) for a subscription.
    notes: Vec<(SubscriptionId, Bytes)>,
    /// Set by every push or close request, cleared by the wait it ends: like a
    /// `Notify` permit, a push between two waits is never missed, and one wake-up
    /// serves any number of pushes. Kept under the queue's own lock, so a push takes
    /// one lock, not a second one inside a `Notify`.
    signalled: bool,
    /// The session's task, while it waits.
    waker: Option<Waker>,
}

/// What a session takes out of its outbox at once.
#[derive(Debug, Default)]
pub struct Batch {
    /// Queued messages in delivery order, each with the subscription it is for.
    pub messages: Vec<(SubscriptionId, Message)>,
    /// Subscriptions ended since the last drain. They take effect before the messages
    /// of the same batch: nothing of an ended subscription is sent after it ended.
    pub ended: Vec<(SubscriptionId, Close)>,
    /// Messages without an offset, kept in no history (presence, read positions), for
    /// a subscription; sent as they are, after the ended subscriptions and before the
    /// channel messages of the batch.
    pub notes: Vec<(SubscriptionId, Bytes)>,
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
        }
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // critical section is a push or a drain), so a poisoned lock is still usable.
        crate::sync::lock(&self.state)
    }

    /// Queues `message` for subscription `sub` without waiting. On overflow, asks the
    /// session to close with 1008 and returns [`Overflow`]; messages after a close
    /// request are dropped.
    pub fn push(&self, sub: SubscriptionId, message: &Message) -> Result<(), Overflow> {
        let mut state = self.lock();
        if state.close.is_some() {
            return Ok(());
        }
        let len = message.bytes.len();
        if state.bytes + len > self.max_bytes && !state.queue.is_empty() {
            state.close = Some(crate::close::CloseCode::SlowConsumer.into());
            state.queue = VecDeque::new();
            state.bytes = 0;
            signal(state);
            return Err(Overflow);
        }
        state.bytes += len;
        state.queue.push_back((sub, message.clone()));
        signal(state);
        Ok(())
    }

    /// Queues `text`, a message without an offset, for subscription `sub`, without
    /// waiting. It counts toward the byte bound like a channel message.
    pub fn push_note(&self, sub: SubscriptionId, text: Bytes) -> Result<(), Overflow> {
        let mut state = self.lock();
        if state.close.is_some() {
            return Ok(());
        }
        let len = text.len();
        if state.bytes + len > self.max_bytes && !(state.queue.is_empty() && state.notes.is_empty()) {
            state.close = Some(crate::close::CloseCode::SlowConsumer.into());
            state.queue = VecDeque::new();
            state.notes = Vec::new();
            state.bytes = 0;
            signal(state);
            return Err(Overflow);
        }
        state.bytes += len;
        state.notes.push((sub, text));
        signal(state);
        Ok(())
    }

    /// Asks the session to close the socket. The first request wins.
    pub fn request_close(&self, close: Close) {
        let mut state = self.lock();
        if state.close.is_none() {
            state.close = Some(close);
        }
        signal(state);
    }

    /// Ends subscription `sub` with `close` (its code and reason are told in band);
    /// ending [`SOLE`] closes the socket.
    pub fn end(&self, sub: SubscriptionId, close: Close) {
        if sub == SOLE {
            self.request_close(close);
            return;
        }
        let mut state = self.lock();
        if state.close.is_none() {
            state.ended.push((sub, close));
        }
        signal(state);
    }

    /// The pending close request, if any, leaving queued messages in place.
    pub fn close_requested(&self) -> Option<Close> {
        self.lock().close.clone()
    }

    /// Waits until something was pushed or a close was requested. One task waits on an
    /// outbox (its session, or the SSE follower that owns it): a second waiter would
    /// take the first one's place.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if state.signalled {
                state.signalled = false;
                return Poll::Ready(());
            }
            match &mut state.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await;
    }

    /// Moves every queued message and ended subscription into `out` (in order), or
    /// returns the close request.
    pub fn drain(&self, out: &mut Batch) -> Drained {
        let mut state = self.lock();
        if let Some(close) = state.close.clone() {
            return Drained::Close(close);
        }
        out.messages.extend(state.queue.drain(..));
        if !state.ended.is_empty() {
            // Taken, not copied: an outbox keeps no memory for a rare event.
            out.ended.extend(std::mem::take(&mut state.ended));
        }
        if !state.notes.is_empty() {
            out.notes.extend(std::mem::take(&mut state.notes));
        }
        state.bytes = 0;
        if state.queue.capacity() > SHRINK_ABOVE {
            state.queue = VecDeque::new();
        }
        Drained::Messages
    }
}

/// Marks `state` signalled and wakes the waiting session, after letting go of the lock.
fn signal(mut state: MutexGuard<'_, State>) {
    state.signalled = true;
    let waker = state.waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}
