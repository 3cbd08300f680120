//! What happens when partitions come and go, beyond offset tracking.
//!
//! - **Restore before processing.** When a partition is assigned, its provisioning state
//!   is restored from the state topic on a blocking task; the pipeline holds that
//!   partition's events until the restore is done ([`Assignments::is_restoring`]).
//! - **Fencing.** When a partition is revoked, work from its old generation makes no new
//!   connector attempt (the attempt loop checks [`Assignments::is_current`]), and the
//!   revoke waits, bounded, for attempts already on the wire, so that the new owner does
//!   not race them. Versions guard whatever a slower zombie might still send.
//!
//! Callbacks arrive synchronously from inside the consumer's poll; what the pipeline
//! loop must act on is sent to it over a channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::kafka::consumer::{PartitionListener, TopicPartition};
use crate::pipeline::offsets::{OffsetTracker, Ticket};
use crate::state::ProvisioningState;

/// What the pipeline loop hears about partitions.
#[derive(Debug)]
pub enum PartitionEvent {
    /// A partition's state is restored: its held events may run.
    Restored { partition: i32, restore: u64 },
    /// A partition's restore failed; it is retried after a pause.
    RestoreFailed { partition: i32, restore: u64 },
    /// A partition was revoked: drop its held events.
    Revoked { partition: i32 },
}

pub struct Assignments {
    tracker: Arc<OffsetTracker>,
    state: Option<Arc<ProvisioningState>>,
    events: mpsc::UnboundedSender<PartitionEvent>,
    inner: Mutex<Inner>,
    /// How long a revoke waits for attempts already on the wire.
    revoke_wait: Duration,
    /// Bumped at every revoke, so that work waiting off the wire (on a gate, in a
    /// backoff sleep) looks at once whether it is still current.
    revocations: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    /// Partitions whose restore is running, with the restore's number (a partition
    /// revoked and assigned again gets a new one, so a late answer is recognised).
    restoring: HashMap<i32, u64>,
    next_restore: u64,
    /// Connector attempts on the wire, per input partition.
    attempts_in_flight: HashMap<i32, usize>,
}

impl Assignments {
    pub fn new(
        tracker: Arc<OffsetTracker>,
        state: Option<Arc<ProvisioningState>>,
        revoke_wait: Duration,
    ) -> (Arc<Assignments>, mpsc::UnboundedReceiver<PartitionEvent>) {
        let (events, receiver) = mpsc::unbounded_channel();
        let assignments = Arc::new(Assignments {
            tracker,
            state,
            events,
            inner: Mutex::new(Inner::default()),
            revoke_wait,
            revocations: watch::Sender::new(0),
        });
        (assignments, receiver)
    }

    pub fn tracker(&self) -> &Arc<OffsetTracker> {
        &self.tracker
    }

    /// Whether `partition`'s events must wait for its restore.
    pub fn is_restoring(&self, partition: i32) -> bool {
        self.inner
            .lock()
            .expect("assignments lock")
            .restoring
            .contains_key(&partition)
    }

    /// Whether work for `ticket` may still make calls: its partition is ours, in the
    /// same generation.
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        self.tracker.is_current(ticket)
    }

    /// Changes at every revoke.
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Marks a connector attempt for `partition` as on the wire until the guard drops.
    pub fn attempt(self: &Arc<Self>, partition: i32) -> AttemptGuard {
        *self
            .inner
            .lock()
            .expect("assignments lock")
            .attempts_in_flight
            .entry(partition)
            .or_default() += 1;
        AttemptGuard {
            assignments: self.clone(),
            partition,
        }
    }

    /// The restore of `partition` (number `restore`) finished; `false` when it was
    /// superseded (revoked, or assigned again since) and its result must be ignored.
    pub fn finish_restore(&self, partition: i32, restore: u64) -> bool {
        let mut inner = self.inner.lock().expect("assignments lock");
        if inner.restoring.get(&partition) == Some(&restore) {
            inner.restoring.remove(&partition);
            true
        } else {
            false
        }
    }

    /// Starts (or restarts, after a failure) the restore of `partition`.
    pub fn start_restore(self: &Arc<Self>, partition: i32, delay: Duration) {
        let Some(state) = self.state.clone() else {
            return;
        };
        let restore = {
            let mut inner = self.inner.lock().expect("assignments lock");
            inner.next_restore += 1;
            let restore = inner.next_restore;
            inner.restoring.insert(partition, restore);
            restore
        };
        let events = self.events.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(partition, "No runtime to restore on; the partition stays held.");
            return;
        };
        runtime.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let task_state = state.clone();
            let result = tokio::task::spawn_blocking(move || task_state.restore(partition)).await;
            let event = match result {
                Ok(Ok(report)) => {
                    tracing::info!(
                        partition,
                        from_offset = report.from_offset,
                        next_offset = report.next_offset,
                        records = report.records,
                        ignored = report.ignored,
                        full = report.full,
                        elapsed_ms = report.elapsed.as_millis() as u64,
                        "Provisioning state restored."
                    );
                    PartitionEvent::Restored { partition, restore }
                }
                Ok(Err(error)) => {
                    tracing::error!(partition, error = %error, "Restoring the provisioning state failed; its events wait and the restore is retried.");
                    PartitionEvent::RestoreFailed { partition, restore }
                }
                Err(error) => {
                    tracing::error!(partition, error = %error, "The restore task failed; retrying.");
                    PartitionEvent::RestoreFailed { partition, restore }
                }
            };
            let _ = events.send(event);
        });
    }

    /// Waits (bounded) until no attempt of `partitions` is on the wire.
    fn wait_for_attempts(&self, partitions: &[i32]) {
        let deadline = Instant::now() + self.revoke_wait;
        let busy = || {
            let inner = self.inner.lock().expect("assignments lock");
            partitions
                .iter()
                .map(|partition| inner.attempts_in_flight.get(partition).copied().unwrap_or(0))
                .sum::<usize>()
        };
        let wait = || {
            while busy() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        if busy() == 0 {
            return;
        }
        // The callback runs on a runtime worker (inside the consumer's poll): let the
        // runtime move its other tasks elsewhere while this one waits.
        let flavor = tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor());
        if let Ok(tokio::runtime::RuntimeFlavor::MultiThread) = flavor {
            tokio::task::block_in_place(wait);
        }
        let left = busy();
        if left > 0 {
            tracing::warn!(partitions = ?partitions, attempts = left, "Revoke: attempts still on the wire after the wait; the new owner may race them (versions guard the state).");
        }
    }
}

impl PartitionListener for Assignments {
    fn assigned(&self, partitions: &[TopicPartition]) {
        self.tracker.assigned(partitions);
    }

    fn revoked(&self, partitions: &[TopicPartition]) {
        // Fence first: from here on, attempts for these partitions are refused.
        self.tracker.revoked(partitions);
        self.revocations.send_modify(|count| *count += 1);
        let numbers: Vec<i32> = partitions
            .iter()
            .map(|(_, partition)| *partition)
            .collect::<std::collections::BTreeSet<i32>>()
            .into_iter()
            .collect();
        {
            let mut inner = self.inner.lock().expect("assignments lock");
            for partition in &numbers {
                inner.restoring.remove(partition);
            }
        }
        for partition in &numbers {
            let _ = self.events.send(PartitionEvent::Revoked { partition: *partition });
        }
        self.wait_for_attempts(&numbers);
    }
}

/// Restores need an `Arc<Assignments>`; the consumer's listener gets this wrapper.
pub struct AssignmentListener(pub Arc<Assignments>);

impl PartitionListener for AssignmentListener {
    fn assigned(&self, partitions: &[TopicPartition]) {
        self.0.assigned(partitions);
        // Retry partitions come with their input partition: one restore per number.
        let numbers: std::collections::BTreeSet<i32> = partitions.iter().map(|(_, partition)| *partition).collect();
        for partition in numbers {
            self.0.start_restore(partition, Duration::ZERO);
        }
    }

    fn revoked(&self, partitions: &[TopicPartition]) {
        self.0.revoked(partitions);
    }
}

/// An attempt on the wire; dropping it ends it.
pub struct AttemptGuard {
    assignments: Arc<Assignments>,
    partition: i32,
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        let mut inner = self.assignments.inner.lock().expect("assignments lock");
        if let Some(count) = inner.attempts_in_flight.get_mut(&self.partition) {
            *count = count.saturating_sub(1);
        }
    }
}
