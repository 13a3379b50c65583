//! Request coalescing (#22): identical deterministic requests in flight at the same time share one generation.
//!
//! The first request for a key becomes the flight's [`Publisher`] and runs the generation; every item it
//! publishes is kept in the flight's history and handed to each [`Subscription`] in order, so a late joiner
//! first receives what was already produced, then the live items. A subscriber leaving does not disturb the
//! others; when the last one leaves before the end, the publisher's next `publish` returns false (its
//! generation is wanted no more) and the flight is forgotten, so a new request for the key starts afresh.
//! A finished flight is forgotten too (later requests are served by the response cache, or run again).
//!
//! Bounded: flights in all, and subscribers per flight. Beyond either bound a request simply runs alone
//! ([`Join::Alone`]); coalescing never refuses anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::Notify;

/// What joining a key gives.
pub enum Join<T> {
    /// No generation for the key is in flight: run it, publishing through the publisher, and read it back
    /// through the subscription like any joiner.
    Leader(Publisher<T>, Subscription<T>),
    /// A generation is in flight: read it.
    Follower(Subscription<T>),
    /// A bound was reached: run the request on its own, uncoalesced.
    Alone,
}

/// The in-flight generations by key.
pub struct Coalescer<T> {
    flights: Mutex<HashMap<String, Weak<Flight<T>>>>,
    max_flights: usize,
    max_subscribers: usize,
}

struct Flight<T> {
    key: String,
    state: Mutex<FlightState<T>>,
    notify: Notify,
    owner: Weak<Coalescer<T>>,
}

struct FlightState<T> {
    history: Vec<T>,
    /// The publisher finished (or went away): no more items.
    closed: bool,
    subscribers: usize,
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Clone> Coalescer<T> {
    pub fn new(max_flights: usize, max_subscribers: usize) -> Arc<Self> {
        Arc::new(Self { flights: Mutex::new(HashMap::new()), max_flights, max_subscribers })
    }

    /// Joins the generation for `key`, or starts one.
    pub fn join(self: &Arc<Self>, key: &str) -> Join<T> {
        let mut flights = lock(&self.flights);
        if let Some(f) = flights.get(key).and_then(Weak::upgrade) {
            let mut st = lock(&f.state);
            if !st.closed && st.subscribers > 0 {
                if st.subscribers >= self.max_subscribers {
                    return Join::Alone;
                }
                st.subscribers += 1;
                drop(st);
                return Join::Follower(Subscription { flight: f, next: 0 });
            }
        }
        flights.retain(|_, f| f.strong_count() > 0);
        if flights.len() >= self.max_flights {
            return Join::Alone;
        }
        let flight = Arc::new(Flight {
            key: key.to_string(),
            state: Mutex::new(FlightState { history: Vec::new(), closed: false, subscribers: 1 }),
            notify: Notify::new(),
            owner: Arc::downgrade(self),
        });
        flights.insert(key.to_string(), Arc::downgrade(&flight));
        Join::Leader(Publisher { flight: flight.clone() }, Subscription { flight, next: 0 })
    }

    /// Generations in flight.
    pub fn len(&self) -> usize {
        lock(&self.flights).values().filter(|f| f.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Flight<T> {
    /// Takes the flight out of its coalescer's map (if the map still points at it): later requests start anew.
    fn forget(&self) {
        if let Some(owner) = self.owner.upgrade() {
            let mut flights = lock(&owner.flights);
            if flights.get(&self.key).is_some_and(|w| std::ptr::eq(w.as_ptr(), self)) {
                flights.remove(&self.key);
            }
        }
    }
}

/// The generating side of a flight.
pub struct Publisher<T> {
    flight: Arc<Flight<T>>,
}

impl<T> Publisher<T> {
    /// Hands `item` to every subscriber, present and future. False when nobody is subscribed any more: the
    /// generation may stop.
    pub fn publish(&self, item: T) -> bool {
        let mut st = lock(&self.flight.state);
        if st.subscribers == 0 {
            return false;
        }
        st.history.push(item);
        drop(st);
        self.flight.notify.notify_waiters();
        true
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        lock(&self.flight.state).subscribers
    }
}

impl<T> Drop for Publisher<T> {
    /// The end of the generation (finished or abandoned): subscribers drain the history, then see the end.
    fn drop(&mut self) {
        lock(&self.flight.state).closed = true;
        self.flight.forget();
        self.flight.notify.notify_waiters();
    }
}

/// One reader of a flight, from its first item.
pub struct Subscription<T> {
    flight: Arc<Flight<T>>,
    next: usize,
}

impl<T: Clone> Subscription<T> {
    /// The next item, or `None` once the publisher is gone and every item was read.
    pub async fn next(&mut self) -> Option<T> {
        loop {
            let mut notified = std::pin::pin!(self.flight.notify.notified());
            // Registered before the state is read: a publish in between still wakes us.
            notified.as_mut().enable();
            {
                let st = lock(&self.flight.state);
                if let Some(item) = st.history.get(self.next) {
                    self.next += 1;
                    return Some(item.clone());
                }
                if st.closed {
                    return None;
                }
            }
            notified.await;
        }
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.flight.state);
        st.subscribers -= 1;
        let abandoned = st.subscribers == 0 && !st.closed;
        drop(st);
        if abandoned {
            // Nobody reads it: a new request for the key must not join a generation that is stopping.
            self.flight.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn drain(mut s: Subscription<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(x) = s.next().await {
            out.push(x);
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn late_joiners_get_the_history_then_the_live_items() {
        let c = Coalescer::<u32>::new(8, 8);
        let Join::Leader(publisher, first) = c.join("k") else { panic!("first is the leader") };
        assert!(publisher.publish(1) && publisher.publish(2));
        let Join::Follower(late) = c.join("k") else { panic!("joins the flight") };
        assert!(matches!(c.join("other"), Join::Leader(..)), "another key is another flight");
        let readers = [tokio::spawn(drain(first)), tokio::spawn(drain(late))];
        for i in 3..=50 {
            assert!(publisher.publish(i));
            if i % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(publisher);
        for r in readers {
            assert_eq!(r.await.unwrap(), (1..=50).collect::<Vec<_>>());
        }
        assert!(c.is_empty(), "a finished flight is forgotten");
        assert!(matches!(c.join("k"), Join::Leader(..)), "and the key starts anew");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_generation_stops_when_the_last_subscriber_leaves() {
        let c = Coalescer::<u32>::new(8, 8);
        let Join::Leader(publisher, a) = c.join("k") else { panic!() };
        let Join::Follower(b) = c.join("k") else { panic!() };
        assert_eq!(publisher.subscribers(), 2);
        drop(a);
        assert!(publisher.publish(1), "one subscriber is still reading");
        drop(b);
        assert!(!publisher.publish(2), "nobody is left: the generation may stop");
        // A new request for the key does not join the abandoned flight.
        let Join::Leader(p2, s2) = c.join("k") else { panic!("a fresh flight") };
        assert!(p2.publish(7));
        drop(p2);
        assert_eq!(drain(s2).await, vec![7]);
        drop(publisher);
    }

    #[test]
    fn bounds_make_requests_run_alone() {
        let c = Coalescer::<u32>::new(1, 2);
        let Join::Leader(_p, _a) = c.join("k") else { panic!() };
        let Join::Follower(_b) = c.join("k") else { panic!() };
        assert!(matches!(c.join("k"), Join::Alone), "two subscribers at most");
        assert!(matches!(c.join("other"), Join::Alone), "one flight at most");
    }
}
