//! The work for one event: route it, apply every binding with retries, reply to a
//! blocking caller once the blocking bindings are done, publish the complete result,
//! and dead-letter what failed for good.
//!
//! **Invariant:** [`process`] returns only after the event's reply (if any), its result
//! and its dead letter (if any) have been acknowledged by the broker. The pipeline stores
//! the input offset only after that.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::Instrument;

use crate::connectors::{ConnectorError, ConnectorHandle, ConnectorSet};
use crate::dead_letter::{self, CONNECTOR_FAILED_REASON, INTERNAL_ERROR_REASON};
use crate::domain::UserChange;
use crate::event::{self, DecodeError, ReplyRoute, UserEvent};
use crate::kafka::producer::{EventProducer, OutboundRecord, ProduceError};
use crate::kafka::InboundRecord;
use crate::metrics::Metrics;
use crate::pipeline::assignments::Assignments;
use crate::pipeline::offsets::Ticket;
use crate::pipeline::router::{Decision, Router, Routing, Step};
use crate::result::{
    ConnectorResult, ErrorKind, EventVersion, Operation, Outcome, ProvisioningResult, ResultError, ResultScope, Status,
    Superseded,
};
use crate::retry::run_with_retries;
use crate::state::record::{AccountState, StateKey, StateRecord, STATE_SCHEMA_VERSION};
use crate::state::version::Relation;
use crate::state::ProvisioningState;

/// Everything a worker needs, shared by all workers.
pub struct Worker {
    pub producer: EventProducer,
    pub router: Router,
    pub connectors: ConnectorSet,
    pub metrics: Arc<Metrics>,
    pub results_topic: String,
    pub dead_letter_topic: String,
    pub reply_topic_allow_list: Vec<String>,
    pub max_event_bytes: usize,
    /// The provisioning state, when `[state]` is enabled.
    pub state: Option<Arc<ProvisioningState>>,
    /// Which partitions are still ours: revoked work makes no new attempt.
    pub assignments: Arc<Assignments>,
}

/// What the provisioning state needs to know about the event being applied.
struct Versioned<'a> {
    state: &'a ProvisioningState,
    version: EventVersion,
    /// The input partition: the state record goes to the same partition number.
    partition: i32,
}

/// Runs one event to completion: when it returns, every output is durable.
pub async fn process(
    worker: Arc<Worker>,
    record: Arc<InboundRecord>,
    decoded: Result<UserEvent, DecodeError>,
    ticket: &Ticket,
) {
    let span = tracing::info_span!(
        "event",
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        event_id = tracing::field::Empty,
        event_type = tracing::field::Empty,
        tenant = tracing::field::Empty,
        user_id = tracing::field::Empty,
    );
    async move {
        match decoded {
            Ok(event) => process_event(&worker, &record, event, ticket).await,
            Err(error) => reject_undecodable(&worker, &record, error).await,
        }
    }
    .instrument(span)
    .await
}

async fn process_event(worker: &Worker, record: &InboundRecord, event: UserEvent, ticket: &Ticket) {
    let span = tracing::Span::current();
    span.record("event_id", event.id.as_str());
    span.record("event_type", event.event_type.as_str());
    span.record("tenant", event.data.tenant.as_str());
    span.record("user_id", event.data.user.id.as_str());
    worker
        .metrics
        .events_consumed
        .with_label_values(&[event.event_type.as_str()])
        .inc();
    let reply_route = allowed_reply_route(worker, record);
    let correlation_id = reply_route.as_ref().map(|route| route.correlation_id.clone());
    let operation = event.event_type.operation();
    let received_at = Utc::now() - chrono::Duration::from_std(record.received_at.elapsed()).unwrap_or_default();
    let versioned = worker.state.as_deref().map(|state| Versioned {
        state,
        version: state.event_version(
            record.partition,
            record.offset,
            &record.headers,
            &event.source,
            event.sequence.as_deref(),
        ),
        partition: record.partition,
    });
    let version = versioned.as_ref().map(|versioned| versioned.version.clone());

    let (provider, steps) = match worker.router.route(&event) {
        Routing::UnknownTenant => {
            let reason = format!("tenant `{}` is not configured", event.data.tenant);
            tracing::info!(reason = %reason, "Event skipped.");
            let result = summary(
                &version,
                &event,
                correlation_id,
                Vec::new(),
                ResultScope::Complete,
                Some(reason),
                received_at,
            );
            if let Some(route) = &reply_route {
                let reply = ProvisioningResult {
                    scope: ResultScope::Blocking,
                    ..result.clone()
                };
                publish_reply(worker, route, &reply).await;
            }
            publish_result(worker, &event, &result).await;
            return;
        }
        Routing::Plan { provider, steps } => (provider, steps),
    };
    tracing::debug!(provider = %provider, bindings = steps.len(), "Event routed.");

    let (blocking_steps, background_steps): (Vec<Step>, Vec<Step>) =
        steps.into_iter().partition(|step| step.binding.blocking);
    let blocking_work = async {
        let results = futures::future::join_all(
            blocking_steps
                .iter()
                .map(|step| apply_step(worker, step, operation, &event, versioned.as_ref(), ticket)),
        )
        .await;
        if let Some(route) = reply_route.as_ref().filter(|_| worker.assignments.is_current(ticket)) {
            let reason = results
                .is_empty()
                .then(|| "no blocking binding applies; non-blocking bindings continue".to_string());
            let reply = summary(
                &version,
                &event,
                correlation_id.clone(),
                results.clone(),
                ResultScope::Blocking,
                reason,
                received_at,
            );
            publish_reply(worker, route, &reply).await;
            worker
                .metrics
                .reply_duration
                .with_label_values(&[reply.status.as_str()])
                .observe(record.received_at.elapsed().as_secs_f64());
        }
        results
    };
    let background_work = futures::future::join_all(
        background_steps
            .iter()
            .map(|step| apply_step(worker, step, operation, &event, versioned.as_ref(), ticket)),
    );
    let (mut results, background_results) = tokio::join!(blocking_work, background_work);
    results.extend(background_results);
    if !worker.assignments.is_current(ticket) {
        // Revoked meanwhile: the new owner applies the event again and writes its
        // result; ours would only be a duplicate, or a failure that is not one.
        tracing::info!("Partition revoked while the event was applied; its new owner finishes it.");
        return;
    }

    let failed: Vec<&ConnectorResult> = results
        .iter()
        .filter(|result| result.outcome == Outcome::Failed)
        .collect();
    if !failed.is_empty() {
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
        publish_dead_letter(worker, record, CONNECTOR_FAILED_REASON, &message).await;
    }
    let result = summary(
        &version,
        &event,
        correlation_id,
        results,
        ResultScope::Complete,
        None,
        received_at,
    );
    publish_result(worker, &event, &result).await;
    worker
        .metrics
        .events_completed
        .with_label_values(&[result.status.as_str()])
        .inc();
    worker
        .metrics
        .event_duration
        .with_label_values(&[result.status.as_str()])
        .observe(record.received_at.elapsed().as_secs_f64());
}

/// Applies one binding, or records why it was skipped.
async fn apply_step(
    worker: &Worker,
    step: &Step,
    operation: Operation,
    event: &UserEvent,
    versioned: Option<&Versioned<'_>>,
    ticket: &Ticket,
) -> ConnectorResult {
    let started_at = Utc::now();
    let connector = step.binding.connector.clone();
    let blocking = step.binding.blocking;
    let skipped = |error: Option<ResultError>| ConnectorResult {
        connector: connector.clone(),
        operation,
        outcome: Outcome::Skipped,
        blocking,
        remote_id: None,
        attempts: 0,
        error,
        superseded_by: None,
        started_at,
        finished_at: Utc::now(),
    };
    let result = match &step.decision {
        Decision::Skip { reason } => {
            tracing::debug!(connector = %connector, reason = %reason, "Binding skipped.");
            skipped(None)
        }
        Decision::RuleError { message } => {
            tracing::warn!(connector = %connector, error = %message, "Rule failed; binding denied.");
            skipped(Some(ResultError {
                kind: ErrorKind::Rule,
                message: message.clone(),
                http_status: None,
                retryable: false,
            }))
        }
        Decision::Apply => match worker.connectors.get(&connector) {
            Some(handle) => match versioned {
                Some(versioned) => apply_versioned(worker, handle, operation, event, blocking, versioned, ticket).await,
                None => call_connector(worker, handle, operation, event, None, blocking, ticket).await,
            },
            None => ConnectorResult {
                outcome: Outcome::Failed,
                error: Some(ResultError {
                    kind: ErrorKind::Internal,
                    message: format!("connector `{connector}` is not running"),
                    http_status: None,
                    retryable: false,
                }),
                ..skipped(None)
            },
        },
    };
    worker
        .metrics
        .connector_results
        .with_label_values(&[result.connector.as_str(), result.outcome.as_str()])
        .inc();
    result
}

/// Applies one binding under the provisioning state: a stale event makes no call; the
/// call goes by the stored remote id; what the target then holds is written to the
/// state topic (acknowledged) and the local store before the result is returned.
async fn apply_versioned(
    worker: &Worker,
    handle: &ConnectorHandle,
    operation: Operation,
    event: &UserEvent,
    blocking: bool,
    versioned: &Versioned<'_>,
    ticket: &Ticket,
) -> ConnectorResult {
    let key = StateKey::new(&handle.name, &event.user_key());
    let prior = versioned.state.lookup(versioned.partition, &key);
    if let Some(prior) = &prior {
        if versioned.version.relation_to(&prior.version) == Relation::Older {
            tracing::info!(connector = %handle.name, applied = %prior.version, event_version = %versioned.version, "Stale event: a newer one was applied already; no call made.");
            worker
                .metrics
                .stale_events
                .with_label_values(&[handle.name.as_str()])
                .inc();
            let now = Utc::now();
            return ConnectorResult {
                connector: handle.name.clone(),
                operation,
                outcome: Outcome::Stale,
                blocking,
                remote_id: prior.remote_id.clone(),
                attempts: 0,
                error: None,
                superseded_by: Some(Superseded {
                    event_id: prior.event_id.clone(),
                    version: prior.version.clone(),
                }),
                started_at: now,
                finished_at: now,
            };
        }
    }
    // A deleted account has no id to go by; a failed one keeps the id it had.
    let known_id = prior
        .as_ref()
        .filter(|prior| prior.account != AccountState::Deleted)
        .and_then(|prior| prior.remote_id.as_deref());
    let result = call_connector(worker, handle, operation, event, known_id, blocking, ticket).await;
    if result
        .error
        .as_ref()
        .is_some_and(|error| error.kind == ErrorKind::Revoked)
    {
        // No call was made: nothing to remember.
        return result;
    }
    let account = match result.outcome {
        Outcome::Created | Outcome::Adopted | Outcome::Updated => AccountState::Present,
        Outcome::Deactivated => AccountState::Deactivated,
        Outcome::Deleted | Outcome::AlreadyAbsent => AccountState::Deleted,
        Outcome::Failed => AccountState::Failed,
        Outcome::Skipped | Outcome::Stale => return result,
    };
    let remote_id = match account {
        AccountState::Deleted => None,
        _ => result
            .remote_id
            .clone()
            .or_else(|| prior.as_ref().and_then(|prior| prior.remote_id.clone())),
    };
    let record = StateRecord {
        schema: STATE_SCHEMA_VERSION,
        version: versioned.version.clone(),
        account,
        remote_id,
        event_id: event.id.clone(),
        updated_at: Utc::now(),
    };
    publish_state(worker, versioned, &key, &record).await;
    result
}

/// Writes a state record to the state topic, on the input record's partition number,
/// and once acknowledged to the local store.
async fn publish_state(worker: &Worker, versioned: &Versioned<'_>, key: &StateKey, record: &StateRecord) {
    let payload = record.encode();
    let encoded_key = key.encode();
    // Retried until written: only dead letters give up (see produce_durably).
    let _ = produce_durably(
        worker,
        "state",
        OutboundRecord {
            topic: versioned.state.topic(),
            partition: Some(versioned.partition),
            key: Some(encoded_key.as_bytes()),
            payload: &payload,
            headers: vec![("content-type", b"application/json")],
        },
    )
    .await;
    versioned.state.remember(versioned.partition, key, record);
}

async fn call_connector(
    worker: &Worker,
    handle: &ConnectorHandle,
    operation: Operation,
    event: &UserEvent,
    known_id: Option<&str>,
    blocking: bool,
    ticket: &Ticket,
) -> ConnectorResult {
    let started_at = Utc::now();
    let metrics = &worker.metrics;
    let name = handle.name.as_str();
    let deadline = tokio::time::Instant::now() + handle.retry.max_elapsed;
    let outcome = run_with_retries(
        handle.retry,
        || async {
            // Admission is per attempt, so a backoff sleep holds no slot; an open circuit
            // holds the attempt here (not failing it) until the event's retry time ends.
            let Some(admission) = handle.gate.admit(deadline).await else {
                return Err(ConnectorError::Held);
            };
            // Fencing: a revoked partition's work makes no new attempt; its new owner
            // applies the event. Checked after the gate, right before the call.
            if !worker.assignments.is_current(ticket) {
                drop(admission);
                return Err(ConnectorError::Revoked);
            }
            let _on_the_wire = worker.assignments.attempt(ticket.partition);
            metrics.connector_attempts.with_label_values(&[name]).inc();
            let timer = metrics
                .connector_request_duration
                .with_label_values(&[name, operation.as_str()])
                .start_timer();
            let change = UserChange {
                remote_id: known_id,
                ..event.change(operation)
            };
            let result = handle.connector.apply(change).await;
            timer.observe_duration();
            admission.finish(&result);
            result
        },
        |error, delay, attempt| {
            metrics
                .connector_retries
                .with_label_values(&[name, error.kind().as_str()])
                .inc();
            tracing::warn!(connector = name, attempt, delay_ms = delay.as_millis() as u64, error = %error, "Retrying connector call.");
        },
    )
    .await;
    let (outcome_kind, remote_id, error) = match outcome.result {
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
    ConnectorResult {
        connector: handle.name.clone(),
        operation,
        outcome: outcome_kind,
        blocking,
        remote_id,
        attempts: outcome.attempts,
        error,
        superseded_by: None,
        started_at,
        finished_at: Utc::now(),
    }
}

fn summary(
    version: &Option<EventVersion>,
    event: &UserEvent,
    correlation_id: Option<String>,
    results: Vec<ConnectorResult>,
    scope: ResultScope,
    reason: Option<String>,
    received_at: chrono::DateTime<Utc>,
) -> ProvisioningResult {
    ProvisioningResult {
        correlation_id,
        event_id: event.id.clone(),
        event_type: Some(event.event_type),
        tenant: event.data.tenant.clone(),
        user_id: event.data.user.id.clone(),
        status: Status::from_results(&results),
        scope,
        reason,
        results,
        version: version.clone(),
        received_at,
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

async fn publish_result(worker: &Worker, event: &UserEvent, result: &ProvisioningResult) {
    let payload = serde_json::to_vec(result).expect("results serialise");
    let key = event.user_key();
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

/// Produces until the broker acknowledges, backing off between failures. It never gives
/// up on a failure that may pass (the input offset must not move past an event whose
/// outputs are not durable; at shutdown the drain's grace period bounds it and an
/// aborted event is redone). A dead letter too large to ever be written is returned as
/// an error at once, for its caller to truncate: retrying it would wedge the partition.
async fn produce_durably(worker: &Worker, destination: &str, record: OutboundRecord<'_>) -> Result<(), ProduceError> {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = OutboundRecord {
            topic: record.topic,
            partition: record.partition,
            key: record.key,
            payload: record.payload,
            headers: record.headers.clone(),
        };
        match worker.producer.send(attempt).await {
            Ok(()) => return Ok(()),
            // Only a dead letter carries an arbitrary payload, and only its caller can
            // shrink it. Results, replies and state records are small: a topic that
            // refuses them is misconfigured, and retrying (visibly) loses nothing.
            Err(error) if error.is_too_large() && destination == "dead_letter" => {
                worker.metrics.produce_failures.with_label_values(&[destination]).inc();
                return Err(error);
            }
            Err(error) => {
                worker.metrics.produce_failures.with_label_values(&[destination]).inc();
                if destination == "reply" {
                    worker.metrics.reply_publish_failures.inc();
                }
                tracing::warn!(destination, topic = record.topic, error = %error, delay_ms = delay.as_millis() as u64, "Produce failed; retrying.");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
