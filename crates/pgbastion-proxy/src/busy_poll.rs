//! Busy polling (`[runtime] busy_poll`): after the proxy forwards a message, its thread keeps
//! polling the sockets for a short while instead of going to sleep.
//!
//! The answer to a forwarded message usually follows within tens of microseconds: PostgreSQL
//! answers a short query, the client sends its next one. A thread that sleeps in between must
//! be woken by the kernel when it comes, which costs more than the wait (on a virtual machine,
//! an interrupt between CPUs), and a client that sends one request at a time pays that twice
//! per round trip. Polling trades CPU for it: up to `busy_poll` of polling after each forwarded
//! message, none while nothing is forwarded.
//!
//! Only the single-threaded runtime can do it: on a multi-threaded one, the thread asleep in
//! the I/O driver is not the one that would poll.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct BusyPoll {
    base: Instant,
    window: u64,
    /// Nanoseconds after `base` until which the thread polls.
    until: AtomicU64,
    /// The polling task waits for a forwarded message.
    asleep: AtomicBool,
    wake: Notify,
    /// Polling rounds so far (each one lets the runtime poll its sockets once).
    rounds: AtomicU64,
}

impl BusyPoll {
    pub fn new(window: Duration) -> BusyPoll {
        BusyPoll {
            base: Instant::now(),
            window: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            until: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            wake: Notify::new(),
            rounds: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A message was forwarded: its answer is expected soon.
    pub fn forwarded(&self) {
        self.until
            .store(self.now().saturating_add(self.window), Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) && self.asleep.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    fn polling(&self) -> bool {
        self.now() < self.until.load(Ordering::SeqCst)
    }

    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Runs on the runtime's thread until aborted. Each round yields to the runtime. The
    /// current-thread scheduler of tokio 1.5x defers a yielded task's wake-up until it has
    /// polled its I/O driver, and polls it with a zero timeout because the deferred wake-up
    /// is work pending: the sockets are polled without sleeping, timers fire, and whatever
    /// became ready runs before the next round.
    pub async fn run(&self) {
        loop {
            if self.polling() {
                self.rounds.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                continue;
            }
            self.asleep.store(true, Ordering::SeqCst);
            // A message forwarded between the check and the store would not have woken us.
            if self.polling() {
                self.asleep.store(false, Ordering::SeqCst);
                continue;
            }
            self.wake.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "current_thread")]
    async fn polls_after_a_forward_and_sleeps_when_the_window_ends() {
        // A window long enough that a loaded machine cannot let it pass unseen.
        let busy = Arc::new(BusyPoll::new(Duration::from_millis(100)));
        let task = tokio::spawn({
            let busy = busy.clone();
            async move { busy.run().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(busy.rounds(), 0, "nothing forwarded, nothing polled");

        busy.forwarded();
        // Timers fire while it polls.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(busy.rounds() > 0, "a forward starts polling");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let after_window = busy.rounds();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(busy.rounds(), after_window, "polling stops with its window");

        busy.forwarded();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(busy.rounds() > after_window, "the next forward polls again");
        task.abort();
    }
}
