//! Google's Admin SDK Directory discovery document, and checks of request bodies against
//! its schemas: what the Google tests use to show that a body Google would accept.

use std::path::PathBuf;

use provisioner::devtools::emulators::google::GoogleEmulator;
use serde_json::{json, Value};

/// The discovery document `scripts/test` installs with google-api-python-client
/// (`GOOGLE_DISCOVERY_DOC`, else found in the test cache).
pub fn discovery_document() -> Value {
    let path = std::env::var("GOOGLE_DISCOVERY_DOC").map(PathBuf::from).unwrap_or_else(|_| {
        let cache = PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/provisioner");
        std::fs::read_dir(&cache)
            .unwrap()
            .filter_map(|entry| {
                let candidate = entry
                    .ok()?
                    .path()
                    .join("lib/python3.11/site-packages/googleapiclient/discovery_cache/documents/admin.directory_v1.json");
                candidate.exists().then_some(candidate)
            })
            .next()
            .expect("admin.directory_v1.json: run scripts/test, which installs google-api-python-client")
    });
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The schema of the request body of `method_id` (e.g. `directory.members.insert`).
pub fn request_schema(document: &Value, method_id: &str) -> Value {
    let [_, resource, method] = method_id.split('.').collect::<Vec<_>>()[..] else {
        panic!("{method_id}: not a directory method id");
    };
    let reference = document
        .pointer(&format!("/resources/{resource}/methods/{method}/request/$ref"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{method_id} takes no request body in the discovery document"));
    document["schemas"][reference].clone()
}

/// Checks `value` against a discovery-document schema; fields typed `any` that have a
/// companion schema (externalIds → UserExternalId) are checked against it too.
pub fn check(document: &Value, schema: &Value, value: &Value, path: &str, problems: &mut Vec<String>) {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        return check(document, &document["schemas"][reference], value, path, problems);
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(object) = value.as_object() else {
                return problems.push(format!("{path}: not an object"));
            };
            for (field, field_value) in object {
                let field_path = format!("{path}.{field}");
                match schema.pointer(&format!("/properties/{field}")) {
                    Some(field_schema) => {
                        let companion = match field.as_str() {
                            "externalIds" => Some(json!({"type": "array", "items": {"$ref": "UserExternalId"}})),
                            _ => None,
                        };
                        check(
                            document,
                            companion.as_ref().unwrap_or(field_schema),
                            field_value,
                            &field_path,
                            problems,
                        );
                    }
                    None => problems.push(format!("{field_path}: not in Google's schema")),
                }
            }
        }
        Some("array") => match value.as_array() {
            Some(items) => {
                for (index, item) in items.iter().enumerate() {
                    check(document, &schema["items"], item, &format!("{path}[{index}]"), problems);
                }
            }
            None => problems.push(format!("{path}: not an array")),
        },
        Some("string") if !value.is_string() => problems.push(format!("{path}: not a string")),
        Some("boolean") if !value.is_boolean() => problems.push(format!("{path}: not a boolean")),
        _ => {}
    }
}

/// Fields the discovery document marks required for `method_id` (e.g.
/// `directory.users.insert`) that `value` lacks.
pub fn required_for(
    document: &Value,
    method_id: &str,
    schema: &Value,
    value: &Value,
    path: &str,
    problems: &mut Vec<String>,
) {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => &document["schemas"][reference],
        None => schema,
    };
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (field, field_schema) in properties {
        let required = field_schema
            .pointer("/annotations/required")
            .and_then(Value::as_array)
            .is_some_and(|methods| methods.iter().any(|method| method == method_id));
        match value.get(field) {
            None if required => problems.push(format!("{path}.{field}: required on {method_id}")),
            Some(field_value) => required_for(
                document,
                method_id,
                field_schema,
                field_value,
                &format!("{path}.{field}"),
                problems,
            ),
            None => {}
        }
    }
}

/// Every body the emulator's groups and members endpoints received fits the request
/// schema of its method in Google's discovery document; with `all_accepted`, each also
/// has the fields the document requires for its method.
pub fn assert_group_bodies_fit_discovery_document(emulator: &GoogleEmulator, all_accepted: bool) {
    let document = discovery_document();
    let requests = emulator.group_requests();
    assert!(!requests.is_empty());
    let mut problems = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        let schema = request_schema(&document, request.method_id);
        let path = format!("request {index} ({})", request.method_id);
        check(&document, &schema, &request.body, &path, &mut problems);
        if all_accepted {
            required_for(
                &document,
                request.method_id,
                &schema,
                &request.body,
                &path,
                &mut problems,
            );
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
