//! Google groups and their members: `groups.insert/get/patch/delete` and
//! `members.insert/delete`, all with the group token ([`Api::Groups`]).
//!
//! A group's address comes from `group_email` when it is created and then stays: a
//! rename changes only the group's `name`, as an administrator's rename in the Admin
//! console does, so mail to the address and filters that name it keep working. The remote
//! id is Google's immutable group id; the address is only the fallback when that id is
//! unknown or gone.
//!
//! Members are named by their Google user id (the user's remote id). `members.insert`
//! takes it as `id`: the discovery document's Member schema has the field, though its
//! text calls `email` required when adding. Should Google answer `400 required` to an id,
//! the connector switches for good to reading the member's primary email first
//! (`users.get`, one call more per member). `members.delete` takes the id as `memberKey`.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};
use url::Url;

use crate::connectors::google::{resource_id, Api, GoogleConnector};
use crate::connectors::naming::group_email;
use crate::connectors::{Applied, ConnectorError};
use crate::domain::{GroupChange, GroupRef, MemberAction, MemberRef, MembersChange, Operation, Outcome};

/// Every member we add is a plain member; owners and managers are Google's own business.
const MEMBER_ROLE: &str = "MEMBER";

/// A group as found in the directory.
struct RemoteGroup {
    id: String,
    name: String,
}

impl GoogleConnector {
    pub(super) async fn apply_group_change(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        match change.operation {
            Operation::Create => self.create_group(change).await,
            Operation::Update => self.rename_group(change).await,
            Operation::Delete => self.delete_group(change).await,
        }
    }

    pub(super) async fn apply_members_change(&self, change: &MembersChange<'_>) -> Result<(), ConnectorError> {
        // One member per call is all Google has; the caller sends one at a time
        // (`max_members_per_request`), and a longer list is worked through in order.
        for member in change.members {
            match change.action {
                MemberAction::Add => self.insert_member(&change.group, member).await?,
                MemberAction::Remove => self.delete_member(&change.group, member).await?,
            }
        }
        Ok(())
    }

    async fn create_group(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        let email = self.group_email(change);
        let body = json!({"email": email, "name": change.display_name});
        let url = self.groups_url.clone();
        match self.send(Api::Groups, |http| http.post(url.clone()).json(&body)).await {
            Ok(created) => Ok(Applied {
                outcome: Outcome::Created,
                remote_id: Some(resource_id(&created, "group")?),
            }),
            Err(ConnectorError::Rejected { status: 409, .. }) => {
                // `duplicate`: the address is taken. A group there is taken over (an
                // earlier attempt of ours, or one an administrator made); a user or an
                // alias with that address is not ours to touch.
                let remote = self.get_group(&email).await?.ok_or_else(|| ConnectorError::Conflict {
                    status: Some(409),
                    message: format!(
                        "Google reports {email} exists, but not as a group: a user or an alias has that address"
                    ),
                })?;
                self.converge_group_name(&remote, change.display_name).await?;
                Ok(Applied {
                    outcome: Outcome::Adopted,
                    remote_id: Some(remote.id),
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Renames by the remembered id; without it (or when Google no longer has it) the
    /// group at the pattern's address; failing that, creates the group.
    async fn rename_group(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        if let Some(id) = change.remote_id {
            match self.patch_group_name(id, change.display_name).await {
                Ok(()) => {
                    return Ok(Applied {
                        outcome: Outcome::Updated,
                        remote_id: Some(id.to_string()),
                    })
                }
                Err(ConnectorError::Rejected { status: 404, .. }) => {
                    tracing::info!(
                        remote_id = id,
                        "The stored group id is gone; looking the group up by address."
                    );
                }
                Err(error) => return Err(error),
            }
        }
        match self.get_group(&self.group_email(change)).await? {
            Some(remote) => {
                self.converge_group_name(&remote, change.display_name).await?;
                Ok(Applied {
                    outcome: Outcome::Updated,
                    remote_id: Some(remote.id),
                })
            }
            None => self.create_group(change).await,
        }
    }

    /// Deletes by the remembered id, else by the address the group would have.
    async fn delete_group(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        let group_key = match change.remote_id {
            Some(id) => id.to_string(),
            None => self.group_email(change),
        };
        let url = self.group_url(&group_key);
        let outcome = match self.send(Api::Groups, |http| http.delete(url.clone())).await {
            Ok(_) => Outcome::Deleted,
            Err(ConnectorError::Rejected { status: 404, .. }) => Outcome::AlreadyAbsent,
            Err(error) => return Err(error),
        };
        Ok(Applied {
            outcome,
            remote_id: change.remote_id.map(str::to_string),
        })
    }

    async fn get_group(&self, group_key: &str) -> Result<Option<RemoteGroup>, ConnectorError> {
        let url = self.group_url(group_key);
        match self.send(Api::Groups, |http| http.get(url.clone())).await {
            Ok(resource) => Ok(Some(RemoteGroup {
                id: resource_id(&resource, "group")?,
                name: resource
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            })),
            Err(ConnectorError::Rejected { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn converge_group_name(&self, remote: &RemoteGroup, display_name: &str) -> Result<(), ConnectorError> {
        if remote.name == display_name {
            return Ok(());
        }
        self.patch_group_name(&remote.id, display_name).await
    }

    /// `groups.patch` with the name only: the address stays what it was.
    async fn patch_group_name(&self, group_key: &str, display_name: &str) -> Result<(), ConnectorError> {
        let url = self.group_url(group_key);
        let body = json!({"name": display_name});
        self.send(Api::Groups, |http| http.patch(url.clone()).json(&body))
            .await
            .map(|_| ())
    }

    /// `members.insert`; a member already there (409 `duplicate`) is success.
    async fn insert_member(&self, group: &GroupRef<'_>, member: &MemberRef) -> Result<(), ConnectorError> {
        let url = self.members_url(group.remote_id);
        loop {
            let by_id = self.member_insert_by_id.load(Ordering::Relaxed);
            let body = if by_id {
                json!({"id": member.remote_id, "role": MEMBER_ROLE})
            } else {
                json!({"email": self.user_primary_email(&member.remote_id).await?, "role": MEMBER_ROLE})
            };
            match self.send(Api::Groups, |http| http.post(url.clone()).json(&body)).await {
                Ok(_) | Err(ConnectorError::Rejected { status: 409, .. }) => return Ok(()),
                Err(ConnectorError::Rejected { status: 400, message }) if by_id && message.starts_with("required:") => {
                    tracing::warn!(
                        error = %message,
                        "Google refused a member by id; adding members by their primary email from now on (one users.get more per member)."
                    );
                    self.member_insert_by_id.store(false, Ordering::Relaxed);
                }
                Err(error) => return Err(group_gone_or(error, group)),
            }
        }
    }

    /// `members.delete` by the user id; a member who is not there (404 `memberKey`) is
    /// success.
    async fn delete_member(&self, group: &GroupRef<'_>, member: &MemberRef) -> Result<(), ConnectorError> {
        let mut url = self.members_url(group.remote_id);
        url.path_segments_mut()
            .expect("groups URL is hierarchical")
            .push(&member.remote_id);
        match self.send(Api::Groups, |http| http.delete(url.clone())).await {
            Ok(_) => Ok(()),
            Err(ConnectorError::Rejected { status: 404, message }) if names_member_key(&message) => Ok(()),
            Err(error) => Err(group_gone_or(error, group)),
        }
    }

    /// The primary email of the user with Google id `user_id`, for a `members.insert`
    /// that will not take the id.
    async fn user_primary_email(&self, user_id: &str) -> Result<String, ConnectorError> {
        let url = self.user_url(user_id);
        let user = self.send(Api::Users, |http| http.get(url.clone())).await?;
        user.get("primaryEmail")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ConnectorError::InvalidResponse {
                status: None,
                message: format!("the Google user {user_id} has no primaryEmail"),
            })
    }

    fn group_email(&self, change: &GroupChange<'_>) -> String {
        group_email(&self.settings.group_email, change, &self.settings.domain)
    }

    fn group_url(&self, group_key: &str) -> Url {
        let mut url = self.groups_url.clone();
        url.path_segments_mut()
            .expect("groups URL is hierarchical")
            .push(group_key);
        url
    }

    fn members_url(&self, group_key: &str) -> Url {
        let mut url = self.group_url(group_key);
        url.path_segments_mut()
            .expect("groups URL is hierarchical")
            .push("members");
        url
    }
}

/// Whether a 404 of a members call is about the member (`Resource Not Found: memberKey`)
/// rather than the group (`…: groupKey`).
fn names_member_key(message: &str) -> bool {
    message.contains("memberKey")
}

/// A members call's 404 that is not about the member means the group is gone.
fn group_gone_or(error: ConnectorError, group: &GroupRef<'_>) -> ConnectorError {
    match error {
        ConnectorError::Rejected { status: 404, message } if !names_member_key(&message) => ConnectorError::GroupGone {
            message: format!(
                "Google has no group {} (`{}`): {message}",
                group.remote_id, group.display_name
            ),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_group_is_told_from_a_missing_member() {
        let group = GroupRef {
            group_id: "g-1",
            display_name: "Sales",
            remote_id: "00abc",
        };
        let not_found = |key: &str| ConnectorError::Rejected {
            status: 404,
            message: format!("notFound: Resource Not Found: {key}"),
        };
        let gone = group_gone_or(not_found("groupKey"), &group);
        assert!(matches!(gone, ConnectorError::GroupGone { .. }), "{gone:?}");
        assert_eq!(
            gone.to_string(),
            "the group is gone from the target: Google has no group 00abc (`Sales`): notFound: Resource Not Found: groupKey"
        );
        assert!(matches!(
            group_gone_or(not_found("memberKey"), &group),
            ConnectorError::Rejected { status: 404, .. }
        ));
        let forbidden = ConnectorError::Auth {
            status: Some(403),
            message: "forbidden".into(),
        };
        assert_eq!(group_gone_or(forbidden.clone(), &group), forbidden);
    }
}
