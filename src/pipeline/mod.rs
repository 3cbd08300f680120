//! The consume → fan out → apply → complete → store-offset loop.
//!
//! One task owns the consumer and all scheduling state; every connector operation,
//! reply and completion runs in its own task. The rules:
//! - an event fans out into one operation per binding that applies
//!   ([`process::prepare`]); operations run in per-(connector, user) lanes
//!   ([`lanes::Lanes`]): one at a time per lane, in offset order, retries included;
//!   each connector runs up to `pipeline.max_in_flight` operations at once, and nothing
//!   one connector waits on is needed by another;
//! - a blocking caller's reply goes out once the blocking bindings are final, or at
//!   `pipeline.reply_deadline` with the unfinished ones `queued`;
//! - a connector that cannot keep up parks its new work in its retry topic
//!   ([`parking`]); its lanes drain from there, in order, when the target is back;
//! - an event is complete when every operation is final or parked and its reply,
//!   result (or pending result) and dead letter are durable; only then does its offset
//!   count as finished, and the stored offset never passes an unfinished one
//!   ([`offsets::OffsetTracker`]);
//! - when `pipeline.max_buffered_events` offsets are uncommitted (in memory, or
//!   finished but behind an unfinished one), the loop stops reading the consumer; if the
//!   window stays full for `HOLD_BEFORE_PAUSE` every partition is paused (and the
//!   consumer polled for rebalances) until that drains to three quarters, so memory and
//!   the redo after a crash stay bounded.

pub mod assignments;
pub mod groups;
pub mod lanes;
pub mod offsets;
pub mod parking;
pub mod process;
pub mod router;
pub mod wedge;
pub mod worker;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::{self, DecodeError, Event};
use crate::kafka::consumer::{ConsumeError, EventConsumer};
use crate::kafka::InboundRecord;
use crate::metrics::Metrics;
use crate::pipeline::assignments::{Assignments, PartitionEvent};
use crate::pipeline::lanes::{LaneKey, Laned, Lanes, Started};
use crate::pipeline::offsets::Ticket;
use crate::pipeline::parking::ParkingMonitor;
use crate::pipeline::process::{EventContext, OperationDone, Prepared, Start};
use crate::pipeline::router::Binding;
use crate::pipeline::worker::Worker;
use crate::result::{ConnectorResult, ErrorKind, Outcome, ResultError};
use crate::settings::OrderingMode;

/// How often connectors' parking is re-evaluated while nothing else happens.
const PARKING_TICK: Duration = Duration::from_millis(250);

/// Back-pressure first only stops reading the consumer, which keeps librdkafka's
/// prefetched records (bounded by `queued.max.messages.kbytes`); only a window full for
/// this long pauses the partitions, which discards the prefetch (librdkafka purges a
/// paused partition's fetch queue and fetches it again on resume) but lets the consumer
/// be polled for rebalances meanwhile. Pausing at once cost a third of the benchmark's
/// throughput: every pause threw away the prefetch and the window ran dry refetching it.
const HOLD_BEFORE_PAUSE: Duration = Duration::from_secs(1);

/// A record read and tracked, not yet fanned out (its partition's state may still be
/// restoring).
struct Accepted {
    record: Arc<InboundRecord>,
    decoded: Result<Event, DecodeError>,
    ticket: Ticket,
}

/// One connector operation of an event, waiting in or running from its lane.
struct Operation {
    event: u64,
    index: usize,
    lane: LaneKey,
    binding: Arc<Binding>,
    /// Parked work read back from a retry topic.
    drained: bool,
}

impl Laned for Operation {
    fn lane(&self) -> &LaneKey {
        &self.lane
    }
    fn drained(&self) -> bool {
        self.drained
    }
    fn sequence(&self) -> u64 {
        self.event
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyState {
    /// No blocking caller.
    None,
    /// Waiting for the blocking bindings (or the deadline).
    Waiting,
    /// Being written.
    Sending,
    Sent,
}

/// An event being worked on.
struct EventEntry {
    context: Arc<EventContext>,
    bindings: Vec<Arc<Binding>>,
    results: Vec<Option<ConnectorResult>>,
    outstanding: usize,
    outstanding_blocking: usize,
    reply: ReplyState,
    /// Its completion task runs (or waits for its pending result's turn).
    completing: bool,
    /// Some operation was parked: it owns its pending result's key until complete.
    parked: bool,
}

/// What a finished task hands back.
enum TaskDone {
    Operation {
        event: u64,
        index: usize,
        lane: LaneKey,
        park_only: bool,
        done: Box<OperationDone>,
        /// The event's last operation finished it in the same task: its result (and
        /// dead letters) are durable, so the event is complete.
        completed: bool,
    },
    Reply {
        event: u64,
    },
    Completed {
        event: u64,
    },
    /// An event with nothing to apply (undecodable, unknown tenant) is finished.
    Finished {
        ticket: Ticket,
    },
}

/// What a running task was, so that a panicking one can still be accounted for.
enum TaskKind {
    Operation {
        event: u64,
        index: usize,
        lane: LaneKey,
        park_only: bool,
        connector: String,
        blocking: bool,
    },
    Reply {
        event: u64,
    },
    Completed {
        event: u64,
        record: Arc<InboundRecord>,
    },
    Finished {
        ticket: Ticket,
        record: Arc<InboundRecord>,
    },
}

pub struct Pipeline {
    pub consumer: EventConsumer,
    pub worker: Arc<Worker>,
    pub assignments: Arc<Assignments>,
    pub partition_events: mpsc::UnboundedReceiver<PartitionEvent>,
    pub metrics: Arc<Metrics>,
    /// Operations running at once, per connector.
    pub max_in_flight: usize,
    pub max_buffered_events: usize,
    pub shutdown_grace: Duration,
    pub reply_deadline: Duration,
    pub ordering: OrderingMode,
    pub parking: ParkingMonitor,
    /// Memberships waiting for their members, held in memory at most.
    pub max_waiting: usize,
}

/// The loop's state, apart from the consumer.
struct Scheduler {
    worker: Arc<Worker>,
    assignments: Arc<Assignments>,
    metrics: Arc<Metrics>,
    max_in_flight: usize,
    reply_deadline: Duration,
    ordering: OrderingMode,
    parking: ParkingMonitor,
    parking_signals: HashMap<Arc<str>, watch::Receiver<bool>>,
    /// Per connector: its parking sender, so that the monitor's flag reaches operations.
    parking_senders: HashMap<Arc<str>, watch::Sender<bool>>,
    lanes: Lanes<Operation>,
    events: HashMap<u64, EventEntry>,
    next_event: u64,
    tasks: JoinSet<TaskDone>,
    task_kinds: HashMap<tokio::task::Id, TaskKind>,
    /// Records of partitions whose state is being restored, by partition.
    held: HashMap<i32, VecDeque<Accepted>>,
    held_count: usize,
    reply_deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Pending-result keys in use: the event that owns each (an input event whose
    /// operations were parked, until its pending result is written; or a drained
    /// operation writing to it), and the drained operations waiting for their turn.
    pending_keys: HashMap<String, VecDeque<u64>>,
    /// Memberships waiting for their member's account, by lane: run again when the
    /// lane's next operation finishes (the member's create, say), or at their deadline.
    waiting: HashMap<LaneKey, Vec<(Operation, Instant)>>,
    waiting_count: usize,
    /// Above this many waiting memberships the membership topic is paused.
    max_waiting: usize,
    membership_topic_paused: bool,
}

impl Pipeline {
    /// Runs until `shutdown` is cancelled, then drains: fetching stops, and every event
    /// already held is finished for up to `shutdown_grace`, so the stored offsets cover
    /// everything that produced a result and a restart redoes nothing acknowledged.
    /// Then it commits and leaves the group. Work still unfinished when the grace runs
    /// out is abandoned and redelivered after the restart.
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
            reply_deadline,
            ordering,
            parking,
            max_waiting,
        } = self;
        let resume_below = (max_buffered_events * 3 / 4).max(1);
        let lanes = Lanes::new(parking.enabled());
        let tracker = assignments.tracker().clone();
        let mut scheduler = Scheduler {
            worker: worker.clone(),
            assignments: assignments.clone(),
            metrics: metrics.clone(),
            max_in_flight,
            reply_deadline,
            ordering,
            parking,
            parking_signals: HashMap::new(),
            parking_senders: HashMap::new(),
            lanes,
            events: HashMap::new(),
            next_event: 0,
            tasks: JoinSet::new(),
            task_kinds: HashMap::new(),
            held: HashMap::new(),
            held_count: 0,
            reply_deadlines: BinaryHeap::new(),
            pending_keys: HashMap::new(),
            waiting: HashMap::new(),
            waiting_count: 0,
            max_waiting,
            membership_topic_paused: false,
        };
        let mut paused = false;
        let mut drain_deadline: Option<Instant> = None;
        let mut consecutive_consumer_errors = 0u32;
        let mut fatal: Option<ConsumeError> = None;
        let mut parking_tick = tokio::time::interval(PARKING_TICK);
        parking_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // The window counts input offsets only: drained work has its own bound (its
        // connector's), and must never hold up the input of the others; memberships
        // have theirs too, and may wait for creates that only the input brings.
        let input_uncommitted = || {
            let retry_topics = worker.parking.get().map(|parking| &parking.topics);
            let membership_topic = worker.groups.get().map(|groups| groups.membership_topic.as_str());
            tracker.pending_count_where(|topic| {
                retry_topics.is_none_or(|topics| !topics.is_retry_topic(topic)) && membership_topic != Some(topic)
            })
        };
        let mut full_since: Option<Instant> = None;
        loop {
            scheduler.dispatch();
            let uncommitted = input_uncommitted();
            metrics.events_buffered.set(uncommitted as i64);
            metrics.events_in_flight.set(scheduler.lanes.running() as i64);
            if paused && uncommitted <= resume_below {
                consumer.resume_all();
                scheduler.repause_retry_topics(&consumer);
                scheduler.membership_topic_paused = false;
                scheduler.bound_waiting_memberships(&consumer, false);
                paused = false;
                tracing::info!(uncommitted, "Back-pressure released; fetching resumed.");
            }
            // The window is full: stop reading; pause if it stays full.
            let full = uncommitted >= max_buffered_events;
            full_since = match (full, full_since) {
                (false, _) => None,
                (true, since) => Some(since.unwrap_or_else(Instant::now)),
            };
            if !paused && full_since.is_some_and(|since| since.elapsed() >= HOLD_BEFORE_PAUSE) {
                // (Partitions a rebalance adds meanwhile are paused as their records come.)
                consumer.pause_all();
                tracing::info!(uncommitted, "Back-pressure: fetching paused.");
                paused = true;
            }
            metrics.consumer_paused.set(i64::from(full || paused));
            // Paused partitions deliver nothing, but the consumer must still be polled.
            let reading = drain_deadline.is_none() && (!full || paused);
            if drain_deadline.is_some() && scheduler.is_idle() {
                break;
            }
            let next_reply_deadline = scheduler.reply_deadlines.peek().map(|Reverse((deadline, _))| *deadline);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                    tracing::info!(events = scheduler.events.len(), running = scheduler.lanes.running(), grace_ms = shutdown_grace.as_millis() as u64, "Draining: fetching stopped, finishing held events.");
                    drain_deadline = Some(Instant::now() + shutdown_grace);
                }
                _ = sleep_until_deadline(drain_deadline) => {
                    tracing::warn!(abandoned = scheduler.events.len(), "Shutdown grace ran out; unfinished events will be redelivered.");
                    scheduler.tasks.abort_all();
                    break;
                }
                Some(partition_event) = partition_events.recv() => {
                    scheduler.on_partition_event(partition_event);
                }
                Some(joined) = scheduler.tasks.join_next_with_id() => {
                    if let Some(ticket) = scheduler.on_task_done(joined) {
                        if let Some(next_offset) = tracker.complete(&ticket) {
                            consumer.store_offset(&ticket.topic, ticket.partition, next_offset);
                        }
                    }
                }
                _ = sleep_until_deadline(next_reply_deadline) => {
                    scheduler.on_reply_deadlines(Instant::now());
                }
                _ = parking_tick.tick() => {
                    scheduler.evaluate_parking(&consumer, paused);
                    scheduler.wake_expired_waits(Instant::now());
                    scheduler.bound_waiting_memberships(&consumer, paused);
                }
                received = consumer.recv(), if reading => {
                    let record = match received {
                        Ok(record) => {
                            consecutive_consumer_errors = 0;
                            record
                        }
                        Err(error) if error.is_fatal() => {
                            // The consumer cannot go on: finish what is held, then stop.
                            tracing::error!(error = %error, "Fatal Kafka consumer error; draining and stopping.");
                            drain_deadline = Some(Instant::now() + shutdown_grace);
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
                    // Decoded here, once: the lane key comes from the event.
                    let mut decoded = if groups::is_membership_record(&worker, &record.topic, &record.headers) {
                        event::decode_membership(record.value.as_deref()).map(Event::Membership)
                    } else {
                        event::decode(record.value.as_deref(), &record.headers, worker.max_event_bytes)
                    };
                    if worker.state.is_some() {
                        decoded = decoded.and_then(|event| event::check_key(event, record.key.as_deref()));
                    }
                    let drained = worker.parking.get().is_some_and(|parking| parking.topics.is_retry_topic(&record.topic));
                    scheduler.accept(Accepted { record: Arc::new(record), decoded, ticket });
                    if drained {
                        // Parked work read back is bounded by its connector's own bound,
                        // checked now (not at the next tick), so that one fetch cannot
                        // load a whole retry backlog into memory.
                        scheduler.evaluate_parking(&consumer, paused);
                    }
                    if paused && input_uncommitted() >= max_buffered_events {
                        // A rebalance may have added unpaused partitions.
                        consumer.pause_all();
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

impl Scheduler {
    /// Nothing left to finish before stopping: no task runs and every event held is a
    /// membership waiting for its member (uncommitted, so read again after the restart;
    /// waiting out the grace for it would only delay the stop).
    fn is_idle(&self) -> bool {
        self.events.len() == self.waiting_count && self.held_count == 0 && self.tasks.is_empty()
    }

    /// A tracked record: fanned out now, or held while its partition restores.
    fn accept(&mut self, accepted: Accepted) {
        let partition = accepted.ticket.partition;
        if self.assignments.is_restoring(partition) {
            self.held.entry(partition).or_default().push_back(accepted);
            self.held_count += 1;
            return;
        }
        self.fan_out(accepted);
    }

    fn fan_out(&mut self, accepted: Accepted) {
        let Accepted {
            record,
            decoded,
            ticket,
        } = accepted;
        if !self.assignments.is_current(&ticket) {
            // Revoked meanwhile: the new owner reads it again.
            return;
        }
        let event = match decoded {
            Ok(event) => event,
            Err(error) => {
                let worker = self.worker.clone();
                let task_record = record.clone();
                let task_ticket = ticket.clone();
                let handle = self.tasks.spawn(async move {
                    process::reject(worker, task_record, error).await;
                    TaskDone::Finished { ticket: task_ticket }
                });
                self.task_kinds
                    .insert(handle.id(), TaskKind::Finished { ticket, record });
                return;
            }
        };
        match process::prepare(&self.worker, record.clone(), event, ticket.clone()) {
            Prepared::Unrouted { context, reason } => {
                let worker = self.worker.clone();
                let task_ticket = ticket.clone();
                let handle = self.tasks.spawn(async move {
                    process::finish_unrouted(worker, context, reason).await;
                    TaskDone::Finished { ticket: task_ticket }
                });
                self.task_kinds
                    .insert(handle.id(), TaskKind::Finished { ticket, record });
            }
            Prepared::Plan {
                context,
                steps,
                results,
            } => {
                let id = self.next_event;
                self.next_event += 1;
                let ordering_key: Arc<str> = match self.ordering {
                    OrderingMode::User => context.ordering_key().into(),
                    OrderingMode::Partition => format!("partition/{}", record.partition).into(),
                };
                let bindings: Vec<Arc<Binding>> = steps.into_iter().map(|step| step.binding).collect();
                let mut outstanding = 0;
                let mut outstanding_blocking = 0;
                for (index, (binding, result)) in bindings.iter().zip(&results).enumerate() {
                    if result.is_some() {
                        continue;
                    }
                    outstanding += 1;
                    if binding.blocking {
                        outstanding_blocking += 1;
                    }
                    self.lanes.accept(Operation {
                        event: id,
                        index,
                        lane: LaneKey {
                            connector: binding.connector.as_str().into(),
                            ordering_key: ordering_key.clone(),
                        },
                        binding: binding.clone(),
                        drained: context.drained.is_some(),
                    });
                }
                let reply = if context.reply_route.is_some() {
                    let waited = context.record.received_at.elapsed();
                    let deadline = Instant::now() + self.reply_deadline.saturating_sub(waited);
                    self.reply_deadlines.push(Reverse((deadline, id)));
                    ReplyState::Waiting
                } else {
                    ReplyState::None
                };
                self.events.insert(
                    id,
                    EventEntry {
                        context,
                        bindings,
                        results,
                        outstanding,
                        outstanding_blocking,
                        reply,
                        completing: false,
                        parked: false,
                    },
                );
                self.progress(id);
            }
        }
    }

    /// Starts ready operations while their connectors have room.
    fn dispatch(&mut self) {
        for connector in self.lanes.connectors() {
            while let Some(Started { operation, park_only }) = self.lanes.start_next(&connector, self.max_in_flight) {
                let Some(entry) = self.events.get(&operation.event) else {
                    // Cannot happen: an event lives until its operations are done.
                    self.lanes.finish(&operation.lane, park_only);
                    continue;
                };
                let context = entry.context.clone();
                // The common case (the event's last operation, no blocking caller, not
                // parked work read back) completes the event in the operation's own task:
                // one task and one trip through this loop per event fewer. Anything else
                // (a park, a membership that waits) comes back here as before.
                let complete_inline = !park_only
                    && entry.outstanding == 1
                    && entry.reply == ReplyState::None
                    && !entry.completing
                    && !entry.parked
                    && context.drained.is_none();
                let decided: Vec<Option<ConnectorResult>> = if complete_inline {
                    entry.results.clone()
                } else {
                    Vec::new()
                };
                let signal = self.parking_signal(&connector);
                let worker = self.worker.clone();
                let Operation {
                    event,
                    index,
                    lane,
                    binding,
                    drained: _,
                } = operation;
                let kind = TaskKind::Operation {
                    event,
                    index,
                    lane: lane.clone(),
                    park_only,
                    connector: binding.connector.clone(),
                    blocking: binding.blocking,
                };
                let handle = self.tasks.spawn(async move {
                    let start = if park_only { Start::ParkOnly } else { Start::Run(signal) };
                    let done = Box::new(process::run_operation(worker.clone(), context.clone(), binding, start).await);
                    let completed = complete_inline && !done.parked && done.waits_until.is_none();
                    if completed {
                        let mut results = decided;
                        results[index] = Some(done.result.clone());
                        process::complete_event(worker, context, results.into_iter().flatten().collect()).await;
                    }
                    TaskDone::Operation {
                        event,
                        index,
                        lane,
                        park_only,
                        done,
                        completed,
                    }
                });
                self.task_kinds.insert(handle.id(), kind);
            }
        }
    }

    /// The watch a connector's operations read to learn that it parks.
    fn parking_signal(&mut self, connector: &Arc<str>) -> Option<watch::Receiver<bool>> {
        if !self.parking.enabled() {
            return None;
        }
        if let Some(receiver) = self.parking_signals.get(connector) {
            return Some(receiver.clone());
        }
        let parking = self.parking.is_parking(connector);
        let (sender, receiver) = watch::channel(parking);
        self.parking_senders.insert(connector.clone(), sender);
        self.parking_signals.insert(connector.clone(), receiver.clone());
        Some(receiver)
    }

    /// Handles a finished task; answers the ticket to mark finished, if any.
    fn on_task_done(&mut self, joined: Result<(tokio::task::Id, TaskDone), tokio::task::JoinError>) -> Option<Ticket> {
        let done = match joined {
            Ok((id, done)) => {
                self.task_kinds.remove(&id);
                done
            }
            Err(error) => {
                let kind = self.task_kinds.remove(&error.id())?;
                return self.on_task_panicked(kind, &error);
            }
        };
        match done {
            TaskDone::Operation {
                event,
                index,
                lane,
                park_only,
                done,
                completed,
            } => {
                self.lanes.finish(&lane, park_only);
                if completed {
                    self.wake_waiting(&lane);
                    return self.completed(event);
                }
                match done.waits_until {
                    Some(until) => self.wait(event, index, lane, until),
                    None => {
                        self.operation_done(event, index, *done);
                        self.wake_waiting(&lane);
                    }
                }
                None
            }
            TaskDone::Reply { event } => {
                if let Some(entry) = self.events.get_mut(&event) {
                    entry.reply = ReplyState::Sent;
                }
                self.progress(event);
                None
            }
            TaskDone::Completed { event } => self.completed(event),
            TaskDone::Finished { ticket } => Some(ticket),
        }
    }

    fn on_task_panicked(&mut self, kind: TaskKind, error: &tokio::task::JoinError) -> Option<Ticket> {
        match kind {
            TaskKind::Operation {
                event,
                index,
                lane,
                park_only,
                connector,
                blocking,
            } => {
                tracing::error!(connector = %connector, error = %error, "Connector operation panicked; it fails for good.");
                self.lanes.finish(&lane, park_only);
                let operation = self
                    .events
                    .get(&event)
                    .map(|entry| entry.context.operation)
                    .unwrap_or(crate::result::Operation::Update);
                let result = ConnectorResult {
                    error: Some(ResultError {
                        kind: ErrorKind::Internal,
                        message: "the operation panicked; see the service log".into(),
                        http_status: None,
                        retryable: false,
                    }),
                    ..ConnectorResult::without_call(&connector, operation, Outcome::Failed, blocking)
                };
                self.operation_done(event, index, OperationDone::finished(result));
                None
            }
            TaskKind::Reply { event } => {
                tracing::error!(error = %error, "Publishing a reply panicked; the caller gets none.");
                if let Some(entry) = self.events.get_mut(&event) {
                    entry.reply = ReplyState::Sent;
                }
                self.progress(event);
                None
            }
            TaskKind::Completed { event, record } => {
                // A bug, not bad input: dead-letter the event so the partition moves on.
                tracing::error!(topic = %record.topic, partition = record.partition, offset = record.offset, error = %error, "Completing an event panicked; dead-lettering it.");
                let worker = self.worker.clone();
                let task_record = record.clone();
                let handle = self.tasks.spawn(async move {
                    process::dead_letter_after_panic(&worker, &task_record).await;
                    TaskDone::Completed { event }
                });
                self.task_kinds
                    .insert(handle.id(), TaskKind::Completed { event, record });
                None
            }
            TaskKind::Finished { ticket, record } => {
                tracing::error!(topic = %record.topic, partition = record.partition, offset = record.offset, error = %error, "Worker panicked; dead-lettering the event.");
                let worker = self.worker.clone();
                let task_record = record.clone();
                let task_ticket = ticket.clone();
                let handle = self.tasks.spawn(async move {
                    process::dead_letter_after_panic(&worker, &task_record).await;
                    TaskDone::Finished { ticket: task_ticket }
                });
                self.task_kinds
                    .insert(handle.id(), TaskKind::Finished { ticket, record });
                None
            }
        }
    }

    fn operation_done(&mut self, event: u64, index: usize, done: OperationDone) {
        let Some(entry) = self.events.get_mut(&event) else {
            return;
        };
        if entry.results[index].is_none() {
            entry.outstanding -= 1;
            if entry.bindings[index].blocking {
                entry.outstanding_blocking -= 1;
            }
        }
        if done.parked && !entry.parked {
            entry.parked = true;
            // Until this event's pending result is written, a drained operation of it
            // waits (it would find nothing to fill in).
            let key = entry.context.pending_key();
            self.pending_keys.entry(key).or_default();
        }
        entry.results[index] = Some(done.result);
        self.progress(event);
    }

    /// Sends the reply or starts the completion once the event is ready for it.
    fn progress(&mut self, event: u64) {
        let Some(entry) = self.events.get_mut(&event) else {
            return;
        };
        if entry.reply == ReplyState::Waiting && entry.outstanding_blocking == 0 {
            let results = blocking_results(entry, false);
            entry.reply = ReplyState::Sending;
            self.spawn_reply(event, results);
            return;
        }
        if entry.outstanding > 0 || entry.completing || entry.reply == ReplyState::Sending {
            return;
        }
        entry.completing = true;
        if entry.context.drained.is_some() {
            let key = entry.context.pending_key();
            match self.pending_keys.get_mut(&key) {
                // Another writer has the key: wait for its turn.
                Some(waiting) => {
                    waiting.push_back(event);
                    return;
                }
                None => {
                    self.pending_keys.insert(key, VecDeque::new());
                }
            }
        }
        self.spawn_completion(event);
    }

    fn spawn_reply(&mut self, event: u64, results: Vec<ConnectorResult>) {
        let Some(entry) = self.events.get(&event) else {
            return;
        };
        let worker = self.worker.clone();
        let context = entry.context.clone();
        let handle = self.tasks.spawn(async move {
            process::publish_blocking_reply(worker, context, results).await;
            TaskDone::Reply { event }
        });
        self.task_kinds.insert(handle.id(), TaskKind::Reply { event });
    }

    fn spawn_completion(&mut self, event: u64) {
        let Some(entry) = self.events.get(&event) else {
            return;
        };
        let worker = self.worker.clone();
        let context = entry.context.clone();
        let record = context.record.clone();
        let results: Vec<ConnectorResult> = entry.results.iter().flatten().cloned().collect();
        let handle = if context.drained.is_some() {
            let result = results.into_iter().next().expect("a drained event has one operation");
            self.tasks.spawn(async move {
                process::complete_drained(worker, context, result).await;
                TaskDone::Completed { event }
            })
        } else {
            self.tasks.spawn(async move {
                process::complete_event(worker, context, results).await;
                TaskDone::Completed { event }
            })
        };
        self.task_kinds
            .insert(handle.id(), TaskKind::Completed { event, record });
    }

    /// An event's outputs are durable: forget it, and let the next writer of its
    /// pending result go.
    fn completed(&mut self, event: u64) -> Option<Ticket> {
        let entry = self.events.remove(&event)?;
        if entry.parked || entry.context.drained.is_some() {
            let key = entry.context.pending_key();
            let next = self.pending_keys.get_mut(&key).and_then(VecDeque::pop_front);
            match next {
                Some(next) => self.spawn_completion(next),
                None => {
                    self.pending_keys.remove(&key);
                }
            }
        }
        Some(entry.context.ticket.clone())
    }

    /// Replies whose deadline passed go out now, with unfinished bindings `queued`.
    fn on_reply_deadlines(&mut self, now: Instant) {
        while let Some(Reverse((deadline, event))) = self.reply_deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.reply_deadlines.pop();
            let Some(entry) = self.events.get_mut(&event) else {
                continue;
            };
            if entry.reply != ReplyState::Waiting {
                continue;
            }
            let results = blocking_results(entry, true);
            entry.reply = ReplyState::Sending;
            self.metrics.replies_past_deadline.inc();
            tracing::info!(event_id = %entry.context.event.id(), "Reply deadline reached; unfinished blocking bindings reported as queued.");
            self.spawn_reply(event, results);
        }
    }

    fn on_partition_event(&mut self, partition_event: PartitionEvent) {
        match partition_event {
            PartitionEvent::Restored { partition, restore } => {
                if self.assignments.finish_restore(partition, restore) {
                    let held = self.held.remove(&partition).unwrap_or_default();
                    self.held_count -= held.len();
                    for accepted in held {
                        self.fan_out(accepted);
                    }
                }
            }
            PartitionEvent::RestoreFailed { partition, restore } => {
                if self.assignments.finish_restore(partition, restore) {
                    self.assignments.start_restore(partition, Duration::from_secs(5));
                }
            }
            PartitionEvent::Revoked { partition } => {
                let held = self.held.remove(&partition).unwrap_or_default();
                self.held_count -= held.len();
                // Waiting memberships of the partition end now (revoked), not at their
                // deadline.
                let lanes: Vec<LaneKey> = self
                    .waiting
                    .iter()
                    .filter(|(_, waiting)| {
                        waiting.iter().any(|(operation, _)| {
                            self.events
                                .get(&operation.event)
                                .is_some_and(|entry| entry.context.ticket.partition == partition)
                        })
                    })
                    .map(|(lane, _)| lane.clone())
                    .collect();
                for lane in lanes {
                    self.wake_waiting(&lane);
                }
            }
        }
    }

    /// A membership waits for its member's account: off the lane (the member's create
    /// may be behind it), until the lane moves or `until`.
    fn wait(&mut self, event: u64, index: usize, lane: LaneKey, until: Instant) {
        let Some(entry) = self.events.get(&event) else {
            return;
        };
        let operation = Operation {
            event,
            index,
            lane: lane.clone(),
            binding: entry.bindings[index].clone(),
            drained: entry.context.drained.is_some(),
        };
        self.waiting.entry(lane).or_default().push((operation, until));
        self.waiting_count += 1;
        self.metrics.memberships_waiting.set(self.waiting_count as i64);
    }

    /// The lane moved: its waiting memberships try again, behind what it holds.
    fn wake_waiting(&mut self, lane: &LaneKey) {
        let Some(waiting) = self.waiting.remove(lane) else {
            return;
        };
        self.waiting_count -= waiting.len();
        self.metrics.memberships_waiting.set(self.waiting_count as i64);
        for (operation, _) in waiting {
            self.lanes.accept(operation);
        }
    }

    /// Memberships whose wait is over try once more (and then give up with a reason).
    fn wake_expired_waits(&mut self, now: Instant) {
        let expired: Vec<LaneKey> = self
            .waiting
            .iter()
            .filter(|(_, waiting)| waiting.iter().any(|(_, until)| *until <= now))
            .map(|(lane, _)| lane.clone())
            .collect();
        for lane in expired {
            self.wake_waiting(&lane);
        }
    }

    /// Pauses the membership topic while too many memberships wait in memory; the
    /// input goes on, so the creates they wait for still come.
    fn bound_waiting_memberships(&mut self, consumer: &EventConsumer, paused: bool) {
        let Some(groups) = self.worker.groups.get() else {
            return;
        };
        let pause = if self.waiting_count >= self.max_waiting {
            true
        } else if self.waiting_count <= self.max_waiting / 2 {
            false
        } else {
            return;
        };
        if pause != self.membership_topic_paused && (pause || !paused) {
            consumer.set_topic_paused(&groups.membership_topic, pause);
            self.membership_topic_paused = pause;
            tracing::info!(
                waiting = self.waiting_count,
                paused = pause,
                "Membership topic paused or resumed for waiting memberships."
            );
        }
    }

    /// Re-decides which connectors park, and pauses or resumes their drains.
    fn evaluate_parking(&mut self, consumer: &EventConsumer, paused: bool) {
        let now = std::time::Instant::now();
        let parking_topics = self.worker.parking.get();
        let shared = self.worker.connectors.names().count() > 1;
        for connector in self.lanes.connectors() {
            let held = self.lanes.held(&connector);
            self.metrics
                .connector_held_operations
                .with_label_values(&[&connector])
                .set(held as i64);
            let circuit_open = self
                .worker
                .connectors
                .get(&connector)
                .is_some_and(|handle| handle.gate.circuit_state() == crate::connectors::gate::CircuitState::Open);
            let change = self.parking.evaluate(&connector, circuit_open, held, shared, now);
            if let Some(sender) = self.parking_senders.get(&connector) {
                let parking = self.parking.is_parking(&connector);
                sender.send_if_modified(|current| std::mem::replace(current, parking) != parking);
            }
            if let (Some(pause), Some(parking)) = (change.retry_paused, parking_topics) {
                let topic = format!("{}{}", parking.prefix, connector);
                // While everything is paused for back-pressure, a resume waits for that.
                if pause || !paused {
                    consumer.set_topic_paused(&topic, pause);
                }
            }
        }
    }

    /// After a back-pressure resume: retry topics paused for their own bound stay paused.
    fn repause_retry_topics(&self, consumer: &EventConsumer) {
        let Some(parking) = self.worker.parking.get() else {
            return;
        };
        for connector in self.lanes.connectors() {
            if self.parking.retry_paused(&connector) {
                consumer.set_topic_paused(&format!("{}{}", parking.prefix, connector), true);
            }
        }
    }
}

/// The blocking bindings' results; at the deadline, unfinished ones as `queued`.
fn blocking_results(entry: &EventEntry, at_deadline: bool) -> Vec<ConnectorResult> {
    entry
        .bindings
        .iter()
        .zip(&entry.results)
        .filter(|(binding, _)| binding.blocking)
        .filter_map(|(binding, result)| match result {
            Some(result) => Some(result.clone()),
            None if at_deadline => Some(ConnectorResult::without_call(
                &binding.connector,
                entry.context.operation,
                Outcome::Queued,
                true,
            )),
            None => None,
        })
        .collect()
}

/// Completes at the deadline; never, without one.
async fn sleep_until_deadline(deadline: Option<Instant>) {
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
