//! The README's first command: `provisioner demo` runs to a correct summary and exits 0.

use std::process::Command;

#[test]
fn the_demo_runs_to_a_summary_and_exits_zero() {
    let output = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["demo", "--users", "12", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\n{stdout}\n{stderr}", output.status);
    // 12 users: 12 creates, 6 updates, 3 deletes; a group with one member on all three
    // targets (one membership result each).
    assert!(
        stdout.contains("25/25 events and memberships have their complete result"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "targets now hold: SCIM group members 1, Google group members 1, Salesforce Sales_Access assignments 1"
        ),
        "the group and its member on every target: {stdout}"
    );
    assert!(stdout.contains("corp_directory"), "{stdout}");
    assert!(
        stdout.contains("created=12"),
        "every user reached the corporate directory: {stdout}"
    );
    assert!(
        stdout.contains("\"status\": \"succeeded\""),
        "a blocking round trip is shown: {stdout}"
    );
    assert!(stdout.contains("dead letters: 1"), "{stdout}");
    assert!(stdout.contains("/metrics"), "{stdout}");
}
