//! The consume → schedule → process → store-offset loop.
//!
//! One task owns the consumer and the scheduling state; each event runs in its own
//! worker task. Ordering and concurrency rules:
//! - events with the same key (`tenant/user id`) run one at a time, in offset order,
//!   retries included (a per-key queue);
//! - different users run concurrently, up to `pipeline.max_in_flight`, and each
//!   connector caps its own concurrent calls;
//! - when `pipeline.max_buffered_events` events are held, every partition is paused
//!   until the backlog drains to three quarters of that, so memory stays bounded;
//! - an offset is stored only when it and every earlier offset of its partition are
//!   finished with durable outputs ([`offsets::OffsetTracker`]).

pub mod assignments;
pub mod offsets;
pub mod process;
pub mod router;
pub mod wedge;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::event::{self, DecodeError, UserEvent};
use crate::kafka::consumer::{ConsumeError, EventConsumer};
use crate::kafka::InboundRecord;
use crate::metrics::Metrics;
use crate::pipeline::assignments::{Assignments, PartitionEvent};
use crate::pipeline::offsets::Ticket;
use crate::pipeline::process::Worker;
use crate::settings::OrderingMode;

/// One accepted record, waiting for or holding its key.
struct Job {
    record: Arc<InboundRecord>,
    decoded: Result<UserEvent, DecodeError>,
    ticket: Ticket,
    ordering_key: String,
}

/// What the scheduler needs of a job: the key it is ordered by.
trait Keyed {
    fn ordering_key(&self) -> &str;
}

impl Keyed for Job {
    fn ordering_key(&self) -> &str {
        &self.ordering_key
    }
}

/// Per-key FIFO queues plus a ready queue bounded by the in-flight limit. It only
/// counts and orders; the pipeline loop runs the jobs.
struct Scheduler<J> {
    /// A key is present while one of its jobs is ready or running; the queue holds
    /// the jobs waiting behind it.
    waiting_by_key: HashMap<String, VecDeque<J>>,
    ready: VecDeque<J>,
    running: usize,
    /// Jobs held: running, ready or waiting.
    buffered: usize,
}

impl<J> Default for Scheduler<J> {
    fn default() -> Self {
        Scheduler {
            waiting_by_key: HashMap::new(),
            ready: VecDeque::new(),
            running: 0,
            buffered: 0,
        }
    }
}

impl<J: Keyed> Scheduler<J> {
    fn accept(&mut self, job: J) {
        self.buffered += 1;
        match self.waiting_by_key.get_mut(job.ordering_key()) {
            Some(queue) => queue.push_back(job),
            None => {
                self.waiting_by_key
                    .insert(job.ordering_key().to_string(), VecDeque::new());
                self.ready.push_back(job);
            }
        }
    }

    /// The next ready job, counted as running, while fewer than `max_in_flight` run.
    fn start_next(&mut self, max_in_flight: usize) -> Option<J> {
        if self.running >= max_in_flight {
            return None;
        }
        let job = self.ready.pop_front()?;
        self.running += 1;
        Some(job)
    }

    /// A started job must wait (its partition's state is being restored): it stays
    /// buffered, holding its key, but no longer counts as running.
    fn hold(&mut self) {
        self.running -= 1;
    }

    /// A held job may run again.
    fn release_held(&mut self, job: J) {
        self.ready.push_back(job);
    }

    /// A held job was dropped unrun (its partition was revoked).
    fn drop_held(&mut self, ordering_key: &str) {
        self.running += 1;
        self.finish(ordering_key);
    }

    /// A started job is done (or was dropped unrun): its key's next job becomes ready.
    fn finish(&mut self, ordering_key: &str) {
        self.running -= 1;
        self.buffered -= 1;
        if let Some(queue) = self.waiting_by_key.get_mut(ordering_key) {
            match queue.pop_front() {
                Some(next) => self.ready.push_back(next),
                None => {
                    self.waiting_by_key.remove(ordering_key);
                }
            }
        }
    }
}

pub struct Pipeline {
    pub consumer: EventConsumer,
    pub worker: Arc<Worker>,
    pub assignments: Arc<Assignments>,
    pub partition_events: mpsc::UnboundedReceiver<PartitionEvent>,
    pub metrics: Arc<Metrics>,
    pub max_in_flight: usize,
    pub max_buffered_events: usize,
    pub shutdown_grace: Duration,
    pub ordering: OrderingMode,
}

/// What a finished worker task hands back: its outputs are durable.
struct Finished {
    ticket: Ticket,
    ordering_key: String,
}

/// A started job, kept so that a panicking worker can still be accounted for.
#[derive(Clone)]
struct RunningJob {
    ticket: Ticket,
    ordering_key: String,
    record: Arc<InboundRecord>,
}

impl Pipeline {
    /// Runs until `shutdown` is cancelled, then drains: fetching stops, and every event
    /// already held (running or queued) is finished for up to `shutdown_grace`, so the
    /// stored offsets cover everything that produced a result and a restart redoes
    /// nothing acknowledged. Then it commits and leaves the group. Work still unfinished
    /// when the grace runs out is abandoned and redelivered after the restart.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumeError> {
        let Pipeline {
            consumer,
            worker,
            assignments,
            mut partition_events,
            metrics,
            max_in_flight,
            max_buffered_events,
            shutdown_grace,
            ordering,
        } = self;
        let resume_below = (max_buffered_events * 3 / 4).max(1);
        let mut scheduler: Scheduler<Job> = Scheduler::default();
        let mut workers: JoinSet<Finished> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, RunningJob> = HashMap::new();
        let mut paused = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let tracker = assignments.tracker().clone();
        // Jobs waiting for their partition's state restore, by partition.
        let mut held: HashMap<i32, VecDeque<Job>> = HashMap::new();
        let mut consecutive_consumer_errors = 0u32;
        let mut fatal: Option<ConsumeError> = None;

        loop {
            dispatch(
                &mut scheduler,
                &mut workers,
                &mut running,
                &mut held,
                &worker,
                &assignments,
                max_in_flight,
            );
            metrics.events_buffered.set(scheduler.buffered as i64);
            metrics.events_in_flight.set(scheduler.running as i64);
            if paused && scheduler.buffered <= resume_below {
                consumer.resume_all();
                paused = false;
                metrics.consumer_paused.set(0);
                tracing::info!(
                    buffered = scheduler.buffered,
                    "Back-pressure released; fetching resumed."
                );
            }
            if drain_deadline.is_some() && scheduler.buffered == 0 {
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                    tracing::info!(buffered = scheduler.buffered, running = scheduler.running, grace_ms = shutdown_grace.as_millis() as u64, "Draining: fetching stopped, finishing held events.");
                    drain_deadline = Some(tokio::time::Instant::now() + shutdown_grace);
                }
                _ = sleep_until_deadline(drain_deadline) => {
                    tracing::warn!(abandoned = scheduler.buffered, "Shutdown grace ran out; unfinished events will be redelivered.");
                    workers.abort_all();
                    break;
                }
                Some(partition_event) = partition_events.recv() => {
                    match partition_event {
                        PartitionEvent::Restored { partition, restore } => {
                            if assignments.finish_restore(partition, restore) {
                                for job in held.remove(&partition).unwrap_or_default() {
                                    scheduler.release_held(job);
                                }
                            }
                        }
                        PartitionEvent::RestoreFailed { partition, restore } => {
                            if assignments.finish_restore(partition, restore) {
                                assignments.start_restore(partition, Duration::from_secs(5));
                            }
                        }
                        PartitionEvent::Revoked { partition } => {
                            for job in held.remove(&partition).unwrap_or_default() {
                                scheduler.drop_held(&job.ordering_key);
                            }
                        }
                    }
                }
                Some(joined) = workers.join_next_with_id() => {
                    let finished = match joined {
                        Ok((id, finished)) => {
                            running.remove(&id);
                            finished
                        }
                        Err(error) => {
                            // A bug, not bad input: dead-letter the event so the partition
                            // moves on, keeping its key held until that is durable.
                            let job = running.remove(&error.id()).expect("every worker is registered");
                            tracing::error!(topic = %job.record.topic, partition = job.record.partition, offset = job.record.offset, error = %error, "Worker panicked; dead-lettering the event.");
                            let task_worker = worker.clone();
                            let task_job = job.clone();
                            let handle = workers.spawn(async move {
                                process::dead_letter_after_panic(&task_worker, &task_job.record).await;
                                Finished { ticket: task_job.ticket, ordering_key: task_job.ordering_key }
                            });
                            running.insert(handle.id(), job);
                            continue;
                        }
                    };
                    scheduler.finish(&finished.ordering_key);
                    if let Some(next_offset) = tracker.complete(&finished.ticket) {
                        consumer.store_offset(&finished.ticket.topic, finished.ticket.partition, next_offset);
                    }
                }
                received = consumer.recv(), if drain_deadline.is_none() => {
                    let record = match received {
                        Ok(record) => {
                            consecutive_consumer_errors = 0;
                            record
                        }
                        Err(error) if error.is_fatal() => {
                            // The consumer cannot go on: finish what is held, then stop.
                            tracing::error!(error = %error, "Fatal Kafka consumer error; draining and stopping.");
                            drain_deadline = Some(tokio::time::Instant::now() + shutdown_grace);
                            fatal = Some(error);
                            continue;
                        }
                        Err(error) => {
                            // librdkafka recovers by itself; back off so that a broker
                            // that keeps failing does not make this loop spin.
                            consecutive_consumer_errors += 1;
                            let pause = Duration::from_millis(50 * u64::from(consecutive_consumer_errors.min(20)));
                            tracing::warn!(error = %error, pause_ms = pause.as_millis() as u64, "Kafka consumer error; librdkafka retries.");
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                    };
                    let Some(ticket) = tracker.track(&record.topic, record.partition, record.offset) else {
                        continue;
                    };
                    // Decoded here, once: the ordering key comes from the event.
                    let mut decoded = event::decode(record.value.as_deref(), &record.headers, worker.max_event_bytes);
                    if worker.state.is_some() {
                        decoded = decoded.and_then(|event| event::check_key(event, record.key.as_deref()));
                    }
                    let ordering_key = match ordering {
                        OrderingMode::User => ordering_key_for(&record, &decoded),
                        OrderingMode::Partition => format!("{}/{}", record.topic, record.partition),
                    };
                    scheduler.accept(Job { record: Arc::new(record), decoded, ticket, ordering_key });
                    // Also re-pause while paused: a rebalance may have added unpaused partitions.
                    if scheduler.buffered >= max_buffered_events {
                        consumer.pause_all();
                        if !paused {
                            tracing::info!(buffered = scheduler.buffered, "Back-pressure: fetching paused.");
                        }
                        paused = true;
                        metrics.consumer_paused.set(1);
                    }
                }
            }
        }

        metrics.events_in_flight.set(0);
        metrics.events_buffered.set(0);
        // Flushing and the final synchronous commit block: off the runtime's workers.
        let closing = tokio::task::spawn_blocking(move || {
            flush_producer(&worker);
            consumer.close();
        });
        if let Err(error) = closing.await {
            tracing::error!(error = %error, "Closing the consumer failed.");
        }
        match fatal {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Starts ready jobs while there is room. Jobs of partitions we no longer own are
/// dropped: their new owner redoes them.
fn dispatch(
    scheduler: &mut Scheduler<Job>,
    workers: &mut JoinSet<Finished>,
    running: &mut HashMap<tokio::task::Id, RunningJob>,
    held: &mut HashMap<i32, VecDeque<Job>>,
    worker: &Arc<Worker>,
    assignments: &Assignments,
    max_in_flight: usize,
) {
    while let Some(job) = scheduler.start_next(max_in_flight) {
        if !assignments.is_current(&job.ticket) {
            scheduler.finish(&job.ordering_key);
            continue;
        }
        if assignments.is_restoring(job.ticket.partition) {
            scheduler.hold();
            held.entry(job.ticket.partition).or_default().push_back(job);
            continue;
        }
        let Job {
            record,
            decoded,
            ticket,
            ordering_key,
        } = job;
        let task_worker = worker.clone();
        let task_record = record.clone();
        let task_ticket = ticket.clone();
        let task_key = ordering_key.clone();
        let handle = workers.spawn(async move {
            process::process(task_worker, task_record, decoded, &task_ticket).await;
            Finished {
                ticket: task_ticket,
                ordering_key: task_key,
            }
        });
        running.insert(
            handle.id(),
            RunningJob {
                ticket,
                ordering_key,
                record,
            },
        );
    }
}

/// Completes at the drain deadline; never, while not draining.
async fn sleep_until_deadline(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn flush_producer(worker: &Worker) {
    if let Err(error) = worker.producer.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %error, in_flight = worker.producer.in_flight_count(), "Producer flush incomplete.");
    }
}

/// Events about the same user must not overtake each other. The key is taken from the
/// decoded event (`tenant/user id`), not the Kafka key, which producers may not set.
/// Undecodable records get a unique key: there is nothing to order them against.
fn ordering_key_for(record: &InboundRecord, decoded: &Result<UserEvent, DecodeError>) -> String {
    match decoded {
        Ok(event) => event.user_key(),
        Err(_) => format!(
            "\u{0}undecodable/{}/{}/{}",
            record.topic, record.partition, record.offset
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job: its key and its place in the input.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct TestJob(&'static str, u32);

    impl Keyed for TestJob {
        fn ordering_key(&self) -> &str {
            self.0
        }
    }

    fn scheduler(jobs: &[TestJob]) -> Scheduler<TestJob> {
        let mut scheduler = Scheduler::default();
        for job in jobs {
            scheduler.accept(job.clone());
        }
        scheduler
    }

    #[test]
    fn a_key_runs_one_job_at_a_time_in_arrival_order() {
        let mut scheduler = scheduler(&[
            TestJob("alice", 1),
            TestJob("alice", 2),
            TestJob("bob", 3),
            TestJob("alice", 4),
        ]);
        assert_eq!(scheduler.start_next(10), Some(TestJob("alice", 1)));
        assert_eq!(scheduler.start_next(10), Some(TestJob("bob", 3)));
        assert_eq!(scheduler.start_next(10), None, "alice 2 waits behind alice 1");
        scheduler.finish("alice");
        assert_eq!(scheduler.start_next(10), Some(TestJob("alice", 2)));
        assert_eq!(scheduler.start_next(10), None);
        scheduler.finish("bob");
        assert_eq!(scheduler.start_next(10), None, "bob has nothing more");
        scheduler.finish("alice");
        assert_eq!(scheduler.start_next(10), Some(TestJob("alice", 4)));
    }

    #[test]
    fn no_more_than_max_in_flight_run_at_once() {
        let jobs: Vec<TestJob> = ["a", "b", "c", "d", "e"]
            .iter()
            .zip(1..)
            .map(|(key, place)| TestJob(key, place))
            .collect();
        let mut scheduler = scheduler(&jobs);
        assert_eq!(scheduler.start_next(2), Some(TestJob("a", 1)));
        assert_eq!(scheduler.start_next(2), Some(TestJob("b", 2)));
        assert_eq!(scheduler.start_next(2), None, "two already run");
        assert_eq!(scheduler.running, 2);
        scheduler.finish("a");
        assert_eq!(scheduler.start_next(2), Some(TestJob("c", 3)));
        assert_eq!(scheduler.start_next(2), None);
    }

    #[test]
    fn buffered_counts_every_held_job_until_it_finishes() {
        let mut scheduler = scheduler(&[TestJob("a", 1), TestJob("a", 2), TestJob("b", 3)]);
        assert_eq!(scheduler.buffered, 3, "running, ready and waiting all count");
        scheduler.start_next(1);
        assert_eq!(scheduler.buffered, 3, "starting a job does not release it");
        scheduler.finish("a");
        assert_eq!(scheduler.buffered, 2);
        assert_eq!(scheduler.running, 0);
    }

    #[test]
    fn draining_finishes_everything_held_in_per_key_order() {
        let keys = ["a", "b", "c"];
        let jobs: Vec<TestJob> = (0..30).map(|place| TestJob(keys[place as usize % 3], place)).collect();
        let mut scheduler = scheduler(&jobs);
        let mut finished: Vec<TestJob> = Vec::new();
        let mut running: VecDeque<TestJob> = VecDeque::new();
        // What the pipeline's drain does: keep starting and finishing until nothing is held.
        while scheduler.buffered > 0 {
            while let Some(job) = scheduler.start_next(2) {
                running.push_back(job);
            }
            let done = running.pop_front().expect("something runs while jobs are held");
            scheduler.finish(done.0);
            finished.push(done);
        }
        assert_eq!(finished.len(), jobs.len());
        assert!(scheduler.waiting_by_key.is_empty() && scheduler.ready.is_empty());
        assert_eq!(scheduler.running, 0);
        for key in keys {
            let order: Vec<u32> = finished.iter().filter(|job| job.0 == key).map(|job| job.1).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(order, sorted, "key {key} finished out of order");
        }
    }
}
