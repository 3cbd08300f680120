//! Per-(connector, user) lanes: the order and concurrency of connector operations.
//!
//! An event fans out into one operation per binding that applies. Operations of one
//! lane (one connector, one ordering key, normally `tenant/user id`) run one at a time,
//! in the order they were accepted, retries included. Lanes of one connector run
//! concurrently, up to that connector's limit. Nothing here is shared between
//! connectors: an operation waiting on one connector's target occupies only that
//! connector's slots, so a target that is down holds up no other target.
//!
//! Parked work read back (a *drained* operation) may wait on its target for days. Two
//! rules keep it from holding up new work:
//! - drained operations have their own slots, so they never take the slots that new
//!   work of the same connector needs to run or to park;
//! - new work that arrives behind a drained operation in its lane does not wait for it
//!   when the lanes park past drains (parking on): it is started as *park only*, one
//!   at a time per lane, in arrival order. It goes to the retry topic behind the
//!   drained operation, which is where its order puts it anyway.
//!
//! Ready new work starts **oldest first** (by the order operations were accepted), not
//! in the order lanes became ready: an operation that waited behind its lane's previous
//! one (a delete behind its user's create) would otherwise queue behind everything
//! accepted meanwhile, and the input's committed offset, which cannot pass it, would
//! stand still while the uncommitted window fills behind it.
//!
//! It only counts and orders; the pipeline loop runs the operations.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

/// One lane: a connector and an ordering key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LaneKey {
    pub connector: Arc<str>,
    pub ordering_key: Arc<str>,
}

/// What the lanes need of an operation.
pub trait Laned {
    fn lane(&self) -> &LaneKey;
    /// Parked work read back from a retry topic.
    fn drained(&self) -> bool;
    /// Its place in acceptance order (its event's): smaller starts first.
    fn sequence(&self) -> u64;
}

/// A ready operation in the heap: the smallest sequence first, then arrival.
struct Ready<Op> {
    sequence: u64,
    arrival: u64,
    started: Started<Op>,
}

impl<Op> PartialEq for Ready<Op> {
    fn eq(&self, other: &Self) -> bool {
        (self.sequence, self.arrival) == (other.sequence, other.arrival)
    }
}

impl<Op> Eq for Ready<Op> {}

impl<Op> PartialOrd for Ready<Op> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<Op> Ord for Ready<Op> {
    /// Reversed: `BinaryHeap` pops the greatest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.sequence, other.arrival).cmp(&(self.sequence, self.arrival))
    }
}

/// An operation the loop may start now.
#[derive(Debug, PartialEq, Eq)]
pub struct Started<Op> {
    pub operation: Op,
    /// Park it without trying: its lane's head is a drained operation.
    pub park_only: bool,
}

/// One connector's share: its ready operations and counts.
struct ConnectorLanes<Op> {
    /// New work, and park-only operations, oldest first.
    ready: BinaryHeap<Ready<Op>>,
    /// Tie-break among operations of one event (several bindings of one connector).
    arrivals: u64,
    running: usize,
    /// Drained operations: their own queue and slots.
    ready_drained: VecDeque<Op>,
    running_drained: usize,
    /// Operations held: running, ready or waiting in a lane.
    held: usize,
}

impl<Op> Default for ConnectorLanes<Op> {
    fn default() -> Self {
        ConnectorLanes {
            ready: BinaryHeap::new(),
            arrivals: 0,
            running: 0,
            ready_drained: VecDeque::new(),
            running_drained: 0,
            held: 0,
        }
    }
}

/// A lane with an operation ready or running.
struct Lane<Op> {
    /// The head (ready or running) is a drained operation.
    head_drained: bool,
    /// The head has finished; the lane waits for its park-only operation.
    head_done: bool,
    /// A park-only operation taken out of `waiting` is ready or running.
    parking: bool,
    /// Operations behind the head, in arrival order.
    waiting: VecDeque<Op>,
}

pub struct Lanes<Op> {
    lanes: HashMap<LaneKey, Lane<Op>>,
    connectors: HashMap<Arc<str>, ConnectorLanes<Op>>,
    /// New work behind a drained operation is parked rather than held.
    park_past_drains: bool,
}

impl<Op> Default for Lanes<Op> {
    fn default() -> Self {
        Lanes {
            lanes: HashMap::new(),
            connectors: HashMap::new(),
            park_past_drains: false,
        }
    }
}

impl<Op: Laned> Lanes<Op> {
    /// `park_past_drains`: parking is on, so new work may be parked behind a drain.
    pub fn new(park_past_drains: bool) -> Self {
        Lanes {
            park_past_drains,
            ..Lanes::default()
        }
    }

    pub fn accept(&mut self, operation: Op) {
        let connector = self.connectors.entry(operation.lane().connector.clone()).or_default();
        connector.held += 1;
        match self.lanes.get_mut(operation.lane()) {
            Some(lane) => {
                let key = operation.lane().clone();
                lane.waiting.push_back(operation);
                self.advance(&key);
            }
            None => {
                self.lanes.insert(
                    operation.lane().clone(),
                    Lane {
                        head_drained: operation.drained(),
                        head_done: false,
                        parking: false,
                        waiting: VecDeque::new(),
                    },
                );
                push_ready(connector, operation, false);
            }
        }
    }

    /// The next ready operation of `connector`, counted as running, while fewer than
    /// `limit` of its operations of that kind run (new work and drained work have a
    /// limit each).
    pub fn start_next(&mut self, connector: &str, limit: usize) -> Option<Started<Op>> {
        let lanes = self.connectors.get_mut(connector)?;
        if lanes.running < limit {
            if let Some(ready) = lanes.ready.pop() {
                lanes.running += 1;
                return Some(ready.started);
            }
        }
        if lanes.running_drained < limit {
            if let Some(operation) = lanes.ready_drained.pop_front() {
                lanes.running_drained += 1;
                return Some(Started {
                    operation,
                    park_only: false,
                });
            }
        }
        None
    }

    /// A started operation is done: its lane moves on.
    pub fn finish(&mut self, lane_key: &LaneKey, park_only: bool) {
        let Some(lanes) = self.connectors.get_mut(&lane_key.connector) else {
            return;
        };
        lanes.held -= 1;
        let Some(lane) = self.lanes.get_mut(lane_key) else {
            lanes.running -= 1;
            return;
        };
        if park_only {
            lanes.running -= 1;
            lane.parking = false;
        } else {
            if lane.head_drained {
                lanes.running_drained -= 1;
            } else {
                lanes.running -= 1;
            }
            lane.head_done = true;
        }
        self.advance(lane_key);
    }

    /// Starts what a lane may start: its next head once the head and any park-only
    /// operation are done, and a park-only operation while a drained head holds it.
    fn advance(&mut self, lane_key: &LaneKey) {
        let Some(lane) = self.lanes.get_mut(lane_key) else {
            return;
        };
        let connector = self
            .connectors
            .get_mut(&lane_key.connector)
            .expect("a lane's connector is known");
        if lane.head_done && !lane.parking {
            match lane.waiting.pop_front() {
                Some(next) => {
                    lane.head_done = false;
                    lane.head_drained = next.drained();
                    push_ready(connector, next, false);
                }
                None => {
                    self.lanes.remove(lane_key);
                    return;
                }
            }
        }
        if self.park_past_drains && lane.head_drained && !lane.head_done && !lane.parking {
            if let Some(position) = lane.waiting.iter().position(|operation| !operation.drained()) {
                let operation = lane.waiting.remove(position).expect("position is in range");
                lane.parking = true;
                push_ready(connector, operation, true);
            }
        }
    }

    /// Connectors that have ever held an operation.
    pub fn connectors(&self) -> Vec<Arc<str>> {
        self.connectors.keys().cloned().collect()
    }

    /// Operations `connector` holds: running, ready or waiting.
    pub fn held(&self, connector: &str) -> usize {
        self.connectors.get(connector).map_or(0, |lanes| lanes.held)
    }

    /// Operations running, all connectors together.
    pub fn running(&self) -> usize {
        self.connectors
            .values()
            .map(|lanes| lanes.running + lanes.running_drained)
            .sum()
    }

    /// Operations held, all connectors together.
    pub fn total_held(&self) -> usize {
        self.connectors.values().map(|lanes| lanes.held).sum()
    }
}

fn push_ready<Op: Laned>(connector: &mut ConnectorLanes<Op>, operation: Op, park_only: bool) {
    if operation.drained() && !park_only {
        connector.ready_drained.push_back(operation);
    } else {
        connector.arrivals += 1;
        connector.ready.push(Ready {
            sequence: operation.sequence(),
            arrival: connector.arrivals,
            started: Started { operation, park_only },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct TestOp(LaneKey, u32, bool);

    impl Laned for TestOp {
        fn lane(&self) -> &LaneKey {
            &self.0
        }
        fn drained(&self) -> bool {
            self.2
        }
        fn sequence(&self) -> u64 {
            u64::from(self.1)
        }
    }

    fn lane(connector: &str, user: &str) -> LaneKey {
        LaneKey {
            connector: connector.into(),
            ordering_key: user.into(),
        }
    }

    fn op(connector: &str, user: &str, place: u32) -> TestOp {
        TestOp(lane(connector, user), place, false)
    }

    fn drained(connector: &str, user: &str, place: u32) -> TestOp {
        TestOp(lane(connector, user), place, true)
    }

    fn run(operation: TestOp) -> Option<Started<TestOp>> {
        Some(Started {
            operation,
            park_only: false,
        })
    }

    fn park(operation: TestOp) -> Option<Started<TestOp>> {
        Some(Started {
            operation,
            park_only: true,
        })
    }

    #[test]
    fn a_lane_runs_one_operation_at_a_time_in_arrival_order() {
        let mut lanes = Lanes::new(true);
        for operation in [op("scim", "alice", 1), op("scim", "alice", 2), op("scim", "bob", 3)] {
            lanes.accept(operation);
        }
        assert_eq!(lanes.start_next("scim", 10), run(op("scim", "alice", 1)));
        assert_eq!(lanes.start_next("scim", 10), run(op("scim", "bob", 3)));
        assert_eq!(lanes.start_next("scim", 10), None, "alice 2 waits behind alice 1");
        lanes.finish(&lane("scim", "alice"), false);
        assert_eq!(lanes.start_next("scim", 10), run(op("scim", "alice", 2)));
    }

    #[test]
    fn one_users_lanes_on_different_connectors_do_not_wait_for_each_other() {
        let mut lanes = Lanes::new(true);
        for operation in [
            op("google", "alice", 1),
            op("scim", "alice", 1),
            op("google", "alice", 2),
            op("scim", "alice", 2),
        ] {
            lanes.accept(operation);
        }
        assert_eq!(lanes.start_next("google", 10), run(op("google", "alice", 1)));
        // Google's first operation is stuck; SCIM's lane for the same user goes on.
        assert_eq!(lanes.start_next("scim", 10), run(op("scim", "alice", 1)));
        lanes.finish(&lane("scim", "alice"), false);
        assert_eq!(lanes.start_next("scim", 10), run(op("scim", "alice", 2)));
        assert_eq!(lanes.start_next("google", 10), None);
        assert_eq!(lanes.held("google"), 2);
        assert_eq!(lanes.held("scim"), 1);
    }

    #[test]
    fn each_connector_has_its_own_limit() {
        let mut lanes = Lanes::new(true);
        for user in ["a", "b", "c"] {
            lanes.accept(op("google", user, 1));
            lanes.accept(op("scim", user, 1));
        }
        assert!(lanes.start_next("google", 2).is_some());
        assert!(lanes.start_next("google", 2).is_some());
        assert_eq!(lanes.start_next("google", 2), None, "google's two slots are taken");
        assert!(lanes.start_next("scim", 2).is_some(), "scim's are not");
        assert_eq!(lanes.running(), 3);
        assert_eq!(lanes.total_held(), 6);
    }

    #[test]
    fn drained_operations_waiting_on_their_target_leave_new_work_its_slots() {
        let mut lanes = Lanes::new(true);
        for user in ["a", "b"] {
            lanes.accept(drained("google", user, 1));
        }
        lanes.accept(op("google", "c", 2));
        lanes.accept(drained("google", "d", 3));
        assert_eq!(lanes.start_next("google", 2), run(op("google", "c", 2)));
        assert_eq!(lanes.start_next("google", 2), run(drained("google", "a", 1)));
        assert_eq!(lanes.start_next("google", 2), run(drained("google", "b", 1)));
        assert_eq!(lanes.start_next("google", 2), None, "both drain slots are taken");
        lanes.accept(op("google", "e", 4));
        assert_eq!(
            lanes.start_next("google", 2),
            run(op("google", "e", 4)),
            "new work still has a slot"
        );
    }

    #[test]
    fn new_work_behind_a_drained_operation_is_parked_one_at_a_time_in_order() {
        let mut lanes = Lanes::new(true);
        lanes.accept(drained("google", "alice", 1));
        assert_eq!(lanes.start_next("google", 10), run(drained("google", "alice", 1)));
        lanes.accept(op("google", "alice", 2));
        lanes.accept(drained("google", "alice", 3));
        lanes.accept(op("google", "alice", 4));
        assert_eq!(lanes.start_next("google", 10), park(op("google", "alice", 2)));
        assert_eq!(lanes.start_next("google", 10), None, "one park at a time per lane");
        lanes.finish(&lane("google", "alice"), true);
        assert_eq!(
            lanes.start_next("google", 10),
            park(op("google", "alice", 4)),
            "new work passes the drained operation 3, which stays in order behind 1"
        );
        lanes.finish(&lane("google", "alice"), true);
        lanes.finish(&lane("google", "alice"), false);
        assert_eq!(lanes.start_next("google", 10), run(drained("google", "alice", 3)));
        lanes.finish(&lane("google", "alice"), false);
        assert_eq!(lanes.start_next("google", 10), None);
        assert_eq!(lanes.held("google"), 0);
    }

    #[test]
    fn the_next_head_waits_for_a_park_in_flight() {
        let mut lanes = Lanes::new(true);
        lanes.accept(drained("google", "alice", 1));
        assert!(lanes.start_next("google", 10).is_some());
        lanes.accept(op("google", "alice", 2));
        lanes.accept(op("google", "alice", 3));
        assert_eq!(lanes.start_next("google", 10), park(op("google", "alice", 2)));
        // The drain finishes while 2 is being parked: 3 must not run before 2 is parked.
        lanes.finish(&lane("google", "alice"), false);
        assert_eq!(lanes.start_next("google", 10), None);
        lanes.finish(&lane("google", "alice"), true);
        assert_eq!(lanes.start_next("google", 10), run(op("google", "alice", 3)));
    }

    #[test]
    fn without_parking_new_work_waits_behind_a_drain() {
        let mut lanes = Lanes::new(false);
        lanes.accept(drained("google", "alice", 1));
        assert!(lanes.start_next("google", 10).is_some());
        lanes.accept(op("google", "alice", 2));
        assert_eq!(lanes.start_next("google", 10), None);
        lanes.finish(&lane("google", "alice"), false);
        assert_eq!(lanes.start_next("google", 10), run(op("google", "alice", 2)));
    }
}
