//! Locks that ignore poisoning.
//!
//! Every `std::sync` lock in herald guards a short critical section that leaves its data
//! consistent at each step (a map insert, a counter, a swap), and none is held across an
//! `.await`. A panic while one is held therefore leaves nothing half-written, and taking
//! the lock again is safe: one panicking request must not turn every later request that
//! touches the same map into a panic.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

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
