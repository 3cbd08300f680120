//! Groups and their members.
//!
//! A group's event runs in the group's lane (`tenant/group:<id>`) like a user's: the
//! connector creates, renames or deletes the group. Its members are not applied there.
//! Once the group exists on a connector, the event writes one **membership record** per
//! member added or removed to the membership topic, keyed and partitioned like that
//! member's own events ([`emit_memberships`]). The owner of the member's partition
//! reads it and applies it in the member's (user, connector) lane
//! ([`decide`], then the call in `process`), as Kafka's foreign-key joins do (KIP-213):
//!
//! - the member's remote id is local state there, so no instance holds every user's;
//! - a membership runs in order with the member's own events: after the create it
//!   needs, before a delete that makes it moot;
//! - a member not created yet on that connector is waited for (up to
//!   `groups.member_wait`) rather than sent as a `null` member;
//! - each (group, member, connector) keeps the version of the group event that last
//!   set it, so a late, older delta cannot undo a newer one.
//!
//! Membership calls of one group are batched into shared requests by the connector's
//! `MembershipBatcher`, however many lanes they come from.

use std::time::Duration;

use chrono::Utc;

use crate::connectors::ConnectorHandle;
use crate::domain::MemberAction;
use crate::event::{
    self, GroupEvent, MembershipGroup, MembershipRecord, MEMBERSHIP_CONTENT_TYPE, MEMBERSHIP_SCHEMA_VERSION,
};
use crate::kafka::producer::OutboundRecord;
use crate::kafka::retry_topics::{self, RetryTopicError};
use crate::kafka::settings::KafkaSettings;
use crate::kafka::state_topic::{self, StateTopicError};
use crate::pipeline::worker::{produce_durably, publish_state, update_state, Groups, Lane, Worker};
use crate::result::{ConnectorResult, ErrorKind, Outcome, ResultError, Superseded};
use crate::settings::GroupsSettings;
use crate::state::record::{AccountState, StateKey, StateRecord, STATE_SCHEMA_VERSION};
use crate::state::version::Relation;

/// Why the membership topic cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    #[error("membership topic: {0}")]
    Topic(#[from] RetryTopicError),
    #[error("membership topic: {0}")]
    Describe(#[from] StateTopicError),
    #[error("membership topic `{topic}` does not exist and groups.create_topics is false; create it with {partitions} partitions (as many as `{input}`)")]
    Missing {
        topic: String,
        input: String,
        partitions: usize,
    },
    #[error("membership topic `{topic}` has {found} partitions but the input topic `{input}` has {expected}: a member's memberships must be on its partition")]
    PartitionMismatch {
        topic: String,
        input: String,
        found: usize,
        expected: usize,
    },
}

impl GroupsError {
    pub fn is_retryable(&self) -> bool {
        match self {
            GroupsError::Topic(error) => error.is_retryable(),
            GroupsError::Describe(error) => error.is_retryable(),
            GroupsError::Missing { .. } | GroupsError::PartitionMismatch { .. } => false,
        }
    }
}

/// Start-up: the membership topic exists (created if allowed) with the input's
/// partition count.
pub async fn prepare_membership_topic(
    kafka: &KafkaSettings,
    settings: &GroupsSettings,
    input: &str,
) -> Result<Groups, GroupsError> {
    let input_partitions = state_topic::describe_topic(kafka, input, false)
        .await?
        .map(|facts| facts.partitions)
        .unwrap_or(0);
    let topic = &settings.membership_topic;
    match state_topic::describe_topic(kafka, topic, false).await? {
        Some(facts) if facts.partitions != input_partitions => {
            return Err(GroupsError::PartitionMismatch {
                topic: topic.clone(),
                input: input.into(),
                found: facts.partitions,
                expected: input_partitions,
            })
        }
        Some(_) => {}
        None if settings.create_topics && input_partitions > 0 => {
            // Memberships wait minutes at most; a week covers an outage of the service.
            let retention = (settings.member_wait * 2).max(Duration::from_secs(7 * 24 * 3600));
            retry_topics::create_topic(kafka, topic, input_partitions as i32, retention).await?;
            tracing::info!(topic = %topic, partitions = input_partitions, "Membership topic created.");
        }
        None => {
            return Err(GroupsError::Missing {
                topic: topic.clone(),
                input: input.into(),
                partitions: input_partitions,
            })
        }
    }
    Ok(Groups {
        membership_topic: topic.clone(),
        partitions: input_partitions as i32,
        user_partitioner: settings.user_partitioner,
        member_wait: settings.member_wait,
        chunk: settings.chunk,
    })
}

/// Writes the memberships of a group's event for one connector, once the group exists
/// there (`result` has its remote id), and counts them into `result`. Progress is saved
/// in the group's state record every `groups.chunk` records, so an event redone after
/// a crash resumes where it stopped.
pub async fn emit_memberships(
    worker: &Worker,
    handle: &ConnectorHandle,
    event: &GroupEvent,
    lane: &Lane<'_>,
    result: &mut ConnectorResult,
) {
    let group = &event.data.group;
    let mut members: Vec<(MemberAction, &String)> = Vec::new();
    if let Some(all) = &group.members {
        members.extend(all.iter().map(|member| (MemberAction::Add, member)));
    }
    members.extend(group.added.iter().map(|member| (MemberAction::Add, member)));
    members.extend(group.removed.iter().map(|member| (MemberAction::Remove, member)));
    if members.is_empty() {
        return;
    }
    let added = members
        .iter()
        .filter(|(action, _)| *action == MemberAction::Add)
        .count() as u64;
    result.members_added = Some(added);
    result.members_removed = Some(members.len() as u64 - added);
    let Some(groups) = worker.groups.get() else {
        result.reason = Some("members are not applied: [groups] needs the provisioning state ([state])".into());
        return;
    };
    let Some(remote_id) = result.remote_id.clone() else {
        return;
    };
    let already = lane
        .state
        .lookup(lane.partition, &lane.key)
        .filter(|record| record.version == *lane.version)
        .and_then(|record| record.members_emitted)
        .unwrap_or(0) as usize;
    let emitted_at = Utc::now();
    let mut done = already.min(members.len());
    for chunk in members[done..].chunks(groups.chunk) {
        let records: Vec<(String, Vec<u8>, MemberAction)> = chunk
            .iter()
            .map(|(action, member)| {
                let record = MembershipRecord {
                    schema: MEMBERSHIP_SCHEMA_VERSION,
                    connector: handle.name.clone(),
                    action: *action,
                    tenant: event.data.tenant.clone(),
                    user_id: (*member).clone(),
                    group: MembershipGroup {
                        id: group.id.clone(),
                        display_name: group.display_name.clone(),
                        remote_id: remote_id.clone(),
                    },
                    event_id: event.id.clone(),
                    event_type: event.event_type,
                    version: lane.version.clone(),
                    emitted_at,
                };
                let payload = serde_json::to_vec(&record).expect("a membership record serialises");
                (record.key(), payload, *action)
            })
            .collect();
        let sends = records.iter().map(|(key, payload, _)| {
            produce_durably(
                worker,
                "membership",
                OutboundRecord {
                    topic: &groups.membership_topic,
                    partition: Some(groups.partition_of(key)),
                    key: Some(key.as_bytes()),
                    payload,
                    headers: vec![("content-type", MEMBERSHIP_CONTENT_TYPE.as_bytes())],
                },
            )
        });
        // Each is retried until written (only dead letters give up).
        let _ = futures::future::join_all(sends).await;
        for (_, _, action) in &records {
            worker
                .metrics
                .memberships_emitted
                .with_label_values(&[handle.name.as_str(), action.as_str()])
                .inc();
        }
        done += chunk.len();
        save_progress(worker, lane, done as u64).await;
    }
    tracing::info!(connector = %handle.name, members = members.len(), resumed_at = already, "Memberships written for the members' lanes.");
}

/// The group's record with `members_emitted` set: read again under the lane's write
/// lock when parking is on (a drain may be writing the same record).
async fn save_progress(worker: &Worker, lane: &Lane<'_>, emitted: u64) {
    let next = |current: Option<StateRecord>| {
        current
            .filter(|current| current.version == *lane.version)
            .map(|current| StateRecord {
                members_emitted: Some(emitted),
                updated_at: Utc::now(),
                ..current
            })
    };
    match worker.parking.get() {
        Some(parking) => update_state(worker, lane, parking, next).await,
        None => {
            if let Some(record) = next(lane.state.lookup(lane.partition, &lane.key)) {
                publish_state(worker, lane, &record).await;
            }
        }
    }
}

/// What became of a membership before any call.
pub enum Decision {
    /// The member has an account on the connector: call with this remote id.
    Apply { member_remote_id: String },
    /// Final without a call.
    Done(Box<ConnectorResult>),
    /// The member's account is not there yet: wait until then at the latest.
    Wait { until: tokio::time::Instant },
}

/// Decides a membership from the member's record on the connector (`member`, the
/// lane's record) and the membership's own record.
pub fn decide(
    worker: &Worker,
    handle: &ConnectorHandle,
    record: &MembershipRecord,
    blocking: bool,
    lane: &Lane<'_>,
    member: Option<&StateRecord>,
) -> Decision {
    let operation = crate::result::Operation::Update;
    let without_call = |outcome| ConnectorResult::without_call(&handle.name, operation, outcome, blocking);
    let skipped = |reason: String| {
        Decision::Done(Box::new(ConnectorResult {
            reason: Some(reason),
            ..without_call(Outcome::Skipped)
        }))
    };
    let user = &record.user_id;
    let connector = &handle.name;
    let member_remote_id = match member {
        Some(member) if matches!(member.account, AccountState::Present | AccountState::Deactivated) => {
            member.remote_id.clone()
        }
        Some(member) if member.account == AccountState::Deleted => {
            return skipped(format!(
                "user `{user}` is deleted on `{connector}` (event `{}`): its memberships went with the account",
                member.event_id
            ));
        }
        Some(member) if member.account == AccountState::Failed => {
            return Decision::Done(Box::new(ConnectorResult {
                error: Some(ResultError {
                    kind: ErrorKind::Dependency,
                    message: format!(
                        "user `{user}` has no account on `{connector}`: its last operation there failed for good (event `{}`); the membership is not sent",
                        member.event_id
                    ),
                    http_status: None,
                    retryable: false,
                }),
                ..without_call(Outcome::Failed)
            }));
        }
        _ => None,
    };
    let Some(member_remote_id) = member_remote_id else {
        let groups = worker.groups.get();
        let wait = groups.map_or(Duration::ZERO, |groups| groups.member_wait);
        let waited = (Utc::now() - record.emitted_at).to_std().unwrap_or_default();
        if waited < wait {
            return Decision::Wait {
                until: tokio::time::Instant::now() + (wait - waited),
            };
        }
        return skipped(format!(
            "user `{user}` has no account on `{connector}` {} after its group's event: it is not provisioned to `{connector}` (or its create has not come)",
            humantime::format_duration(Duration::from_secs(waited.as_secs()))
        ));
    };
    let key = StateKey::membership(&handle.name, &record.tenant, &record.group.id, &record.user_id);
    if let Some(prior) = lane.state.lookup(lane.partition, &key) {
        if record.version.relation_to(&prior.version) == Relation::Older {
            worker
                .metrics
                .stale_events
                .with_label_values(&[handle.name.as_str()])
                .inc();
            return Decision::Done(Box::new(ConnectorResult {
                superseded_by: Some(Superseded {
                    event_id: prior.event_id.clone(),
                    version: prior.version.clone(),
                }),
                ..without_call(Outcome::Stale)
            }));
        }
    }
    Decision::Apply { member_remote_id }
}

/// After the call: a group gone from the target is a skip (its delete made the
/// membership moot); a success is remembered as the (group, member, connector)'s
/// version, on the member's partition.
pub async fn finish(
    worker: &Worker,
    record: &MembershipRecord,
    lane: &Lane<'_>,
    mut result: ConnectorResult,
) -> ConnectorResult {
    if let Some(error) = result
        .error
        .as_ref()
        .filter(|error| error.kind == ErrorKind::Dependency)
    {
        result.reason = Some(error.message.clone());
        result.error = None;
        result.outcome = Outcome::Skipped;
        return result;
    }
    let account = match result.outcome {
        Outcome::MembersAdded => {
            result.members_added = Some(1);
            AccountState::Present
        }
        Outcome::MembersRemoved => {
            result.members_removed = Some(1);
            AccountState::Deleted
        }
        _ => return result,
    };
    let membership_lane = Lane {
        state: lane.state,
        version: &record.version,
        key: StateKey::membership(&record.connector, &record.tenant, &record.group.id, &record.user_id),
        partition: lane.partition,
    };
    let state = StateRecord {
        schema: STATE_SCHEMA_VERSION,
        version: record.version.clone(),
        account,
        remote_id: None,
        event_id: record.event_id.clone(),
        updated_at: Utc::now(),
        parked_until: None,
        members_emitted: None,
    };
    publish_state(worker, &membership_lane, &state).await;
    result
}

/// Whether `record` came from the membership topic (or was parked from it).
pub fn is_membership_record(worker: &Worker, topic: &str, headers: &[(String, Vec<u8>)]) -> bool {
    let from_membership_topic = worker
        .groups
        .get()
        .is_some_and(|groups| groups.membership_topic == topic);
    let from_retry_topic = worker
        .parking
        .get()
        .is_some_and(|parking| parking.topics.is_retry_topic(topic));
    from_membership_topic || (from_retry_topic && event::is_membership(headers))
}

/// Counts a user event found on a partition other than the one the configured
/// partitioner gives its key: memberships for that user would go elsewhere.
pub fn check_user_partition(worker: &Worker, key: &str, partition: i32) {
    let Some(groups) = worker.groups.get() else {
        return;
    };
    let expected = groups.partition_of(key);
    if expected != partition {
        worker.metrics.partitioner_mismatches.inc();
        // The first, then one in a thousand: the metric counts them all.
        if worker.metrics.partitioner_mismatches.get() % 1000 != 1 {
            return;
        }
        tracing::warn!(
            key,
            partition,
            expected,
            partitioner = ?groups.user_partitioner,
            "A user event is not on the partition groups.user_partitioner gives its key: memberships for this user would be applied on another partition. Set groups.user_partitioner to the producer's partitioner."
        );
    }
}
