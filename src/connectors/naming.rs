//! WSO2-compatible account names for Google and Salesforce, and Google group addresses.
//!
//! The user pattern holds tokens `{UN}` (user name without its user-store domain), `{UD}`
//! (user-store domain), `{TD}` (tenant) and `{IDP}` (identity provider). Adjacent tokens
//! are joined with the separator, which is stripped from the domain, tenant and IdP
//! values; empty tokens vanish with their separator. The result is lower-cased; if it
//! does not already end with `@domain`, any `@` becomes `.` and `@domain` is appended
//! (WSO2's `buildUserId`). Characters an email local part cannot hold become `_`.
//!
//! The group pattern works the same way with `{GN}` (the group's display name as a slug),
//! `{GID}` (the group's source id) and `{TD}`, and is then held to Google's rules for an
//! address: no leading, trailing or doubled period, at most 64 characters before the `@`.

use serde::{Deserialize, Serialize};

use crate::domain::{GroupChange, UserChange};

/// Google's limit on the part of an address before the `@`.
pub const MAX_LOCAL_PART_CHARACTERS: usize = 64;

/// The tokens a user pattern may hold.
const USER_TOKENS: [&str; 4] = ["{UN}", "{UD}", "{TD}", "{IDP}"];
/// The tokens a group pattern may hold.
const GROUP_TOKENS: [&str; 3] = ["{GN}", "{GID}", "{TD}"];

/// WSO2-compatible account-name pattern shared by Google and Salesforce.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountNamePattern {
    /// Tokens: `{UN}` user name, `{UD}` user-store domain, `{TD}` tenant, `{IDP}` IdP.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    #[serde(default = "default_separator")]
    pub separator: String,
}

impl Default for AccountNamePattern {
    fn default() -> Self {
        Self {
            pattern: default_pattern(),
            separator: default_separator(),
        }
    }
}

impl AccountNamePattern {
    /// Problems serde cannot see, each with its full key under `key`.
    pub fn check(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        if !self.pattern.contains("{UN}") {
            problem(format!("{key}.pattern"), "must contain {UN}".into());
        }
        check_tokens(&self.pattern, &USER_TOKENS, &format!("{key}.pattern"), problem);
    }
}

/// The address pattern of Google groups: `{GN}` the display name as a slug, `{GID}` the
/// group's source id, `{TD}` the tenant; `@domain` is appended as for users.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEmailPattern {
    #[serde(default = "default_group_pattern")]
    pub pattern: String,
    #[serde(default = "default_separator")]
    pub separator: String,
}

impl Default for GroupEmailPattern {
    fn default() -> Self {
        Self {
            pattern: default_group_pattern(),
            separator: default_separator(),
        }
    }
}

impl GroupEmailPattern {
    /// Problems serde cannot see, each with its full key under `key`.
    pub fn check(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        if !self.pattern.contains("{GN}") && !self.pattern.contains("{GID}") {
            problem(
                format!("{key}.pattern"),
                "must contain {GN} or {GID}, or every group would get the same address".into(),
            );
        }
        check_tokens(&self.pattern, &GROUP_TOKENS, &format!("{key}.pattern"), problem);
    }
}

fn default_pattern() -> String {
    "{UN}".into()
}
fn default_group_pattern() -> String {
    "{GN}".into()
}
fn default_separator() -> String {
    "_".into()
}

/// Reports each `{…}` in `pattern` that is not one of `allowed`, and an unclosed `{`.
fn check_tokens(pattern: &str, allowed: &[&str], key: &str, problem: &mut impl FnMut(String, String)) {
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            problem(key.to_string(), "has an unclosed `{`".into());
            break;
        };
        let token = &rest[start..start + end + 1];
        if !allowed.contains(&token) {
            problem(
                key.to_string(),
                format!("unknown token {token}; use {}", allowed.join(", ")),
            );
        }
        rest = &rest[start + end + 1..];
    }
}

/// The user name without a `DOMAIN/` prefix.
pub fn bare_user_name(user_name: &str) -> &str {
    user_name.split_once('/').map_or(user_name, |(_, name)| name)
}

pub fn account_name(pattern: &AccountNamePattern, change: &UserChange<'_>, domain: &str) -> String {
    let user = change.user;
    let separator = pattern.separator.as_str();
    let user_store_domain = user
        .user_name
        .split_once('/')
        .map(|(domain, _)| domain.to_string())
        .or_else(|| user.user_store_domain.clone())
        .unwrap_or_default();
    let tokens = [
        ("{UN}", bare_user_name(&user.user_name).to_string()),
        ("{UD}", strip_separator(&user_store_domain, separator)),
        ("{TD}", strip_separator(change.tenant, separator)),
        (
            "{IDP}",
            strip_separator(change.identity_provider.unwrap_or_default(), separator),
        ),
    ];
    let mut name = fill(&pattern.pattern, separator, &tokens).to_lowercase();
    let suffix = format!("@{}", domain.to_lowercase());
    if !name.ends_with(&suffix) {
        name = name.replace('@', ".");
        name = sanitize_local_part(&name);
        name.push_str(&suffix);
    }
    name
}

/// The Google address of a group: the pattern filled in, held to Google's rules for a
/// local part, then `@domain`. A display name with nothing Google can use in an address
/// (only symbols, or a script other than Latin) stands in as its group id.
pub fn group_email(pattern: &GroupEmailPattern, change: &GroupChange<'_>, domain: &str) -> String {
    let separator = pattern.separator.as_str();
    let mut name_slug = slug(change.display_name);
    if name_slug.is_empty() {
        name_slug = slug(change.group_id);
    }
    let tokens = [
        ("{GN}", name_slug),
        ("{GID}", change.group_id.to_string()),
        ("{TD}", strip_separator(change.tenant, separator)),
    ];
    let filled = fill(&pattern.pattern, separator, &tokens).to_lowercase();
    // A pattern may spell the domain out; it is appended below either way.
    let suffix = format!("@{}", domain.to_lowercase());
    let local = filled.strip_suffix(&suffix).unwrap_or(&filled).replace('@', ".");
    format!("{}{suffix}", google_local_part(&sanitize_local_part(&local)))
}

fn strip_separator(value: &str, separator: &str) -> String {
    if separator.is_empty() {
        value.to_string()
    } else {
        value.replace(separator, "")
    }
}

/// Fills `pattern` with the token values: adjacent tokens are joined with `separator`,
/// and an empty token vanishes with its separator.
fn fill(pattern: &str, separator: &str, tokens: &[(&str, String)]) -> String {
    let mut filled = String::new();
    let mut previous_was_token = false;
    let mut rest = pattern;
    while !rest.is_empty() {
        match tokens.iter().find(|(token, _)| rest.starts_with(token)) {
            Some((token, value)) => {
                if !value.is_empty() {
                    if previous_was_token {
                        filled.push_str(separator);
                    }
                    filled.push_str(value);
                    previous_was_token = true;
                }
                rest = &rest[token.len()..];
            }
            None => {
                let character = rest.chars().next().expect("non-empty");
                filled.push(character);
                previous_was_token = false;
                rest = &rest[character.len_utf8()..];
            }
        }
    }
    filled
}

fn sanitize_local_part(local: &str) -> String {
    local
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-' | '\'') {
                character
            } else {
                '_'
            }
        })
        .collect()
}

/// A display name as a piece of an address: lower-case ASCII letters and digits, with
/// every run of anything else (spaces, punctuation, other scripts) as one `-`, none at
/// either end. "R&D Team (EU)" → `r-d-team-eu`.
pub fn slug(display_name: &str) -> String {
    let mut slug = String::new();
    for character in display_name.chars() {
        if character.is_ascii_alphanumeric() {
            slug.push(character.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    slug.trim_end_matches('-').to_string()
}

/// Google's rules for the part of an address before the `@`: no period at either end,
/// no two in a row, at most 64 characters.
fn google_local_part(local: &str) -> String {
    let mut cleaned = String::new();
    for character in local.chars() {
        if character == '.' && (cleaned.is_empty() || cleaned.ends_with('.')) {
            continue;
        }
        cleaned.push(character);
    }
    let cut: String = cleaned.chars().take(MAX_LOCAL_PART_CHARACTERS).collect();
    cut.trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{GroupChange, Operation, User};

    /// A user of tenant `carbon.super`, federated through `idp` when given.
    struct Subject {
        user: User,
        idp: Option<&'static str>,
    }

    impl Subject {
        fn change(&self, operation: Operation) -> UserChange<'_> {
            UserChange {
                operation,
                event_id: "e",
                tenant: "carbon.super",
                identity_provider: self.idp,
                user: &self.user,
                remote_id: None,
            }
        }
    }

    fn event(user_name: &str, domain: Option<&str>, idp: Option<&'static str>) -> Subject {
        let user = serde_json::json!({"id": "u", "userName": user_name, "userStoreDomain": domain});
        Subject {
            user: serde_json::from_value(user).unwrap(),
            idp,
        }
    }

    fn pattern(pattern: &str, separator: &str) -> AccountNamePattern {
        AccountNamePattern {
            pattern: pattern.into(),
            separator: separator.into(),
        }
    }

    #[test]
    fn wso2_patterns() {
        let alice = event("Alice", Some("PRIMARY"), None);
        assert_eq!(
            account_name(&pattern("{UN}", "_"), &alice.change(Operation::Create), "example.com"),
            "alice@example.com"
        );
        assert_eq!(
            account_name(
                &pattern("{UD}{UN}", "_"),
                &alice.change(Operation::Create),
                "example.com"
            ),
            "primary_alice@example.com"
        );
        assert_eq!(
            account_name(
                &pattern("{UN}{TD}", "_"),
                &alice.change(Operation::Create),
                "example.com"
            ),
            "alice_carbon.super@example.com"
        );
        let federated = event("bob@partner.org", None, Some("Partner_IdP"));
        assert_eq!(
            account_name(
                &pattern("{UN}{IDP}", "_"),
                &federated.change(Operation::Create),
                "example.com"
            ),
            "bob.partner.org_partneridp@example.com",
            "@ becomes . and the separator is stripped from the IdP"
        );
        let already = event("carol@example.com", None, None);
        assert_eq!(
            account_name(&pattern("{UN}", "_"), &already.change(Operation::Create), "example.com"),
            "carol@example.com"
        );
        let domain_prefixed = event("SECONDARY/dave", None, None);
        assert_eq!(
            account_name(
                &pattern("{UD}.{UN}", "_"),
                &domain_prefixed.change(Operation::Create),
                "example.com"
            ),
            "secondary.dave@example.com"
        );
    }

    #[test]
    fn hostile_characters_cannot_escape_the_local_part() {
        let hostile = event("eve smith'/../x\"@evil.com", None, Some("Evil IdP"));
        let name = account_name(
            &pattern("{UN}{IDP}", "_"),
            &hostile.change(Operation::Create),
            "example.com",
        );
        assert!(name.ends_with("@example.com"), "{name}");
        assert_eq!(name.matches('@').count(), 1, "{name}");
        assert!(
            !name.contains(' ') && !name.contains('/') && !name.contains('"'),
            "{name}"
        );
    }

    fn group(group_id: &'static str, display_name: &'static str) -> GroupChange<'static> {
        GroupChange {
            operation: Operation::Create,
            event_id: "e",
            tenant: "carbon.super",
            group_id,
            display_name,
            remote_id: None,
        }
    }

    fn group_pattern(pattern: &str) -> GroupEmailPattern {
        GroupEmailPattern {
            pattern: pattern.into(),
            separator: "_".into(),
        }
    }

    #[test]
    fn group_addresses_slug_the_display_name() {
        let default = GroupEmailPattern::default();
        assert_eq!(
            group_email(&default, &group("g-1", "Engineering"), "Example.com"),
            "engineering@example.com"
        );
        assert_eq!(
            group_email(&default, &group("g-1", "  R&D Team (EU) "), "example.com"),
            "r-d-team-eu@example.com"
        );
        assert_eq!(
            group_email(&default, &group("g-1", "Équipe Ventes"), "example.com"),
            "quipe-ventes@example.com",
            "letters Google cannot take drop out"
        );
        assert_eq!(
            group_email(&default, &group("7F3C-11", "研发"), "example.com"),
            "7f3c-11@example.com",
            "a name with nothing usable stands in as its id"
        );
        assert_eq!(
            group_email(&group_pattern("grp.{GN}{GID}"), &group("g-1", "Sales"), "example.com"),
            "grp.sales_g-1@example.com"
        );
        assert_eq!(
            group_email(&group_pattern("{GN}{TD}"), &group("g-1", "Sales"), "example.com"),
            "sales_carbon.super@example.com"
        );
        assert_eq!(
            group_email(
                &group_pattern("{GN}@example.com"),
                &group("g-1", "Sales"),
                "example.com"
            ),
            "sales@example.com",
            "a pattern may spell the domain out"
        );
    }

    #[test]
    fn group_addresses_keep_to_googles_rules() {
        let hostile = group("../x\"@evil.com", "..a..b..");
        let email = group_email(&group_pattern("{GID}.{GN}."), &hostile, "example.com");
        assert_eq!(email, "_x_.evil.com.a-b@example.com");
        assert_eq!(email.matches('@').count(), 1);
        let long = group(
            "g",
            "a very long group name that goes on and on well past what google takes",
        );
        let email = group_email(&GroupEmailPattern::default(), &long, "example.com");
        let local = email.strip_suffix("@example.com").unwrap();
        assert_eq!(local.chars().count(), MAX_LOCAL_PART_CHARACTERS, "{email}");
    }

    #[test]
    fn group_patterns_are_checked() {
        let mut problems = Vec::new();
        group_pattern("{GN}{UN}").check("connectors.g.group_email", &mut |key, message| {
            problems.push(format!("{key}: {message}"))
        });
        group_pattern("static").check("connectors.g.group_email", &mut |key, message| {
            problems.push(format!("{key}: {message}"))
        });
        assert_eq!(
            problems,
            vec![
                "connectors.g.group_email.pattern: unknown token {UN}; use {GN}, {GID}, {TD}",
                "connectors.g.group_email.pattern: must contain {GN} or {GID}, or every group would get the same address",
            ]
        );
    }
}
