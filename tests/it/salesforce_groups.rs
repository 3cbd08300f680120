//! The Salesforce connector's groups as permission sets against its emulator: groups
//! bound through `permission_sets` (by displayName or id), members assigned and removed
//! 200 to a request (counted), refusals, and a permission set that is gone.

use provisioner::connectors::{Connector, ConnectorError};
use provisioner::domain::{GroupRef, MemberAction, MemberRef};
use provisioner::result::{Operation, Outcome};
use serde_json::json;

use crate::support::targets::{apply_members_in_batches, create_members, group_change, SalesforceFixture};

/// A well-formed user id that no user has.
const UNKNOWN_USER_ID: &str = "005999999999999999";

#[tokio::test]
async fn groups_are_bound_to_the_permission_sets_they_map_to() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let sales_id = fixture
        .emulator
        .add_permission_set("Sales_Cloud_User", "Sales Cloud User");
    let service_id = fixture.emulator.add_permission_set("Service_Agent", "Service Agent");
    let connector = fixture.connector(json!({"permission_sets": {
        "Sales": "Sales_Cloud_User",
        "g-support": "Service_Agent",
        "Finance": "Finance_Analyst",
    }}));

    let bound = connector
        .apply_group(group_change(Operation::Create, "g-sales", "Sales", None))
        .await
        .unwrap();
    assert_eq!(
        (bound.outcome, bound.remote_id.as_deref()),
        (Outcome::Adopted, Some(sales_id.as_str())),
        "by displayName; the permission set existed, so it is adopted"
    );
    assert_eq!(
        fixture.emulator.queries(),
        vec!["SELECT Id FROM PermissionSet WHERE Name = 'Sales_Cloud_User'"]
    );
    let renamed = connector
        .apply_group(group_change(Operation::Update, "g-sales", "Sales", Some(&sales_id)))
        .await
        .unwrap();
    assert_eq!(
        (renamed.outcome, renamed.remote_id.as_deref()),
        (Outcome::Adopted, Some(sales_id.as_str()))
    );
    assert_eq!(fixture.emulator.queries().len(), 1, "the Id is cached");

    let by_id = connector
        .apply_group(group_change(Operation::Create, "g-support", "Support Team", None))
        .await
        .unwrap();
    assert_eq!(by_id.remote_id.as_deref(), Some(service_id.as_str()), "by group id");

    for (group_id, display_name) in [("g-marketing", "Marketing"), ("g-sales-lower", "sales")] {
        let error = connector
            .apply_group(group_change(Operation::Create, group_id, display_name, None))
            .await
            .unwrap_err();
        assert_eq!(
            error,
            ConnectorError::Unsupported {
                message: format!("group `{display_name}` has no permission set in connectors.crm.permission_sets")
            },
            "displayNames match exactly"
        );
    }

    let error = connector
        .apply_group(group_change(Operation::Create, "g-finance", "Finance", None))
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    assert!(
        error.to_string().contains("no permission set `Finance_Analyst`"),
        "{error}"
    );

    // A deleted group takes its access with it: every assignment of its permission set
    // goes (250: two collection requests), the permission set and others' stay.
    for index in 0..250 {
        fixture.emulator.assign_directly(&format!("005{index:015}"), &sales_id);
    }
    fixture.emulator.assign_directly("005000000000000999", &service_id);
    let deleted = connector
        .apply_group(group_change(Operation::Delete, "g-sales", "Sales", Some(&sales_id)))
        .await
        .unwrap();
    assert_eq!(deleted.outcome, Outcome::Deleted, "{deleted:?}");
    assert_eq!(fixture.emulator.permission_sets().len(), 2, "the permission sets stay");
    assert_eq!(
        fixture.emulator.assignment_count(),
        1,
        "only the other permission set's assignment is left"
    );
    let again = connector
        .apply_group(group_change(Operation::Delete, "g-sales", "Sales", Some(&sales_id)))
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyAbsent);
}

#[tokio::test]
async fn members_are_assigned_and_removed_200_to_a_request() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let permission_set_id = fixture
        .emulator
        .add_permission_set("Sales_Cloud_User", "Sales Cloud User");
    let connector = fixture.connector(json!({"permission_sets": {"Sales": "Sales_Cloud_User"}}));
    let members = create_members(&connector, "member", 250).await;
    connector
        .apply_group(group_change(Operation::Create, "g-sales", "Sales", None))
        .await
        .unwrap();
    let group = GroupRef {
        group_id: "g-sales",
        display_name: "Sales",
        remote_id: &permission_set_id,
    };
    assert_eq!(connector.max_members_per_request(), 200);

    let before = fixture.emulator.api_calls();
    apply_members_in_batches(&connector, MemberAction::Add, group, &members)
        .await
        .unwrap();
    assert_eq!(
        fixture.emulator.api_calls() - before,
        2,
        "two sObject Collections requests: 200 and 50"
    );
    assert_eq!(fixture.emulator.assignment_count(), 250);
    assert_eq!(
        fixture.emulator.permission_set_names_of(&members[249].remote_id),
        vec!["Sales_Cloud_User"]
    );

    // Again: every assignment exists (DUPLICATE_VALUE), which is success.
    let before = fixture.emulator.api_calls();
    apply_members_in_batches(&connector, MemberAction::Add, group, &members)
        .await
        .unwrap();
    assert_eq!(fixture.emulator.api_calls() - before, 2);
    assert_eq!(fixture.emulator.assignment_count(), 250);

    let leaving = &members[..60];
    let queries = fixture.emulator.queries().len();
    let before = fixture.emulator.api_calls();
    apply_members_in_batches(&connector, MemberAction::Remove, group, leaving)
        .await
        .unwrap();
    assert_eq!(
        fixture.emulator.api_calls() - before,
        2,
        "one query for the assignment ids, one collection delete"
    );
    assert_eq!(fixture.emulator.assignment_count(), 190);
    assert!(fixture.emulator.assignments_of(&members[0].remote_id).is_empty());
    let query = &fixture.emulator.queries()[queries];
    assert!(
        query.starts_with(&format!(
            "SELECT Id, AssigneeId FROM PermissionSetAssignment WHERE PermissionSetId = '{permission_set_id}' AND AssigneeId IN ('{}', ",
            members[0].remote_id
        )),
        "{query}"
    );

    // Again: nothing is left to remove, which is success once the set is known to exist.
    let before = fixture.emulator.api_calls();
    apply_members_in_batches(&connector, MemberAction::Remove, group, leaving)
        .await
        .unwrap();
    assert_eq!(
        fixture.emulator.api_calls() - before,
        2,
        "the assignment query and the permission set check"
    );
    assert_eq!(fixture.emulator.assignment_count(), 190);
}

#[tokio::test]
async fn a_refused_member_fails_its_batch_but_not_the_others() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let permission_set_id = fixture
        .emulator
        .add_permission_set("Sales_Cloud_User", "Sales Cloud User");
    let connector = fixture.connector(json!({"permission_sets": {"Sales": "Sales_Cloud_User"}}));
    let members = create_members(&connector, "member", 2).await;
    let group = GroupRef {
        group_id: "g-sales",
        display_name: "Sales",
        remote_id: &permission_set_id,
    };
    let unknown = MemberRef {
        user_id: "u-unknown".into(),
        remote_id: UNKNOWN_USER_ID.into(),
    };
    let batch = [members[0].clone(), unknown.clone(), members[1].clone()];
    let error = apply_members_in_batches(&connector, MemberAction::Add, group, &batch)
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ConnectorError::Rejected {
            status: 400,
            message: format!(
                "Salesforce refused 1 of 3 assignments: user u-unknown ({UNKNOWN_USER_ID}): INVALID_CROSS_REFERENCE_KEY: invalid cross reference id"
            ),
        }
    );
    assert_eq!(
        fixture.emulator.assignment_count(),
        2,
        "allOrNone=false: the others are assigned"
    );
    // What the caller does with a refused batch: each member alone.
    apply_members_in_batches(&connector, MemberAction::Add, group, &members[..1])
        .await
        .unwrap();
    assert!(
        apply_members_in_batches(&connector, MemberAction::Add, group, std::slice::from_ref(&unknown))
            .await
            .is_err()
    );

    // A hostile id cannot break out of its SOQL literal.
    let hostile = MemberRef {
        user_id: "u-hostile".into(),
        remote_id: "005' OR PermissionSetId != '".into(),
    };
    apply_members_in_batches(&connector, MemberAction::Remove, group, &[members[0].clone(), hostile])
        .await
        .unwrap();
    assert_eq!(fixture.emulator.assignment_count(), 1);
    assert!(
        fixture
            .emulator
            .queries()
            .last()
            .unwrap()
            .ends_with(r"'005\' OR PermissionSetId != \'')"),
        "{:?}",
        fixture.emulator.queries().last()
    );
}

#[tokio::test]
async fn a_permission_set_salesforce_does_not_have_is_a_group_gone() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let connector = fixture.connector(json!({"permission_sets": {"Sales": "Sales_Cloud_User"}}));
    let members = create_members(&connector, "member", 1).await;
    let group = GroupRef {
        group_id: "g-sales",
        display_name: "Sales",
        remote_id: "0PS999999999999999",
    };
    for action in [MemberAction::Add, MemberAction::Remove] {
        let error = apply_members_in_batches(&connector, action, group, &members)
            .await
            .unwrap_err();
        assert_eq!(
            error,
            ConnectorError::GroupGone {
                message: "Salesforce has no permission set 0PS999999999999999 (group `Sales`)".into()
            },
            "{action:?}"
        );
    }

    // A group whose entry is gone from the settings is not managed here any more.
    let unmapped = GroupRef {
        group_id: "g-marketing",
        display_name: "Marketing",
        remote_id: "0PS999999999999999",
    };
    let error = apply_members_in_batches(&connector, MemberAction::Add, unmapped, &members)
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectorError::Unsupported { .. }), "{error:?}");
}
