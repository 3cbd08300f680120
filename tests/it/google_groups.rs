//! The Google Workspace connector's groups and members against the Directory API
//! emulator: create, adopt, rename and delete; one request per member, counted; the group
//! token apart from the user token; every body checked against Google's discovery
//! document.

use std::collections::BTreeMap;

use provisioner::connectors::{Connector, ConnectorError};
use provisioner::domain::{GroupRef, MemberAction, MemberRef};
use provisioner::result::{Operation, Outcome};
use serde_json::json;

use crate::support::google_discovery::assert_group_bodies_fit_discovery_document;
use crate::support::targets::{apply_members_in_batches, create_members, group_change, user_event, GoogleFixture};

/// How many calls each discovery method got between two `call_counts` readings; methods
/// not called are left out.
fn calls_between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(method, count)| (method.clone(), count - before.get(method).copied().unwrap_or(0)))
        .filter(|(_, count)| *count > 0)
        .collect()
}

fn calls(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
    entries
        .iter()
        .map(|(method, count)| (method.to_string(), *count))
        .collect()
}

#[tokio::test]
async fn groups_are_created_adopted_renamed_and_deleted() {
    let fixture = GoogleFixture::start().await;
    let connector = fixture.connector(json!({}));

    let created = connector
        .apply_group(group_change(Operation::Create, "g-eng", "Engineering Team", None))
        .await
        .unwrap();
    assert_eq!(created.outcome, Outcome::Created);
    let remote = fixture
        .emulator
        .group_by_email("engineering-team@example.com")
        .expect("the address is the display name's slug");
    let engineering_id = created.remote_id.clone().unwrap();
    assert_eq!(
        remote["id"],
        engineering_id.as_str(),
        "the remote id is Google's group id"
    );
    assert_eq!(remote["name"], "Engineering Team");

    // A redelivered create whose id was never stored takes over the group it made.
    let again = connector
        .apply_group(group_change(Operation::Create, "g-eng", "Engineering Team", None))
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::Adopted);
    assert_eq!(again.remote_id.as_deref(), Some(engineering_id.as_str()));
    assert_eq!(fixture.emulator.group_count(), 1);
    assert_eq!(
        fixture.emulator.call_count("directory.groups.patch"),
        0,
        "the name already matched"
    );

    // One an administrator made at that address is adopted and its name converged.
    let existing_id = fixture
        .emulator
        .insert_group_directly("sales@example.com", "sales (old)");
    let adopted = connector
        .apply_group(group_change(Operation::Create, "g-sales", "Sales", None))
        .await
        .unwrap();
    assert_eq!(adopted.outcome, Outcome::Adopted);
    assert_eq!(adopted.remote_id.as_deref(), Some(existing_id.as_str()));
    assert_eq!(
        fixture.emulator.group_by_email("sales@example.com").unwrap()["name"],
        "Sales"
    );

    // A rename changes the name; the address stays.
    let renamed = connector
        .apply_group(group_change(
            Operation::Update,
            "g-eng",
            "Platform Engineering",
            Some(&engineering_id),
        ))
        .await
        .unwrap();
    assert_eq!(renamed.outcome, Outcome::Updated);
    assert_eq!(renamed.remote_id.as_deref(), Some(engineering_id.as_str()));
    let remote = fixture.emulator.group_by_email("engineering-team@example.com").unwrap();
    assert_eq!(remote["name"], "Platform Engineering");
    assert!(fixture
        .emulator
        .group_by_email("platform-engineering@example.com")
        .is_none());
    let patch = fixture.emulator.group_requests().last().unwrap().clone();
    assert_eq!(
        (patch.method_id, patch.body),
        ("directory.groups.patch", json!({"name": "Platform Engineering"}))
    );

    // An update whose stored id Google no longer has finds the group by its address…
    let found = connector
        .apply_group(group_change(
            Operation::Update,
            "g-sales",
            "Sales",
            Some("00000000000dead"),
        ))
        .await
        .unwrap();
    assert_eq!(
        (found.outcome, found.remote_id.as_deref()),
        (Outcome::Updated, Some(existing_id.as_str()))
    );
    // … and one Google never had is created.
    let ops = connector
        .apply_group(group_change(Operation::Update, "g-ops", "Ops", None))
        .await
        .unwrap();
    assert_eq!(ops.outcome, Outcome::Created);

    // Delete by id, twice; without an id, by the address.
    let delete = group_change(
        Operation::Delete,
        "g-eng",
        "Platform Engineering",
        Some(&engineering_id),
    );
    assert_eq!(connector.apply_group(delete).await.unwrap().outcome, Outcome::Deleted);
    assert!(fixture
        .emulator
        .group_by_email("engineering-team@example.com")
        .is_none());
    assert_eq!(
        connector.apply_group(delete).await.unwrap().outcome,
        Outcome::AlreadyAbsent
    );
    let delete_ops = group_change(Operation::Delete, "g-ops", "Ops", None);
    assert_eq!(
        connector.apply_group(delete_ops).await.unwrap().outcome,
        Outcome::Deleted
    );
    assert!(fixture.emulator.group_by_email("ops@example.com").is_none());

    // A user's address is not a group to take over.
    let it_user = user_event("user.created", "u-it", json!({"userName": "it"}));
    connector.apply(it_user.change(Operation::Create)).await.unwrap();
    let error = connector
        .apply_group(group_change(Operation::Create, "g-it", "IT", None))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ConnectorError::Conflict { .. }) && !error.is_retryable(),
        "{error:?}"
    );
    assert!(error.to_string().contains("not as a group"), "{error}");

    assert_group_bodies_fit_discovery_document(&fixture.emulator, true);
}

#[tokio::test]
async fn members_are_added_and_removed_one_request_each() {
    let fixture = GoogleFixture::start().await;
    let connector = fixture.connector(json!({}));
    let members = create_members(&connector, "member", 250).await;
    let group_id = connector
        .apply_group(group_change(Operation::Create, "g-all", "Everyone", None))
        .await
        .unwrap()
        .remote_id
        .unwrap();
    let group = GroupRef {
        group_id: "g-all",
        display_name: "Everyone",
        remote_id: &group_id,
    };
    assert_eq!(
        connector.max_members_per_request(),
        1,
        "Google has no batch member call"
    );

    let before = fixture.emulator.call_counts();
    apply_members_in_batches(&connector, MemberAction::Add, group, &members)
        .await
        .unwrap();
    assert_eq!(
        calls_between(&before, &fixture.emulator.call_counts()),
        calls(&[("directory.members.insert", 250)]),
        "one request per member, and no lookup of the member's email"
    );
    let emails = fixture.emulator.member_emails_of(&group_id);
    assert_eq!(emails.len(), 250);
    assert!(emails.contains(&"member-249@example.com".to_string()));
    let insert = fixture.emulator.group_requests().last().unwrap().clone();
    assert_eq!(
        insert.body,
        json!({"id": members[249].remote_id, "role": "MEMBER"}),
        "members go by their Google user id"
    );

    // Again: each member is already there (409 duplicate), which is success.
    let before = fixture.emulator.call_counts();
    apply_members_in_batches(&connector, MemberAction::Add, group, &members)
        .await
        .unwrap();
    assert_eq!(
        calls_between(&before, &fixture.emulator.call_counts()),
        calls(&[("directory.members.insert", 250)])
    );
    assert_eq!(fixture.emulator.member_emails_of(&group_id).len(), 250);

    let leaving = &members[..100];
    let before = fixture.emulator.call_counts();
    apply_members_in_batches(&connector, MemberAction::Remove, group, leaving)
        .await
        .unwrap();
    assert_eq!(
        calls_between(&before, &fixture.emulator.call_counts()),
        calls(&[("directory.members.delete", 100)])
    );
    let emails = fixture.emulator.member_emails_of(&group_id);
    assert_eq!(emails.len(), 150);
    assert!(!emails.contains(&"member-0@example.com".to_string()));

    // Again: each is gone already (404 memberKey), which is success.
    apply_members_in_batches(&connector, MemberAction::Remove, group, leaving)
        .await
        .unwrap();
    assert_eq!(fixture.emulator.member_emails_of(&group_id).len(), 150);

    assert_eq!(
        fixture.emulator.tokens_issued(),
        2,
        "one token for users, one for groups, each cached"
    );
    assert_group_bodies_fit_discovery_document(&fixture.emulator, true);
}

#[tokio::test]
async fn a_group_google_no_longer_has_is_gone_and_an_unknown_user_is_refused() {
    let fixture = GoogleFixture::start().await;
    let connector = fixture.connector(json!({}));
    let members = create_members(&connector, "member", 1).await;
    let group_id = connector
        .apply_group(group_change(Operation::Create, "g-temp", "Temp", None))
        .await
        .unwrap()
        .remote_id
        .unwrap();
    let group = GroupRef {
        group_id: "g-temp",
        display_name: "Temp",
        remote_id: &group_id,
    };
    let stranger = [MemberRef {
        user_id: "u-stranger".into(),
        remote_id: "999999999999999999999".into(),
    }];
    let error = apply_members_in_batches(&connector, MemberAction::Add, group, &stranger)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ConnectorError::Rejected { status: 404, message } if message.contains("memberKey")),
        "a user Google does not have fails that member, not the group: {error:?}"
    );

    connector
        .apply_group(group_change(Operation::Delete, "g-temp", "Temp", Some(&group_id)))
        .await
        .unwrap();
    for action in [MemberAction::Add, MemberAction::Remove] {
        let error = apply_members_in_batches(&connector, action, group, &members)
            .await
            .unwrap_err();
        assert!(
            matches!(error, ConnectorError::GroupGone { .. }) && !error.is_retryable(),
            "{action:?}: {error:?}"
        );
        assert!(error.to_string().contains("groupKey"), "{error}");
    }
}

#[tokio::test]
async fn members_go_by_email_once_google_asks_for_it() {
    let fixture = GoogleFixture::start().await;
    fixture.emulator.require_member_email(true);
    let connector = fixture.connector(json!({}));
    let members = create_members(&connector, "member", 3).await;
    let group_id = connector
        .apply_group(group_change(Operation::Create, "g-few", "Few", None))
        .await
        .unwrap()
        .remote_id
        .unwrap();
    let group = GroupRef {
        group_id: "g-few",
        display_name: "Few",
        remote_id: &group_id,
    };
    let before = fixture.emulator.call_counts();
    apply_members_in_batches(&connector, MemberAction::Add, group, &members)
        .await
        .unwrap();
    assert_eq!(
        calls_between(&before, &fixture.emulator.call_counts()),
        calls(&[("directory.members.insert", 4), ("directory.users.get", 3)]),
        "the first id is refused once; from then on each member costs a users.get more"
    );
    assert_eq!(
        fixture.emulator.member_emails_of(&group_id),
        vec!["member-0@example.com", "member-1@example.com", "member-2@example.com"]
    );
    let bodies: Vec<_> = fixture
        .emulator
        .group_requests()
        .into_iter()
        .filter(|request| request.method_id == "directory.members.insert")
        .map(|request| request.body)
        .collect();
    assert_eq!(
        bodies,
        vec![
            json!({"id": members[0].remote_id, "role": "MEMBER"}),
            json!({"email": "member-0@example.com", "role": "MEMBER"}),
            json!({"email": "member-1@example.com", "role": "MEMBER"}),
            json!({"email": "member-2@example.com", "role": "MEMBER"}),
        ]
    );
    assert_group_bodies_fit_discovery_document(&fixture.emulator, true);
}

#[tokio::test]
async fn a_delegation_without_the_group_scope_still_provisions_users() {
    let fixture = GoogleFixture::start().await;
    // The emulated delegation grants the directory's user and group scopes only.
    let connector = fixture.connector(json!({"group_scopes": ["https://www.googleapis.com/auth/cloud-platform"]}));
    let alice = user_event("user.created", "u-alice", json!({"userName": "alice"}));
    assert_eq!(
        connector.apply(alice.change(Operation::Create)).await.unwrap().outcome,
        Outcome::Created
    );
    let error = connector
        .apply_group(group_change(Operation::Create, "g-eng", "Engineering", None))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ConnectorError::Auth { .. }) && !error.is_retryable(),
        "{error:?}"
    );
    assert!(error.to_string().contains("unauthorized_client"), "{error}");
    let renamed = user_event(
        "user.updated",
        "u-alice",
        json!({"userName": "alice", "name": {"givenName": "Alice", "familyName": "Adams"}}),
    );
    assert_eq!(
        connector
            .apply(renamed.change(Operation::Update))
            .await
            .unwrap()
            .outcome,
        Outcome::Updated,
        "the refused group token leaves the user token alone"
    );
    assert_eq!(fixture.emulator.group_count(), 0);
}
