//! A target double: a small in-memory directory behind the `Connector` trait that
//! records every call, how many run at once, and can be slowed, gated or made to fail.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use provisioner::connectors::{Applied, Connector, ConnectorError};
use provisioner::domain::{GroupChange, MemberAction, MembersChange, Operation, Outcome, UserChange};
use rand::Rng;
use tokio::sync::Semaphore;

/// One successful call, with global sequence numbers for its start and end.
#[derive(Debug, Clone)]
pub struct Call {
    pub user_key: String,
    pub event_id: String,
    pub operation: Operation,
    pub outcome: Outcome,
    pub started: u64,
    pub finished: u64,
}

#[derive(Default)]
pub struct RecordingConnector {
    /// Uniform random latency in [min, max].
    latency: Mutex<(Duration, Duration)>,
    /// When set, every call waits for a permit first (the test releases them).
    gate: Mutex<Option<Arc<Semaphore>>>,
    /// Scripted errors, consumed one per call, per user key.
    scripted_errors: Mutex<HashMap<String, VecDeque<ConnectorError>>>,
    accounts: Mutex<HashMap<String, String>>,
    calls: Mutex<Vec<Call>>,
    attempts: AtomicUsize,
    sequence: AtomicU64,
    current: AtomicUsize,
    most_at_once: AtomicUsize,
    waiting: AtomicUsize,
    /// Groups by source id: remote id, display name, members' remote ids.
    groups: Mutex<HashMap<String, RecordedGroup>>,
    /// Each membership request: the action and how many members it carried.
    membership_requests: Mutex<Vec<(MemberAction, usize)>>,
}

#[derive(Debug, Clone, Default)]
pub struct RecordedGroup {
    pub remote_id: String,
    pub display_name: String,
    pub members: std::collections::BTreeSet<String>,
}

impl RecordingConnector {
    pub fn new() -> Arc<RecordingConnector> {
        Arc::new(RecordingConnector::default())
    }

    pub fn with_latency(self: Arc<Self>, min: Duration, max: Duration) -> Arc<Self> {
        *self.latency.lock().unwrap() = (min, max);
        self
    }

    /// Calls block until the returned semaphore gets permits.
    pub fn gated(self: &Arc<Self>) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.gate.lock().unwrap() = Some(gate.clone());
        gate
    }

    /// Calls waiting at the gate now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub fn fail_next(&self, user_key: &str, errors: Vec<ConnectorError>) {
        self.scripted_errors
            .lock()
            .unwrap()
            .entry(user_key.to_string())
            .or_default()
            .extend(errors);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    pub fn most_at_once(&self) -> usize {
        self.most_at_once.load(Ordering::SeqCst)
    }

    pub fn has_account(&self, user_key: &str) -> bool {
        self.accounts.lock().unwrap().contains_key(user_key)
    }

    /// The group with source id `group_id`, as the target holds it.
    pub fn group(&self, group_id: &str) -> Option<RecordedGroup> {
        self.groups.lock().unwrap().get(group_id).cloned()
    }

    pub fn membership_requests(&self) -> Vec<(MemberAction, usize)> {
        self.membership_requests.lock().unwrap().clone()
    }

    fn apply_group_change(&self, change: GroupChange<'_>) -> Result<Applied, ConnectorError> {
        let mut groups = self.groups.lock().unwrap();
        let remote_id = format!("remote-group-{}", change.group_id);
        let outcome = match change.operation {
            Operation::Create | Operation::Update => {
                let existed = groups.contains_key(change.group_id);
                let group = groups.entry(change.group_id.to_string()).or_default();
                group.remote_id = remote_id.clone();
                group.display_name = change.display_name.to_string();
                match (change.operation, existed) {
                    (Operation::Create, true) => Outcome::Adopted,
                    (Operation::Create, false) => Outcome::Created,
                    _ => Outcome::Updated,
                }
            }
            Operation::Delete => match groups.remove(change.group_id) {
                Some(_) => Outcome::Deleted,
                None => Outcome::AlreadyAbsent,
            },
        };
        Ok(Applied {
            outcome,
            remote_id: Some(remote_id),
        })
    }

    /// Like a real server: members must be existing accounts (no `null` member).
    fn apply_members_change(&self, change: MembersChange<'_>) -> Result<(), ConnectorError> {
        self.membership_requests
            .lock()
            .unwrap()
            .push((change.action, change.members.len()));
        let known: std::collections::HashSet<String> = self.accounts.lock().unwrap().values().cloned().collect();
        let mut groups = self.groups.lock().unwrap();
        let Some(group) = groups
            .values_mut()
            .find(|group| group.remote_id == change.group.remote_id)
        else {
            return Err(ConnectorError::GroupGone {
                message: format!("no group {}", change.group.remote_id),
            });
        };
        if let Some(unknown) = change
            .members
            .iter()
            .find(|member| change.action == MemberAction::Add && !known.contains(&member.remote_id))
        {
            return Err(ConnectorError::Rejected {
                status: 400,
                message: format!("no such user: {:?}", unknown.remote_id),
            });
        }
        for member in change.members {
            match change.action {
                MemberAction::Add => group.members.insert(member.remote_id.clone()),
                MemberAction::Remove => group.members.remove(&member.remote_id),
            };
        }
        Ok(())
    }

    async fn call(&self, change: UserChange<'_>) -> Result<Applied, ConnectorError> {
        let operation = change.operation;
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            gate.acquire().await.expect("gate open").forget();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        let started = self.sequence.fetch_add(1, Ordering::SeqCst);
        let (min, max) = *self.latency.lock().unwrap();
        if !max.is_zero() {
            let millis = rand::rng().random_range(min.as_millis() as u64..=max.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(millis)).await;
        }
        let user_key = format!("{}/{}", change.tenant, change.user.id);
        let scripted = self
            .scripted_errors
            .lock()
            .unwrap()
            .get_mut(&user_key)
            .and_then(VecDeque::pop_front);
        let result = match scripted {
            Some(error) => Err(error),
            None => {
                let mut accounts = self.accounts.lock().unwrap();
                let outcome = match operation {
                    Operation::Create if accounts.contains_key(&user_key) => Outcome::Adopted,
                    Operation::Create => Outcome::Created,
                    Operation::Update => Outcome::Updated,
                    Operation::Delete if accounts.remove(&user_key).is_some() => Outcome::Deleted,
                    Operation::Delete => Outcome::AlreadyAbsent,
                };
                let remote_id = format!("remote-{}", change.user.id);
                if operation != Operation::Delete {
                    accounts.insert(user_key.clone(), remote_id.clone());
                }
                Ok(Applied {
                    outcome,
                    remote_id: Some(remote_id),
                })
            }
        };
        self.current.fetch_sub(1, Ordering::SeqCst);
        if let Ok(applied) = &result {
            self.calls.lock().unwrap().push(Call {
                user_key,
                event_id: change.event_id.to_string(),
                operation,
                outcome: applied.outcome,
                started,
                finished: self.sequence.fetch_add(1, Ordering::SeqCst),
            });
        }
        result
    }
}

impl Connector for RecordingConnector {
    fn apply<'a>(&'a self, change: UserChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(self.call(change))
    }

    fn apply_group<'a>(&'a self, change: GroupChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(async move { self.apply_group_change(change) })
    }

    fn apply_members<'a>(&'a self, change: MembersChange<'a>) -> BoxFuture<'a, Result<(), ConnectorError>> {
        Box::pin(async move { self.apply_members_change(change) })
    }

    fn max_members_per_request(&self) -> usize {
        100
    }
}

/// A structured-mode event for `tenant`/`user_id` with the given type and extras.
pub fn event_json(
    event_id: &str,
    event_type: &str,
    tenant: &str,
    user_id: &str,
    extra_data: serde_json::Value,
) -> Vec<u8> {
    let mut data = serde_json::json!({
        "tenant": tenant,
        "user": {"id": user_id, "userName": format!("user-{user_id}"), "emails": [{"value": format!("{user_id}@example.com"), "primary": true}]}
    });
    if let serde_json::Value::Object(extra) = extra_data {
        for (key, value) in extra {
            if key == "user" {
                if let serde_json::Value::Object(user_extra) = value {
                    for (user_key, user_value) in user_extra {
                        data["user"][user_key] = user_value;
                    }
                }
            } else {
                data[key] = value;
            }
        }
    }
    serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0",
        "id": event_id,
        "source": "/tests",
        "type": event_type,
        "data": data,
    }))
    .unwrap()
}

/// The Kafka key an identity platform must give `payload` (a structured-mode event):
/// its `tenant/user id`.
pub fn user_key(payload: &[u8]) -> String {
    let event: serde_json::Value = serde_json::from_slice(payload).expect("a JSON event");
    format!(
        "{}/{}",
        event["data"]["tenant"].as_str().expect("data.tenant"),
        event["data"]["user"]["id"].as_str().expect("data.user.id")
    )
}
