//! Routing: event → tenant → provider → bindings, with the JIT flag and CEL rules.
//!
//! Mirrors WSO2: an event's `service_provider` selects that application's bindings;
//! an absent or unconfigured one falls back to the tenant's resident (organisation-level)
//! provider. A binding's `rule` is WSO2's XACML "Enable Rules" done in CEL; an error in a
//! rule denies the binding, as WSO2 does, and says why in the result.

use std::collections::HashMap;
use std::sync::Arc;

use cel_interpreter::{Context, Program, Value};

use crate::event::{Event, EventType};
use crate::settings::{BindingSettings, Problem, Settings};

/// One binding, ready to evaluate.
pub struct Binding {
    pub connector: String,
    pub blocking: bool,
    pub jit_outbound: bool,
    rule: Option<CompiledRule>,
}

impl Binding {
    /// The binding of work routed already: a parked operation read back from its retry
    /// topic (routed when it was accepted), or a membership (routed as its group's
    /// event). It is not routed again.
    pub fn routed(connector: &str, blocking: bool) -> Binding {
        Binding {
            connector: connector.to_string(),
            blocking,
            jit_outbound: true,
            rule: None,
        }
    }
}

struct CompiledRule {
    source: String,
    program: Program,
}

struct TenantRoutes {
    resident: Vec<Arc<Binding>>,
    service_providers: HashMap<String, Vec<Arc<Binding>>>,
}

pub struct Router {
    tenants: HashMap<String, TenantRoutes>,
}

/// What to do with one event.
pub enum Routing {
    /// The tenant is not configured: nothing to do, and the result says so.
    UnknownTenant,
    Plan {
        /// `resident` or the service provider's name.
        provider: String,
        steps: Vec<Step>,
    },
}

pub struct Step {
    pub binding: Arc<Binding>,
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply,
    Skip {
        reason: String,
    },
    /// The rule could not be evaluated; the binding is denied.
    RuleError {
        message: String,
    },
}

impl Router {
    /// Compiles every rule; a rule that does not parse is a configuration problem.
    pub fn new(settings: &Settings) -> Result<Router, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut compile = |key: String, bindings: &[BindingSettings]| -> Vec<Arc<Binding>> {
            bindings
                .iter()
                .enumerate()
                .map(|(index, binding)| {
                    let rule = binding.rule.as_ref().and_then(|source| match compile_rule(source) {
                        Ok(program) => Some(CompiledRule {
                            source: source.clone(),
                            program,
                        }),
                        Err(error) => {
                            problems.push(Problem {
                                key: format!("{key}.bindings[{index}].rule"),
                                message: format!("is not a valid CEL expression: {error}"),
                            });
                            None
                        }
                    });
                    Arc::new(Binding {
                        connector: binding.connector.clone(),
                        blocking: binding.blocking,
                        jit_outbound: binding.jit_outbound,
                        rule,
                    })
                })
                .collect()
        };
        let mut tenants = HashMap::new();
        for (tenant_name, tenant) in &settings.tenants {
            let tenant_key = format!("tenants.{tenant_name}");
            let resident = compile(format!("{tenant_key}.resident"), &tenant.resident.bindings);
            let service_providers = tenant
                .service_providers
                .iter()
                .map(|(name, provider)| {
                    let mut bindings = compile(format!("{tenant_key}.service_providers.{name}"), &provider.bindings);
                    if provider.inherit_resident {
                        for inherited in &resident {
                            if !bindings.iter().any(|binding| binding.connector == inherited.connector) {
                                bindings.push(inherited.clone());
                            }
                        }
                    }
                    (name.clone(), bindings)
                })
                .collect();
            tenants.insert(
                tenant_name.clone(),
                TenantRoutes {
                    resident,
                    service_providers,
                },
            );
        }
        if problems.is_empty() {
            Ok(Router { tenants })
        } else {
            Err(problems)
        }
    }

    pub fn route(&self, event: &Event) -> Routing {
        let envelope = event.envelope();
        let Some(tenant) = self.tenants.get(envelope.tenant) else {
            return Routing::UnknownTenant;
        };
        let (provider, bindings) = match envelope
            .service_provider
            .and_then(|name| tenant.service_providers.get_key_value(name))
        {
            Some((name, bindings)) => (name.clone(), bindings),
            None => ("resident".to_string(), &tenant.resident),
        };
        let mut rule_context = None;
        let steps = bindings
            .iter()
            .map(|binding| {
                let decision = if envelope.event_type == EventType::UserJitProvisioned && !binding.jit_outbound {
                    Decision::Skip {
                        reason: "JIT-provisioned user and jit_outbound is off for this binding".into(),
                    }
                } else if let Some(rule) = &binding.rule {
                    let context = rule_context.get_or_insert_with(|| rule_context_for(event));
                    match context {
                        Ok(context) => evaluate(rule, context),
                        Err(message) => Decision::RuleError {
                            message: message.clone(),
                        },
                    }
                } else {
                    Decision::Apply
                };
                Step {
                    binding: binding.clone(),
                    decision,
                }
            })
            .collect();
        Routing::Plan { provider, steps }
    }
}

/// The CEL parser (antlr4rust) panics on some malformed input instead of returning an
/// error, so compilation runs under `catch_unwind` and the panic becomes a config error.
fn compile_rule(source: &str) -> Result<Program, String> {
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let compiled = std::panic::catch_unwind(|| Program::compile(source));
    std::panic::set_hook(previous_hook);
    match compiled {
        Ok(Ok(program)) => Ok(program),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("the expression is malformed".to_string()),
    }
}

fn evaluate(rule: &CompiledRule, context: &Context<'_>) -> Decision {
    // Evaluation is guarded too: a rule must never take a worker down.
    let executed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rule.program.execute(context)));
    let Ok(executed) = executed else {
        return Decision::RuleError {
            message: format!("rule `{}` could not be evaluated", rule.source),
        };
    };
    match executed {
        Ok(Value::Bool(true)) => Decision::Apply,
        Ok(Value::Bool(false)) => Decision::Skip {
            reason: format!("rule is false: {}", rule.source),
        },
        Ok(other) => Decision::RuleError {
            message: format!("rule `{}` returned {other:?}, not a bool", rule.source),
        },
        Err(error) => Decision::RuleError {
            message: format!("rule `{}` failed: {error}", rule.source),
        },
    }
}

/// The variables a rule can see: `user`, `roles`, `groups`, `attributes`, `group`,
/// `tenant`, `service_provider`, `identity_provider` and `type`. A user's event has a
/// `group` with empty `id` and `displayName`; a group's event has its `group` (`id`,
/// `displayName`), a `user` with empty `id` and `userName`, and empty `roles`, `groups`
/// and `attributes`. Absent optional values are empty
/// strings, so rules can compare without null checks.
fn rule_context_for(event: &Event) -> Result<Context<'static>, String> {
    let envelope = event.envelope();
    let empty_map = || Ok(Value::Map(std::collections::HashMap::<String, Value>::new().into()));
    // Absent: empty strings, so that `group.displayName == 'Sales'` is false for a
    // user's event, not an error (an error would deny the binding).
    let no_group = || {
        to_cel(&serde_json::json!({
            "id": "",
            "displayName": "",
        }))
    };
    let no_user = || {
        to_cel(&serde_json::json!({
            "id": "",
            "userName": "",
        }))
    };
    let empty_list = || Ok(Value::List(Vec::new().into()));
    let (user, roles, groups, attributes, group, identity_provider) = match event {
        Event::User(event) => {
            let user = &event.data.user;
            (
                to_cel(user),
                to_cel(&user.roles),
                to_cel(&user.groups),
                to_cel(&user.attributes),
                no_group(),
                event.data.identity_provider.clone().unwrap_or_default(),
            )
        }
        Event::Group(event) => (
            no_user(),
            empty_list(),
            empty_list(),
            empty_map(),
            to_cel(&serde_json::json!({
                "id": event.data.group.id,
                "displayName": event.data.group.display_name,
            })),
            String::new(),
        ),
        // Never routed (its group's event was); the same view, for completeness.
        Event::Membership(record) => (
            no_user(),
            empty_list(),
            empty_list(),
            empty_map(),
            to_cel(&serde_json::json!({
                "id": record.group.id,
                "displayName": record.group.display_name,
            })),
            String::new(),
        ),
    };
    let mut context = Context::default();
    let variables: [(&str, Result<Value, String>); 9] = [
        ("user", user),
        ("roles", roles),
        ("groups", groups),
        ("attributes", attributes),
        ("group", group),
        ("tenant", Ok(Value::from(envelope.tenant.to_string()))),
        (
            "service_provider",
            Ok(Value::from(envelope.service_provider.unwrap_or_default().to_string())),
        ),
        ("identity_provider", Ok(Value::from(identity_provider))),
        ("type", Ok(Value::from(envelope.event_type.as_str().to_string()))),
    ];
    for (name, value) in variables {
        context.add_variable_from_value(name, value?);
    }
    Ok(context)
}

/// serde → CEL through JSON, so every event field converts the same way.
fn to_cel<T: serde::Serialize>(value: &T) -> Result<Value, String> {
    let json = serde_json::to_value(value).map_err(|error| error.to_string())?;
    cel_interpreter::to_value(json).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::from_toml_str(
            r#"
            [kafka]
            bootstrap_servers = "127.0.0.1:9092"

            [connectors.directory]
            type = "scim2"
            base_url = "http://127.0.0.1:1/scim/v2"

            [connectors.crm]
            type = "scim2"
            base_url = "http://127.0.0.1:2/scim/v2"

            [[tenants.acme.resident.bindings]]
            connector = "directory"
            blocking = true

            [[tenants.acme.service_providers.portal.bindings]]
            connector = "crm"
            jit_outbound = true
            rule = "'sales' in roles && attributes.department == 'EMEA'"
            "#,
        )
        .unwrap()
    }

    fn event(service_provider: Option<&str>, event_type: &str, roles: &[&str]) -> Event {
        let document = serde_json::json!({
            "specversion": "1.0", "id": "e", "source": "s", "type": event_type,
            "data": {
                "tenant": "acme",
                "service_provider": service_provider,
                "user": {"id": "u", "userName": "alice", "roles": roles, "attributes": {"department": "EMEA"}}
            }
        });
        crate::event::decode(Some(document.to_string().as_bytes()), &[], 1 << 20).unwrap()
    }

    fn decisions(routing: Routing) -> Vec<(String, Decision)> {
        match routing {
            Routing::UnknownTenant => panic!("tenant should be known"),
            Routing::Plan { steps, .. } => steps
                .into_iter()
                .map(|step| (step.binding.connector.clone(), step.decision))
                .collect(),
        }
    }

    #[test]
    fn absent_or_unknown_service_provider_falls_back_to_resident() {
        let router = Router::new(&settings()).unwrap();
        for provider in [None, Some("unknown-app")] {
            let routed = decisions(router.route(&event(provider, "user.created", &[])));
            assert_eq!(routed, vec![("directory".to_string(), Decision::Apply)]);
        }
    }

    #[test]
    fn rules_select_bindings() {
        let router = Router::new(&settings()).unwrap();
        let sales = decisions(router.route(&event(Some("portal"), "user.created", &["sales"])));
        assert_eq!(sales, vec![("crm".to_string(), Decision::Apply)]);
        let other = decisions(router.route(&event(Some("portal"), "user.created", &["support"])));
        assert!(matches!(&other[0].1, Decision::Skip { reason } if reason.contains("rule is false")));
    }

    #[test]
    fn jit_events_need_jit_outbound() {
        let router = Router::new(&settings()).unwrap();
        let resident = decisions(router.route(&event(None, "user.jit_provisioned", &[])));
        assert!(matches!(&resident[0].1, Decision::Skip { .. }));
        let portal = decisions(router.route(&event(Some("portal"), "user.jit_provisioned", &["sales"])));
        assert_eq!(portal[0].1, Decision::Apply);
    }

    #[test]
    fn unknown_tenant_is_reported() {
        let router = Router::new(&settings()).unwrap();
        let mut other = event(None, "user.created", &[]);
        let Event::User(user) = &mut other else {
            panic!("a user event");
        };
        user.data.tenant = "globex".into();
        assert!(matches!(router.route(&other), Routing::UnknownTenant));
    }

    #[test]
    fn a_rule_sees_the_group_of_a_group_event_and_an_empty_one_for_a_user() {
        let settings = Settings::from_toml_str(
            r#"
            [kafka]
            bootstrap_servers = "127.0.0.1:9092"

            [connectors.scim]
            type = "scim2"
            base_url = "http://127.0.0.1:1/scim/v2"

            [[tenants.acme.resident.bindings]]
            connector = "scim"
            rule = "type.startsWith('user.') || group.displayName.startsWith('app-')"
            "#,
        )
        .unwrap();
        let router = Router::new(&settings).unwrap();
        let group_event = |name: &str| {
            let document = serde_json::json!({
                "specversion": "1.0", "id": "g", "source": "s", "type": "group.created",
                "data": {"tenant": "acme", "group": {"id": "g-1", "displayName": name, "members": []}}
            });
            crate::event::decode(Some(document.to_string().as_bytes()), &[], 1 << 20).unwrap()
        };
        assert_eq!(decisions(router.route(&group_event("app-sales")))[0].1, Decision::Apply);
        assert!(matches!(
            decisions(router.route(&group_event("staff")))[0].1,
            Decision::Skip { .. }
        ));
        assert_eq!(
            decisions(router.route(&event(None, "user.created", &[])))[0].1,
            Decision::Apply
        );
    }

    #[test]
    fn a_rule_that_does_not_parse_names_its_key() {
        let mut settings = settings();
        settings.tenants.get_mut("acme").unwrap().resident.bindings[0].rule = Some("roles.exists(".into());
        let problems = Router::new(&settings).err().unwrap();
        assert_eq!(problems[0].key, "tenants.acme.resident.bindings[0].rule");
    }

    #[test]
    fn a_rule_that_fails_at_run_time_denies_the_binding() {
        let mut settings = settings();
        settings.tenants.get_mut("acme").unwrap().resident.bindings[0].rule = Some("attributes.missing == 1".into());
        let router = Router::new(&settings).unwrap();
        let routed = decisions(router.route(&event(None, "user.created", &[])));
        assert!(matches!(&routed[0].1, Decision::RuleError { .. }), "{routed:?}");
    }
}
