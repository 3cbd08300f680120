//! Batches of group members: membership operations of one group on one target, each
//! running in its own member's lane, are sent together in one request where the target
//! allows it (SCIM: one PATCH with up to `max_members_per_request` values).
//!
//! An operation hands its member to [`MembershipBatcher::submit`] and waits for the
//! outcome of the request that carried it. A batch goes out when it is full or
//! [`LINGER`] after its first member, whichever comes first, so a lone membership waits
//! a few milliseconds at most. Each request passes the connector's gate once (circuit,
//! rate, concurrency), not once per member. A batch the target refuses as a whole (a
//! 4xx) is retried member by member, so one bad member cannot fail the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::connectors::gate::Gate;
use crate::connectors::{Connector, ConnectorError};
use crate::domain::{GroupRef, MemberAction, MemberRef, MembersChange};
use crate::metrics::Metrics;

/// How long a batch waits for more members after its first.
pub const LINGER: Duration = Duration::from_millis(5);

/// The group and the direction one batch is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub tenant: String,
    pub group_id: String,
    pub display_name: String,
    pub group_remote_id: String,
    pub action: MemberAction,
}

struct Waiting {
    member: MemberRef,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), ConnectorError>>,
}

struct Shared {
    name: String,
    connector: Arc<dyn Connector>,
    gate: Arc<Gate>,
    max_per_request: usize,
    metrics: Option<Arc<Metrics>>,
    open: Mutex<HashMap<BatchKey, Vec<Waiting>>>,
}

/// One connector's membership batches.
#[derive(Clone)]
pub struct MembershipBatcher {
    shared: Arc<Shared>,
}

impl MembershipBatcher {
    pub fn new(name: &str, connector: Arc<dyn Connector>, gate: Arc<Gate>, metrics: Option<Arc<Metrics>>) -> Self {
        let max_per_request = connector.max_members_per_request().max(1);
        MembershipBatcher {
            shared: Arc::new(Shared {
                name: name.to_string(),
                connector,
                gate,
                max_per_request,
                metrics,
                open: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn max_per_request(&self) -> usize {
        self.shared.max_per_request
    }

    /// Adds or removes `member`, in a request shared with other members of the same
    /// group and direction. `deadline` bounds the wait for the gate.
    pub async fn submit(&self, key: BatchKey, member: MemberRef, deadline: Instant) -> Result<(), ConnectorError> {
        let (reply, outcome) = oneshot::channel();
        let (full, first) = {
            let mut open = self.shared.open.lock().expect("membership batches lock");
            let batch = open.entry(key.clone()).or_default();
            batch.push(Waiting {
                member,
                deadline,
                reply,
            });
            if batch.len() >= self.shared.max_per_request {
                (open.remove(&key), false)
            } else {
                (None, batch.len() == 1)
            }
        };
        if let Some(batch) = full {
            tokio::spawn(send(self.shared.clone(), key, batch));
        } else if first {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(LINGER).await;
                let batch = shared.open.lock().expect("membership batches lock").remove(&key);
                if let Some(batch) = batch {
                    send(shared, key, batch).await;
                }
            });
        }
        outcome.await.unwrap_or_else(|_| {
            Err(ConnectorError::Transport {
                message: "the membership request was dropped (shutting down?)".into(),
            })
        })
    }
}

/// Sends one batch and answers each member; a batch refused as a whole is split.
async fn send(shared: Arc<Shared>, key: BatchKey, batch: Vec<Waiting>) {
    let members: Vec<MemberRef> = batch.iter().map(|waiting| waiting.member.clone()).collect();
    let deadline = batch
        .iter()
        .map(|waiting| waiting.deadline)
        .min()
        .unwrap_or_else(Instant::now);
    let result = call(&shared, &key, &members, deadline).await;
    match result {
        Err(ConnectorError::Rejected { .. }) if batch.len() > 1 => {
            // One member the target refuses must not fail the others: each alone.
            for waiting in batch {
                let alone = call(&shared, &key, std::slice::from_ref(&waiting.member), waiting.deadline).await;
                let _ = waiting.reply.send(alone);
            }
        }
        result => {
            for waiting in batch {
                let _ = waiting.reply.send(result.clone());
            }
        }
    }
}

async fn call(shared: &Shared, key: &BatchKey, members: &[MemberRef], deadline: Instant) -> Result<(), ConnectorError> {
    let Some(admission) = shared.gate.admit(deadline).await else {
        return Err(ConnectorError::Held);
    };
    if let Some(metrics) = &shared.metrics {
        metrics
            .membership_requests
            .with_label_values(&[shared.name.as_str(), key.action.as_str()])
            .inc();
        metrics
            .membership_batch_size
            .with_label_values(&[shared.name.as_str()])
            .observe(members.len() as f64);
    }
    let change = MembersChange {
        action: key.action,
        tenant: &key.tenant,
        group: GroupRef {
            group_id: &key.group_id,
            display_name: &key.display_name,
            remote_id: &key.group_remote_id,
        },
        members,
    };
    let result = shared.connector.apply_members(change).await;
    admission.finish(&result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::delivery::DeliverySettings;
    use crate::connectors::Applied;
    use crate::domain::UserChange;
    use futures::future::BoxFuture;

    /// Records each request's members; refuses any request holding `bad`.
    #[derive(Default)]
    struct Recorder {
        requests: Mutex<Vec<Vec<String>>>,
        bad: Option<String>,
    }

    impl Connector for Recorder {
        fn apply<'a>(&'a self, _: UserChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
            unreachable!("only memberships here")
        }

        fn apply_members<'a>(&'a self, change: MembersChange<'a>) -> BoxFuture<'a, Result<(), ConnectorError>> {
            let ids: Vec<String> = change.members.iter().map(|member| member.user_id.clone()).collect();
            let refused = self.bad.as_ref().is_some_and(|bad| ids.contains(bad));
            self.requests.lock().unwrap().push(ids);
            Box::pin(async move {
                if refused {
                    Err(ConnectorError::Rejected {
                        status: 400,
                        message: "no such user".into(),
                    })
                } else {
                    Ok(())
                }
            })
        }

        fn max_members_per_request(&self) -> usize {
            100
        }
    }

    fn key() -> BatchKey {
        BatchKey {
            tenant: "acme".into(),
            group_id: "g".into(),
            display_name: "G".into(),
            group_remote_id: "remote-g".into(),
            action: MemberAction::Add,
        }
    }

    fn member(index: usize) -> MemberRef {
        MemberRef {
            user_id: format!("u{index}"),
            remote_id: format!("r{index}"),
        }
    }

    fn batcher(recorder: Arc<Recorder>) -> MembershipBatcher {
        let gate = Arc::new(Gate::new("scim", &DeliverySettings::default(), None));
        MembershipBatcher::new("scim", recorder, gate, None)
    }

    #[tokio::test]
    async fn concurrent_members_of_one_group_go_in_requests_of_at_most_the_maximum() {
        let recorder = Arc::new(Recorder::default());
        let batcher = batcher(recorder.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let submissions = (0..250).map(|index| batcher.submit(key(), member(index), deadline));
        let outcomes = futures::future::join_all(submissions).await;
        assert!(outcomes.iter().all(Result::is_ok));
        let requests = recorder.requests.lock().unwrap();
        let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 250, "{sizes:?}");
        assert_eq!(sizes.len(), 3, "250 members in 3 requests: {sizes:?}");
        assert!(sizes.iter().all(|size| *size <= 100), "{sizes:?}");
    }

    #[tokio::test]
    async fn a_member_the_target_refuses_fails_alone() {
        let recorder = Arc::new(Recorder {
            bad: Some("u3".into()),
            ..Recorder::default()
        });
        let batcher = batcher(recorder.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcomes =
            futures::future::join_all((0..5).map(|index| batcher.submit(key(), member(index), deadline))).await;
        let failed: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, outcome)| outcome.is_err())
            .map(|(index, _)| index)
            .collect();
        assert_eq!(failed, vec![3]);
        let requests = recorder.requests.lock().unwrap();
        assert_eq!(
            requests.len(),
            6,
            "one refused batch of 5, then each alone: {requests:?}"
        );
    }

    #[tokio::test]
    async fn a_lone_member_is_sent_after_the_linger() {
        let recorder = Arc::new(Recorder::default());
        let batcher = batcher(recorder.clone());
        let started = std::time::Instant::now();
        batcher
            .submit(key(), member(1), Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(recorder.requests.lock().unwrap().len(), 1);
    }
}
