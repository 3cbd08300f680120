//! Which input offsets may be stored.
//!
//! Events of one partition finish out of order (different users run concurrently).
//! Kafka keeps one offset per partition, so we may store only the *contiguous*
//! watermark: the first offset whose event is not finished yet.
//!
//! **Invariant:** the stored offset never passes an unfinished event, and never moves
//! backwards within one assignment.
//!
//! Each assignment of a partition gets a new generation. Work from an older generation
//! (the partition was revoked, maybe re-assigned since) finishes without storing
//! anything: the new owner, or our new generation, redoes it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::kafka::consumer::{PartitionListener, TopicPartition};

/// Proof that an offset is being tracked, handed back on completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

#[derive(Default)]
struct PartitionState {
    generation: u64,
    /// Offsets read and not yet below the watermark, ascending, with a done flag.
    pending: VecDeque<(i64, bool)>,
}

#[derive(Default)]
pub struct OffsetTracker {
    inner: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    partitions: HashMap<TopicPartition, PartitionState>,
    next_generation: u64,
}

impl OffsetTracker {
    /// Starts tracking a record just read. `None` when the partition is not assigned
    /// (a record that raced a revoke): the caller drops it, the next owner reads it.
    pub fn track(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        let mut state = self.inner.lock().expect("offset tracker lock");
        let partition_state = state.partitions.get_mut(&(topic.to_string(), partition))?;
        if let Some((last, _)) = partition_state.pending.back() {
            if offset <= *last {
                // A re-fetch after pause/resume can repeat offsets; the earlier copy is
                // already tracked and will be processed.
                return None;
            }
        }
        partition_state.pending.push_back((offset, false));
        Some(Ticket {
            topic: topic.to_string(),
            partition,
            offset,
            generation: partition_state.generation,
        })
    }

    /// Whether the ticket's partition is still ours in the same generation.
    pub fn is_current(&self, ticket: &Ticket) -> bool {
        let state = self.inner.lock().expect("offset tracker lock");
        state
            .partitions
            .get(&(ticket.topic.clone(), ticket.partition))
            .is_some_and(|partition| partition.generation == ticket.generation)
    }

    /// Marks the ticket's event finished. Returns the offset to store (first unfinished
    /// offset) when the watermark moved.
    pub fn complete(&self, ticket: &Ticket) -> Option<i64> {
        let mut state = self.inner.lock().expect("offset tracker lock");
        let partition = state.partitions.get_mut(&(ticket.topic.clone(), ticket.partition))?;
        if partition.generation != ticket.generation {
            return None;
        }
        let index = partition
            .pending
            .binary_search_by_key(&ticket.offset, |(offset, _)| *offset)
            .ok()?;
        partition.pending[index].1 = true;
        let mut watermark = None;
        while let Some((offset, true)) = partition.pending.front().copied() {
            partition.pending.pop_front();
            watermark = Some(offset + 1);
        }
        watermark
    }

    /// Events read but not yet below the watermark, across partitions.
    pub fn pending_count(&self) -> usize {
        let state = self.inner.lock().expect("offset tracker lock");
        state.partitions.values().map(|partition| partition.pending.len()).sum()
    }
}

impl PartitionListener for OffsetTracker {
    fn assigned(&self, partitions: &[TopicPartition]) {
        let mut state = self.inner.lock().expect("offset tracker lock");
        for partition in partitions {
            state.next_generation += 1;
            let generation = state.next_generation;
            state.partitions.insert(
                partition.clone(),
                PartitionState {
                    generation,
                    pending: VecDeque::new(),
                },
            );
        }
    }

    fn revoked(&self, partitions: &[TopicPartition]) {
        let mut state = self.inner.lock().expect("offset tracker lock");
        for partition in partitions {
            state.partitions.remove(partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> OffsetTracker {
        let tracker = OffsetTracker::default();
        tracker.assigned(&[("events".to_string(), 0)]);
        tracker
    }

    #[test]
    fn watermark_waits_for_the_oldest_unfinished_event() {
        let tracker = tracker();
        let tickets: Vec<Ticket> = (10..15)
            .map(|offset| tracker.track("events", 0, offset).unwrap())
            .collect();
        assert_eq!(tracker.complete(&tickets[1]), None, "offset 10 is still running");
        assert_eq!(tracker.complete(&tickets[2]), None);
        assert_eq!(tracker.complete(&tickets[0]), Some(13), "10, 11 and 12 are done");
        assert_eq!(tracker.complete(&tickets[4]), None);
        assert_eq!(tracker.complete(&tickets[3]), Some(15));
        assert_eq!(tracker.pending_count(), 0);
    }

    #[test]
    fn work_from_a_revoked_generation_stores_nothing() {
        let tracker = tracker();
        let old = tracker.track("events", 0, 5).unwrap();
        tracker.revoked(&[("events".to_string(), 0)]);
        assert!(!tracker.is_current(&old));
        assert_eq!(tracker.complete(&old), None);
        tracker.assigned(&[("events".to_string(), 0)]);
        let new = tracker.track("events", 0, 5).unwrap();
        assert_eq!(tracker.complete(&old), None, "old generation still ignored");
        assert_eq!(tracker.complete(&new), Some(6));
    }

    #[test]
    fn unassigned_partitions_are_not_tracked() {
        let tracker = tracker();
        assert_eq!(tracker.track("events", 1, 0), None);
    }

    /// Random completion orders: the watermark never passes an unfinished offset and
    /// never goes backwards.
    #[test]
    fn watermark_invariants_hold_for_random_orders() {
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let tracker = tracker();
            let count = 50;
            let mut tickets: Vec<Ticket> = (0..count)
                .map(|offset| tracker.track("events", 0, offset).unwrap())
                .collect();
            tickets.shuffle(&mut rng);
            let mut finished = vec![false; count as usize];
            let mut last_watermark = 0;
            for ticket in &tickets {
                finished[ticket.offset as usize] = true;
                if let Some(watermark) = tracker.complete(ticket) {
                    assert!(watermark > last_watermark, "watermark went backwards");
                    assert!(
                        finished[..watermark as usize].iter().all(|done| *done),
                        "passed an unfinished event"
                    );
                    last_watermark = watermark;
                }
            }
            assert_eq!(last_watermark, count);
        }
    }
}
