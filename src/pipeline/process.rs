//! The work for one event, in pieces the pipeline loop schedules: [`prepare`] routes it
//! into operations (one per binding), [`run_operation`] applies one binding (or parks
//! it), [`publish_blocking_reply`] answers a blocking caller once the blocking bindings
//! are final (or at the reply deadline), and [`complete_event`] writes the complete
//! result and dead letter. A parked operation read back from its retry topic runs
//! through [`run_operation`] too and ends in [`complete_drained`].
//!
//! **Invariant:** each piece returns only after what it writes is acknowledged by the
//! broker. The pipeline stores an input offset only after the event's operations are
//! final or parked, and its reply, result (or pending result) and dead letter are
//! durable.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::Instrument;

use crate::connectors::members::BatchKey;
use crate::connectors::Applied;
use crate::connectors::{ConnectorError, ConnectorHandle};
use crate::dead_letter::{self, CONNECTOR_FAILED_REASON, INTERNAL_ERROR_REASON};
use crate::domain::{GroupChange, MemberAction, MemberRef, UserChange};
use crate::event::{self, DecodeError, Event, MembershipRecord, ReplyRoute};
use crate::kafka::producer::OutboundRecord;
use crate::kafka::InboundRecord;
use crate::pipeline::groups;
use crate::pipeline::offsets::Ticket;
use crate::pipeline::parking;
use crate::pipeline::router::{Binding, Decision, Routing, Step};
use crate::pipeline::worker::{
    clear_parked_mark, drained_past, produce_durably, publish_state, update_state, Lane, Mark, Parking, Worker,
};
use crate::result::{
    ConnectorResult, ErrorKind, EventVersion, Operation, Outcome, ProvisioningResult, ResultError, ResultScope, Status,
    Superseded,
};
use crate::retry::{run_with_retries, RetryPolicy};
use crate::state::pending::{pending_key, PendingResult, PENDING_SCHEMA_VERSION};
use crate::state::record::{AccountState, StateKey, StateRecord, STATE_SCHEMA_VERSION};
use crate::state::version::Relation;
use crate::state::ProvisioningState;

/// One event being worked on, shared by its operations.
pub struct EventContext {
    pub record: Arc<InboundRecord>,
    pub event: Event,
    pub ticket: Ticket,
    pub version: Option<EventVersion>,
    pub reply_route: Option<ReplyRoute>,
    pub received_at: DateTime<Utc>,
    pub operation: Operation,
    /// Where the event was first published: names its pending result.
    pub origin: (i32, i64),
    /// Set when this is a parked operation read back from a retry topic.
    pub drained: Option<Drained>,
    span: tracing::Span,
}

/// A parked operation read back from its retry topic.
pub struct Drained {
    /// `None` when the connector is no longer configured.
    pub connector: Option<String>,
    pub blocking: bool,
    pub parked_at: DateTime<Utc>,
}

impl EventContext {
    pub fn ordering_key(&self) -> String {
        self.event.key()
    }

    pub fn pending_key(&self) -> String {
        pending_key(self.origin.0, self.origin.1)
    }

    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

/// What routing made of an event.
pub enum Prepared {
    /// Nothing to apply: answer and finish at once ([`finish_unrouted`]).
    Unrouted { context: Arc<EventContext>, reason: String },
    /// One result slot per binding: `Some` for those already final (skipped), `None`
    /// for those to run.
    Plan {
        context: Arc<EventContext>,
        steps: Vec<Step>,
        results: Vec<Option<ConnectorResult>>,
    },
}

/// Decodes what the pipeline needs from an input or retry record and routes it.
pub fn prepare(worker: &Worker, record: Arc<InboundRecord>, event: Event, ticket: Ticket) -> Prepared {
    let envelope = event.envelope();
    let span = tracing::info_span!(
        "event",
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        event_id = %envelope.id,
        event_type = envelope.event_type.as_str(),
        tenant = %envelope.tenant,
        subject = %event.subject_id(),
    );
    let drained = worker
        .parking
        .get()
        .filter(|parking| parking.topics.is_retry_topic(&record.topic))
        .map(|parking| Drained {
            connector: parking.topics.connector_of(&record.topic).map(str::to_string),
            blocking: header(&record.headers, parking::BLOCKING_HEADER).as_deref() == Some("true"),
            parked_at: header(&record.headers, parking::PARKED_AT_HEADER)
                .and_then(|value| DateTime::parse_from_rfc3339(&value).ok())
                .map(|value| value.with_timezone(&Utc))
                .unwrap_or_else(Utc::now),
        });
    if drained.is_none() {
        let label = match &event {
            Event::Membership(_) => "membership",
            _ => envelope.event_type.as_str(),
        };
        worker.metrics.events_consumed.with_label_values(&[label]).inc();
        if let Event::User(user) = &event {
            groups::check_user_partition(worker, &user.key(), record.partition);
        }
    }
    let reply_route = if drained.is_none() {
        allowed_reply_route(worker, &record)
    } else {
        None
    };
    let operation = envelope.event_type.operation();
    let received_at = Utc::now() - chrono::Duration::from_std(record.received_at.elapsed()).unwrap_or_default();
    let version = worker.state.as_deref().map(|state| match &event {
        // A membership carries its group event's version.
        Event::Membership(membership) => membership.version.clone(),
        _ => state.event_version(
            record.partition,
            record.offset,
            &record.headers,
            envelope.source,
            envelope.sequence,
        ),
    });
    let origin = dead_letter::origin_of(&record.headers, record.partition, record.offset);
    let context = Arc::new(EventContext {
        record,
        event,
        ticket,
        version,
        reply_route,
        received_at,
        operation,
        origin,
        drained,
        span,
    });
    if let Some(drained) = &context.drained {
        // A parked operation: its one binding, whatever the routing says now (a rule
        // change must not drop work that was accepted).
        // A removed connector keeps its name (the retry topic's suffix), so that its
        // failure fills its slot in the event's pending result.
        let removed_name = worker
            .parking
            .get()
            .and_then(|parking| context.record.topic.strip_prefix(parking.prefix.as_str()))
            .unwrap_or(context.record.topic.as_str());
        let step = Step {
            binding: Arc::new(Binding::routed(
                drained.connector.as_deref().unwrap_or(removed_name),
                drained.blocking,
            )),
            decision: Decision::Apply,
        };
        return Prepared::Plan {
            context,
            steps: vec![step],
            results: vec![None],
        };
    }
    if let Event::Membership(membership) = &context.event {
        // Routed already, as its group's event: the connector is in the record.
        let step = Step {
            binding: Arc::new(Binding::routed(&membership.connector, false)),
            decision: Decision::Apply,
        };
        return Prepared::Plan {
            context,
            steps: vec![step],
            results: vec![None],
        };
    }
    match worker.router.route(&context.event) {
        Routing::UnknownTenant => {
            let reason = format!("tenant `{}` is not configured", context.event.tenant());
            Prepared::Unrouted { context, reason }
        }
        Routing::Plan { provider, steps } => {
            context
                .span
                .in_scope(|| tracing::debug!(provider = %provider, bindings = steps.len(), "Event routed."));
            let results = steps
                .iter()
                .map(|step| decided_result(worker, step, context.operation))
                .collect();
            Prepared::Plan {
                context,
                steps,
                results,
            }
        }
    }
}

/// The result of a binding that needs no call (skipped, rule error), else `None`.
fn decided_result(worker: &Worker, step: &Step, operation: Operation) -> Option<ConnectorResult> {
    let skipped = ConnectorResult::without_call(
        &step.binding.connector,
        operation,
        Outcome::Skipped,
        step.binding.blocking,
    );
    let result = match &step.decision {
        Decision::Apply => return None,
        Decision::Skip { reason } => {
            tracing::debug!(connector = %step.binding.connector, reason = %reason, "Binding skipped.");
            ConnectorResult {
                reason: Some(reason.clone()),
                ..skipped
            }
        }
        Decision::RuleError { message } => {
            tracing::warn!(connector = %step.binding.connector, error = %message, "Rule failed; binding denied.");
            ConnectorResult {
                error: Some(ResultError {
                    kind: ErrorKind::Rule,
                    message: message.clone(),
                    http_status: None,
                    retryable: false,
                }),
                ..skipped
            }
        }
    };
    count_result(worker, &result);
    Some(result)
}

fn count_result(worker: &Worker, result: &ConnectorResult) {
    if result
        .error
        .as_ref()
        .is_some_and(|error| error.kind == ErrorKind::Revoked)
    {
        worker
            .metrics
            .operations_revoked
            .with_label_values(&[result.connector.as_str()])
            .inc();
    }
    worker
        .metrics
        .connector_results
        .with_label_values(&[result.connector.as_str(), result.outcome.as_str()])
        .inc();
}

fn header(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .rev()
        .find(|(key, _)| key == name)
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}

/// An event with nothing to apply (unknown tenant): reply, publish its result.
pub async fn finish_unrouted(worker: Arc<Worker>, context: Arc<EventContext>, reason: String) {
    let span = context.span.clone();
    async move {
        tracing::info!(reason = %reason, "Event skipped.");
        let result = summary(&context, Vec::new(), ResultScope::Complete, Some(reason));
        if let Some(route) = &context.reply_route {
            let reply = ProvisioningResult {
                scope: ResultScope::Blocking,
                ..result.clone()
            };
            publish_reply(&worker, route, &reply).await;
        }
        publish_result(&worker, &context.event, &result).await;
    }
    .instrument(span)
    .await
}

/// An undecodable record: dead-letter it, and tell a blocking caller why.
pub async fn reject(worker: Arc<Worker>, record: Arc<InboundRecord>, error: DecodeError) {
    let span =
        tracing::info_span!("event", topic = %record.topic, partition = record.partition, offset = record.offset);
    reject_undecodable(&worker, &record, error).instrument(span).await
}

/// How one operation ended.
pub struct OperationDone {
    pub result: ConnectorResult,
    /// It was written to its connector's retry topic: `result` says `queued`.
    pub parked: bool,
    /// Not done: a membership waits (until then at the latest) for its member's
    /// account; the loop runs it again after the lane's next operation.
    pub waits_until: Option<tokio::time::Instant>,
}

impl OperationDone {
    pub fn finished(result: ConnectorResult) -> OperationDone {
        OperationDone {
            result,
            parked: false,
            waits_until: None,
        }
    }
}

/// How the loop starts an operation.
pub enum Start {
    /// Apply it, or park it when its connector parks or its lane is parked. The watch
    /// says when its connector starts parking.
    Run(Option<watch::Receiver<bool>>),
    /// Park it without trying: a drained operation holds its lane.
    ParkOnly,
}

/// Applies one binding of an event, or parks it. For a parked operation read back,
/// applies it and clears its lane's parked mark once the drain has passed it.
pub async fn run_operation(
    worker: Arc<Worker>,
    context: Arc<EventContext>,
    binding: Arc<Binding>,
    start: Start,
) -> OperationDone {
    let span = context.span.clone();
    async move {
        let done = operate(&worker, &context, &binding, start).await;
        count_result(&worker, &done.result);
        done
    }
    .instrument(span)
    .await
}

async fn operate(worker: &Worker, context: &EventContext, binding: &Binding, start: Start) -> OperationDone {
    let started_at = Utc::now();
    let finished = |outcome: Outcome, error: Option<ResultError>| ConnectorResult {
        error,
        started_at,
        ..ConnectorResult::without_call(&binding.connector, context.operation, outcome, binding.blocking)
    };
    let internal = |message: String| ResultError {
        kind: ErrorKind::Internal,
        message,
        http_status: None,
        retryable: false,
    };
    let Some(handle) = worker.connectors.get(&binding.connector) else {
        let message = match &context.drained {
            Some(_) => format!(
                "parked in `{}` for connector `{}`, which is no longer configured",
                context.record.topic, binding.connector
            ),
            None => format!("connector `{}` is not running", binding.connector),
        };
        return OperationDone::finished(finished(Outcome::Failed, Some(internal(message))));
    };
    let lane = match (&worker.state, context.version.as_ref()) {
        (Some(state), Some(version)) => Some(Lane {
            state,
            version,
            key: StateKey::new(&handle.name, &context.ordering_key()),
            partition: context.record.partition,
        }),
        _ => None,
    };
    let parking = worker.parking.get();
    let parking_signal = match (start, parking, &lane) {
        (Start::ParkOnly, Some(parking), Some(lane)) => {
            return park(worker, handle, context, binding, lane, parking, started_at).await;
        }
        (Start::ParkOnly, ..) => None,
        (Start::Run(signal), ..) => signal,
    };
    let Some(lane) = lane else {
        // No state: no versions and no parking, only the call.
        let result = call_connector(worker, handle, context, None, binding.blocking, None, None).await;
        return OperationDone::finished(result.unwrap_or_else(|| finished(Outcome::Failed, None)));
    };
    let prior = lane.state.lookup(lane.partition, &lane.key);

    if let Some(drained) = &context.drained {
        let parking = parking.expect("drained work comes from a retry topic");
        let expires_at =
            drained.parked_at + chrono::Duration::from_std(parking.max_parked_time).unwrap_or(chrono::Duration::MAX);
        let remaining = (expires_at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if remaining.is_zero() {
            clear_parked_mark(worker, &lane, parking, context.record.offset).await;
            let message = format!(
                "parked at {} and not applied within parking.max_parked_time ({})",
                drained.parked_at.to_rfc3339(),
                humantime::format_duration(parking.max_parked_time)
            );
            return OperationDone::finished(finished(
                Outcome::Failed,
                Some(ResultError {
                    kind: ErrorKind::Exhausted,
                    message,
                    http_status: None,
                    retryable: true,
                }),
            ));
        }
        // Parked work retries until it expires: the target was down when it was
        // parked, and the drain waits on the gate like any other call.
        let policy = RetryPolicy {
            max_attempts: u32::MAX,
            max_elapsed: remaining,
            ..handle.retry
        };
        let result = match &context.event {
            Event::Membership(record) => {
                let done = run_membership(
                    worker,
                    handle,
                    context,
                    record,
                    binding.blocking,
                    &lane,
                    prior.as_ref(),
                    Some(policy),
                    None,
                )
                .await
                .expect("a drained operation is never parked again");
                if done.waits_until.is_some() {
                    return done;
                }
                // A membership writes its own key, not the lane's: the mark moves here.
                clear_parked_mark(worker, &lane, parking, context.record.offset).await;
                done.result
            }
            _ => {
                let result = apply_versioned(
                    worker,
                    handle,
                    context,
                    binding.blocking,
                    &lane,
                    prior.as_ref(),
                    Mark::DrainedPast(context.record.offset, parking),
                    Some(policy),
                    None,
                )
                .await
                .expect("a drained operation is never parked again");
                if matches!(result.outcome, Outcome::Stale | Outcome::Skipped) {
                    clear_parked_mark(worker, &lane, parking, context.record.offset).await;
                }
                result
            }
        };
        let label = match result.outcome {
            Outcome::Failed => "failed",
            Outcome::Stale => "stale",
            _ => "applied",
        };
        if result
            .error
            .as_ref()
            .is_none_or(|error| error.kind != ErrorKind::Revoked)
        {
            worker
                .metrics
                .operations_drained
                .with_label_values(&[handle.name.as_str(), label])
                .inc();
        }
        return OperationDone::finished(result);
    }

    let lane_parked = prior.as_ref().is_some_and(|prior| prior.parked_until.is_some());
    let connector_parking = parking_signal.as_ref().is_some_and(|signal| *signal.borrow());
    if let Some(parking) = parking.filter(|_| lane_parked || connector_parking) {
        return park(worker, handle, context, binding, &lane, parking, started_at).await;
    }
    // Not parked: nothing else writes this lane while its head runs.
    let parked_until = prior.as_ref().and_then(|prior| prior.parked_until);
    let signal = parking.and(parking_signal);
    let done = match &context.event {
        Event::Membership(record) => {
            run_membership(
                worker,
                handle,
                context,
                record,
                binding.blocking,
                &lane,
                prior.as_ref(),
                None,
                signal,
            )
            .await
        }
        _ => apply_versioned(
            worker,
            handle,
            context,
            binding.blocking,
            &lane,
            prior.as_ref(),
            Mark::Keep(parked_until),
            None,
            signal,
        )
        .await
        .map(OperationDone::finished),
    };
    match done {
        Some(done) => done,
        // The connector started parking while this operation waited off the wire.
        None => {
            let parking = parking.expect("only a parking connector interrupts");
            park(worker, handle, context, binding, &lane, parking, started_at).await
        }
    }
}

/// A membership in its member's lane: decided from the member's record on the
/// connector, then sent (batched with others of its group). `None` when the connector
/// started parking while it waited off the wire.
#[allow(clippy::too_many_arguments)]
async fn run_membership(
    worker: &Worker,
    handle: &ConnectorHandle,
    context: &EventContext,
    record: &MembershipRecord,
    blocking: bool,
    lane: &Lane<'_>,
    member: Option<&StateRecord>,
    policy: Option<RetryPolicy>,
    parking_signal: Option<watch::Receiver<bool>>,
) -> Option<OperationDone> {
    if !worker.assignments.is_current(&context.ticket) {
        // Revoked while it waited for its member: the new owner applies it.
        return Some(OperationDone::finished(ConnectorResult {
            error: Some(ResultError {
                kind: ErrorKind::Revoked,
                message: ConnectorError::Revoked.to_string(),
                http_status: None,
                retryable: false,
            }),
            ..ConnectorResult::without_call(&handle.name, context.operation, Outcome::Failed, blocking)
        }));
    }
    match groups::decide(worker, handle, record, blocking, lane, member) {
        groups::Decision::Done(result) => Some(OperationDone::finished(*result)),
        groups::Decision::Wait { until } => Some(OperationDone {
            result: ConnectorResult::without_call(&handle.name, context.operation, Outcome::Queued, blocking),
            parked: false,
            waits_until: Some(until),
        }),
        groups::Decision::Apply { member_remote_id } => {
            let result = call_connector(
                worker,
                handle,
                context,
                Some(&member_remote_id),
                blocking,
                policy,
                parking_signal,
            )
            .await?;
            if result
                .error
                .as_ref()
                .is_some_and(|error| error.kind == ErrorKind::Revoked)
            {
                return Some(OperationDone::finished(result));
            }
            Some(OperationDone::finished(
                groups::finish(worker, record, lane, result).await,
            ))
        }
    }
}

/// Writes the operation to its connector's retry topic (same partition number as the
/// input record), then marks its lane parked up to that offset.
async fn park(
    worker: &Worker,
    handle: &ConnectorHandle,
    context: &EventContext,
    binding: &Binding,
    lane: &Lane<'_>,
    parking: &Parking,
    started_at: DateTime<Utc>,
) -> OperationDone {
    // Attempts made before parking are not carried over; the drain counts its own.
    let queued = |error: Option<ResultError>, outcome: Outcome, remote_id: Option<String>| ConnectorResult {
        remote_id,
        error,
        started_at,
        ..ConnectorResult::without_call(&handle.name, context.operation, outcome, binding.blocking)
    };
    if !worker.assignments.is_current(&context.ticket) {
        let error = ResultError {
            kind: ErrorKind::Revoked,
            message: "partition revoked before the operation was parked".into(),
            http_status: None,
            retryable: true,
        };
        return OperationDone::finished(queued(Some(error), Outcome::Failed, None));
    }
    let topic = format!("{}{}", parking.prefix, handle.name);
    let record = &context.record;
    let origin = dead_letter::format_origin(context.origin.0, context.origin.1);
    let parked_at = Utc::now().to_rfc3339();
    let blocking = if binding.blocking { "true" } else { "false" };
    // The original headers, minus our own (a replayed dead letter's) and the reply
    // route: the caller has its answer (`queued`) already.
    let mut headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with(dead_letter::HEADER_PREFIX))
        .filter(|(name, _)| name != event::REPLY_TO_HEADER)
        .map(|(name, value)| (name.as_str(), value.as_slice()))
        .collect();
    headers.extend([
        (parking::CONNECTOR_HEADER, handle.name.as_bytes()),
        (parking::PARKED_AT_HEADER, parked_at.as_bytes()),
        (parking::BLOCKING_HEADER, blocking.as_bytes()),
        (dead_letter::ORIGIN_HEADER, origin.as_bytes()),
    ]);
    let offset = produce_durably(
        worker,
        "retry",
        OutboundRecord {
            topic: &topic,
            partition: Some(record.partition),
            key: record.key.as_deref(),
            payload: record.value.as_deref().unwrap_or_default(),
            headers,
        },
    )
    .await
    .expect("only dead letters give up on a produce");
    // The newest parked offset: a drain of this lane may be writing at the same time.
    let mut remote_id = None;
    update_state(worker, lane, parking, |current| {
        remote_id = current.as_ref().and_then(|current| current.remote_id.clone());
        Some(match current {
            Some(current) => StateRecord {
                parked_until: Some(offset),
                updated_at: Utc::now(),
                ..current
            },
            None => StateRecord {
                schema: STATE_SCHEMA_VERSION,
                version: lane.version.clone(),
                account: AccountState::NotApplied,
                remote_id: None,
                event_id: context.event.id().to_string(),
                updated_at: Utc::now(),
                parked_until: Some(offset),
                members_emitted: None,
            },
        })
    })
    .await;
    worker
        .metrics
        .operations_parked
        .with_label_values(&[handle.name.as_str()])
        .inc();
    tracing::info!(connector = %handle.name, retry_topic = %topic, retry_offset = offset, "Operation parked.");
    OperationDone {
        result: queued(None, Outcome::Queued, remote_id),
        parked: true,
        waits_until: None,
    }
}

/// Applies one binding under the provisioning state: a stale event makes no call; the
/// call goes by the stored remote id; what the target then holds is written to the
/// state topic (acknowledged) and the local store before the result is returned.
/// `None` when the parking signal interrupted it before any call was on the wire.
#[allow(clippy::too_many_arguments)]
async fn apply_versioned(
    worker: &Worker,
    handle: &ConnectorHandle,
    context: &EventContext,
    blocking: bool,
    lane: &Lane<'_>,
    prior: Option<&StateRecord>,
    mark: Mark<'_>,
    policy: Option<RetryPolicy>,
    parking_signal: Option<watch::Receiver<bool>>,
) -> Option<ConnectorResult> {
    let operation = context.operation;
    if let Some(prior) = prior {
        if lane.version.relation_to(&prior.version) == Relation::Older {
            tracing::info!(connector = %handle.name, applied = %prior.version, event_version = %lane.version, "Stale event: a newer one was applied already; no call made.");
            worker
                .metrics
                .stale_events
                .with_label_values(&[handle.name.as_str()])
                .inc();
            return Some(ConnectorResult {
                remote_id: prior.remote_id.clone(),
                superseded_by: Some(Superseded {
                    event_id: prior.event_id.clone(),
                    version: prior.version.clone(),
                }),
                ..ConnectorResult::without_call(&handle.name, operation, Outcome::Stale, blocking)
            });
        }
    }
    // A deleted account has no id to go by; a failed one keeps the id it had.
    let known_id = prior
        .filter(|prior| prior.account != AccountState::Deleted)
        .and_then(|prior| prior.remote_id.as_deref());
    let mut result = call_connector(worker, handle, context, known_id, blocking, policy, parking_signal).await?;
    if result
        .error
        .as_ref()
        .is_some_and(|error| error.kind == ErrorKind::Revoked)
    {
        // No call was made: nothing to remember.
        return Some(result);
    }
    let account = match result.outcome {
        Outcome::Created | Outcome::Adopted | Outcome::Updated | Outcome::MembersAdded | Outcome::MembersRemoved => {
            AccountState::Present
        }
        Outcome::Deactivated => AccountState::Deactivated,
        Outcome::Deleted | Outcome::AlreadyAbsent => AccountState::Deleted,
        Outcome::Failed => AccountState::Failed,
        Outcome::Skipped | Outcome::Stale | Outcome::Queued => return Some(result),
    };
    let remote_id = match account {
        AccountState::Deleted => None,
        _ => result
            .remote_id
            .clone()
            .or_else(|| prior.and_then(|prior| prior.remote_id.clone())),
    };
    // A group's event redone at the same version resumes writing its memberships.
    let members_emitted = prior
        .filter(|prior| prior.version == *lane.version)
        .and_then(|prior| prior.members_emitted);
    let record = |parked_until| StateRecord {
        schema: STATE_SCHEMA_VERSION,
        version: lane.version.clone(),
        account,
        remote_id,
        event_id: context.event.id().to_string(),
        updated_at: Utc::now(),
        parked_until,
        members_emitted,
    };
    match mark {
        Mark::Keep(parked_until) => publish_state(worker, lane, &record(parked_until)).await,
        Mark::DrainedPast(drained_offset, parking) => {
            update_state(worker, lane, parking, |current| {
                let parked_until = current.and_then(|current| current.parked_until);
                Some(record(drained_past(parked_until, drained_offset)))
            })
            .await
        }
    }
    if let Event::Group(event) = &context.event {
        if matches!(result.outcome, Outcome::Created | Outcome::Adopted | Outcome::Updated) {
            groups::emit_memberships(worker, handle, event, lane, &mut result).await;
        }
    }
    Some(result)
}

/// What woke the wait for a connector call.
enum Turn<T> {
    Finished(T),
    Parking { alive: bool },
    Revoked,
}

/// Calls the connector with retries. `None` when `parking_signal` turned true while no
/// attempt was on the wire (waiting on the gate or sleeping between attempts): the
/// caller parks the operation instead. An attempt on the wire is never abandoned.
async fn call_connector(
    worker: &Worker,
    handle: &ConnectorHandle,
    context: &EventContext,
    known_id: Option<&str>,
    blocking: bool,
    policy: Option<RetryPolicy>,
    mut parking_signal: Option<watch::Receiver<bool>>,
) -> Option<ConnectorResult> {
    let started_at = Utc::now();
    let metrics = &worker.metrics;
    let name = handle.name.as_str();
    let operation = context.operation;
    let ticket = &context.ticket;
    let policy = policy.unwrap_or(handle.retry);
    let deadline = tokio::time::Instant::now() + policy.max_elapsed;
    let on_the_wire = std::sync::atomic::AtomicBool::new(false);
    let attempts = run_with_retries(
        policy,
        || async {
            // Admission is per attempt, so a backoff sleep holds no slot; an open circuit
            // holds the attempt here (not failing it) until the event's retry time ends.
            // A membership passes the gate with its batch (one request, many members),
            // in the connector's batcher.
            let admission = match &context.event {
                Event::Membership(_) => None,
                _ => match handle.gate.admit(deadline).await {
                    Some(admission) => Some(admission),
                    None => return Err(ConnectorError::Held),
                },
            };
            // Fencing: a revoked partition's work makes no new attempt; its new owner
            // applies the event. Checked after the gate, right before the call.
            if !worker.assignments.is_current(ticket) {
                drop(admission);
                return Err(ConnectorError::Revoked);
            }
            let _on_the_wire = worker.assignments.attempt(ticket.partition);
            on_the_wire.store(true, std::sync::atomic::Ordering::SeqCst);
            metrics.connector_attempts.with_label_values(&[name]).inc();
            let timer = metrics
                .connector_request_duration
                .with_label_values(&[name, operation.as_str()])
                .start_timer();
            let result = match &context.event {
                Event::User(event) => {
                    let change = UserChange {
                        remote_id: known_id,
                        ..event.change(operation)
                    };
                    handle.connector.apply(change).await
                }
                Event::Group(event) => {
                    let change = GroupChange {
                        operation,
                        event_id: &event.id,
                        tenant: &event.data.tenant,
                        group_id: &event.data.group.id,
                        display_name: &event.data.group.display_name,
                        remote_id: known_id,
                    };
                    handle.connector.apply_group(change).await
                }
                Event::Membership(record) => {
                    let member = MemberRef {
                        user_id: record.user_id.clone(),
                        remote_id: known_id.unwrap_or_default().to_string(),
                    };
                    let key = BatchKey {
                        tenant: record.tenant.clone(),
                        group_id: record.group.id.clone(),
                        display_name: record.group.display_name.clone(),
                        group_remote_id: record.group.remote_id.clone(),
                        action: record.action,
                    };
                    let outcome = match record.action {
                        MemberAction::Add => Outcome::MembersAdded,
                        MemberAction::Remove => Outcome::MembersRemoved,
                    };
                    handle.members.submit(key, member, deadline).await.map(|()| Applied {
                        outcome,
                        remote_id: None,
                    })
                }
            };
            timer.observe_duration();
            if let Some(admission) = admission {
                admission.finish(&result);
            }
            on_the_wire.store(false, std::sync::atomic::Ordering::SeqCst);
            result
        },
        |error, delay, attempt| {
            metrics
                .connector_retries
                .with_label_values(&[name, error.kind().as_str()])
                .inc();
            tracing::warn!(connector = name, attempt, delay_ms = delay.as_millis() as u64, error = %error, "Retrying connector call.");
        },
    );
    tokio::pin!(attempts);
    let mut revocations = worker.assignments.revocations();
    let off_the_wire = || !on_the_wire.load(std::sync::atomic::Ordering::SeqCst);
    let outcome = loop {
        let turn = {
            let parking_started = async {
                match parking_signal.as_mut() {
                    Some(signal) => signal.wait_for(|parking| *parking).await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                outcome = attempts.as_mut() => Turn::Finished(outcome),
                alive = parking_started => Turn::Parking { alive },
                _ = revocations.changed() => Turn::Revoked,
            }
        };
        match turn {
            Turn::Finished(outcome) => break outcome,
            // The monitor is gone (shutting down): just finish.
            Turn::Parking { alive: false } => parking_signal = None,
            Turn::Parking { alive: true } if off_the_wire() => return None,
            // A revoke elsewhere, or ours while an attempt is on the wire (the attempt
            // loop refuses the next one): go on.
            Turn::Revoked if worker.assignments.is_current(ticket) || !off_the_wire() => {}
            Turn::Revoked => {
                // Waiting off the wire for a partition no longer ours: stop now, not
                // at the end of the retry time (parked work retries for days).
                return Some(ConnectorResult {
                    error: Some(ResultError {
                        kind: ErrorKind::Revoked,
                        message: ConnectorError::Revoked.to_string(),
                        http_status: None,
                        retryable: false,
                    }),
                    started_at,
                    ..ConnectorResult::without_call(&handle.name, operation, Outcome::Failed, blocking)
                });
            }
            // On the wire: let this attempt finish, then look again.
            Turn::Parking { alive: true } => {
                tokio::select! {
                    outcome = attempts.as_mut() => break outcome,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    };
    let (outcome_kind, remote_id, error) = match outcome.result {
        // The target (or this connector's settings) has no place for it.
        Err(ConnectorError::Unsupported { message }) => {
            tracing::info!(connector = name, reason = %message, "Skipped by the connector.");
            return Some(ConnectorResult {
                reason: Some(message),
                attempts: outcome.attempts,
                started_at,
                ..ConnectorResult::without_call(&handle.name, operation, Outcome::Skipped, blocking)
            });
        }
        Ok(applied) => {
            tracing::info!(
                connector = name,
                outcome = applied.outcome.as_str(),
                attempts = outcome.attempts,
                "Connector applied."
            );
            (applied.outcome, applied.remote_id, None)
        }
        Err(error) => {
            let message = if outcome.exhausted {
                format!("gave up after {} attempts: {error}", outcome.attempts)
            } else {
                error.to_string()
            };
            tracing::error!(connector = name, attempts = outcome.attempts, error = %message, "Connector failed.");
            (
                Outcome::Failed,
                None,
                Some(ResultError {
                    kind: if outcome.exhausted {
                        ErrorKind::Exhausted
                    } else {
                        error.kind()
                    },
                    message,
                    http_status: error.http_status(),
                    retryable: error.is_retryable(),
                }),
            )
        }
    };
    Some(ConnectorResult {
        remote_id,
        attempts: outcome.attempts,
        error,
        started_at,
        ..ConnectorResult::without_call(&handle.name, operation, outcome_kind, blocking)
    })
}

/// Answers a blocking caller with its blocking bindings' results. At the reply deadline
/// `results` holds `queued` for those not final yet.
pub async fn publish_blocking_reply(worker: Arc<Worker>, context: Arc<EventContext>, results: Vec<ConnectorResult>) {
    let Some(route) = context.reply_route.as_ref() else {
        return;
    };
    if !worker.assignments.is_current(&context.ticket) {
        return;
    }
    let span = context.span.clone();
    async {
        let reason = results
            .is_empty()
            .then(|| "no blocking binding applies; non-blocking bindings continue".to_string());
        let reply = summary(&context, results, ResultScope::Blocking, reason);
        publish_reply(&worker, route, &reply).await;
        worker
            .metrics
            .reply_duration
            .with_label_values(&[reply.status.as_str()])
            .observe(context.record.received_at.elapsed().as_secs_f64());
    }
    .instrument(span)
    .await
}

/// Every operation of an input event is final or parked: dead-letter what failed, and
/// write the complete result, or (when some were parked) a queued notice per parked
/// connector and the pending result their drain completes.
pub async fn complete_event(worker: Arc<Worker>, context: Arc<EventContext>, results: Vec<ConnectorResult>) {
    let span = context.span.clone();
    async move {
        if !worker.assignments.is_current(&context.ticket) {
            // Revoked meanwhile: the new owner applies the event again and writes its
            // result; ours would only be a duplicate, or a failure that is not one.
            tracing::info!("Partition revoked while the event was applied; its new owner finishes it.");
            return;
        }
        dead_letter_failures(&worker, &context.record, &results, CONNECTOR_FAILED_REASON).await;
        let parked: Vec<&ConnectorResult> = results
            .iter()
            .filter(|result| result.outcome == Outcome::Queued)
            .collect();
        if parked.is_empty() {
            let result = summary(&context, results, ResultScope::Complete, None);
            finish_complete_result(&worker, &context, &result).await;
            return;
        }
        let state = worker.state.as_deref().expect("parking needs the state");
        let pending = PendingResult {
            schema: PENDING_SCHEMA_VERSION,
            outstanding: parked.iter().map(|result| result.connector.clone()).collect(),
            result: summary(&context, results.clone(), ResultScope::Complete, None),
        };
        publish_pending(
            &worker,
            state,
            context.record.partition,
            &context.pending_key(),
            Some(&pending),
        )
        .await;
        for result in parked {
            let notice = summary(&context, vec![result.clone()], ResultScope::Queued, None);
            publish_result(&worker, &context.event, &notice).await;
        }
    }
    .instrument(span)
    .await
}

/// A drained operation is final: fill its connector's outcome into the event's pending
/// result, and write the complete result when it was the last one outstanding.
pub async fn complete_drained(worker: Arc<Worker>, context: Arc<EventContext>, result: ConnectorResult) {
    let span = context.span.clone();
    async move {
        if result.error.as_ref().is_some_and(|error| error.kind == ErrorKind::Revoked)
            || !worker.assignments.is_current(&context.ticket)
        {
            return;
        }
        if result.outcome == Outcome::Failed {
            let reason = match &context.drained {
                Some(Drained { connector: None, .. }) => parking::CONNECTOR_REMOVED_REASON,
                _ if result.error.as_ref().is_some_and(|error| error.message.contains("parking.max_parked_time")) => {
                    parking::PARKED_TOO_LONG_REASON
                }
                _ => CONNECTOR_FAILED_REASON,
            };
            dead_letter_failures(&worker, &context.record, std::slice::from_ref(&result), reason).await;
        }
        let state = worker.state.as_deref().expect("parking needs the state");
        let key = context.pending_key();
        let partition = context.record.partition;
        let Some(mut pending) = state.pending_result(partition, &key) else {
            // Already completed (this operation is being redone after a restart), or
            // its event was redone and finished without it: nothing more to write.
            tracing::info!(pending = %key, "No pending result for the drained operation; its event's result is written already.");
            return;
        };
        if let Some(slot) = pending
            .result
            .results
            .iter_mut()
            .find(|slot| slot.connector == result.connector && slot.outcome == Outcome::Queued)
        {
            *slot = result.clone();
        }
        pending.outstanding.retain(|connector| connector != &result.connector);
        if pending.outstanding.is_empty() {
            let mut complete = pending.result;
            complete.status = Status::from_results(&complete.results);
            complete.completed_at = Utc::now();
            finish_complete_result(&worker, &context, &complete).await;
            publish_pending(&worker, state, partition, &key, None).await;
        } else {
            publish_pending(&worker, state, partition, &key, Some(&pending)).await;
        }
    }
    .instrument(span)
    .await
}

async fn finish_complete_result(worker: &Worker, context: &EventContext, result: &ProvisioningResult) {
    publish_result(worker, &context.event, result).await;
    worker
        .metrics
        .events_completed
        .with_label_values(&[result.status.as_str()])
        .inc();
    worker
        .metrics
        .event_duration
        .with_label_values(&[result.status.as_str()])
        .observe(
            (Utc::now() - result.received_at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64(),
        );
}

async fn dead_letter_failures(worker: &Worker, record: &InboundRecord, results: &[ConnectorResult], reason: &str) {
    let failed: Vec<&ConnectorResult> = results
        .iter()
        .filter(|result| result.outcome == Outcome::Failed)
        .collect();
    if failed.is_empty() {
        return;
    }
    let message = failed
        .iter()
        .map(|result| {
            let error = result
                .error
                .as_ref()
                .map(|error| error.message.as_str())
                .unwrap_or("failed");
            format!("{}: {error}", result.connector)
        })
        .collect::<Vec<_>>()
        .join("; ");
    publish_dead_letter(worker, record, reason, &message).await;
}

/// Writes (or with `None`, tombstones) a pending result on the state topic, then the
/// local store.
async fn publish_pending(
    worker: &Worker,
    state: &ProvisioningState,
    partition: i32,
    key: &str,
    pending: Option<&PendingResult>,
) {
    match pending.map(PendingResult::encode) {
        Some(payload) => {
            let _ = produce_durably(
                worker,
                "state",
                OutboundRecord {
                    topic: state.topic(),
                    partition: Some(partition),
                    key: Some(key.as_bytes()),
                    payload: &payload,
                    headers: vec![("content-type", b"application/json")],
                },
            )
            .await;
        }
        None => {
            // Compaction then drops the key: a finished pending result is not needed.
            let mut delay = Duration::from_millis(200);
            while let Err(error) = worker
                .producer
                .send_tombstone(state.topic(), partition, key.as_bytes())
                .await
            {
                worker.metrics.produce_failures.with_label_values(&["state"]).inc();
                tracing::warn!(error = %error, delay_ms = delay.as_millis() as u64, "Writing a pending result's tombstone failed; retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    state.remember_pending(partition, key, pending);
}

fn summary(
    context: &EventContext,
    results: Vec<ConnectorResult>,
    scope: ResultScope,
    reason: Option<String>,
) -> ProvisioningResult {
    let event = &context.event;
    let (user_id, group_id) = match event {
        Event::User(event) => (event.data.user.id.clone(), None),
        Event::Group(event) => (String::new(), Some(event.data.group.id.clone())),
        Event::Membership(record) => (record.user_id.clone(), Some(record.group.id.clone())),
    };
    ProvisioningResult {
        correlation_id: context.reply_route.as_ref().map(|route| route.correlation_id.clone()),
        event_id: event.id().to_string(),
        event_type: Some(event.event_type()),
        tenant: event.tenant().to_string(),
        user_id,
        group_id,
        status: Status::from_results(&results),
        scope,
        reason,
        results,
        version: context.version.clone(),
        received_at: context.received_at,
        completed_at: Utc::now(),
    }
}

/// The caller's reply route, if it has one and it is allow-listed.
fn allowed_reply_route(worker: &Worker, record: &InboundRecord) -> Option<ReplyRoute> {
    match event::reply_route(&record.headers) {
        Ok(Some(route)) if worker.reply_topic_allow_list.contains(&route.reply_to) => Some(route),
        Ok(Some(route)) => {
            worker.metrics.replies_refused.inc();
            tracing::warn!(reply_to = %route.reply_to, "Refusing reply_to outside the allow-list; no reply is sent.");
            None
        }
        Ok(None) => None,
        Err(error) => {
            worker.metrics.replies_refused.inc();
            tracing::warn!(error = %error, "Unreadable reply headers; no reply is sent.");
            None
        }
    }
}

/// The worker for this event panicked (a bug): dead-letter the event so the partition
/// moves on; an operator can replay it after the fix.
pub async fn dead_letter_after_panic(worker: &Worker, record: &InboundRecord) {
    publish_dead_letter(
        worker,
        record,
        INTERNAL_ERROR_REASON,
        "processing panicked; see the service log",
    )
    .await;
}

/// An event we cannot read: dead-letter it, and tell a blocking caller why.
async fn reject_undecodable(worker: &Worker, record: &InboundRecord, error: DecodeError) {
    worker.metrics.events_consumed.with_label_values(&["invalid"]).inc();
    tracing::warn!(reason = error.reason(), error = %error, "Undecodable event dead-lettered.");
    publish_dead_letter(worker, record, error.reason(), &error.to_string()).await;
    if let Some(route) = allowed_reply_route(worker, record) {
        let now = Utc::now();
        let reply = ProvisioningResult {
            correlation_id: Some(route.correlation_id.clone()),
            event_id: String::new(),
            event_type: None,
            tenant: String::new(),
            user_id: String::new(),
            group_id: None,
            status: Status::Failed,
            scope: ResultScope::Blocking,
            reason: Some(format!("invalid event ({}): {error}", error.reason())),
            results: Vec::new(),
            version: None,
            received_at: now,
            completed_at: now,
        };
        publish_reply(worker, &route, &reply).await;
    }
}

async fn publish_reply(worker: &Worker, route: &ReplyRoute, reply: &ProvisioningResult) {
    let payload = serde_json::to_vec(reply).expect("results serialise");
    let _ = produce_durably(
        worker,
        "reply",
        OutboundRecord {
            topic: &route.reply_to,
            partition: None,
            key: Some(route.correlation_id.as_bytes()),
            payload: &payload,
            headers: vec![
                (event::CORRELATION_ID_HEADER, route.correlation_id.as_bytes()),
                ("content-type", b"application/json"),
            ],
        },
    )
    .await;
}

async fn publish_result(worker: &Worker, event: &Event, result: &ProvisioningResult) {
    let payload = serde_json::to_vec(result).expect("results serialise");
    let key = event.key();
    let _ = produce_durably(
        worker,
        "result",
        OutboundRecord {
            topic: &worker.results_topic,
            partition: None,
            key: Some(key.as_bytes()),
            payload: &payload,
            headers: vec![("content-type", b"application/json")],
        },
    )
    .await;
}

async fn publish_dead_letter(worker: &Worker, record: &InboundRecord, reason: &str, message: &str) {
    let partition = record.partition.to_string();
    let offset = record.offset.to_string();
    let (origin_partition, origin_offset) = dead_letter::origin_of(&record.headers, record.partition, record.offset);
    let origin = dead_letter::format_origin(origin_partition, origin_offset);
    let failed_at = Utc::now().to_rfc3339();
    let mut headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with(dead_letter::HEADER_PREFIX))
        .map(|(name, value)| (name.as_str(), value.as_slice()))
        .collect();
    headers.extend([
        (dead_letter::REASON_HEADER, reason.as_bytes()),
        (dead_letter::ERROR_HEADER, message.as_bytes()),
        (dead_letter::SOURCE_TOPIC_HEADER, record.topic.as_bytes()),
        (dead_letter::SOURCE_PARTITION_HEADER, partition.as_bytes()),
        (dead_letter::SOURCE_OFFSET_HEADER, offset.as_bytes()),
        (dead_letter::FAILED_AT_HEADER, failed_at.as_bytes()),
        (dead_letter::ORIGIN_HEADER, origin.as_bytes()),
    ]);
    let value = record.value.as_deref().unwrap_or_default();
    let whole = OutboundRecord {
        topic: &worker.dead_letter_topic,
        partition: None,
        key: record.key.as_deref(),
        payload: value,
        headers: headers.clone(),
    };
    if let Err(error) = produce_durably(worker, "dead_letter", whole).await {
        // Too large to write whole (an oversized event, say): a dead letter that waits
        // for ever would wedge the partition. Keep the start of the value and say so.
        let original_size = value.len().to_string();
        tracing::error!(error = %error, bytes = value.len(), kept = dead_letter::TRUNCATED_VALUE_BYTES, "Dead letter too large to write whole; writing it truncated.");
        let mut truncated_headers = headers;
        truncated_headers.push((dead_letter::TRUNCATED_HEADER, original_size.as_bytes()));
        let truncated = OutboundRecord {
            topic: &worker.dead_letter_topic,
            partition: None,
            key: record.key.as_deref(),
            payload: &value[..value.len().min(dead_letter::TRUNCATED_VALUE_BYTES)],
            headers: truncated_headers,
        };
        if let Err(error) = produce_durably(worker, "dead_letter", truncated).await {
            tracing::error!(error = %error, "Even the truncated dead letter is too large (its headers?); the event is dropped with this log line as its only trace.");
        }
    }
    worker.metrics.dead_letters.with_label_values(&[reason]).inc();
}
