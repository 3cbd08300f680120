//! SCIM 2.0 Groups (RFC 7643 §4.2): create (adopting our own), rename, delete, and
//! membership changes.
//!
//! A group is ours when its `externalId` is the source group id. Create looks for ours
//! before it POSTs: RFC 7643 makes neither `displayName` nor `externalId` unique, and a
//! server that does not enforce names (scim2-server among them) would take a redelivered
//! create as a second group. A uniqueness conflict (409) adopts the group by
//! `externalId`, then `displayName`, unless its `externalId` names another source group.
//! Groups are created without members, and renames never touch them.
//!
//! Members change with one PATCH per batch where PATCH is advertised: one `add` carrying
//! the batch, or one `remove` per member with a `members[value eq "…"]` path. Otherwise
//! the group is read, only our members are added to or taken out of its list, and it is
//! PUT back.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use url::Url;

use super::{
    filter_literal, is_uniqueness_conflict, patch_request, resource_id, without_meta, Filtered, Lookup, RemoteResource,
    ScimConnector,
};
use crate::connectors::{deleted_or_absent, Applied, Connector, ConnectorError};
use crate::domain::{GroupChange, MemberAction, MemberRef, MembersChange, Operation, Outcome};

const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

impl ScimConnector {
    pub(super) async fn apply_group_change(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        match change.operation {
            Operation::Create => self.create_group(change).await,
            Operation::Update => self.update_group(change).await,
            Operation::Delete => self.delete_group(change).await,
        }
    }

    async fn create_group(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        // By externalId only, and without scanning a listing when filtering fails: a
        // group of the same name may be someone else's (the POST's 409 decides), and a
        // scan of every group on each create would cost too much.
        match self.filter_lookup(&self.groups, &[external_id_lookup(change)]).await? {
            Filtered::Found(ours) => self.adopt_group(ours, change).await,
            Filtered::NotFound | Filtered::FilteringFailed(_) => self.post_group(change).await,
        }
    }

    /// POSTs the group, without members. On a uniqueness conflict, adopts the group
    /// that has our `externalId` or the name.
    async fn post_group(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        let resource = json!({
            "schemas": [GROUP_SCHEMA],
            "displayName": change.display_name,
            "externalId": change.group_id,
        });
        let url = self.groups.url.clone();
        let response = self
            .send(
                |http| http.post(url.clone()).json(&resource),
                &[StatusCode::CREATED, StatusCode::OK],
            )
            .await;
        match response {
            Ok(body) => Ok(Applied {
                outcome: Outcome::Created,
                remote_id: Some(resource_id(&body)?),
            }),
            Err(error) if is_uniqueness_conflict(&error) => {
                let Some(found) = self.find_group(change).await? else {
                    return Err(ConnectorError::Conflict {
                        status: error.http_status(),
                        message: format!(
                            "the target reports the group exists ({error}) but neither externalId nor displayName finds it"
                        ),
                    });
                };
                self.adopt_group(found, change).await
            }
            Err(error) => Err(error),
        }
    }

    async fn adopt_group(&self, found: RemoteResource, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        let id = self.converge_group(found, change).await?;
        Ok(Applied {
            outcome: Outcome::Adopted,
            remote_id: Some(id),
        })
    }

    async fn update_group(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        let updated = |id: String| Applied {
            outcome: Outcome::Updated,
            remote_id: Some(id),
        };
        if let Some(id) = change.remote_id {
            let written = self
                .update_by_id(&self.groups, id, &group_attributes(change))
                .await
                .map_err(|error| name_taken(error, change))?;
            if let Some(id) = written {
                return Ok(updated(id));
            }
        }
        match self.find_group(change).await? {
            Some(found) => self.converge_group(found, change).await.map(updated),
            // An update of a group the target has never seen creates it, as for users.
            None => self.post_group(change).await,
        }
    }

    /// Gives a group found by lookup our `displayName` and `externalId`, unless it is
    /// someone else's. Returns its id.
    async fn converge_group(&self, found: RemoteResource, change: &GroupChange<'_>) -> Result<String, ConnectorError> {
        if let Some(owner) = foreign_owner(&found.resource, change) {
            return Err(ConnectorError::Conflict {
                status: None,
                message: format!(
                    "the target's group {:?} belongs to another source group (externalId {owner:?}), not to {}",
                    change.display_name, change.group_id
                ),
            });
        }
        let attributes = group_attributes(change);
        let converged = attributes
            .iter()
            .all(|(attribute, value)| found.resource.get(attribute) == Some(value));
        if converged {
            return Ok(found.id);
        }
        // Lookups leave the members out, so the write goes by id: where it must PUT the
        // group back, it reads the whole group first.
        self.update_by_id(&self.groups, &found.id, &attributes)
            .await
            .map_err(|error| name_taken(error, change))?
            .ok_or_else(|| ConnectorError::Rejected {
                status: 404,
                message: format!("group {} disappeared while being updated", found.id),
            })
    }

    async fn delete_group(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        // No If-Match: it would cost a read of the whole group (members included), and
        // a delete stands whatever changed since.
        if let Some(id) = change.remote_id {
            match self.delete_resource(&self.groups, id, None).await {
                Err(ConnectorError::Rejected { status: 404, .. }) => {
                    tracing::info!(connector = %self.name, remote_id = id, "The stored remote id is gone; searching.");
                }
                result => return deleted_or_absent(result, id.to_string()),
            }
        }
        match self.find_group(change).await? {
            Some(found) if foreign_owner(&found.resource, change).is_none() => {
                let result = self.delete_resource(&self.groups, &found.id, None).await;
                deleted_or_absent(result, found.id)
            }
            // Only someone else's group has the name: ours is not there.
            Some(_) | None => Ok(Applied {
                outcome: Outcome::AlreadyAbsent,
                remote_id: None,
            }),
        }
    }

    /// Looks the group up by `externalId`, then by `displayName`.
    async fn find_group(&self, change: &GroupChange<'_>) -> Result<Option<RemoteResource>, ConnectorError> {
        let lookups = [
            external_id_lookup(change),
            Lookup {
                attribute: "displayName",
                value: change.display_name,
                case_exact: false,
            },
        ];
        self.find(&self.groups, &lookups).await
    }

    pub(super) async fn apply_members_change(&self, change: &MembersChange<'_>) -> Result<(), ConnectorError> {
        if change.members.is_empty() {
            return Ok(());
        }
        let result = if self.capabilities().await?.patch {
            self.patch_members(change).await
        } else {
            self.put_members(change).await
        };
        result.map_err(|error| match error {
            ConnectorError::Rejected { status: 404, message } => ConnectorError::GroupGone {
                message: format!(
                    "group {} ({}) has no id {} on the target: {message}",
                    change.group.group_id, change.group.display_name, change.group.remote_id
                ),
            },
            error => error,
        })
    }

    /// One PATCH per batch of at most [`Connector::max_members_per_request`] members
    /// (the caller should not send more; a target's limit is not ours to break).
    async fn patch_members(&self, change: &MembersChange<'_>) -> Result<(), ConnectorError> {
        let url = self.groups.resource_url(change.group.remote_id);
        for batch in change.members.chunks(self.max_members_per_request()) {
            match self.send_members_patch(&url, change.action, batch).await {
                Ok(()) => {}
                // Some servers refuse a whole batch over one member already there (add:
                // uniqueness) or already gone (remove: `noTarget`, which RFC 7644 §3.12
                // gives for a path filter matching nothing, though §3.5.2.2 calls such a
                // remove a success). Sent one by one, those members are success.
                Err(error) if is_already_done(change.action, &error) && batch.len() > 1 => {
                    tracing::info!(connector = %self.name, error = %error, "A membership batch was refused as partly done already; sending it member by member.");
                    for member in batch {
                        match self
                            .send_members_patch(&url, change.action, std::slice::from_ref(member))
                            .await
                        {
                            Ok(()) => {}
                            Err(error) if is_already_done(change.action, &error) => {}
                            Err(error) => return Err(error),
                        }
                    }
                }
                Err(error) if is_already_done(change.action, &error) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    async fn send_members_patch(
        &self,
        url: &Url,
        action: MemberAction,
        members: &[MemberRef],
    ) -> Result<(), ConnectorError> {
        let body = members_patch(action, members);
        self.send(
            |http| http.patch(url.clone()).json(&body),
            &[StatusCode::OK, StatusCode::NO_CONTENT],
        )
        .await
        .map(drop)
    }

    /// Without PATCH: reads the group, adds or takes out only these members, and PUTs
    /// it back (with `If-Match` where ETags are advertised). One write for the whole
    /// change, unbatched: a PUT carries the whole member list anyway.
    async fn put_members(&self, change: &MembersChange<'_>) -> Result<(), ConnectorError> {
        let id = change.group.remote_id;
        let Some(remote) = self.get_resource(&self.groups, id).await? else {
            return Err(ConnectorError::Rejected {
                status: 404,
                message: format!("group {id} not found"),
            });
        };
        self.write_resource(&self.groups, remote, |remote| {
            let mut group = remote.resource.clone();
            edit_members(&mut group, change.action, change.members).then(|| (Method::PUT, without_meta(group)))
        })
        .await
        .map(drop)
    }
}

fn external_id_lookup<'a>(change: &GroupChange<'a>) -> Lookup<'a> {
    Lookup {
        attribute: "externalId",
        value: change.group_id,
        case_exact: true,
    }
}

/// The attributes we own on a group.
fn group_attributes(change: &GroupChange<'_>) -> Vec<(String, Value)> {
    vec![
        (
            "displayName".to_string(),
            Value::String(change.display_name.to_string()),
        ),
        ("externalId".to_string(), Value::String(change.group_id.to_string())),
    ]
}

/// The `externalId` of a group that names another source group: taking it over would
/// hand its members to ours (another provisioning system's group, or one of ours that
/// had the name first).
fn foreign_owner<'a>(group: &'a Value, change: &GroupChange<'_>) -> Option<&'a str> {
    group
        .get("externalId")
        .and_then(Value::as_str)
        .filter(|owner| !owner.is_empty() && *owner != change.group_id)
}

/// A rename refused because another group has the name is a conflict, not a bad request.
fn name_taken(error: ConnectorError, change: &GroupChange<'_>) -> ConnectorError {
    if !is_uniqueness_conflict(&error) {
        return error;
    }
    ConnectorError::Conflict {
        status: error.http_status(),
        message: format!(
            "group {} cannot be named {:?}: the target has another group of that name ({error})",
            change.group_id, change.display_name
        ),
    }
}

/// The PatchOp for one batch: one `add` carrying every member, or one `remove` per
/// member with a path selecting it by `value` (RFC 7644 §3.5.2.2).
fn members_patch(action: MemberAction, members: &[MemberRef]) -> Value {
    let operations = match action {
        MemberAction::Add => {
            let values: Vec<Value> = members
                .iter()
                .map(|member| json!({"value": member.remote_id}))
                .collect();
            vec![json!({"op": "add", "path": "members", "value": values})]
        }
        MemberAction::Remove => members
            .iter()
            .map(|member| json!({"op": "remove", "path": member_path(&member.remote_id)}))
            .collect(),
    };
    patch_request(operations)
}

/// `members[value eq "<id>"]`, the id a filter string literal, so quotes, backslashes
/// and `]` in it stay inside the literal.
fn member_path(remote_id: &str) -> String {
    format!("members[value eq {}]", filter_literal(remote_id))
}

/// Adds `members` to, or takes them out of, a group resource's `members` list, keeping
/// every other member as it was. Whether the list changed.
fn edit_members(group: &mut Value, action: MemberAction, members: &[MemberRef]) -> bool {
    let Value::Object(group) = group else {
        return false;
    };
    let list = group.entry("members").or_insert_with(|| Value::Array(Vec::new()));
    if !list.is_array() {
        *list = Value::Array(Vec::new());
    }
    let Value::Array(list) = list else {
        unreachable!("just made an array")
    };
    let is_member = |entry: &Value, member: &MemberRef| {
        entry.get("value").and_then(Value::as_str) == Some(member.remote_id.as_str())
    };
    let before = list.len();
    match action {
        MemberAction::Add => {
            for member in members {
                if !list.iter().any(|entry| is_member(entry, member)) {
                    list.push(json!({"value": member.remote_id}));
                }
            }
        }
        MemberAction::Remove => list.retain(|entry| !members.iter().any(|member| is_member(entry, member))),
    }
    list.len() != before
}

/// Whether a refused membership request means its members were already as asked.
fn is_already_done(action: MemberAction, error: &ConnectorError) -> bool {
    match action {
        MemberAction::Add => is_uniqueness_conflict(error),
        MemberAction::Remove => matches!(
            error,
            ConnectorError::Rejected { status: 400, message }
                if message.to_ascii_lowercase().starts_with("scimtype notarget")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(remote_id: &str) -> MemberRef {
        MemberRef {
            user_id: format!("u-{remote_id}"),
            remote_id: remote_id.to_string(),
        }
    }

    #[test]
    fn an_add_batch_is_one_operation_carrying_every_member() {
        assert_eq!(
            members_patch(MemberAction::Add, &[member("1"), member("2")]),
            json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "add", "path": "members", "value": [{"value": "1"}, {"value": "2"}]}]
            })
        );
    }

    #[test]
    fn a_remove_batch_selects_each_member_by_value() {
        assert_eq!(
            members_patch(MemberAction::Remove, &[member("1"), member("2")]),
            json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [
                    {"op": "remove", "path": "members[value eq \"1\"]"},
                    {"op": "remove", "path": "members[value eq \"2\"]"}
                ]
            })
        );
    }

    #[test]
    fn hostile_member_ids_stay_inside_the_filter_literal() {
        assert_eq!(
            member_path(r#"a" or value pr or value eq "b]\"#),
            r#"members[value eq "a\" or value pr or value eq \"b]\\"]"#
        );
        let body = members_patch(MemberAction::Remove, &[member("x\"]ü")]);
        assert_eq!(body["Operations"][0]["path"], "members[value eq \"x\\\"]ü\"]");
    }

    #[test]
    fn editing_members_keeps_the_members_we_do_not_touch() {
        let mut group = json!({
            "id": "g",
            "displayName": "Eng",
            "members": [{"value": "other", "display": "Someone else"}, {"value": "1"}]
        });
        assert!(edit_members(&mut group, MemberAction::Add, &[member("1"), member("2")]));
        assert_eq!(
            group["members"],
            json!([{"value": "other", "display": "Someone else"}, {"value": "1"}, {"value": "2"}])
        );
        assert!(
            !edit_members(&mut group, MemberAction::Add, &[member("2")]),
            "adding a member already there changes nothing"
        );
        assert!(edit_members(
            &mut group,
            MemberAction::Remove,
            &[member("1"), member("gone")]
        ));
        assert_eq!(
            group["members"],
            json!([{"value": "other", "display": "Someone else"}, {"value": "2"}])
        );
        assert!(!edit_members(&mut group, MemberAction::Remove, &[member("gone")]));
        assert_eq!(group["displayName"], "Eng");

        let mut without_members = json!({"id": "g", "displayName": "Eng"});
        assert!(!edit_members(
            &mut without_members,
            MemberAction::Remove,
            &[member("1")]
        ));
        assert!(edit_members(&mut without_members, MemberAction::Add, &[member("1")]));
        assert_eq!(without_members["members"], json!([{"value": "1"}]));
    }

    #[test]
    fn refusals_that_mean_already_done_are_recognised() {
        let no_target = ConnectorError::Rejected {
            status: 400,
            message: "scimType noTarget: no member matches".into(),
        };
        let conflict = ConnectorError::Rejected {
            status: 409,
            message: "scimType uniqueness: already a member".into(),
        };
        assert!(is_already_done(MemberAction::Remove, &no_target));
        assert!(!is_already_done(MemberAction::Add, &no_target));
        assert!(is_already_done(MemberAction::Add, &conflict));
        assert!(!is_already_done(MemberAction::Remove, &conflict));
        let invalid = ConnectorError::Rejected {
            status: 400,
            message: "scimType invalidPath: bad".into(),
        };
        assert!(!is_already_done(MemberAction::Remove, &invalid));
    }

    #[test]
    fn a_group_with_another_source_id_is_someone_elses() {
        let change = GroupChange {
            operation: Operation::Create,
            event_id: "e",
            tenant: "acme",
            group_id: "g-1",
            display_name: "Eng",
            remote_id: None,
        };
        assert_eq!(foreign_owner(&json!({"externalId": "g-2"}), &change), Some("g-2"));
        assert_eq!(foreign_owner(&json!({"externalId": "g-1"}), &change), None);
        assert_eq!(foreign_owner(&json!({"displayName": "Eng"}), &change), None);
        assert_eq!(foreign_owner(&json!({"externalId": ""}), &change), None);
    }
}
