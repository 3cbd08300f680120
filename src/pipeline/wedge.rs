//! Wedge detection: a partition whose oldest unfinished offset has not moved for
//! `pipeline.wedge_after` while its events wait.
//!
//! Nothing in the pipeline gives up on an event by itself except the connectors' retry
//! bounds, and a produce is retried until it is written, so one event that never
//! finishes holds its partition's stored offset where it is: every later event of the
//! partition may finish, but none is committed, and a restart redoes them all. Lag grows
//! slowly on a quiet partition and says nothing about which one. This watch says it: per
//! partition, how long the watermark has waited on its oldest unfinished offset
//! ([`OffsetTracker::oldest_unfinished`]), and whether that is longer than
//! `wedge_after`. A wedged partition shows on metrics and fails readiness.
//!
//! The watch only reads the tracker, every [`check_interval`], so the pipeline loop does
//! no extra work per event.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::kafka::consumer::TopicPartition;
use crate::metrics::Metrics;
use crate::pipeline::offsets::OffsetTracker;

/// Told how many partitions are wedged, for the readiness probe. The service passes its
/// `admin::Readiness`; the pipeline does not know `admin`.
pub trait WedgeObserver: Send + Sync + 'static {
    fn set_wedged_partitions(&self, wedged: usize);
}

/// Whether a partition whose oldest unfinished offset has waited `age` is wedged.
pub fn is_wedged(age: Duration, wedge_after: Duration) -> bool {
    age >= wedge_after
}

/// How often the watch looks: a quarter of `wedge_after`, so a wedge is reported at most
/// a quarter late, but no more than every 200 ms (short settings in tests) and at least
/// every 5 s (what a scrape can see anyway).
pub fn check_interval(wedge_after: Duration) -> Duration {
    (wedge_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

pub struct WedgeWatch {
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    observer: Arc<dyn WedgeObserver>,
    wedge_after: Duration,
    /// The input topics. Retry topics are not watched: parked work waiting there for a
    /// target that is down is the design working, not a wedge (the input moves on).
    inputs: Vec<String>,
    /// Partitions with metric labels set by the last check, so that a revoked partition's
    /// labels are removed at the next one.
    labelled: HashSet<TopicPartition>,
    /// Partitions wedged at the last check, so the log says when one wedges and when it
    /// moves again, once each.
    wedged: HashSet<TopicPartition>,
}

impl WedgeWatch {
    pub fn new(
        tracker: Arc<OffsetTracker>,
        metrics: Arc<Metrics>,
        observer: Arc<dyn WedgeObserver>,
        wedge_after: Duration,
        inputs: Vec<String>,
    ) -> WedgeWatch {
        WedgeWatch {
            tracker,
            metrics,
            observer,
            wedge_after,
            inputs,
            labelled: HashSet::new(),
            wedged: HashSet::new(),
        }
    }

    /// Checks every [`check_interval`] until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(check_interval(self.wedge_after));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.check(Instant::now());
        }
    }

    /// Updates the per-partition gauges, the wedged count and readiness as of `now`;
    /// returns how many partitions are wedged.
    pub fn check(&mut self, now: Instant) -> usize {
        let mut assigned = self.tracker.assigned_partitions();
        assigned.retain(|(topic, _)| self.inputs.contains(topic));
        let heads = self.tracker.oldest_unfinished(now);
        let mut wedged_now = HashSet::new();
        for partition in &assigned {
            let head = heads
                .iter()
                .find(|head| head.topic == partition.0 && head.partition == partition.1);
            let age = head.map(|head| head.age).unwrap_or_default();
            let wedged = head.is_some() && is_wedged(age, self.wedge_after);
            let labels = [partition.0.as_str(), &partition.1.to_string()];
            self.metrics
                .partition_oldest_unfinished_age
                .with_label_values(&labels)
                .set(age.as_secs_f64());
            self.metrics
                .partition_wedged
                .with_label_values(&labels)
                .set(i64::from(wedged));
            if let (true, Some(head)) = (wedged, head) {
                if !self.wedged.contains(partition) {
                    tracing::warn!(
                        topic = %head.topic,
                        partition = head.partition,
                        offset = head.offset,
                        waited_s = head.age.as_secs(),
                        wedge_after_s = self.wedge_after.as_secs(),
                        "Partition wedged: its oldest unfinished event has not finished for pipeline.wedge_after; its offset cannot advance. /readyz fails until it moves."
                    );
                }
                wedged_now.insert(partition.clone());
            }
        }
        for partition in self.wedged.difference(&wedged_now) {
            // Moved again, or revoked (its new owner reports it if it is still stuck).
            tracing::info!(topic = %partition.0, partition = partition.1, "Partition no longer wedged.");
        }
        let assigned: HashSet<TopicPartition> = assigned.into_iter().collect();
        for partition in self.labelled.difference(&assigned) {
            let labels = [partition.0.as_str(), &partition.1.to_string()];
            let _ = self
                .metrics
                .partition_oldest_unfinished_age
                .remove_label_values(&labels);
            let _ = self.metrics.partition_wedged.remove_label_values(&labels);
        }
        self.labelled = assigned;
        let count = wedged_now.len();
        self.wedged = wedged_now;
        self.metrics.partitions_wedged.set(count as i64);
        self.observer.set_wedged_partitions(count);
        count
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::kafka::consumer::PartitionListener;

    #[derive(Default)]
    struct Observed(AtomicUsize);

    impl WedgeObserver for Observed {
        fn set_wedged_partitions(&self, wedged: usize) {
            self.0.store(wedged, Ordering::Relaxed);
        }
    }

    const WEDGE_AFTER: Duration = Duration::from_secs(60);

    fn watch() -> (WedgeWatch, Arc<OffsetTracker>, Arc<Metrics>, Arc<Observed>) {
        let tracker = Arc::new(OffsetTracker::default());
        tracker.assigned(&[("events".to_string(), 0), ("events".to_string(), 1)]);
        let metrics = Arc::new(Metrics::new());
        let observed = Arc::new(Observed::default());
        let watch = WedgeWatch::new(
            tracker.clone(),
            metrics.clone(),
            observed.clone(),
            WEDGE_AFTER,
            vec!["events".to_string()],
        );
        (watch, tracker, metrics, observed)
    }

    fn wedged_gauge(metrics: &Metrics, partition: &str) -> i64 {
        metrics.partition_wedged.with_label_values(&["events", partition]).get()
    }

    #[test]
    fn a_partition_is_wedged_once_its_head_has_waited_wedge_after() {
        assert!(!is_wedged(Duration::from_secs(59), WEDGE_AFTER));
        assert!(is_wedged(WEDGE_AFTER, WEDGE_AFTER));
        assert!(is_wedged(Duration::from_secs(3600), WEDGE_AFTER));
    }

    #[test]
    fn the_check_interval_is_a_quarter_of_wedge_after_within_bounds() {
        assert_eq!(check_interval(Duration::from_secs(300)), Duration::from_secs(5));
        assert_eq!(check_interval(Duration::from_secs(8)), Duration::from_secs(2));
        assert_eq!(check_interval(Duration::from_millis(100)), Duration::from_millis(200));
    }

    /// The watch judges ages at the `now` it is given: each test takes the real clock
    /// once, after tracking, and looks ahead from there, so nothing waits.
    #[test]
    fn a_stuck_head_wedges_its_partition_and_moving_unwedges_it() {
        let (mut watch, tracker, metrics, observed) = watch();
        let ticket = tracker.track("events", 0, 41).unwrap();
        let tracked = Instant::now();
        assert_eq!(watch.check(tracked), 0);
        assert_eq!(wedged_gauge(&metrics, "0"), 0);
        assert_eq!(wedged_gauge(&metrics, "1"), 0, "idle partitions are reported too");

        let later = tracked + WEDGE_AFTER + Duration::from_secs(1);
        assert_eq!(watch.check(later), 1);
        assert_eq!(wedged_gauge(&metrics, "0"), 1);
        assert_eq!(wedged_gauge(&metrics, "1"), 0, "an idle partition never wedges");
        assert_eq!(metrics.partitions_wedged.get(), 1);
        assert_eq!(observed.0.load(Ordering::Relaxed), 1);
        let age = metrics
            .partition_oldest_unfinished_age
            .with_label_values(&["events", "0"])
            .get();
        assert!(age >= WEDGE_AFTER.as_secs_f64(), "age {age}");

        assert_eq!(tracker.complete(&ticket), Some(42));
        assert_eq!(watch.check(later), 0);
        assert_eq!(wedged_gauge(&metrics, "0"), 0);
        assert_eq!(metrics.partitions_wedged.get(), 0);
        assert_eq!(observed.0.load(Ordering::Relaxed), 0);
        assert_eq!(
            metrics
                .partition_oldest_unfinished_age
                .with_label_values(&["events", "0"])
                .get(),
            0.0
        );
    }

    #[test]
    fn a_revoked_partition_loses_its_labels_and_its_wedge() {
        let (mut watch, tracker, metrics, observed) = watch();
        tracker.track("events", 1, 7).unwrap();
        let later = Instant::now() + WEDGE_AFTER * 2;
        assert_eq!(watch.check(later), 1);
        assert!(metrics
            .render()
            .contains("provisioner_partition_wedged{partition=\"1\",topic=\"events\"} 1"));

        tracker.revoked(&[("events".to_string(), 1)]);
        assert_eq!(watch.check(later), 0);
        assert_eq!(observed.0.load(Ordering::Relaxed), 0);
        let text = metrics.render();
        assert!(!text.contains("partition=\"1\""), "revoked labels remain:\n{text}");
        assert!(text.contains("provisioner_partition_wedged{partition=\"0\",topic=\"events\"} 0"));
    }
}
