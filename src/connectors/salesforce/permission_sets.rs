//! Salesforce groups as permission sets.
//!
//! Salesforce has no group a provisioning client should create, so a source group is
//! bound to a permission set that an administrator made: `permission_sets` maps the
//! group (by id or displayName) to the permission set's API Name. Its Id, found by SOQL
//! and cached, is the group's remote id, and the group's members are the users assigned
//! the set (`PermissionSetAssignment`).
//!
//! - Create and update bind the group (outcome `adopted`: the set existed before us and
//!   nothing is written). A group with no entry is `skipped` with the reason.
//! - Delete is `skipped` too: permission sets are never deleted, and removing the set's
//!   assignments would need the group's member list, which a delete does not carry (and
//!   a set may be assigned by hand or through another group as well).
//! - Members go 200 to a request through sObject Collections (`composite/sobjects`),
//!   with `allOrNone=false` so one refused record does not undo the others. Adding an
//!   assignment that exists (`DUPLICATE_VALUE`) or removing one that is gone is success.

use serde_json::{json, Value};

use crate::connectors::salesforce::{record_id, soql_literal, SalesforceConnector};
use crate::connectors::{Applied, ConnectorError};
use crate::domain::{GroupChange, GroupRef, MemberAction, MemberRef, MembersChange, Operation, Outcome};

/// The most records or ids one sObject Collections request may carry.
pub const COLLECTION_LIMIT: usize = 200;
/// How many refused records an error lists by name; the rest are counted.
const LISTED_REFUSALS: usize = 5;

/// One record a collection request refused.
struct Refusal {
    user_id: String,
    remote_id: String,
    code: String,
    message: String,
}

impl SalesforceConnector {
    pub(super) async fn apply_group_change(&self, change: &GroupChange<'_>) -> Result<Applied, ConnectorError> {
        let permission_set = self.permission_set_of(change.group_id, change.display_name)?;
        match change.operation {
            Operation::Create | Operation::Update => Ok(Applied {
                outcome: Outcome::Adopted,
                remote_id: Some(self.permission_set_id(permission_set).await?),
            }),
            Operation::Delete => {
                // The permission set stays (it is the administrator's); the access the
                // group granted goes: a deleted group must not leave its members their
                // permissions (a leaver keeping access).
                let permission_set_id = self.permission_set_id(permission_set).await?;
                let removed = self.unassign_all(&permission_set_id).await?;
                tracing::info!(
                    permission_set,
                    removed,
                    "Group deleted: its permission set's assignments removed."
                );
                Ok(Applied {
                    outcome: if removed > 0 {
                        Outcome::Deleted
                    } else {
                        Outcome::AlreadyAbsent
                    },
                    remote_id: Some(permission_set_id),
                })
            }
        }
    }

    /// Removes every assignment of a permission set, 200 at a time; how many went.
    async fn unassign_all(&self, permission_set_id: &str) -> Result<usize, ConnectorError> {
        let mut removed = 0;
        loop {
            let found = self
                .query_records(&format!(
                    "SELECT Id FROM PermissionSetAssignment WHERE PermissionSetId = {}",
                    soql_literal(permission_set_id)
                ))
                .await?;
            if found.is_empty() {
                return Ok(removed);
            }
            let ids = found.iter().map(record_id).collect::<Result<Vec<String>, _>>()?;
            for chunk in ids.chunks(COLLECTION_LIMIT) {
                let joined = chunk.join(",");
                let url = self.api_path("composite/sobjects");
                let results = self
                    .send(|http, base| {
                        http.delete(format!("{base}{url}"))
                            .query(&[("ids", joined.as_str()), ("allOrNone", "false")])
                    })
                    .await?;
                let named: Vec<MemberRef> = chunk
                    .iter()
                    .map(|id| MemberRef {
                        user_id: String::new(),
                        remote_id: id.clone(),
                    })
                    .collect();
                let refusals = refusals(&results, &named, |code| code == "ENTITY_IS_DELETED")?;
                if !refusals.is_empty() {
                    return Err(refused("assignment removals", &refusals, chunk.len()));
                }
                removed += chunk.len();
            }
        }
    }

    pub(super) async fn apply_members_change(&self, change: &MembersChange<'_>) -> Result<(), ConnectorError> {
        // A group whose entry was taken out of the settings is no longer managed here.
        self.permission_set_of(change.group.group_id, change.group.display_name)?;
        for members in change.members.chunks(COLLECTION_LIMIT) {
            match change.action {
                MemberAction::Add => self.assign(&change.group, members).await?,
                MemberAction::Remove => self.unassign(&change.group, members).await?,
            }
        }
        Ok(())
    }

    /// The API Name `permission_sets` gives the group: by its id, else its displayName.
    fn permission_set_of(&self, group_id: &str, display_name: &str) -> Result<&str, ConnectorError> {
        let permission_sets = &self.settings.permission_sets;
        permission_sets
            .get(group_id)
            .or_else(|| permission_sets.get(display_name))
            .map(String::as_str)
            .ok_or_else(|| ConnectorError::Unsupported {
                message: format!(
                    "group `{display_name}` has no permission set in connectors.{}.permission_sets",
                    self.name
                ),
            })
    }

    /// The Id of the permission set with API Name `name`: cached, else one SOQL query.
    async fn permission_set_id(&self, name: &str) -> Result<String, ConnectorError> {
        if let Some(id) = self
            .permission_set_ids
            .lock()
            .expect("permission set ids lock")
            .get(name)
        {
            return Ok(id.clone());
        }
        let records = self
            .query_records(&format!(
                "SELECT Id FROM PermissionSet WHERE Name = {}",
                soql_literal(name)
            ))
            .await?;
        let Some(record) = records.first() else {
            // Retrying cannot help: an administrator has to create it, or fix the name.
            return Err(ConnectorError::Conflict {
                status: None,
                message: format!(
                    "Salesforce has no permission set `{name}` (connectors.{}.permission_sets); the connector does not create permission sets",
                    self.name
                ),
            });
        };
        let id = record_id(record)?;
        self.permission_set_ids
            .lock()
            .expect("permission set ids lock")
            .insert(name.to_string(), id.clone());
        Ok(id)
    }

    /// Creates the assignments of `members` in one collection request.
    async fn assign(&self, group: &GroupRef<'_>, members: &[MemberRef]) -> Result<(), ConnectorError> {
        let records: Vec<Value> = members
            .iter()
            .map(|member| {
                json!({
                    "attributes": {"type": "PermissionSetAssignment"},
                    "AssigneeId": member.remote_id,
                    "PermissionSetId": group.remote_id,
                })
            })
            .collect();
        let body = json!({"allOrNone": false, "records": records});
        let url = self.api_path("composite/sobjects");
        let results = self
            .send(|http, base| http.post(format!("{base}{url}")).json(&body))
            .await?;
        let refusals = refusals(&results, members, |code| code == "DUPLICATE_VALUE")?;
        if refusals.is_empty() {
            return Ok(());
        }
        // An unknown user or an unknown permission set read the same; only the set
        // being gone makes the whole group's work pointless.
        let dangling = refusals
            .iter()
            .any(|refusal| refusal.code == "INVALID_CROSS_REFERENCE_KEY");
        if dangling && !self.permission_set_exists(group).await? {
            return Err(self.group_gone(group));
        }
        Err(refused("assignments", &refusals, members.len()))
    }

    /// Finds the assignments of `members` to the group's permission set by SOQL and
    /// deletes them in one collection request.
    async fn unassign(&self, group: &GroupRef<'_>, members: &[MemberRef]) -> Result<(), ConnectorError> {
        let assignee_ids: Vec<String> = members.iter().map(|member| soql_literal(&member.remote_id)).collect();
        // At most 200 ids of 18 characters: far below SOQL's length limit, and one batch
        // of results (Salesforce's smallest is 200 records).
        let found = self
            .query_records(&format!(
                "SELECT Id, AssigneeId FROM PermissionSetAssignment WHERE PermissionSetId = {} AND AssigneeId IN ({})",
                soql_literal(group.remote_id),
                assignee_ids.join(", ")
            ))
            .await?;
        if found.is_empty() {
            // Nothing left to remove, unless the permission set itself is gone.
            if !self.permission_set_exists(group).await? {
                return Err(self.group_gone(group));
            }
            return Ok(());
        }
        let assignment_ids = found.iter().map(record_id).collect::<Result<Vec<String>, _>>()?;
        // The members whose assignments were found, in the order of the results. An id
        // sent in its 15-character form comes back in its 18-character form, so a
        // member may not be matched; it is then named by the id Salesforce gave.
        let removed: Vec<MemberRef> = found
            .iter()
            .map(|record| {
                let assignee_id = record.get("AssigneeId").and_then(Value::as_str).unwrap_or_default();
                members
                    .iter()
                    .find(|member| member.remote_id == assignee_id)
                    .cloned()
                    .unwrap_or_else(|| MemberRef {
                        user_id: String::new(),
                        remote_id: assignee_id.to_string(),
                    })
            })
            .collect();
        let ids = assignment_ids.join(",");
        let url = self.api_path("composite/sobjects");
        let results = self
            .send(|http, base| {
                http.delete(format!("{base}{url}"))
                    .query(&[("ids", ids.as_str()), ("allOrNone", "false")])
            })
            .await?;
        // Deleted meanwhile (a concurrent removal): what we wanted.
        let refusals = refusals(&results, &removed, |code| code == "ENTITY_IS_DELETED")?;
        if refusals.is_empty() {
            return Ok(());
        }
        Err(refused("assignment removals", &refusals, removed.len()))
    }

    async fn permission_set_exists(&self, group: &GroupRef<'_>) -> Result<bool, ConnectorError> {
        let records = self
            .query_records(&format!(
                "SELECT Id FROM PermissionSet WHERE Id = {}",
                soql_literal(group.remote_id)
            ))
            .await?;
        Ok(!records.is_empty())
    }

    /// The group's permission set is gone: forget its cached Id, so that binding the
    /// group again looks the name up afresh (an administrator may have recreated it).
    fn group_gone(&self, group: &GroupRef<'_>) -> ConnectorError {
        self.permission_set_ids
            .lock()
            .expect("permission set ids lock")
            .retain(|_, id| id != group.remote_id);
        ConnectorError::GroupGone {
            message: format!(
                "Salesforce has no permission set {} (group `{}`)",
                group.remote_id, group.display_name
            ),
        }
    }
}

/// The records of a collection answer that failed, in the order of `members`, except
/// those whose error code `is_success` says is as good as success.
fn refusals(
    results: &Value,
    members: &[MemberRef],
    is_success: impl Fn(&str) -> bool,
) -> Result<Vec<Refusal>, ConnectorError> {
    let results = results
        .as_array()
        .filter(|results| results.len() == members.len())
        .ok_or_else(|| ConnectorError::InvalidResponse {
            status: None,
            message: format!(
                "sObject Collections answered without one result for each of {} records",
                members.len()
            ),
        })?;
    let mut refusals = Vec::new();
    for (member, result) in members.iter().zip(results) {
        if result.get("success").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let error = result.pointer("/errors/0");
        let text = |field: &str| {
            error
                .and_then(|error| error.get(field))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let code = text("statusCode");
        if is_success(&code) {
            continue;
        }
        refusals.push(Refusal {
            user_id: member.user_id.clone(),
            remote_id: member.remote_id.clone(),
            code,
            message: text("message"),
        });
    }
    Ok(refusals)
}

/// The error for a batch with refused records. `Rejected`, so the caller retries the
/// members one by one and only the refused ones fail; 400 is what Salesforce answers
/// when the same record is refused on its own.
fn refused(what: &str, refusals: &[Refusal], total: usize) -> ConnectorError {
    let mut listed: Vec<String> = refusals
        .iter()
        .take(LISTED_REFUSALS)
        .map(|refusal| {
            format!(
                "user {} ({}): {}: {}",
                refusal.user_id, refusal.remote_id, refusal.code, refusal.message
            )
        })
        .collect();
    if refusals.len() > LISTED_REFUSALS {
        listed.push(format!("and {} more", refusals.len() - LISTED_REFUSALS));
    }
    ConnectorError::Rejected {
        status: 400,
        message: format!(
            "Salesforce refused {} of {total} {what}: {}",
            refusals.len(),
            listed.join("; ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user_id: &str, remote_id: &str) -> MemberRef {
        MemberRef {
            user_id: user_id.into(),
            remote_id: remote_id.into(),
        }
    }

    #[test]
    fn collection_results_are_read_in_order() {
        let members = [member("u-1", "005A"), member("u-2", "005B"), member("u-3", "005C")];
        let results = json!([
            {"id": "0Pa1", "success": true, "errors": []},
            {"success": false, "errors": [{"statusCode": "DUPLICATE_VALUE", "message": "Duplicate PermissionSetAssignment", "fields": []}]},
            {"success": false, "errors": [{"statusCode": "INVALID_CROSS_REFERENCE_KEY", "message": "invalid cross reference id", "fields": []}]},
        ]);
        let refusals = refusals(&results, &members, |code| code == "DUPLICATE_VALUE").unwrap();
        assert_eq!(refusals.len(), 1);
        assert_eq!(
            refused("assignments", &refusals, members.len()).to_string(),
            "the target rejected the call with HTTP 400: Salesforce refused 1 of 3 assignments: user u-3 (005C): INVALID_CROSS_REFERENCE_KEY: invalid cross reference id"
        );
        let short = json!([{"success": true}]);
        assert!(matches!(
            refusals_of(&short, &members),
            Err(ConnectorError::InvalidResponse { .. })
        ));
    }

    fn refusals_of(results: &Value, members: &[MemberRef]) -> Result<Vec<Refusal>, ConnectorError> {
        refusals(results, members, |_| false)
    }

    #[test]
    fn long_refusal_lists_are_cut() {
        let many: Vec<Refusal> = (0..8)
            .map(|index| Refusal {
                user_id: format!("u-{index}"),
                remote_id: format!("005{index}"),
                code: "FIELD_INTEGRITY_EXCEPTION".into(),
                message: "no".into(),
            })
            .collect();
        let message = refused("assignments", &many, 200).to_string();
        assert!(message.contains("refused 8 of 200"), "{message}");
        assert!(message.ends_with("; and 3 more"), "{message}");
        assert!(!message.contains("u-5"), "{message}");
    }
}
