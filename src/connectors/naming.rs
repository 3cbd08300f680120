//! WSO2-compatible account names for Google and Salesforce.
//!
//! The pattern holds tokens `{UN}` (user name without its user-store domain), `{UD}`
//! (user-store domain), `{TD}` (tenant) and `{IDP}` (identity provider). Adjacent tokens
//! are joined with the separator, which is stripped from the domain, tenant and IdP
//! values; empty tokens vanish with their separator. The result is lower-cased; if it
//! does not already end with `@domain`, any `@` becomes `.` and `@domain` is appended
//! (WSO2's `buildUserId`). Characters an email local part cannot hold become `_`.

use serde::{Deserialize, Serialize};

use crate::domain::UserChange;

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
        let mut rest = self.pattern.as_str();
        while let Some(start) = rest.find('{') {
            let Some(end) = rest[start..].find('}') else {
                problem(format!("{key}.pattern"), "has an unclosed `{`".into());
                break;
            };
            let token = &rest[start..start + end + 1];
            if !["{UN}", "{UD}", "{TD}", "{IDP}"].contains(&token) {
                problem(
                    format!("{key}.pattern"),
                    format!("unknown token {token}; use {{UN}}, {{UD}}, {{TD}} or {{IDP}}"),
                );
            }
            rest = &rest[start + end + 1..];
        }
    }
}

fn default_pattern() -> String {
    "{UN}".into()
}
fn default_separator() -> String {
    "_".into()
}

/// The user name without a `DOMAIN/` prefix.
pub fn bare_user_name(user_name: &str) -> &str {
    user_name.split_once('/').map_or(user_name, |(_, name)| name)
}

pub fn account_name(pattern: &AccountNamePattern, change: &UserChange<'_>, domain: &str) -> String {
    let user = change.user;
    let separator = pattern.separator.as_str();
    let strip = |value: &str| {
        if separator.is_empty() {
            value.to_string()
        } else {
            value.replace(separator, "")
        }
    };
    let user_store_domain = user
        .user_name
        .split_once('/')
        .map(|(domain, _)| domain.to_string())
        .or_else(|| user.user_store_domain.clone())
        .unwrap_or_default();
    let mut local = String::new();
    let mut previous_was_token = false;
    let mut rest = pattern.pattern.as_str();
    while !rest.is_empty() {
        let token_value = [
            ("{UN}", bare_user_name(&user.user_name).to_string()),
            ("{UD}", strip(&user_store_domain)),
            ("{TD}", strip(change.tenant)),
            ("{IDP}", strip(change.identity_provider.unwrap_or_default())),
        ]
        .into_iter()
        .find(|(token, _)| rest.starts_with(token));
        match token_value {
            Some((token, value)) => {
                if !value.is_empty() {
                    if previous_was_token {
                        local.push_str(separator);
                    }
                    local.push_str(&value);
                    previous_was_token = true;
                }
                rest = &rest[token.len()..];
            }
            None => {
                let character = rest.chars().next().expect("non-empty");
                local.push(character);
                previous_was_token = false;
                rest = &rest[character.len_utf8()..];
            }
        }
    }
    let mut name = local.to_lowercase();
    let suffix = format!("@{}", domain.to_lowercase());
    if !name.ends_with(&suffix) {
        name = name.replace('@', ".");
        name = sanitize_local_part(&name);
        name.push_str(&suffix);
    }
    name
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Operation, User};

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
}
