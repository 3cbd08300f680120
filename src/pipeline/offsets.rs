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
//!
//! Each partition also remembers since when its oldest unfinished offset (the head of
//! `pending`, the offset the stored watermark waits for) has been the head, so that a
//! partition that does not move can be told from one that moves slowly
//! ([`OffsetTracker::oldest_unfinished`], read by `wedge.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// When the head of `pending` became the head: tracked into an empty queue, or
    /// left at the front when the watermark moved. `None` while `pending` is empty.
    head_since: Option<Instant>,
}

/// A partition with work read and not finished: its oldest unfinished offset, and how
/// long that offset has been the oldest (how long the stored watermark has waited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldestUnfinished {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub age: Duration,
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
        self.track_at(topic, partition, offset, Instant::now())
    }

    fn track_at(&self, topic: &str, partition: i32, offset: i64, now: Instant) -> Option<Ticket> {
        let mut state = self.inner.lock().expect("offset tracker lock");
        let partition_state = state.partitions.get_mut(&(topic.to_string(), partition))?;
        if let Some((last, _)) = partition_state.pending.back() {
            if offset <= *last {
                // A re-fetch after pause/resume can repeat offsets; the earlier copy is
                // already tracked and will be processed.
                return None;
            }
        }
        if partition_state.pending.is_empty() {
            partition_state.head_since = Some(now);
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
        self.complete_at(ticket, Instant::now())
    }

    fn complete_at(&self, ticket: &Ticket, now: Instant) -> Option<i64> {
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
        if watermark.is_some() {
            // The head moved: a new oldest unfinished offset starts its wait now, however
            // long ago it was read (what is measured is the watermark standing still).
            partition.head_since = (!partition.pending.is_empty()).then_some(now);
        }
        watermark
    }

    /// Offsets read but not yet below the watermark, in partitions of topics `counted`
    /// accepts.
    pub fn pending_count_where(&self, counted: impl Fn(&str) -> bool) -> usize {
        let state = self.inner.lock().expect("offset tracker lock");
        state
            .partitions
            .iter()
            .filter(|((topic, _), _)| counted(topic))
            .map(|(_, partition)| partition.pending.len())
            .sum()
    }

    /// Events read but not yet below the watermark, across partitions.
    pub fn pending_count(&self) -> usize {
        let state = self.inner.lock().expect("offset tracker lock");
        state.partitions.values().map(|partition| partition.pending.len()).sum()
    }

    /// Every partition assigned now, busy or idle, sorted.
    pub fn assigned_partitions(&self) -> Vec<TopicPartition> {
        let state = self.inner.lock().expect("offset tracker lock");
        let mut partitions: Vec<TopicPartition> = state.partitions.keys().cloned().collect();
        partitions.sort();
        partitions
    }

    /// For each assigned partition with unfinished work, its oldest unfinished offset
    /// and how long, as of `now`, that offset has been the oldest. Sorted by topic and
    /// partition. Idle partitions (nothing read and unfinished) are left out: nothing
    /// waits on them.
    pub fn oldest_unfinished(&self, now: Instant) -> Vec<OldestUnfinished> {
        let state = self.inner.lock().expect("offset tracker lock");
        let mut heads: Vec<OldestUnfinished> = state
            .partitions
            .iter()
            .filter_map(|((topic, partition), partition_state)| {
                let (offset, _) = partition_state.pending.front()?;
                let since = partition_state.head_since?;
                Some(OldestUnfinished {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                    age: now.saturating_duration_since(since),
                })
            })
            .collect();
        heads.sort_by(|left, right| (&left.topic, left.partition).cmp(&(&right.topic, right.partition)));
        heads
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
                    head_since: None,
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

    fn head(tracker: &OffsetTracker, now: Instant) -> Vec<(i32, i64, Duration)> {
        tracker
            .oldest_unfinished(now)
            .into_iter()
            .map(|head| (head.partition, head.offset, head.age))
            .collect()
    }

    #[test]
    fn an_idle_partition_has_no_oldest_unfinished_offset() {
        let tracker = tracker();
        let start = Instant::now();
        assert_eq!(head(&tracker, start), vec![]);
        assert_eq!(tracker.assigned_partitions(), vec![("events".to_string(), 0)]);
        let ticket = tracker.track_at("events", 0, 7, start).unwrap();
        assert_eq!(tracker.complete_at(&ticket, start + Duration::from_secs(1)), Some(8));
        assert_eq!(
            head(&tracker, start + Duration::from_secs(60)),
            vec![],
            "nothing waits once everything read is finished"
        );
    }

    #[test]
    fn the_age_counts_from_when_the_head_was_first_tracked() {
        let tracker = tracker();
        let start = Instant::now();
        tracker.track_at("events", 0, 10, start).unwrap();
        tracker
            .track_at("events", 0, 11, start + Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            head(&tracker, start + Duration::from_secs(30)),
            vec![(0, 10, Duration::from_secs(30))],
            "later records do not reset the wait of the oldest"
        );
    }

    #[test]
    fn the_age_restarts_when_the_head_moves_and_not_otherwise() {
        let tracker = tracker();
        let start = Instant::now();
        let tickets: Vec<Ticket> = (10..13)
            .map(|offset| tracker.track_at("events", 0, offset, start).unwrap())
            .collect();
        // A later offset finishing does not move the watermark: the wait goes on.
        assert_eq!(tracker.complete_at(&tickets[1], start + Duration::from_secs(10)), None);
        assert_eq!(
            head(&tracker, start + Duration::from_secs(20)),
            vec![(0, 10, Duration::from_secs(20))]
        );
        // The head finishes: 10 and 11 go below the watermark, 12 is the new head, and
        // its wait starts now although it was read at `start`.
        let moved = start + Duration::from_secs(25);
        assert_eq!(tracker.complete_at(&tickets[0], moved), Some(12));
        assert_eq!(
            head(&tracker, moved + Duration::from_secs(3)),
            vec![(0, 12, Duration::from_secs(3))]
        );
    }

    #[test]
    fn a_head_tracked_again_after_an_idle_spell_starts_a_new_wait() {
        let tracker = tracker();
        let start = Instant::now();
        let first = tracker.track_at("events", 0, 1, start).unwrap();
        tracker.complete_at(&first, start + Duration::from_secs(1)).unwrap();
        tracker
            .track_at("events", 0, 2, start + Duration::from_secs(100))
            .unwrap();
        assert_eq!(
            head(&tracker, start + Duration::from_secs(101)),
            vec![(0, 2, Duration::from_secs(1))]
        );
    }

    #[test]
    fn revoked_partitions_are_not_reported_and_a_new_assignment_starts_afresh() {
        let tracker = tracker();
        tracker.assigned(&[("events".to_string(), 1)]);
        let start = Instant::now();
        tracker.track_at("events", 0, 5, start).unwrap();
        tracker.track_at("events", 1, 9, start).unwrap();
        let later = start + Duration::from_secs(10);
        assert_eq!(
            head(&tracker, later),
            vec![(0, 5, Duration::from_secs(10)), (1, 9, Duration::from_secs(10))]
        );
        tracker.revoked(&[("events".to_string(), 1)]);
        assert_eq!(head(&tracker, later), vec![(0, 5, Duration::from_secs(10))]);
        assert_eq!(tracker.assigned_partitions(), vec![("events".to_string(), 0)]);
        tracker.assigned(&[("events".to_string(), 1)]);
        assert_eq!(head(&tracker, later), vec![(0, 5, Duration::from_secs(10))]);
    }

    #[test]
    fn a_clock_before_the_head_reads_as_no_wait() {
        let tracker = tracker();
        let start = Instant::now();
        tracker
            .track_at("events", 0, 3, start + Duration::from_secs(5))
            .unwrap();
        assert_eq!(head(&tracker, start), vec![(0, 3, Duration::ZERO)]);
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
