//! Locks that ignore poisoning, and a wait for cancellation that is cheap to poll.
//!
//! Every `std::sync` lock in herald guards a short critical section that leaves its data
//! consistent at each step (a map insert, a counter, a swap), and none is held across an
//! `.await`. A panic while one is held therefore leaves nothing half-written, and taking
//! the lock again is safe: one panicking request must not turn every later request that
//! touches the same map into a panic.

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll, Wake, Waker};

use tokio_util::sync::CancellationToken;

/// Locks `mutex`, ignoring poisoning (see the module docs).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Read-locks `lock`, ignoring poisoning (see the module docs).
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Write-locks `lock`, ignoring poisoning (see the module docs).
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits until `token` is cancelled, like [`CancellationToken::cancelled`], but cheap to
/// poll while nothing happens.
///
/// tokio-util's future takes the token's mutex and its `Notify`'s mutex on every poll,
/// and a `select!` loop polls every branch whenever its task wakes. A socket's loop,
/// an LLM task's loop and an HTTP connection all wait on the node's one shutdown
/// token, so every message forwarded and every token streamed took those two locks,
/// shared by every task on both runtime threads (issue 19). Through [`woken_only`],
/// the token's future is polled only when it has woken its waker (once: when the token
/// is cancelled).
pub fn cancelled(token: &CancellationToken) -> impl Future<Output = ()> + Send + '_ {
    woken_only(token.cancelled())
}

/// Runs `inner`, polling it only when it has woken the waker it was last polled with:
/// for a future that wakes once, at its end, while the task around it wakes for other
/// reasons all the time. Between, a poll by the task already registered is one load of
/// a flag of its own (a task's waker stays the same from poll to poll); a poll by
/// another task registers that task's waker first.
async fn woken_only<F: Future>(inner: F) -> F::Output {
    tokio::pin!(inner);
    // `woken` starts set, so the first poll polls `inner`.
    let woken = Arc::new(Woken {
        woken: AtomicBool::new(true),
        task: Mutex::new(None),
    });
    // The waker last registered, as its data and vtable addresses: to tell without the
    // lock whether this poll's waker is the same one (`Waker::will_wake`, compared with
    // the waker polled with rather than with a clone, whose vtable some wakers change).
    let mut registered: Option<(usize, usize)> = None;
    poll_fn(|cx| {
        let this = waker_id(cx.waker());
        if registered != Some(this) {
            // Registered before the flag is read: a wake after this finds this task's
            // waker; a wake before it set the flag, which the load below sees.
            *lock(&woken.task) = Some(cx.waker().clone());
            registered = Some(this);
        }
        // A wake leaves the waker registered (unlike `AtomicWaker`, which hands it to the
        // wake), so a task that stays registered needs only this load, and no
        // read-modify-write while nothing woke.
        if woken.woken.load(Ordering::Acquire) && woken.woken.swap(false, Ordering::Acquire) {
            // Made here rather than kept: `inner` holds on to it, and an idle socket's
            // future is smaller without a second copy.
            let waker = Waker::from(woken.clone());
            return inner.as_mut().poll(&mut Context::from_waker(&waker));
        }
        Poll::Pending
    })
    .await
}

/// What makes two wakers the same one (what `Waker::will_wake` compares).
fn waker_id(waker: &Waker) -> (usize, usize) {
    (waker.data() as usize, std::ptr::from_ref(waker.vtable()) as usize)
}

/// The waker [`woken_only`] gives the inner future: notes the wake, then wakes the task
/// registered last. The lock is taken by a wake (rare: the futures this serves wake
/// once) and when another task polls, never by a poll of the task registered.
struct Woken {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = lock(&self.task).as_ref() {
            task.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `wait` ends well within 5 s. Not `timeout` alone: its own timer wakes the
    /// task after 5 s and polls the wait again, which would hide a lost wake.
    async fn woke_soon(wait: impl Future<Output = ()>) -> bool {
        let start = tokio::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(5), wait).await.is_ok();
        ended && start.elapsed() < Duration::from_secs(2)
    }

    #[tokio::test]
    async fn a_cancelled_token_is_ready_at_once() {
        let token = CancellationToken::new();
        token.cancel();
        assert!(woke_soon(cancelled(&token)).await);
    }

    #[tokio::test]
    async fn wakes_when_cancelled_later_and_not_before() {
        let token = CancellationToken::new();
        let wait = cancelled(&token);
        tokio::pin!(wait);
        // Polled many times while the token stands: pending each time.
        for _ in 0..3 {
            assert!(futures_util::poll!(wait.as_mut()).is_pending());
        }
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            canceller.cancel();
        });
        assert!(woke_soon(wait).await, "the cancel did not wake the wait");
    }

    /// A future that counts its polls and never ends.
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);

    impl Future for Counted {
        type Output = ();

        fn poll(self: std::pin::Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    /// Wakes its waker at each of its first `left` polls, then ends.
    struct WakesItself {
        left: usize,
    }

    impl Future for WakesItself {
        type Output = ();

        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.left == 0 {
                return Poll::Ready(());
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// A future that wakes its waker more than once before it ends: each wake reaches
    /// the task (with a waker that a wake takes, as `AtomicWaker`'s, the second wake
    /// found none and the task slept).
    #[tokio::test]
    async fn every_wake_of_the_inner_future_reaches_the_task() {
        let wait = woken_only(WakesItself { left: 3 });
        assert!(woke_soon(wait).await, "a later wake of the inner future was lost");
    }

    /// The point of the wrapper: the task wakes and polls it often, the inner future
    /// is polled once, until it wakes its own waker.
    #[tokio::test]
    async fn the_inner_future_is_polled_only_after_it_woke() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let wait = woken_only(Counted(polls.clone()));
        tokio::pin!(wait);
        for _ in 0..5 {
            assert!(futures_util::poll!(wait.as_mut()).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
    }

    /// The future moves to another task between polls (a new waker): the cancel must
    /// wake the task that polled last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakes_the_task_that_polled_last() {
        // Leaked: the wait borrows the token and moves into a task of its own.
        let token: &'static CancellationToken = Box::leak(Box::new(CancellationToken::new()));
        let mut wait = Box::pin(cancelled(token));
        assert!(futures_util::poll!(wait.as_mut()).is_pending());
        let canceller = token.clone();
        let waiter = tokio::spawn(woke_soon(wait));
        tokio::time::sleep(Duration::from_millis(20)).await;
        canceller.cancel();
        assert!(waiter.await.unwrap(), "the moved wait never woke");
    }
}
