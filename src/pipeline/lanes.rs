//! Per-(connector, user) lanes: the order and concurrency of connector operations.
//!
//! An event fans out into one operation per binding that applies. Operations of one
//! lane (one connector, one ordering key, normally `tenant/user id`) run one at a time,
//! in the order they were accepted, retries included. Lanes of one connector run
//! concurrently, up to that connector's limit. Nothing here is shared between
//! connectors: an operation waiting on one connector's target occupies only that
//! connector's slots, so a target that is down holds up no other target.
//!
//! It only counts and orders; the pipeline loop runs the operations.

use std::collections::{HashMap, VecDeque};
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
}

/// One connector's share: its ready operations and counts.
struct ConnectorLanes<Op> {
    ready: VecDeque<Op>,
    running: usize,
    /// Operations held: running, ready or waiting in a lane.
    held: usize,
}

impl<Op> Default for ConnectorLanes<Op> {
    fn default() -> Self {
        ConnectorLanes {
            ready: VecDeque::new(),
            running: 0,
            held: 0,
        }
    }
}

pub struct Lanes<Op> {
    /// A lane is present while one of its operations is ready or running; the queue
    /// holds those waiting behind it.
    waiting: HashMap<LaneKey, VecDeque<Op>>,
    connectors: HashMap<Arc<str>, ConnectorLanes<Op>>,
}

impl<Op> Default for Lanes<Op> {
    fn default() -> Self {
        Lanes {
            waiting: HashMap::new(),
            connectors: HashMap::new(),
        }
    }
}

impl<Op: Laned> Lanes<Op> {
    pub fn accept(&mut self, operation: Op) {
        let connector = self.connectors.entry(operation.lane().connector.clone()).or_default();
        connector.held += 1;
        match self.waiting.get_mut(operation.lane()) {
            Some(queue) => queue.push_back(operation),
            None => {
                self.waiting.insert(operation.lane().clone(), VecDeque::new());
                connector.ready.push_back(operation);
            }
        }
    }

    /// The next ready operation of `connector`, counted as running, while fewer than
    /// `limit` of its operations run.
    pub fn start_next(&mut self, connector: &str, limit: usize) -> Option<Op> {
        let lanes = self.connectors.get_mut(connector)?;
        if lanes.running >= limit {
            return None;
        }
        let operation = lanes.ready.pop_front()?;
        lanes.running += 1;
        Some(operation)
    }

    /// A started operation is done: its lane's next operation becomes ready.
    pub fn finish(&mut self, lane: &LaneKey) {
        let Some(lanes) = self.connectors.get_mut(&lane.connector) else {
            return;
        };
        lanes.running -= 1;
        lanes.held -= 1;
        if let Some(queue) = self.waiting.get_mut(lane) {
            match queue.pop_front() {
                Some(next) => lanes.ready.push_back(next),
                None => {
                    self.waiting.remove(lane);
                }
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
        self.connectors.values().map(|lanes| lanes.running).sum()
    }

    /// Operations held, all connectors together.
    pub fn total_held(&self) -> usize {
        self.connectors.values().map(|lanes| lanes.held).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct TestOp(LaneKey, u32);

    impl Laned for TestOp {
        fn lane(&self) -> &LaneKey {
            &self.0
        }
    }

    fn op(connector: &str, user: &str, place: u32) -> TestOp {
        TestOp(
            LaneKey {
                connector: connector.into(),
                ordering_key: user.into(),
            },
            place,
        )
    }

    #[test]
    fn a_lane_runs_one_operation_at_a_time_in_arrival_order() {
        let mut lanes = Lanes::default();
        for operation in [op("scim", "alice", 1), op("scim", "alice", 2), op("scim", "bob", 3)] {
            lanes.accept(operation);
        }
        assert_eq!(lanes.start_next("scim", 10), Some(op("scim", "alice", 1)));
        assert_eq!(lanes.start_next("scim", 10), Some(op("scim", "bob", 3)));
        assert_eq!(lanes.start_next("scim", 10), None, "alice 2 waits behind alice 1");
        lanes.finish(&op("scim", "alice", 1).0);
        assert_eq!(lanes.start_next("scim", 10), Some(op("scim", "alice", 2)));
    }

    #[test]
    fn one_users_lanes_on_different_connectors_do_not_wait_for_each_other() {
        let mut lanes = Lanes::default();
        for operation in [
            op("google", "alice", 1),
            op("scim", "alice", 1),
            op("google", "alice", 2),
            op("scim", "alice", 2),
        ] {
            lanes.accept(operation);
        }
        assert_eq!(lanes.start_next("google", 10), Some(op("google", "alice", 1)));
        // Google's first operation is stuck; SCIM's lane for the same user goes on.
        assert_eq!(lanes.start_next("scim", 10), Some(op("scim", "alice", 1)));
        lanes.finish(&op("scim", "alice", 1).0);
        assert_eq!(lanes.start_next("scim", 10), Some(op("scim", "alice", 2)));
        assert_eq!(lanes.start_next("google", 10), None);
        assert_eq!(lanes.held("google"), 2);
        assert_eq!(lanes.held("scim"), 1);
    }

    #[test]
    fn each_connector_has_its_own_limit() {
        let mut lanes = Lanes::default();
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
}
